"""What happened to one slide: the row every command prints and every flow returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ._errors import WsiflowError
from ._mpp import MppResolution

__all__ = ["SlideOutcome", "SlideStatus"]

SlideStatus = Literal["done", "reused", "failed"]


@dataclass(frozen=True)
class SlideOutcome:
    """One slide's outcome. ``slide_id`` is None when the slide could not even be read."""

    slide_id: str | None
    status: SlideStatus
    result_dir: Path | None
    tiles: int | None
    error: WsiflowError | None = None
    tiles_per_s: float | None = None
    chunks_computed: int = 0
    chunks_total: int = 0
    mpp: MppResolution | None = None
    """The µm/px used and where it came from (None when the slide failed before that)."""
    model: str | None = None
    """``name@version`` of the model used."""

    def to_json(self) -> dict[str, Any]:
        """The documented row shape of ``run --json`` and ``batch --json`` (see README)."""
        return {
            "slide_id": self.slide_id,
            "status": self.status,
            "result_dir": str(self.result_dir) if self.result_dir else None,
            "model": self.model,
            "tiles": self.tiles,
            "tiles_per_s": self.tiles_per_s,
            "chunks_computed": self.chunks_computed,
            "chunks_total": self.chunks_total,
            "mpp": self.mpp.to_json() if self.mpp else None,
            "error": {"kind": self.error.kind, "message": self.error.message, "hint": self.error.hint}
            if self.error else None,
        }
