"""``summary.json``: counts, areas, hotspots, timings and provenance of one result."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib.metadata import version as package_version
from typing import Any

import numpy as np

from ._engine import EngineSettings
from ._grid import TileGrid
from ._overview import choose_overview_class
from ._result import ModelInfo
from ._settings import AnalysisParams
from ._slide import Slide
from ._tables import TileResults
from ._tissue import TissueMask

__all__ = ["SummaryInputs", "build_summary"]


@dataclass(frozen=True)
class SummaryInputs:
    """Everything a summary is computed from (one object instead of a long argument list)."""

    slide_id: str
    model: ModelInfo
    class_names: tuple[str, ...]
    params: AnalysisParams
    grid: TileGrid
    slide: Slide
    results: TileResults
    mask: TissueMask
    engine: EngineSettings
    device: str
    timings: dict[str, object]
    regions: int
    chunk_cells: int
    """The block edge the slide was cut with (``params.chunk_cells``, or chosen per slide)."""
    chunks: int


def _hotspots(inputs: SummaryInputs) -> dict[str, list[dict[str, Any]]]:
    results = inputs.results
    n = len(results.rows)
    cx, cy = results.centre_um()
    hotspots = {}
    for i, name in enumerate(inputs.class_names):
        order: np.ndarray | list[int] = (
            np.argsort(-results.probabilities[:, i], kind="stable")[: inputs.params.hotspots] if n else []
        )
        hotspots[name] = [
            {"row": int(results.rows[k]), "col": int(results.cols[k]), "x_um": round(float(cx[k]), 2),
             "y_um": round(float(cy[k]), 2), "probability": round(float(results.probabilities[k, i]), 6)}
            for k in order
        ]
    return hotspots


def _classes(inputs: SummaryInputs) -> dict[str, dict[str, float | int]]:
    """Per class: tiles predicted, their fraction, and areas of the cells (stride squares clipped
    to the slide, as in results.geojson): predicted (``area_mm2``) and at or above the region
    threshold (``region_area_mm2``, the GeoJSON regions' area)."""
    results = inputs.results
    n = len(results.rows)
    names = inputs.class_names
    counts = np.bincount(results.predicted, minlength=len(names)) if n else np.zeros(len(names), int)
    cell_um2 = results.cell_area_um2()
    predicted = results.predicted
    threshold = inputs.params.region_threshold
    return {
        name: {
            "tiles": int(counts[i]),
            "fraction": round(float(counts[i]) / n, 6) if n else 0.0,
            "area_mm2": round(float(cell_um2[predicted == i].sum()) / 1e6, 6),
            "region_area_mm2": round(float(cell_um2[results.probabilities[:, i] >= threshold].sum()) / 1e6, 6),
            "mean_probability": round(float(results.probabilities[:, i].mean()), 6) if n else 0.0,
        }
        for i, name in enumerate(names)
    }


def build_summary(inputs: SummaryInputs) -> dict[str, Any]:
    """The ``summary.json`` document (read back through ``ResultFolder.read_summary``)."""
    spec = inputs.grid.spec
    stride_um = spec.effective_stride_px * spec.target_mpp
    slide, engine = inputs.slide, inputs.engine
    overview = choose_overview_class(inputs.class_names, inputs.results.probabilities, inputs.params.overview_class)
    return {
        "slide_id": inputs.slide_id,
        "tiles": len(inputs.results.rows),
        "grid": {"rows": inputs.grid.n_rows, "cols": inputs.grid.n_cols, "stride_um": stride_um,
                 "tile_um": spec.tile_size_px * spec.target_mpp},
        "tissue": {"area_mm2": round(inputs.mask.area_mm2, 4), "fraction": round(inputs.mask.fraction, 4),
                   "mask_mpp": inputs.mask.mpp},
        "classes": _classes(inputs),
        "hotspots": _hotspots(inputs),
        "regions": inputs.regions,
        "overview": {"class": overview.class_name, "reason": overview.reason},
        "timings": inputs.timings,
        "chunks": {"cells": inputs.chunk_cells, "count": inputs.chunks},
        "provenance": {
            "wsiflow_version": package_version("wsiflow"),
            "model": {"name": inputs.model.name, "version": inputs.model.version, "sha256": inputs.model.sha256},
            "parameters": {**inputs.params.to_json(), "grid_spec": asdict(spec),
                           "engine": {"batch_size": engine.batch_size, "readers": engine.readers,
                                      "cpu_threads": engine.cpu_threads}},
            "mpp": slide.mpp.to_json(),
            "slide": {"width": slide.info.width, "height": slide.info.height,
                      "levels": len(slide.info.level_dimensions), "vendor": slide.info.vendor,
                      "objective_power": slide.info.objective_power},
            "backend": slide.info.backend,
            "reader": slide.reader,
            "device": inputs.device,
        },
    }
