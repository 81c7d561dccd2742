"""Sample data for napari: the demo slide with the result ``make demo`` computed."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline import ResultFolder

from ._layers import LayerData
from ._reader import _read_result

__all__ = ["demo_result"]

_ROOT = Path(__file__).resolve().parents[1]


def _find_demo_result() -> Path | None:
    configured = os.environ.get("WSIFLOW_DEMO_OUT")
    out = Path(configured) if configured else _ROOT / "demo-out"
    slides = sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []
    found = [f for p in slides if (f := ResultFolder.find(p / "tissue-qc")) is not None]
    return found[0].path if found else None


def demo_result() -> list[LayerData]:
    """The CMU sample slide with its tissue-qc heatmaps (run ``make demo`` first)."""
    result = _find_demo_result()
    if result is None:
        raise FileNotFoundError(
            "no demo result: run `make demo` in the wsiflow folder (or set WSIFLOW_DEMO_OUT)"
        )
    return _read_result(result)
