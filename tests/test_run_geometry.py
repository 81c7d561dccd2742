"""Each heatmap cell holds exactly its tile's value, read from any pyramid level, in µm."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from pipeline import (
    AnalysisParams,
    EngineSettings,
    GridSettings,
    ModelInfo,
    RunSettings,
    TissueParams,
    analyse_slide,
)
from tests._analytic import RedMeanClassifier
from tests._synthetic import write_pyramid_tiff

MPP = 0.5
CELL_UM = 64.0  # painted pattern: squares of 64 µm with a known red level each


def _red_level(x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """The painted red level (0-255) at µm positions."""
    i, j = np.floor(y_um / CELL_UM).astype(int), np.floor(x_um / CELL_UM).astype(int)
    return (37 * i + 91 * j) % 200 + 30


@pytest.fixture(scope="module")
def pattern_slide(tmp_path_factory):
    h, w = 2560, 3584  # level-0 px: 1280 x 1792 µm
    ys, xs = np.mgrid[0:h, 0:w]
    red = _red_level((xs + 0.5) * MPP, (ys + 0.5) * MPP).astype(np.uint8)
    image = np.stack([red, np.full_like(red, 90), np.full_like(red, 160)], axis=2)
    return write_pyramid_tiff(tmp_path_factory.mktemp("geom") / "pattern.tiff", image, MPP, levels=4, compression="zlib")


@pytest.mark.parametrize(("target_mpp", "tile_px", "stride_px"), [(2.0, 32, 32), (1.0, 64, 32), (4.0, 16, 8), (0.5, 128, 128)])
def test_heatmap_cells_hold_their_tile_values_in_micrometres(pattern_slide, tmp_path, target_mpp, tile_px, stride_px):
    assert tile_px * target_mpp == CELL_UM  # one painted square per tile
    model = RedMeanClassifier(tile_px, target_mpp)
    settings = RunSettings(
        out_dir=tmp_path, model="analytic@1",
        analysis=AnalysisParams(grid=GridSettings(stride_px=stride_px, min_tissue_fraction=0.0, edge="drop"),
                                tissue=TissueParams(min_tissue_area_um2=0), chunk_cells=8),
        engine=EngineSettings(batch_size=16, readers=2, device="cpu"),
    )
    outcome = analyse_slide(
        pattern_slide, model, ModelInfo("analytic", 1, "0" * 64, ("#ff0000", "#0000ff")), settings,
        secret=b"k" * 32,
    )
    assert outcome.status == "done", outcome.error
    group = zarr.open_group(str(outcome.result_dir / "heatmap.ome.zarr"), mode="r")
    multiscale = group.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in multiscale["axes"]] == ["c", "y", "x"]
    level0 = np.asarray(group["0"][...])
    scale = multiscale["datasets"][0]["coordinateTransformations"][0]["scale"]
    translation = multiscale["datasets"][0]["coordinateTransformations"][1]["translation"]
    assert scale == [1.0, stride_px * target_mpp, stride_px * target_mpp]
    assert translation == [0.0, CELL_UM / 2, CELL_UM / 2]
    rows, cols = level0.shape[1:]
    r, c = np.mgrid[0:rows, 0:cols]
    y_um, x_um = translation[1] + r * scale[1], translation[2] + c * scale[2]
    # The tile centred at (x_um, y_um) spans [x_um - 32, x_um + 32) µm.
    aligned = ((x_um - CELL_UM / 2) % CELL_UM == 0) & ((y_um - CELL_UM / 2) % CELL_UM == 0)
    assert aligned.any()
    expected = _red_level(x_um, y_um) / 255.0
    np.testing.assert_allclose(level0[0][aligned], expected[aligned], atol=2e-3)
    np.testing.assert_allclose(level0[0] + level0[1], 1.0, atol=1e-5)
    # Misaligned tiles (stride < tile) straddle squares: their value is the area-weighted mix.
    if (~aligned).any():
        k = np.argwhere(~aligned)[0]
        yy, xx = y_um[tuple(k)], x_um[tuple(k)]
        sub = np.linspace(-CELL_UM / 2 + 0.25, CELL_UM / 2 - 0.25, 128)
        mix = _red_level(xx + sub[None, :], yy + sub[:, None]).mean() / 255.0
        assert level0[0][tuple(k)] == pytest.approx(mix, abs=0.01)
    # Coarser heatmap levels: cell centres are the mean of the 2x2 cells they cover.
    for k, dataset in enumerate(multiscale["datasets"][1:], start=1):
        s = dataset["coordinateTransformations"][0]["scale"][1]
        t = dataset["coordinateTransformations"][1]["translation"][1]
        assert s == pytest.approx(scale[1] * 2**k)
        assert t == pytest.approx(translation[1] + (2**k - 1) / 2 * scale[1])
    # NGFF 0.5: every level names its dimensions after the axes.
    for dataset in multiscale["datasets"]:
        assert group[dataset["path"]].metadata.dimension_names == ("c", "y", "x")
    level1 = np.asarray(group["1"][...]) if "1" in group else None
    if level1 is not None:
        np.testing.assert_allclose(level1[0, 0, 0], level0[0, :2, :2].mean(), rtol=1e-6)
    summary = json.loads((outcome.result_dir / "summary.json").read_text())
    assert summary["tiles"] == outcome.tiles == rows * cols
