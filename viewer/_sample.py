"""Sample data for napari: the demo slide with the result ``make demo`` computed."""

from __future__ import annotations

import os
from pathlib import Path

from ._layers import LayerData
from ._reader import _read_result

__all__ = ["demo_result"]

_ROOT = Path(__file__).resolve().parents[1]


def _find_demo_result() -> Path | None:
    configured = os.environ.get("WSIFLOW_DEMO_OUT")
    out = Path(configured) if configured else _ROOT / "demo-out"
    found = sorted(out.glob("*/tissue-qc/latest/result.json")) if out.is_dir() else []
    return found[0].parent if found else None


def demo_result() -> list[LayerData]:
    """The CMU sample slide with its tissue-qc heatmaps (run ``make demo`` first)."""
    result = _find_demo_result()
    if result is None:
        raise FileNotFoundError(
            "no demo result: run `make demo` in the wsiflow folder (or set WSIFLOW_DEMO_OUT)"
        )
    return _read_result(result)
