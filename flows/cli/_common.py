"""Helpers shared by the CLI commands: exit codes, argument types and the argument parser."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import NoReturn

from pipeline import ConfigError

__all__ = [
    "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "OneLineArgumentParser", "mpp_arg", "positive_int",
    "ctrl_c_stops_this_process",
]

EXIT_OK = 0
EXIT_FAILED = 1
"""At least one slide/model/image failed; the rest were processed."""
EXIT_USAGE = 2
"""Bad arguments or config; nothing was processed."""
EXIT_INTERRUPTED = 130
"""Stopped by Ctrl-C (128 + SIGINT, as shells report it)."""


def ctrl_c_stops_this_process() -> None:
    """Make SIGINT raise ``KeyboardInterrupt`` here even when this process was started with
    it ignored (a non-interactive shell's ``cmd &``, some CI runners and supervisors): a
    long-running command (``serve``, ``pacs watch``) must stop cleanly on Ctrl-C or
    ``kill -INT`` as ``run`` does, not keep its deployment scheduled until SIGKILL."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors read like every other wsiflow error: one line,
    ``wsiflow: error config: ... -- <remedy>``, exit 2 (argparse prints the usage block
    and ``prog: error: ...`` instead)."""

    def error(self, message: str) -> NoReturn:
        error = ConfigError(message, hint=f"see `{self.prog} --help` for the arguments it takes")
        print(f"wsiflow: error {error.one_line()}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def mpp_arg(text: str) -> tuple[float, float]:
    """``0.25`` or ``0.25,0.26`` (x,y) µm/px."""
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of µm/px, e.g. 0.25") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise argparse.ArgumentTypeError(f"{text!r}: give X or X,Y in µm/px")


def positive_int(text: str) -> int:
    """A whole number >= 1 (refused by argparse, before anything is loaded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value
