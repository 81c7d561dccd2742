"""Tile grids: which tiles of a slide to analyse at a model's resolution. Pure functions.

Tiles are ``tile_size_px`` square at ``target_mpp``; on a slide with mpp (mpp_x, mpp_y)
a tile spans ``tile_size_px * target_mpp / mpp_x`` by ``... / mpp_y`` level-0 pixels, so
non-square pixels give non-square level-0 tiles. Grid index (row, col) has its top-left
corner at level-0 (x, y) = (col * stride_x0, row * stride_y0), where ``stride_x0`` is the
stride in level-0 pixels. Coordinates are floats: they are exact, not rounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypedDict, Unpack

import numpy as np

from ._errors import ConfigError
from ._tissue import TissueMask

__all__ = ["GridSpec", "TileGrid", "make_tile_grid", "grid_shape", "MAX_GRID_POSITIONS"]

EdgeMode = Literal["pad", "drop"]


class _GridOptions(TypedDict, total=False):
    """The :class:`GridSpec` fields :meth:`GridSpec.with_overlap` passes through."""

    target_mpp: float
    min_tissue_fraction: float
    edge: EdgeMode


_EPS = 1e-9
MAX_GRID_POSITIONS = 20_000_000
"""A larger grid is a configuration mistake (a 200k px slide at 0.25 µm/px with 224 px
tiles has under a million positions) and would exhaust memory."""


@dataclass(frozen=True)
class GridSpec:
    """How to lay tiles: size and stride in pixels at ``target_mpp``, a tissue threshold.

    ``edge``: ``"pad"`` keeps a partial last row/column (read past the slide edge, which
    is white); ``"drop"`` keeps only tiles that lie wholly inside the slide.
    """

    tile_size_px: int = 224
    target_mpp: float = 1.0
    stride_px: int | None = None
    """Step between tiles at ``target_mpp``; None means ``tile_size_px`` (no overlap)."""
    min_tissue_fraction: float = 0.25
    edge: EdgeMode = "pad"

    def __post_init__(self) -> None:
        if not isinstance(self.tile_size_px, int) or self.tile_size_px < 1:
            raise ConfigError(
                f"tile_size_px = {self.tile_size_px!r} must be a positive integer",
                hint="use the model's tile size, e.g. 224",
            )
        if not (math.isfinite(self.target_mpp) and 0.05 <= self.target_mpp <= 1000):
            raise ConfigError(
                f"target_mpp = {self.target_mpp!r} µm/px is out of range",
                hint="use the model's µm/px, e.g. 0.5 (20x) or 1.0",
            )
        if self.stride_px is not None and (
            not isinstance(self.stride_px, int) or self.stride_px < 1
        ):
            raise ConfigError(
                f"stride_px = {self.stride_px!r} must be a positive integer",
                hint="use tile_size_px for no overlap, or less for overlapping tiles",
            )
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ConfigError(
                f"min_tissue_fraction = {self.min_tissue_fraction!r} must be in [0, 1]",
                hint="0 keeps every tile, 1 only tiles wholly on tissue",
            )
        if self.edge not in ("pad", "drop"):
            raise ConfigError(f"edge = {self.edge!r} is not 'pad' or 'drop'")

    @property
    def effective_stride_px(self) -> int:
        return self.stride_px if self.stride_px is not None else self.tile_size_px

    @classmethod
    def with_overlap(cls, tile_size_px: int, overlap_px: int, **kwargs: Unpack[_GridOptions]) -> GridSpec:
        """A spec whose stride is ``tile_size_px - overlap_px``."""
        if not 0 <= overlap_px < tile_size_px:
            raise ConfigError(
                f"overlap_px = {overlap_px!r} must be in [0, tile_size_px)",
            )
        return cls(tile_size_px=tile_size_px, stride_px=tile_size_px - overlap_px, **kwargs)


@dataclass(frozen=True, eq=False)
class TileGrid:
    """The kept tiles of a slide. Arrays are parallel, one entry per kept tile."""

    spec: GridSpec
    slide_width: int
    slide_height: int
    mpp_x: float
    mpp_y: float
    n_rows: int
    """Rows of the full grid (kept or not)."""
    n_cols: int
    rows: np.ndarray
    cols: np.ndarray
    x: np.ndarray
    """Level-0 x of each kept tile's top-left corner (float64)."""
    y: np.ndarray
    tissue_fraction: np.ndarray
    """Fraction of each kept tile covered by tissue (1.0 everywhere when no mask was given)."""

    @property
    def tile_width_l0(self) -> float:
        return self.spec.tile_size_px * self.spec.target_mpp / self.mpp_x

    @property
    def tile_height_l0(self) -> float:
        return self.spec.tile_size_px * self.spec.target_mpp / self.mpp_y

    @property
    def stride_x_l0(self) -> float:
        return self.spec.effective_stride_px * self.spec.target_mpp / self.mpp_x

    @property
    def stride_y_l0(self) -> float:
        return self.spec.effective_stride_px * self.spec.target_mpp / self.mpp_y

    def __len__(self) -> int:
        return int(self.rows.size)


def _count(extent: float, tile: float, stride: float, edge: EdgeMode) -> int:
    """Number of tile positions along one axis of ``extent`` level-0 pixels."""
    if extent <= 0:
        return 0
    if edge == "drop":
        if tile > extent * (1 + _EPS):
            return 0
        return math.floor((extent - tile) / stride + _EPS) + 1
    if tile >= extent * (1 - _EPS):
        return 1
    # Enough tiles to reach the edge, but no tile may start at or beyond it (this
    # matters when the stride is larger than the tile).
    to_cover = math.ceil((extent - tile) / stride - _EPS) + 1
    starting_inside = math.ceil(extent / stride - _EPS)
    return min(to_cover, starting_inside)


def grid_shape(
    slide_width: int, slide_height: int, mpp_x: float, mpp_y: float, spec: GridSpec
) -> tuple[int, int]:
    """(rows, cols) of the full grid for a slide of (width, height) level-0 pixels."""
    scale = spec.target_mpp
    tile_w, tile_h = spec.tile_size_px * scale / mpp_x, spec.tile_size_px * scale / mpp_y
    stride = spec.effective_stride_px * scale
    return (
        _count(slide_height, tile_h, stride / mpp_y, spec.edge),
        _count(slide_width, tile_w, stride / mpp_x, spec.edge),
    )


def _integral(mask: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column (shape +1 in each axis)."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    table[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    return table


def _area_below(table: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Exact mask area in [0, r) x [0, c) for fractional (r, c): bilinear in the table."""
    rows, cols = table.shape[0] - 1, table.shape[1] - 1
    r = np.clip(r, 0, rows)
    c = np.clip(c, 0, cols)
    r0 = np.minimum(np.floor(r).astype(np.int64), max(rows - 1, 0))
    c0 = np.minimum(np.floor(c).astype(np.int64), max(cols - 1, 0))
    fr, fc = r - r0, c - c0
    r1, c1 = np.minimum(r0 + 1, rows), np.minimum(c0 + 1, cols)
    return (
        table[r0, c0] * (1 - fr) * (1 - fc)
        + table[r1, c0] * fr * (1 - fc)
        + table[r0, c1] * (1 - fr) * fc
        + table[r1, c1] * fr * fc
    )


def _tissue_fractions(
    mask: TissueMask, x: np.ndarray, y: np.ndarray, tile_w: float, tile_h: float,
    mpp_x: float, mpp_y: float,
) -> np.ndarray:
    """Fraction of each tile (level-0 boxes) covered by the mask, with exact partial pixels."""
    if mask.mask.size == 0:
        return np.zeros_like(x)
    table = _integral(mask.mask)
    sx, sy = mpp_x / mask.mpp, mpp_y / mask.mpp  # mask pixels per level-0 pixel
    c0, c1 = x * sx, (x + tile_w) * sx
    r0, r1 = y * sy, (y + tile_h) * sy
    area = (
        _area_below(table, r1, c1) - _area_below(table, r0, c1)
        - _area_below(table, r1, c0) + _area_below(table, r0, c0)
    )
    return np.clip(area / ((c1 - c0) * (r1 - r0)), 0.0, 1.0)


def make_tile_grid(
    slide_width: int,
    slide_height: int,
    mpp_x: float,
    mpp_y: float,
    spec: GridSpec,
    tissue: TissueMask | None = None,
) -> TileGrid:
    """The tiles of a (width, height) level-0 slide that pass ``spec``'s tissue threshold.

    Without a ``tissue`` mask every grid position is kept. Tiles are ordered row-major.
    """
    n_rows, n_cols = grid_shape(slide_width, slide_height, mpp_x, mpp_y, spec)
    if n_rows * n_cols > MAX_GRID_POSITIONS:
        raise ConfigError(
            f"the grid would have {n_rows} x {n_cols} tile positions "
            f"(more than {MAX_GRID_POSITIONS:,})",
            hint="use a larger tile_size_px, target_mpp or stride_px",
        )
    rows, cols = np.divmod(np.arange(n_rows * n_cols, dtype=np.int64), max(n_cols, 1))
    stride = spec.effective_stride_px * spec.target_mpp
    x = cols * (stride / mpp_x)
    y = rows * (stride / mpp_y)
    tile_w = spec.tile_size_px * spec.target_mpp / mpp_x
    tile_h = spec.tile_size_px * spec.target_mpp / mpp_y
    if tissue is None:
        fraction = np.ones(x.shape, dtype=np.float64)
        keep = np.ones(x.shape, dtype=bool)
    else:
        fraction = _tissue_fractions(tissue, x, y, tile_w, tile_h, mpp_x, mpp_y)
        keep = fraction >= spec.min_tissue_fraction - _EPS
        if spec.min_tissue_fraction > 0:
            keep &= fraction > 0
    return TileGrid(
        spec=spec,
        slide_width=slide_width,
        slide_height=slide_height,
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        n_rows=n_rows,
        n_cols=n_cols,
        rows=rows[keep],
        cols=cols[keep],
        x=x[keep].astype(np.float64),
        y=y[keep].astype(np.float64),
        tissue_fraction=fraction[keep],
    )
