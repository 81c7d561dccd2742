"""The ``wsiflow`` command line: parses arguments and config, dispatches to a command.

One module per command (``_run``, ``_batch``, ...); options shared by run, batch and serve
and the one settings builder live in ``_options``; what run and batch print, in ``_report``.

Output never contains slide paths unless the operator asks with ``--show-paths`` (for
their own terminal); errors are one line each, with kind and remedy, and no traceback
unless ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

from pipeline import ConfigError, WsiflowError, apply_offline_env
from privacy import check_audit_log

from .._config import load_config
from .._logs import configure_logging
from ._audit import add_audit_parser, run_audit
from ._batch import add_batch_parser, run_batch_command
from ._common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, OneLineArgumentParser
from ._deid import add_deid_parser, run_deid
from ._export import add_export_parser, run_export
from ._federate import add_federate_parser, run_federate
from ._inspect import add_inspect_parser, run_inspect
from ._models import add_models_parser, run_models
from ._pacs import add_pacs_parser, run_pacs
from ._retry import add_retry_parser, run_retry
from ._run import add_run_parser, run_run
from ._serve import add_serve_parser, add_server_parser, run_serve, run_server
from ._train import add_train_parser, add_validate_parser, run_train, run_validate
from ._view import add_view_parser, run_view

__all__ = ["main", "build_parser"]

_log = logging.getLogger("wsiflow")

_COMMANDS = {
    "inspect": run_inspect,
    "deid": run_deid,
    "models": run_models,
    "run": run_run,
    "batch": run_batch_command,
    "serve": run_serve,
    "server": run_server,
    "retry": run_retry,
    "view": run_view,
    "train": run_train,
    "validate": run_validate,
    "export": run_export,
    "federate": run_federate,
    "audit": run_audit,
    "pacs": run_pacs,
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="wsiflow",
        description="Self-hosted whole-slide image analysis. Nothing leaves this machine.",
    )
    parser.add_argument("--version", action="version", version=f"wsiflow {version('wsiflow')}")
    parser.add_argument("--config", type=Path, help="YAML config (default: $WSIFLOW_CONFIG or built-in)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="show progress logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_inspect_parser(commands)
    add_deid_parser(commands)
    add_run_parser(commands)
    add_batch_parser(commands)
    add_serve_parser(commands)
    add_server_parser(commands)
    add_retry_parser(commands)
    add_view_parser(commands)
    add_models_parser(commands)
    add_train_parser(commands)
    add_validate_parser(commands)
    add_export_parser(commands)
    add_federate_parser(commands)
    add_audit_parser(commands)
    add_pacs_parser(commands)
    return parser


_AUDITED_COMMANDS = frozenset({"run", "batch", "serve", "retry", "deid", "export", "train", "pacs", "federate"})
_AUDITED_MODEL_ACTIONS = frozenset({"verify", "import", "remove", "promote", "rollback", "pack", "trust", "install"})


def _acts_audited(args: argparse.Namespace) -> bool:
    """Whether the command records audit events (it then checks the log before acting)."""
    if args.command == "models":
        if args.models_command == "trust":
            return bool(args.trust_command != "list")
        return args.models_command in _AUDITED_MODEL_ACTIONS
    if args.command == "validate":
        return bool(args.record)  # only a recorded validation changes what promote may do
    return args.command in _AUDITED_COMMANDS


def _serves_deployment(args: argparse.Namespace) -> bool:
    """Whether the command serves a Prefect deployment, whose run logs then show on the console."""
    if args.command == "serve":
        return True
    return bool(args.command == "pacs" and args.pacs_command == "watch" and not args.once)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsiflow`` console script."""
    apply_offline_env()
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING,
                      run_logs=_serves_deployment(args))
    try:
        config = load_config(args.config)
        if _acts_audited(args):
            # Fail closed: nothing happens that a damaged audit log could not record.
            check_audit_log()
        return _COMMANDS[args.command](args, config)
    except WsiflowError as exc:
        print(f"wsiflow: error {exc.one_line()}", file=sys.stderr)
        if args.debug:
            _log.debug("traceback", exc_info=exc)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED
    except KeyboardInterrupt:
        print("wsiflow: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
