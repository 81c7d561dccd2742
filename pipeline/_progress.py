"""How an analysis reports where it is: named stages, then tiles.

A small protocol so that the core never decides how progress looks: the CLI shows stage
lines and a bar, a Prefect task logs, a test records. Stages are logged at INFO here too,
so ``-v`` (and any logging set-up) sees them whatever the reporter does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = ["Progress", "ANALYSIS_STAGES"]

ANALYSIS_STAGES = ("opening", "finding tissue", "classifying", "writing results", "reused")
"""The stages an analysis goes through, in order (``reused`` ends it early)."""


class Progress(Protocol):
    """Receives one slide's progress. Calls come from the thread running the analysis."""

    def stage(self, name: str, detail: str = "") -> None:
        """A stage began (one of :data:`ANALYSIS_STAGES`); ``detail`` is a short human note
        (never a path), e.g. "1,234 tiles in 20 chunks, 5 already done"."""

    def tiles(self, total: int, done: int) -> Callable[[int], None]:
        """Tile classification starts: ``total`` tiles, ``done`` of them already computed
        by an interrupted run. Returns the callback that receives tiles per finished batch."""
