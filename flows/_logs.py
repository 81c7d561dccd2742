"""Log levels for the CLI and every process it starts (analysis child, Dask workers).

Quiet by default (warnings and errors); ``-v`` adds wsiflow's stage and progress logs and
Prefect's and Dask's INFO logs. The level travels to child processes in an environment
variable, because a spawned process does not inherit the parent's logging set-up.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["LOG_LEVEL_ENV", "configure_logging", "configure_child_logging"]

LOG_LEVEL_ENV = "WSIFLOW_LOG_LEVEL"
_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _RunLogsOnTheServer(logging.Filter):
    """Without ``-v``, Prefect's flow- and task-run logs stay on the Prefect server (the UI
    shows them): the terminal gets wsiflow's own line per slide instead of a second copy."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))


def configure_logging(level: int, *, run_logs: bool = False) -> None:
    """Set up this process's logging at ``level`` and pass it on to the processes it starts.

    ``run_logs``: show Prefect's flow- and task-run warnings on the console too (``serve``,
    whose console is the service's log); other commands print their own line per slide.

    Must run before Prefect or Dask is imported: they read their settings at import.
    """
    name = logging.getLevelName(level)
    logging.basicConfig(level=level, format=_FORMAT, stream=sys.stderr)
    # Libraries (Prefect) set their own loggers to INFO; their records reach the root
    # handler whatever the root's level, so the handler itself must filter.
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
        if level > logging.INFO and not run_logs:
            handler.addFilter(_RunLogsOnTheServer())
    os.environ[LOG_LEVEL_ENV] = name
    # Prefect still sends INFO logs to its server (the UI shows them); only the console is quieter.
    for prefect_handler in ("CONSOLE", "CONSOLE_FLOW_RUNS", "CONSOLE_TASK_RUNS"):
        os.environ.setdefault(f"PREFECT_LOGGING_HANDLERS_{prefect_handler}_LEVEL", name)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", name.lower())


def configure_child_logging() -> None:
    """In a child process: the level the CLI chose (WARNING when started otherwise)."""
    name = os.environ.get(LOG_LEVEL_ENV, "WARNING")
    level = logging.getLevelName(name)
    logging.basicConfig(level=level if isinstance(level, int) else logging.WARNING, format=_FORMAT,
                        stream=sys.stderr)
