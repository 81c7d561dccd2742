"""Slide access on real files from ../shared/data (OpenSlide, tiffslide, DICOM-WSI)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import (
    CorruptSlideError,
    GridSpec,
    MissingMppError,
    MppPolicy,
    SlideBackend,
    UnsupportedSlideError,
    detect_tissue,
    make_tile_grid,
    open_backend,
    open_slide,
)
from tests.conftest import shared_file


def test_cmu_svs_geometry_and_mpp(cmu_svs):
    with open_slide(cmu_svs) as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp.mpp_x == pytest.approx(0.499)
        assert slide.mpp.mpp_y == pytest.approx(0.499)
        assert slide.mpp.source == "metadata" and not slide.mpp.is_override
        assert slide.info.vendor == "aperio"
        assert slide.info.objective_power == 20
        assert slide.info.backend == "openslide"
        assert isinstance(slide.backend, SlideBackend)


def test_cmu_tissue_fraction_is_plausible_and_tiles_sit_on_tissue(cmu_svs):
    with open_slide(cmu_svs) as slide:
        thumb = slide.read_thumbnail(8.0)
        mask = detect_tissue(thumb, 8.0)
        # The skin section covers roughly 40 % of this crop (checked by eye on the overview).
        assert 0.25 < mask.fraction < 0.6
        assert mask.area_mm2 == pytest.approx(mask.fraction * 2220 * 2967 * 0.499**2 / 1e6, rel=0.02)
        spec = GridSpec(tile_size_px=112, target_mpp=2.0, min_tissue_fraction=0.5)
        grid = make_tile_grid(*slide.dimensions, slide.mpp.mpp_x, slide.mpp.mpp_y, spec, mask)
        everything = make_tile_grid(
            *slide.dimensions, slide.mpp.mpp_x, slide.mpp.mpp_y, GridSpec(tile_size_px=112, target_mpp=2.0)
        )
        assert 0 < len(grid) < len(everything)
        kept = set(zip(grid.rows.tolist(), grid.cols.tolist()))

        def stained_fraction(x: float, y: float) -> float:
            tile = slide.read_region_at_mpp(x, y, 112, 112, 2.0).astype(int)
            return float(((tile.max(axis=2) - tile.min(axis=2)) > 25).mean())

        for r, c, x, y in zip(everything.rows, everything.cols, everything.x, everything.y):
            fraction = stained_fraction(x, y)
            if (r, c) in kept:
                assert fraction > 0.2, f"kept tile {(r, c)} is mostly glass"
            else:
                assert fraction < 0.6, f"dropped tile {(r, c)} is mostly tissue"


def test_dicom_folder_matches_the_svs_pixel_for_pixel(cmu_svs):
    folder = shared_file("dicom/cmu-1-small-region-lossless")
    # Both through OpenSlide's decoder here; the direct readers (SVS and DICOM) are compared
    # below: they decode the same stored tiles, so they agree with each other exactly.
    with open_slide(cmu_svs, direct_reader=False) as svs, open_slide(folder, direct_reader=False) as dicom:
        assert dicom.dimensions == svs.dimensions
        assert (dicom.mpp.mpp_x, dicom.mpp.mpp_y) == pytest.approx((svs.mpp.mpp_x, svs.mpp.mpp_y))
        assert dicom.info.vendor == "dicom"
        rng = np.random.default_rng(0)
        for _ in range(6):
            x, y = int(rng.integers(0, 2220 - 300)), int(rng.integers(0, 2967 - 300))
            np.testing.assert_array_equal(dicom.read_region(x, y, 0, 300, 300), svs.read_region(x, y, 0, 300, 300))
        # Reads at a target mpp agree too (this DICOM's reduced levels are unusable in
        # OpenSlide, so both come from level 0).
        np.testing.assert_array_equal(
            dicom.read_region_at_mpp(500, 700, 128, 128, 2.0), svs.read_region_at_mpp(500, 700, 128, 128, 2.0)
        )
    with open_slide(cmu_svs) as svs, open_slide(folder) as dicom:
        assert dicom.reader != svs.reader  # each direct reader has its own name in the run key
        for mpp in (1.0, 2.0, 0.8):
            np.testing.assert_array_equal(
                dicom.read_region_at_mpp(500, 700, 128, 128, mpp), svs.read_region_at_mpp(500, 700, 128, 128, mpp)
            )


def test_a_single_dicom_instance_file_opens_the_whole_slide():
    folder = shared_file("dicom/cmu-1-small-region-lossless")
    one_file = sorted(folder.iterdir())[0]
    with open_slide(one_file) as slide:
        assert slide.dimensions == (2220, 2967)


def test_reencoded_dicom_from_another_writer_is_close_to_the_svs(cmu_svs):
    folder = shared_file("dicom/cmu-1-small-region-reencoded")
    with open_slide(cmu_svs) as svs, open_slide(folder) as dicom:
        assert dicom.dimensions == svs.dimensions
        a = dicom.read_region(600, 900, 0, 400, 400).astype(float)
        b = svs.read_region(600, 900, 0, 400, 400).astype(float)
        assert np.abs(a - b).mean() < 6


def test_tcga_without_mpp_is_refused_then_opens_with_an_override():
    path = shared_file("slides/TCGA-CR-7395-crop-jp2k-no-mpp.svs")
    with pytest.raises(MissingMppError) as info:
        open_slide(path)
    assert "--mpp" in info.value.one_line()
    with open_slide(path, mpp_policy=MppPolicy.fixed(0.25, 0.25)) as slide:
        assert slide.dimensions == (4443, 3567)
        assert slide.mpp.source == "cli" and slide.mpp.override == "--mpp"
        assert slide.mpp.metadata_mpp_x is None
        # JPEG 2000 tiles decode, from the reduced level too.
        region = slide.read_region_at_mpp(2000, 1500, 64, 64, 0.5)
        assert region.shape == (64, 64, 3) and region.std() > 5


def test_tiny_slide_smaller_than_one_tile():
    path = shared_file("slides/small-16px.svs")
    with open_slide(path) as slide:
        assert slide.dimensions == (16, 16)
        pad = make_tile_grid(16, 16, slide.mpp.mpp_x, slide.mpp.mpp_y, GridSpec(tile_size_px=224, target_mpp=1.0, min_tissue_fraction=0))
        drop = make_tile_grid(16, 16, slide.mpp.mpp_x, slide.mpp.mpp_y, GridSpec(tile_size_px=224, target_mpp=1.0, min_tissue_fraction=0, edge="drop"))
        assert len(pad) == 1 and len(drop) == 0
        tile = slide.read_region_at_mpp(0, 0, 224, 224, 1.0)
        assert tile.shape == (224, 224, 3)
        assert (tile[-20:, -20:] == 255).all(), "beyond the slide edge must be white"


def test_boxes_tiff_has_an_implausible_mpp_that_is_refused_and_tiffslide_reads_it():
    path = shared_file("synthetic/openslide-python__boxes.tiff")
    with pytest.raises(MissingMppError, match="plausible"):
        open_slide(path)
    backend = open_backend(path, "tiffslide")
    try:
        assert backend.name == "tiffslide"
        assert backend.level_dimensions[0] == (300, 250)
        expected = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(shared_file("synthetic/openslide-python__boxes.png")).convert("RGB"))
        got = backend.read_region(0, 0, 0, 300, 250)
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("relative", "error"),
    [
        ("bad/not-a-tiff.svs", UnsupportedSlideError),
        ("bad/unopenable-unknown-compression.tiff", UnsupportedSlideError),
        ("bad/incomplete-dicom-frames.dcm", UnsupportedSlideError),
    ],
)
def test_bad_files_fail_at_open_with_their_specific_error(relative, error):
    path = shared_file(relative)
    with pytest.raises(error) as info:
        open_slide(path)
    message = info.value.one_line()
    assert path.name not in message and str(path.parent) not in message, "messages must not leak paths"


def test_corrupt_tile_opens_then_fails_to_decode_with_corrupt_error():
    path = shared_file("bad/unreadable-corrupt-tile.svs")
    with open_slide(path) as slide:
        with pytest.raises(CorruptSlideError) as info:
            slide.read_region(0, 0, 0, 16, 16)
        assert "Bogus marker length" in str(info.value)
        # The backend stays usable for the caller to report and move on.
        with pytest.raises(CorruptSlideError):
            slide.read_thumbnail(8.0)
