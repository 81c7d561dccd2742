"""Chunks: the unit of work, retry and resume. Pure geometry over a tile grid.

The grid of tile positions maps one-to-one onto the cells of the level-0 heatmap array
(row, col). That array is chunked in blocks of ``chunk_cells`` x ``chunk_cells`` cells; a
chunk task covers exactly one such block, so chunks write disjoint Zarr chunks and can run
anywhere, in any order, concurrently. A task is a small picklable descriptor: grid cells
and level-0 coordinates, never pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._grid import TileGrid

__all__ = ["ChunkTask", "plan_chunks", "choose_chunk_cells", "MIN_CHUNKS_PER_SLIDE", "CHUNK_CELL_CHOICES"]

MIN_CHUNKS_PER_SLIDE = 20
"""An interrupted slide should lose at most about 1/20 of its work (see ``choose_chunk_cells``)."""
CHUNK_CELL_CHOICES = (64, 32, 16, 8)
"""Block edges tried, largest first: 64 x 64 tiles bounds a chunk's work; 8 x 8 bounds the
per-chunk overhead (one Zarr chunk, one marker, one scheduler task)."""


@dataclass(frozen=True)
class ChunkTask:
    """The kept tiles of one heatmap block.

    ``block`` is (block_row, block_col) in the Zarr chunk grid; ``rows``/``cols`` are grid
    cells; ``x``/``y`` are the tiles' level-0 top-left corners.
    """

    block: tuple[int, int]
    row_range: tuple[int, int]
    """[start, stop) grid rows of the block (clipped to the grid)."""
    col_range: tuple[int, int]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    x: tuple[float, ...]
    y: tuple[float, ...]

    @property
    def name(self) -> str:
        return f"{self.block[0]}_{self.block[1]}"

    def __len__(self) -> int:
        return len(self.rows)


def _occupied_blocks(grid: TileGrid, chunk_cells: int) -> int:
    if not len(grid):
        return 0
    n_block_cols = -(-grid.n_cols // chunk_cells)
    return int(np.unique((grid.rows // chunk_cells) * n_block_cols + grid.cols // chunk_cells).size)


def choose_chunk_cells(grid: TileGrid, requested: int | None) -> int:
    """The heatmap block edge (grid cells) for ``grid``: ``requested`` when given, else the
    largest of :data:`CHUNK_CELL_CHOICES` that cuts the kept tiles into at least
    :data:`MIN_CHUNKS_PER_SLIDE` chunks (the smallest choice when none does).

    Only the grid decides it, so a resumed run cuts the slide exactly as the first one did.
    """
    if requested is not None:
        return requested
    for cells in CHUNK_CELL_CHOICES:
        if _occupied_blocks(grid, cells) >= MIN_CHUNKS_PER_SLIDE:
            return cells
    return CHUNK_CELL_CHOICES[-1]


def plan_chunks(grid: TileGrid, chunk_cells: int) -> list[ChunkTask]:
    """One task per heatmap block that holds at least one kept tile, row-major."""
    if chunk_cells < 1:
        raise ValueError(f"chunk_cells must be positive, got {chunk_cells}")
    block_rows = grid.rows // chunk_cells
    block_cols = grid.cols // chunk_cells
    n_block_cols = -(-grid.n_cols // chunk_cells) if grid.n_cols else 1
    keys = block_rows * n_block_cols + block_cols
    order = np.argsort(keys, kind="stable")
    tasks = []
    for key in np.unique(keys):
        members = order[keys[order] == key]
        br, bc = divmod(int(key), n_block_cols)
        tasks.append(
            ChunkTask(
                block=(br, bc),
                row_range=(br * chunk_cells, min((br + 1) * chunk_cells, grid.n_rows)),
                col_range=(bc * chunk_cells, min((bc + 1) * chunk_cells, grid.n_cols)),
                rows=tuple(int(v) for v in grid.rows[members]),
                cols=tuple(int(v) for v in grid.cols[members]),
                x=tuple(float(v) for v in grid.x[members]),
                y=tuple(float(v) for v in grid.y[members]),
            )
        )
    return tasks
