"""The per-tile table (Parquet) and QuPath-style GeoJSON of a slide's results.

Both speak of heatmap *cells*: the stride x stride square centred on a tile's centre, clipped
to the slide. Cells tile the plane without overlap whatever the stride (tiles overlap when the
stride is smaller than the tile), so class areas, detections and region outlines are all
computed from the same cells and agree exactly.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._grid import TileGrid

__all__ = [
    "TileResults",
    "CellPolygon",
    "cell_polygons",
    "class_regions",
    "write_tile_table",
    "write_geojson",
]

# Feature ids are UUIDs (QuPath >= 0.4 reads a feature's "id" as its object UUID and drops any
# other string), derived from the object's readable key so that a rerun gives the same ids.
_ID_NAMESPACE = uuid.UUID("5b0f8d4e-7a51-4c2e-9a57-3f0c1d2e9b61")


@dataclass(frozen=True, eq=False)
class TileResults:
    """Kept tiles and their probabilities, in grid order. Coordinates: level-0 (x, y)."""

    grid: TileGrid
    probabilities: np.ndarray
    """(tiles, classes) float32, in the grid's tile order."""
    class_names: tuple[str, ...]
    slide_id: str
    model: str
    """``name@version``."""

    @property
    def rows(self) -> np.ndarray:
        return self.grid.rows

    @property
    def cols(self) -> np.ndarray:
        return self.grid.cols

    @property
    def x(self) -> np.ndarray:
        return self.grid.x

    @property
    def y(self) -> np.ndarray:
        return self.grid.y

    @property
    def tissue_fraction(self) -> np.ndarray:
        return self.grid.tissue_fraction

    @property
    def tile_w_l0(self) -> float:
        return self.grid.tile_width_l0

    @property
    def tile_h_l0(self) -> float:
        return self.grid.tile_height_l0

    @property
    def mpp(self) -> tuple[float, float]:
        return self.grid.mpp_x, self.grid.mpp_y

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1) if len(self.rows) else np.zeros(0, dtype=np.int64)

    def centre_um(self) -> tuple[np.ndarray, np.ndarray]:
        return (self.x + self.tile_w_l0 / 2) * self.mpp[0], (self.y + self.tile_h_l0 / 2) * self.mpp[1]

    def cell_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 x of the grid's ``n_cols + 1`` cell edges and y of its ``n_rows + 1``.

        Cell (row, col) spans ``[xs[col], xs[col + 1]] x [ys[row], ys[row + 1]]``: a stride
        square centred on its tile's centre, clipped to the slide. Edges strictly increase:
        every grid tile starts inside the slide, so every cell keeps a part of it.
        """
        g = self.grid
        xs = g.tile_width_l0 / 2 + (np.arange(g.n_cols + 1) - 0.5) * g.stride_x_l0
        ys = g.tile_height_l0 / 2 + (np.arange(g.n_rows + 1) - 0.5) * g.stride_y_l0
        return np.clip(xs, 0.0, float(g.slide_width)), np.clip(ys, 0.0, float(g.slide_height))

    def cell_boxes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x0, y0, x1, y1) level-0 of each kept tile's cell."""
        xs, ys = self.cell_edges()
        return xs[self.cols], ys[self.rows], xs[self.cols + 1], ys[self.rows + 1]

    def cell_area_um2(self) -> np.ndarray:
        """The area of each kept tile's cell in µm²: what summary.json's class areas add up."""
        x0, y0, x1, y1 = self.cell_boxes()
        return (x1 - x0) * self.mpp[0] * ((y1 - y0) * self.mpp[1])

    def region_mask(self, class_index: int, threshold: float) -> np.ndarray:
        """(n_rows, n_cols): the kept cells whose probability of the class is >= ``threshold``."""
        mask = np.zeros((self.grid.n_rows, self.grid.n_cols), dtype=bool)
        hit = self.probabilities[:, class_index] >= threshold
        mask[self.rows[hit], self.cols[hit]] = True
        return mask

    def object_id(self, key: str) -> str:
        """A UUID for the GeoJSON object ``key``: the same for the same slide, model and grid."""
        spec = self.grid.spec
        name = (f"{self.slide_id}/{self.model}/{spec.tile_size_px}px@{spec.target_mpp}/"
                f"{spec.effective_stride_px}/{spec.edge}/{key}")
        return str(uuid.uuid5(_ID_NAMESPACE, name))


def _numbers(values: np.ndarray, arrow_type: Any, dtype: type[np.generic]) -> Any:
    """An Arrow array over the numbers' bytes (no copy after the cast)."""
    import pyarrow as pa

    data = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(arrow_type, len(data), [None, pa.py_buffer(data)])


def _strings(values: Sequence[str]) -> Any:
    """An Arrow string array from its UTF-8 bytes and int32 offsets."""
    import pyarrow as pa

    encoded = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum(np.fromiter((len(e) for e in encoded), np.int64, len(encoded)), out=offsets[1:])
    data = pa.py_buffer(b"".join(encoded))
    return pa.Array.from_buffers(pa.string(), len(encoded), [None, pa.py_buffer(offsets), data])


def write_tile_table(results: TileResults, path: Path) -> None:
    # Arrays are built from their buffers, not with pa.array(): that looks for pandas
    # objects and so imports pandas, 0.4-2 s on the first slide of every process.
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(results.rows)
    cx, cy = results.centre_um()
    f64, f32 = pa.float64(), pa.float32()
    columns: dict[str, Any] = {
        # Constant per file, so that the tables of a cohort concatenate into one.
        "slide_id": _strings([results.slide_id] * n),
        "model": _strings([results.model] * n),
        "row": _numbers(results.rows, pa.int32(), np.int32),
        "col": _numbers(results.cols, pa.int32(), np.int32),
        "x": _numbers(results.x, f64, np.float64),
        "y": _numbers(results.y, f64, np.float64),
        "width": _numbers(np.full(n, results.tile_w_l0), f64, np.float64),
        "height": _numbers(np.full(n, results.tile_h_l0), f64, np.float64),
        "x_um": _numbers(cx, f64, np.float64),
        "y_um": _numbers(cy, f64, np.float64),
        "cell_area_um2": _numbers(results.cell_area_um2(), f64, np.float64),
        "tissue_fraction": _numbers(results.tissue_fraction, f32, np.float32),
    }
    for i, name in enumerate(results.class_names):
        columns[f"prob_{name}"] = _numbers(results.probabilities[:, i], f32, np.float32)
    columns["predicted_class"] = _strings([results.class_names[i] for i in results.predicted])
    table = pa.table(columns)
    table = table.replace_schema_metadata({
        "wsiflow": json.dumps({
            "x, y, width, height": "level-0 pixels, tile top-left corner and size",
            "x_um, y_um": "tile centre in micrometres",
            "cell_area_um2": "the tile's heatmap cell (stride square centred on the tile, clipped to the slide)",
        })
    })
    pq.write_table(table, path)


@dataclass(frozen=True)
class CellPolygon:
    """A 4-connected set of grid cells as a polygon along cell edges.

    Vertices are grid-edge indices (x = column edge, y = row edge): cell (row, col) is the
    square [col, col + 1] x [row, row + 1]. Rings are open (the first vertex is not repeated),
    have no repeated vertex and no collinear vertex; the shell turns counter-clockwise and holes
    clockwise by the shoelace formula on (x, y) (GeoJSON's right-hand rule).
    """

    shell: np.ndarray
    holes: tuple[np.ndarray, ...]
    cells: int
    first_cell: tuple[int, int]
    """(row, col) of its first cell in row-major order."""


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    step_in = ring - np.roll(ring, 1, axis=0)
    step_out = np.roll(ring, -1, axis=0) - ring
    return ring[np.any(np.sign(step_in) != np.sign(step_out), axis=1)]


def _boundary_edges(cells: np.ndarray, background: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """Directed unit edges (background label, x0, y0, x1, y1) between ``cells`` and the rest.

    ``cells`` is padded by one empty cell. The directions make every shell counter-clockwise
    by the shoelace formula on (x, y); a hole, walked along the same cells' sides, comes out
    clockwise.
    """
    edges: list[tuple[int, int, int, int, int]] = []
    r, c = np.nonzero(cells)
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        outside = ~cells[r + dr, c + dc]
        rr, cc = r[outside], c[outside]
        labels = background[rr + dr, cc + dc]
        if dr == -1:  # top side, towards +x
            ends = (cc, rr, cc + 1, rr)
        elif dr == 1:  # bottom side, towards -x
            ends = (cc + 1, rr + 1, cc, rr + 1)
        elif dc == -1:  # left side, towards -y
            ends = (cc, rr + 1, cc, rr)
        else:  # right side, towards +y
            ends = (cc + 1, rr, cc + 1, rr + 1)
        edges.extend(zip(labels.tolist(), *(e.tolist() for e in ends), strict=True))
    return edges


def _rings(edges: list[tuple[int, int, int, int, int]]) -> dict[int, list[np.ndarray]]:
    """Chain each background label's edges into closed rings.

    Along the border with one 4-connected background region each vertex has one outgoing
    edge (two regions meet diagonally only when they are different regions), so chaining is
    unambiguous and no ring touches itself.
    """
    by_label: dict[int, dict[tuple[int, int], tuple[int, int]]] = {}
    for label, x0, y0, x1, y1 in edges:
        by_label.setdefault(label, {})[(x0, y0)] = (x1, y1)
    rings: dict[int, list[np.ndarray]] = {}
    for label in sorted(by_label):
        following = by_label[label]
        while following:
            start = min(following, key=lambda v: (v[1], v[0]))
            ring = [start]
            vertex = following.pop(start)
            while vertex != start:
                ring.append(vertex)
                vertex = following.pop(vertex)
            rings.setdefault(label, []).append(_drop_collinear(np.asarray(ring, dtype=np.int64)))
    return rings


def cell_polygons(mask: np.ndarray) -> list[CellPolygon]:
    """The 4-connected components of a (rows, cols) boolean mask as exact cell-edge polygons,
    in row-major order of their first cell. Cells meeting only at a corner are separate polygons."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask)
    polygons = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        r0, c0 = box[0].start, box[1].start
        cells = np.pad(labels[box] == k, 1)
        background, _ = ndimage.label(~cells)
        rings = _rings(_boundary_edges(cells, background))
        offset = np.array([c0 - 1, r0 - 1])
        outer = int(background[0, 0])
        shell = max(rings.pop(outer), key=lambda ring: abs(_signed_area(ring)))
        holes = tuple(ring + offset for label in sorted(rings) for ring in rings[label])
        first = np.argwhere(cells)[0] - 1 + np.array([r0, c0])
        polygons.append(CellPolygon(shell + offset, holes, int(cells.sum()), (int(first[0]), int(first[1]))))
    return polygons


def class_regions(heatmap: np.ndarray, class_index: int, threshold: float) -> list[np.ndarray]:
    """Outlines of the cells at or above ``threshold``, along cell edges, in grid cell units.

    (x, y) = (col, row) with cell centres at whole numbers, so edges lie at half-integers:
    ``translation + outline * scale`` places them in the heatmap's world coordinates. Shells
    and holes are all returned, each closed (first vertex repeated).
    """
    outlines = []
    for polygon in cell_polygons(heatmap[class_index] >= threshold):
        for ring in (polygon.shell, *polygon.holes):
            closed = np.vstack([ring, ring[:1]]).astype(np.float64) - 0.5
            outlines.append(closed)
    return outlines


def _hex_to_rgb(color: str) -> list[int]:
    color = color.lstrip("#")
    return [int(color[i : i + 2], 16) for i in (0, 2, 4)]


def _detections(results: TileResults, class_colors: Sequence[str]) -> list[dict[str, Any]]:
    x0, y0, x1, y1 = results.cell_boxes()
    predicted = results.predicted
    features = []
    for k in range(len(results.rows)):
        cls, key = int(predicted[k]), f"tile-{int(results.rows[k])}-{int(results.cols[k])}"
        a, b, c, d = float(x0[k]), float(y0[k]), float(x1[k]), float(y1[k])
        measurements = {
            f"prob_{n}": round(float(results.probabilities[k, i]), 6) for i, n in enumerate(results.class_names)
        }
        # The tile the model saw (it may overlap its neighbours and reach past the slide edge).
        measurements.update({
            "tissue_fraction": round(float(results.tissue_fraction[k]), 6),
            "tile_x": float(results.x[k]), "tile_y": float(results.y[k]),
            "tile_width": float(results.tile_w_l0), "tile_height": float(results.tile_h_l0),
        })
        features.append({
            "type": "Feature",
            "id": results.object_id(key),
            "geometry": {"type": "Polygon", "coordinates": [[[a, b], [c, b], [c, d], [a, d], [a, b]]]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": results.class_names[cls], "color": _hex_to_rgb(class_colors[cls])},
                "measurements": measurements,
                "metadata": {"wsiflow_id": key},
            },
        })
    return features


def _regions(results: TileResults, class_colors: Sequence[str], threshold: float) -> list[dict[str, Any]]:
    xs, ys = results.cell_edges()
    um2_per_px = results.mpp[0] * results.mpp[1]
    features = []
    for i, name in enumerate(results.class_names):
        for n, polygon in enumerate(cell_polygons(results.region_mask(i, threshold)), start=1):
            key = f"region-{name}-{n}"
            rings = [np.column_stack([xs[ring[:, 0]], ys[ring[:, 1]]]) for ring in (polygon.shell, *polygon.holes)]
            area_um2 = sum(_signed_area(ring) for ring in rings) * um2_per_px  # holes are negative
            features.append({
                "type": "Feature",
                "id": results.object_id(f"{key}@{threshold:g}"),
                "geometry": {"type": "Polygon", "coordinates": [
                    [*ring.tolist(), ring[0].tolist()] for ring in rings
                ]},
                "properties": {
                    "objectType": "annotation",
                    "name": f"{name} >= {threshold:g}",
                    "classification": {"name": name, "color": _hex_to_rgb(class_colors[i])},
                    "measurements": {"cells": polygon.cells, "area_um2": round(area_um2, 3)},
                    "metadata": {"wsiflow_id": key},
                },
            })
    return features


def write_geojson(results: TileResults, class_colors: Sequence[str], threshold: float, path: Path) -> int:
    """Cells as QuPath detections, thresholded class regions as annotations; the region count.

    Coordinates are level-0 pixels, every object within the slide.
    """
    regions = _regions(results, class_colors, threshold)
    features = _detections(results, class_colors) + regions
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")
    return len(regions)
