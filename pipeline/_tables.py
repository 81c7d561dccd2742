"""The per-tile table (Parquet) and QuPath-style GeoJSON of a slide's results."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TileResults", "write_tile_table", "write_geojson", "class_regions"]


class TileResults:
    """Kept tiles and their probabilities, in grid order. Coordinates: level-0 (x, y)."""

    def __init__(
        self,
        rows: np.ndarray,
        cols: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        tile_w_l0: float,
        tile_h_l0: float,
        mpp: tuple[float, float],
        tissue_fraction: np.ndarray,
        probabilities: np.ndarray,
        class_names: Sequence[str],
    ) -> None:
        self.rows, self.cols, self.x, self.y = rows, cols, x, y
        self.tile_w_l0, self.tile_h_l0 = tile_w_l0, tile_h_l0
        self.mpp = mpp
        self.tissue_fraction = tissue_fraction
        self.probabilities = probabilities
        self.class_names = tuple(class_names)

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1) if len(self.rows) else np.zeros(0, dtype=np.int64)

    def centre_um(self) -> tuple[np.ndarray, np.ndarray]:
        return (self.x + self.tile_w_l0 / 2) * self.mpp[0], (self.y + self.tile_h_l0 / 2) * self.mpp[1]


def write_tile_table(results: TileResults, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cx, cy = results.centre_um()
    columns: dict[str, Any] = {
        "row": pa.array(results.rows, pa.int32()),
        "col": pa.array(results.cols, pa.int32()),
        "x": pa.array(results.x, pa.float64()),
        "y": pa.array(results.y, pa.float64()),
        "width": pa.array(np.full(len(results.rows), results.tile_w_l0), pa.float64()),
        "height": pa.array(np.full(len(results.rows), results.tile_h_l0), pa.float64()),
        "x_um": pa.array(cx, pa.float64()),
        "y_um": pa.array(cy, pa.float64()),
        "tissue_fraction": pa.array(results.tissue_fraction, pa.float32()),
    }
    for i, name in enumerate(results.class_names):
        columns[f"prob_{name}"] = pa.array(results.probabilities[:, i], pa.float32())
    columns["predicted_class"] = pa.array([results.class_names[i] for i in results.predicted], pa.string())
    table = pa.table(columns)
    table = table.replace_schema_metadata({
        "wsiflow": json.dumps({
            "x, y, width, height": "level-0 pixels, tile top-left corner and size",
            "x_um, y_um": "tile centre in micrometres",
        })
    })
    pq.write_table(table, path)


def _hex_to_rgb(color: str) -> list[int]:
    color = color.lstrip("#")
    return [int(color[i : i + 2], 16) for i in (0, 2, 4)]


def class_regions(
    heatmap: np.ndarray, class_index: int, threshold: float
) -> list[np.ndarray]:
    """Outlines (in grid cell units, (x, y) = (col, row)) of cells at or above ``threshold``."""
    from skimage import measure

    mask = heatmap[class_index] >= threshold
    if not mask.any():
        return []
    padded = np.pad(mask.astype(np.float32), 1)
    contours = measure.find_contours(padded, 0.5)
    return [np.column_stack([c[:, 1] - 1, c[:, 0] - 1]) for c in contours if len(c) >= 4]


def write_geojson(
    results: TileResults,
    heatmap: np.ndarray,
    class_colors: Sequence[str],
    stride_l0: tuple[float, float],
    threshold: float,
    path: Path,
) -> int:
    """Tiles as QuPath detections, thresholded class regions as annotations; region count."""
    features: list[dict[str, Any]] = []
    w, h = results.tile_w_l0, results.tile_h_l0
    for k in range(len(results.rows)):
        x0, y0 = float(results.x[k]), float(results.y[k])
        cls = int(results.predicted[k])
        features.append({
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[x0, y0], [x0 + w, y0], [x0 + w, y0 + h], [x0, y0 + h], [x0, y0]]],
            },
            "properties": {
                "objectType": "detection",
                "classification": {"name": results.class_names[cls], "color": _hex_to_rgb(class_colors[cls])},
                "measurements": {
                    f"prob_{n}": round(float(results.probabilities[k, i]), 6) for i, n in enumerate(results.class_names)
                },
            },
        })
    regions = 0
    sx, sy = stride_l0
    for i, name in enumerate(results.class_names):
        for outline in class_regions(heatmap, i, threshold):
            # Cell (col, row) is the tile whose centre is at (col * sx + w/2, row * sy + h/2).
            ring = [[float(c * sx + w / 2), float(r * sy + h / 2)] for c, r in outline]
            if ring[0] != ring[-1]:
                ring.append(ring[0])
            features.append({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "name": f"{name} >= {threshold:g}",
                    "classification": {"name": name, "color": _hex_to_rgb(class_colors[i])},
                },
            })
            regions += 1
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")
    return regions
