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


def configure_logging(level: int) -> None:
    """Set up this process's logging at ``level`` and pass it on to the processes it starts.

    Must run before Prefect or Dask is imported: they read their settings at import.
    """
    name = logging.getLevelName(level)
    logging.basicConfig(level=level, format=_FORMAT, stream=sys.stderr)
    # Libraries (Prefect) set their own loggers to INFO; their records reach the root
    # handler whatever the root's level, so the handler itself must filter.
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
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
