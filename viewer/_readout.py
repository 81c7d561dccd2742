"""What the result says at a point of the slide: every class's probability and the tissue
fraction of the tile there. Pure (no Qt, no napari), so it is tested without a screen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import ResultFolder

__all__ = ["ResultGrid", "Readout"]


@dataclass(frozen=True)
class Readout:
    """The result under one world point ((y, x) in µm)."""

    x_um: float
    y_um: float
    probabilities: dict[str, float] | None
    """Each class's probability at the heatmap cell there; None where no tile was analysed."""
    tissue_fraction: float | None

    def text(self) -> str:
        where = f"x {self.x_um:.1f} µm, y {self.y_um:.1f} µm"
        if self.probabilities is None:
            return f"{where} · no tile here (glass, or too little tissue)"
        probs = " · ".join(f"{name} {p:.2f}" for name, p in self.probabilities.items())
        fraction = "" if self.tissue_fraction is None else f" · tissue {self.tissue_fraction:.0%} of the tile"
        return f"{where} · P: {probs}{fraction}"


@dataclass(frozen=True)
class ResultGrid:
    """A result's level-0 heatmap (classes, rows, cols) and per-cell tile tissue fraction,
    placed in µm like the heatmap layers (a cell's centre at ``translate + index * scale``)."""

    class_names: tuple[str, ...]
    probabilities: np.ndarray = field(repr=False, compare=False)
    tissue_fraction: np.ndarray = field(repr=False, compare=False)
    """(rows, cols); NaN where no tile was analysed."""
    scale: tuple[float, float]
    translate: tuple[float, float]
    tiles: int

    @classmethod
    def from_result(cls, result_dir: Path) -> ResultGrid:
        import pyarrow.parquet as pq
        import zarr

        folder = ResultFolder(result_dir)
        group = zarr.open_group(str(folder.heatmap), mode="r")
        attrs: dict[str, Any] = group.attrs.asdict()
        dataset = attrs["ome"]["multiscales"][0]["datasets"][0]
        transforms = {t["type"]: t for t in dataset["coordinateTransformations"]}
        scale = transforms["scale"]["scale"][1:]
        translate = transforms.get("translation", {"translation": [0.0, 0.0, 0.0]})["translation"][1:]
        probabilities = np.asarray(group[dataset["path"]], dtype=np.float32)
        n_rows, n_cols = int(probabilities.shape[1]), int(probabilities.shape[2])
        fraction = np.full((n_rows, n_cols), np.nan, dtype=np.float32)
        table = pq.read_table(folder.tiles, columns=["row", "col", "tissue_fraction"])
        rows, cols = table.column("row").to_numpy(), table.column("col").to_numpy()
        inside = (rows >= 0) & (rows < n_rows) & (cols >= 0) & (cols < n_cols)
        fraction[rows[inside], cols[inside]] = table.column("tissue_fraction").to_numpy()[inside]
        names = tuple(str(c["name"]) for c in attrs["wsiflow"]["classes"])
        return cls(names, probabilities, fraction, (float(scale[0]), float(scale[1])),
                   (float(translate[0]), float(translate[1])), int(table.num_rows))

    def cell(self, y_um: float, x_um: float) -> tuple[int, int] | None:
        """The heatmap cell whose square holds the point, or None outside the grid."""
        row = round((y_um - self.translate[0]) / self.scale[0])
        col = round((x_um - self.translate[1]) / self.scale[1])
        rows, cols = self.tissue_fraction.shape
        return (row, col) if 0 <= row < rows and 0 <= col < cols else None

    def at(self, y_um: float, x_um: float) -> Readout:
        cell = self.cell(y_um, x_um)
        if cell is None or np.isnan(self.tissue_fraction[cell]):
            return Readout(x_um, y_um, None, None)
        probs = {name: float(self.probabilities[k][cell]) for k, name in enumerate(self.class_names)}
        return Readout(x_um, y_um, probs, float(self.tissue_fraction[cell]))

    def max_probability(self, class_name: str) -> float:
        index = self.class_names.index(class_name)
        values = self.probabilities[index][~np.isnan(self.tissue_fraction)]
        return float(values.max()) if values.size else 0.0
