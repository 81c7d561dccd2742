"""What the scheduled looks (the scanner inbox, the PACS watch) share: run names and the
final Prefect state of a look."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

__all__ = ["look_run_name", "look_state"]


def look_run_name(prefix: str, parameter: str, pattern: re.Pattern[str]) -> str:
    """``<prefix>-<ID>-<UTC start time>`` for the flow run under way, so looks of one inbox or
    archive are told apart in the UI; an ID that does not match ``pattern`` (the run will
    fail) is never shown."""
    from prefect.runtime import flow_run

    value = flow_run.get_parameters().get(parameter)
    shown = value if isinstance(value, str) and pattern.fullmatch(value) else "invalid-id"
    return f"{prefix}-{shown}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"


def look_state(failed: int, attempted: int, message: str, data: Any, *, broken: bool = False) -> Any:
    """Failed when the look itself broke or every slide it tried failed, "Partially failed"
    when some did, else Completed; ``message`` is the state's one line."""
    from prefect.states import Completed, Failed

    if broken or (failed and failed == attempted):
        return Failed(message=message, data=data)
    if failed:
        return Failed(name="Partially failed", message=message, data=data)
    return Completed(message=message, data=data)
