"""Tile grid geometry: examples and properties (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline import ConfigError, GridSpec, TissueMask, grid_shape, make_tile_grid

mpps = st.floats(min_value=0.1, max_value=4.0, allow_nan=False)
sizes = st.integers(min_value=1, max_value=20_000)
specs = st.builds(
    GridSpec,
    tile_size_px=st.integers(1, 512),
    target_mpp=st.floats(0.1, 16.0, allow_nan=False),
    stride_px=st.one_of(st.none(), st.integers(1, 512)),
    min_tissue_fraction=st.just(0.0),
    edge=st.sampled_from(["pad", "drop"]),
)


@settings(max_examples=300, deadline=None)
@given(width=sizes, height=sizes, mpp_x=mpps, mpp_y=mpps, spec=specs)
def test_grid_geometry_properties(width, height, mpp_x, mpp_y, spec):
    n_rows, n_cols = grid_shape(width, height, mpp_x, mpp_y, spec)
    assume(n_rows * n_cols <= 100_000)
    grid = make_tile_grid(width, height, mpp_x, mpp_y, spec)
    tw, th = grid.tile_width_l0, grid.tile_height_l0
    sx, sy = grid.stride_x_l0, grid.stride_y_l0
    assert len(grid) == grid.n_rows * grid.n_cols
    assert (grid.n_rows, grid.n_cols) == grid_shape(width, height, mpp_x, mpp_y, spec)
    if len(grid) == 0:
        assert spec.edge == "drop" and (tw > width * (1 + 1e-9) or th > height * (1 + 1e-9))
        return
    # Origins start at 0 and step by the stride, row-major.
    assert grid.x.min() == 0 and grid.y.min() == 0
    np.testing.assert_allclose(grid.x, grid.cols * sx)
    np.testing.assert_allclose(grid.y, grid.rows * sy)
    right, bottom = grid.x.max() + tw, grid.y.max() + th
    if spec.edge == "drop":
        # Every tile lies inside the slide, and one more column/row would not.
        assert right <= width * (1 + 1e-9) + 1e-6 and bottom <= height * (1 + 1e-9) + 1e-6
        assert right + sx > width * (1 - 1e-9) - 1e-6
        assert bottom + sy > height * (1 - 1e-9) - 1e-6
    else:
        # Every tile starts inside the slide; the last column/row reaches the edge (or,
        # with a stride longer than the tile, one more stride would pass it).
        assert grid.x.max() < width and grid.y.max() < height
        assert max(right, grid.x.max() + sx) >= width * (1 - 1e-9) - 1e-6
        assert max(bottom, grid.y.max() + sy) >= height * (1 - 1e-9) - 1e-6
        if sx <= tw and sy <= th:
            assert right >= width * (1 - 1e-9) - 1e-6 and bottom >= height * (1 - 1e-9) - 1e-6


@settings(max_examples=200, deadline=None)
@given(
    mask=st.integers(1, 24).flatmap(
        lambda r: st.integers(1, 24).flatmap(
            lambda c: st.lists(st.booleans(), min_size=r * c, max_size=r * c).map(
                lambda v: np.array(v, bool).reshape(r, c)
            )
        )
    ),
    tile=st.integers(1, 9),
    stride=st.integers(1, 9),
)
def test_tissue_fraction_equals_brute_force_on_aligned_grids(mask, tile, stride):
    """With mask pixel = level-0 pixel, a tile's fraction is the mean of its mask cells."""
    rows, cols = mask.shape
    spec = GridSpec(tile_size_px=tile, target_mpp=1.0, stride_px=stride, min_tissue_fraction=0.0, edge="pad")
    grid = make_tile_grid(cols, rows, 1.0, 1.0, spec, TissueMask(mask, 1.0))
    for x, y, fraction in zip(grid.x.astype(int), grid.y.astype(int), grid.tissue_fraction):
        window = np.zeros((tile, tile))
        part = mask[y : y + tile, x : x + tile]
        window[: part.shape[0], : part.shape[1]] = part
        assert fraction == pytest.approx(window.mean(), abs=1e-9)


def test_fraction_with_partial_mask_pixels():
    """A tile covering half of a tissue mask pixel gets exactly half of its area."""
    mask = TissueMask(np.array([[True, False]]), mpp=8.0)
    # Level-0 mpp 1: a mask pixel is 8 x 8 level-0 px; a 4 px tile at x=4 is half in pixel 0.
    grid = make_tile_grid(16, 8, 1.0, 1.0, GridSpec(tile_size_px=8, target_mpp=1.0, stride_px=4, min_tissue_fraction=0), mask)
    fractions = dict(zip(grid.x.tolist(), grid.tissue_fraction.tolist()))
    assert fractions == pytest.approx({0.0: 1.0, 4.0: 0.5, 8.0: 0.0})


def test_threshold_keeps_tiles_at_or_above_it():
    mask = TissueMask(np.array([[True, True, False, False]]), mpp=1.0)
    spec = GridSpec(tile_size_px=2, target_mpp=1.0, stride_px=1, min_tissue_fraction=0.5, edge="drop")
    grid = make_tile_grid(4, 1, 1.0, 1.0, GridSpec(tile_size_px=1, target_mpp=1.0, min_tissue_fraction=0.5, edge="drop"), mask)
    assert grid.cols.tolist() == [0, 1]
    grid = make_tile_grid(4, 2, 1.0, 1.0, spec, TissueMask(np.array([[1, 1, 0, 0], [1, 1, 0, 0]], bool), 1.0))
    assert grid.cols.tolist() == [0, 1]  # fractions 1.0 and 0.5 kept, 0.0 dropped


def test_edge_modes_on_an_exact_multiple_agree():
    a = make_tile_grid(448, 224, 1.0, 1.0, GridSpec(edge="pad"))
    b = make_tile_grid(448, 224, 1.0, 1.0, GridSpec(edge="drop"))
    assert (a.n_rows, a.n_cols) == (b.n_rows, b.n_cols) == (1, 2)


def test_partial_last_column_is_padded_or_dropped():
    assert grid_shape(500, 224, 1.0, 1.0, GridSpec(edge="pad")) == (1, 3)
    assert grid_shape(500, 224, 1.0, 1.0, GridSpec(edge="drop")) == (1, 2)


def test_overlap_spec():
    spec = GridSpec.with_overlap(224, 112, target_mpp=0.5)
    assert spec.effective_stride_px == 112
    with pytest.raises(ConfigError):
        GridSpec.with_overlap(224, 224)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tile_size_px": 0},
        {"tile_size_px": 22.5},
        {"target_mpp": 0.0},
        {"target_mpp": math.nan},
        {"stride_px": 0},
        {"min_tissue_fraction": 1.5},
        {"edge": "wrap"},
    ],
)
def test_bad_specs_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        GridSpec(**kwargs)


def test_absurd_grids_are_refused_before_allocating():
    with pytest.raises(ConfigError, match="tile positions"):
        make_tile_grid(100_000, 100_000, 0.25, 0.25, GridSpec(tile_size_px=1, target_mpp=0.25))
