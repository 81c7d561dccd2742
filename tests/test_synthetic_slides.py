"""Generated pyramidal TIFFs with tissue at known coordinates and a known µm/px."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import GridSpec, detect_tissue, make_tile_grid, open_backend, open_slide
from tests._synthetic import BACKGROUND, TISSUE, write_pyramid_tiff, write_strip_tiff

MPP = 0.5  # µm/px at level 0
TILE = 64  # tile px at the target mpp
TARGET = 2.0  # µm/px: one tile = 256 level-0 px


def _textured_tissue(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0, 6, size=(*shape, 3))
    return np.clip(np.array(TISSUE, float) + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def painted_slide(tmp_path):
    """4096 x 3072 px slide; tissue fills exactly grid cells (row, col) in EXPECTED."""
    rng = np.random.default_rng(1)
    image = np.empty((3072, 4096, 3), np.uint8)
    image[:] = BACKGROUND
    expected = {(2, 3), (2, 4), (3, 3), (3, 4), (3, 5), (8, 10), (5, 12)}
    for r, c in expected:
        image[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256] = _textured_tissue((256, 256), rng)
    path = write_pyramid_tiff(tmp_path / "painted.tiff", image, MPP, levels=4)
    return path, image, expected


def test_grid_keeps_exactly_the_painted_tiles(painted_slide):
    path, _, expected = painted_slide
    with open_slide(path) as slide:
        assert slide.info.backend == "openslide"
        assert slide.mpp.mpp_x == pytest.approx(MPP)
        assert len(slide.info.level_dimensions) == 4
        mask = detect_tissue(slide.read_thumbnail(8.0), 8.0)
        spec = GridSpec(tile_size_px=TILE, target_mpp=TARGET, min_tissue_fraction=0.5)
        grid = make_tile_grid(*slide.dimensions, slide.mpp.mpp_x, slide.mpp.mpp_y, spec, mask)
    assert (grid.n_rows, grid.n_cols) == (12, 16)
    assert set(zip(grid.rows.tolist(), grid.cols.tolist())) == expected
    for r, c, x, y in zip(grid.rows, grid.cols, grid.x, grid.y):
        assert (x, y) == (c * 256, r * 256)


def test_half_offset_grid_sees_half_covered_tiles(painted_slide):
    path, _, _ = painted_slide
    with open_slide(path) as slide:
        mask = detect_tissue(slide.read_thumbnail(8.0), 8.0)
        # Stride of half a tile: the tile at (row 17, col 23) straddles painted cell (8, 11)?
        spec = GridSpec(tile_size_px=TILE, target_mpp=TARGET, stride_px=TILE // 2, min_tissue_fraction=0.0)
        grid = make_tile_grid(*slide.dimensions, slide.mpp.mpp_x, slide.mpp.mpp_y, spec, mask)
    fractions = {(r, c): f for r, c, f in zip(grid.rows.tolist(), grid.cols.tolist(), grid.tissue_fraction)}
    assert fractions[(16, 20)] == pytest.approx(1.0, abs=0.05)  # exactly on cell (8, 10)
    assert fractions[(16, 21)] == pytest.approx(0.5, abs=0.05)  # half on it
    assert fractions[(17, 21)] == pytest.approx(0.25, abs=0.05)  # a quarter


@pytest.mark.parametrize("target_mpp", [0.5, 1.0, 2.0, 3.0, 8.0, 0.25])
def test_read_at_target_mpp_returns_the_right_pixels(tmp_path, target_mpp):
    """A red square at known µm coordinates lands where expected, from any level."""
    image = np.empty((2048, 2048, 3), np.uint8)
    image[:] = BACKGROUND
    image[512:1024, 768:1280] = (200, 30, 40)  # 256 x 256 µm at 0.5 µm/px, top-left (384, 256) µm
    path = write_pyramid_tiff(tmp_path / "square.tiff", image, MPP, levels=4)
    with open_slide(path) as slide:
        level = slide.best_level_for_mpp(target_mpp)
        mpp_l = slide.level_mpp(level)[0]
        if target_mpp < MPP:
            assert level == 0  # finer than the scan: upsampled from level 0
        else:
            assert mpp_l <= target_mpp * 1.001
        if level + 1 < len(slide.info.level_dimensions):
            assert slide.level_mpp(level + 1)[0] > target_mpp * 1.001
        size_px = round(1024 / target_mpp)  # 1024 µm around the square
        # Region from (128, 0) µm -> level-0 (256, 0).
        out = slide.read_region_at_mpp(256, 0, size_px, size_px, target_mpp)
    assert out.shape == (size_px, size_px, 3)
    # Square spans x in [384, 640) µm and y in [256, 512) µm; relative to origin (128, 0) µm.
    inside = out[round(300 / target_mpp) : round(468 / target_mpp), round(300 / target_mpp) : round(468 / target_mpp)]
    assert np.abs(inside.astype(int) - (200, 30, 40)).max() <= 12
    outside = out[round(560 / target_mpp) :, :]
    assert np.abs(outside.astype(int) - BACKGROUND).max() <= 12
    # Edges within one output pixel (+ filter support) of the truth.
    row = out[round(384 / target_mpp)].astype(int)
    red = np.flatnonzero(np.abs(row - (200, 30, 40)).max(axis=1) < 40)
    assert abs(red[0] - 256 / target_mpp) <= 2
    assert abs(red[-1] + 1 - 512 / target_mpp) <= 2


def test_subpixel_offsets_are_honoured(tmp_path):
    image = np.empty((512, 512, 3), np.uint8)
    image[:] = 255
    image[:, 256:] = 0
    path = write_pyramid_tiff(tmp_path / "edge.tiff", image, MPP, levels=1, compression="zlib")
    with open_slide(path) as slide:
        # Start 1.5 level-0 px to the right: the black edge moves 0.75 px left at 2x downsample.
        a = slide.read_region_at_mpp(0, 0, 128, 8, 1.0).astype(float).mean(axis=(0, 2))
        b = slide.read_region_at_mpp(1.5, 0, 128, 8, 1.0).astype(float).mean(axis=(0, 2))
    # The amount of black in the window grows by 0.75 output px.
    assert (255 - b).sum() / 255 - (255 - a).sum() / 255 == pytest.approx(0.75, abs=0.1)


def test_non_square_pixels(tmp_path):
    image = np.empty((1000, 2000, 3), np.uint8)
    image[:] = BACKGROUND
    image[200:400, 400:800] = TISSUE  # 200 x 100 µm box at (200, 100) µm with mpp (0.5, 0.5)
    path = write_pyramid_tiff(tmp_path / "aniso.tiff", image, (0.5, 1.0), levels=1, compression="zlib")
    with open_slide(path) as slide:
        assert (slide.mpp.mpp_x, slide.mpp.mpp_y) == pytest.approx((0.5, 1.0))
        # At 1 µm/px the box is 200 x 200 output px at (200, 200).
        out = slide.read_region_at_mpp(0, 0, 600, 600, 1.0)
        assert np.abs(out[250:350, 250:350].astype(int) - TISSUE).max() <= 3
        assert np.abs(out[450:, :].astype(int) - BACKGROUND).max() <= 3
        grid = make_tile_grid(2000, 1000, 0.5, 1.0, GridSpec(tile_size_px=100, target_mpp=1.0))
        assert grid.tile_width_l0 == 200 and grid.tile_height_l0 == 100
        assert (grid.n_rows, grid.n_cols) == (10, 10)


def test_auto_backend_falls_back_to_tiffslide(tmp_path):
    image = np.full((300, 400, 3), 200, np.uint8)
    path = write_strip_tiff(tmp_path / "strips.tif", image, 0.5)
    backend = open_backend(path, "auto")
    try:
        assert backend.name == "tiffslide"
        assert backend.metadata_mpp == pytest.approx((0.5, 0.5))
        # Outside the image is white, not black, as with OpenSlide.
        region = backend.read_region(350, 250, 0, 100, 100)
        assert (region[:50, :50] == 200).all() and (region[60:, 60:] == 255).all()
    finally:
        backend.close()
    with open_slide(path, backend="auto") as slide:
        assert slide.info.backend == "tiffslide"
