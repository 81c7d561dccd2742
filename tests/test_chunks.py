"""Chunks: the unit of work and resume. Every kept tile in exactly one chunk; enough
chunks per slide that an interrupt loses little (issue 12: resume granularity)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import GridSpec, TissueMask, make_tile_grid, plan_chunks
from pipeline._chunks import CHUNK_CELL_CHOICES, MIN_CHUNKS_PER_SLIDE, choose_chunk_cells

SPEC = GridSpec(tile_size_px=224, target_mpp=1.0, stride_px=None, min_tissue_fraction=0.25, edge="pad")


def _ellipse_slide(width_px: int, height_px: int, mpp: float = 0.5, fill: float = 0.8):
    """A slide of (width, height) level-0 px with one elliptic tissue section."""
    mask_mpp = 8.0
    rows, cols = int(height_px * mpp / mask_mpp) + 1, int(width_px * mpp / mask_mpp) + 1
    yy, xx = np.mgrid[0:rows, 0:cols]
    ellipse = ((yy - rows / 2) / (fill * rows / 2)) ** 2 + ((xx - cols / 2) / (fill * cols / 2)) ** 2 <= 1
    return make_tile_grid(width_px, height_px, mpp, mpp, SPEC, TissueMask(ellipse, mask_mpp))


@settings(max_examples=100, deadline=None)
@given(
    mask=st.lists(st.lists(st.booleans(), min_size=1, max_size=40), min_size=1, max_size=40).filter(
        lambda rows: len({len(r) for r in rows}) == 1),
    cells=st.integers(1, 70),
)
def test_every_kept_tile_is_in_exactly_one_chunk_inside_its_block(mask, cells):
    tissue = TissueMask(np.array(mask, dtype=bool), 8.0)
    grid = make_tile_grid(len(mask[0]) * 16, len(mask) * 16, 0.5, 0.5, SPEC, tissue)
    tasks = plan_chunks(grid, cells)
    seen = [(r, c) for t in tasks for r, c in zip(t.rows, t.cols, strict=True)]
    assert sorted(seen) == sorted(zip(grid.rows.tolist(), grid.cols.tolist(), strict=True))
    for task in tasks:
        assert len(task) > 0
        assert all(task.row_range[0] <= r < task.row_range[1] for r in task.rows)
        assert all(task.col_range[0] <= c < task.col_range[1] for c in task.cols)
        assert task.row_range[0] == task.block[0] * cells and task.col_range[0] == task.block[1] * cells


def test_a_requested_chunk_size_is_kept():
    grid = _ellipse_slide(20_000, 14_000)
    assert choose_chunk_cells(grid, 64) == 64
    assert choose_chunk_cells(grid, 3) == 3


@pytest.mark.parametrize(("width", "height"), [(19_000, 14_200), (46_000, 32_914), (100_000, 80_000)])
def test_automatic_chunks_cut_a_slide_finely(width, height):
    """The issue's case: a 0.27-gigapixel slide had 4 chunks, the first holding 77 % of the
    tiles, so an interrupt at 35 % lost everything. Now: at least 20 chunks, none with more
    than a tenth of the slide."""
    grid = _ellipse_slide(width, height)
    cells = choose_chunk_cells(grid, None)
    tasks = plan_chunks(grid, cells)
    # Enough chunks, or the smallest blocks (64 tiles at most) on a small slide.
    assert len(tasks) >= MIN_CHUNKS_PER_SLIDE or cells == CHUNK_CELL_CHOICES[-1]
    assert max(len(t) for t in tasks) <= 0.1 * len(grid)
    # The largest block edge that still gives enough chunks: no needless overhead.
    larger = [c for c in CHUNK_CELL_CHOICES if c > cells]
    assert all(len(plan_chunks(grid, c)) < MIN_CHUNKS_PER_SLIDE for c in larger)


def test_a_small_slide_gets_the_smallest_blocks_and_the_choice_is_stable():
    grid = _ellipse_slide(2_220, 2_967)  # the CMU sample: a handful of tiles
    assert choose_chunk_cells(grid, None) == CHUNK_CELL_CHOICES[-1]
    big = _ellipse_slide(46_000, 32_914)
    # Only the grid decides: a resumed run cuts the slide as the first one did.
    assert choose_chunk_cells(big, None) == choose_chunk_cells(_ellipse_slide(46_000, 32_914), None)
