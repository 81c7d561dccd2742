"""The result files other tools read: strict OME-NGFF 0.5, QuPath GeoJSON, the tile table, overview.png.

Generated slides with the analytic model (P(red) = the tile's mean red level) give known
regions, padded edge tiles and a stride smaller than the tile; the real sample slide with the
bundled model checks the same on real data (marked slow).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from PIL import Image

from pipeline import (
    AnalysisParams,
    EngineSettings,
    GridSettings,
    ModelInfo,
    RunSettings,
    TissueParams,
    analyse_slide,
)
from pipeline._overview import OVERVIEW_NOTE_COLOR
from pipeline._tables import cell_polygons
from tests._analytic import RedMeanClassifier
from tests._synthetic import BACKGROUND, TISSUE, write_pyramid_tiff
from tests.conftest import shared_file

MPP = 0.5
TILE_PX, TARGET_MPP, STRIDE_PX = 32, 2.0, 16  # 64 µm tiles every 32 µm
ANALYTIC = ModelInfo("analytic", 1, "0" * 64, ("#d62728", "#1f77b4"))


# -- helpers --------------------------------------------------------------------------------------
def _shoelace(ring: list[list[float]]) -> float:
    xy = np.asarray(ring[:-1], dtype=np.float64)  # GeoJSON rings repeat their first point
    x, y = xy[:, 0], xy[:, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2


def _features(result: Path, kind: str) -> list[dict]:
    geo = json.loads((result / "results.geojson").read_text())
    return [f for f in geo["features"] if f["properties"]["objectType"] == kind]


def _summary(result: Path) -> dict:
    return json.loads((result / "summary.json").read_text())


def _slide_size(result: Path) -> tuple[int, int]:
    slide = _summary(result)["provenance"]["slide"]
    return slide["width"], slide["height"]


def _pink_or_purple(rgb: np.ndarray) -> np.ndarray:
    """Pixels in the hue range of H&E stain (eosin pink to haematoxylin purple), not greyish."""
    from matplotlib.colors import rgb_to_hsv

    hsv = rgb_to_hsv(rgb[..., :3].astype(np.float64) / 255.0)
    hue = hsv[..., 0] * 360
    return ((hue >= 250) | (hue <= 10)) & (hsv[..., 1] > 0.05) & (hsv[..., 2] > 0.15)


def _analytic_settings(out: Path, grid: GridSettings | None = None, overview_class: str | None = None) -> RunSettings:
    analysis = AnalysisParams(grid=grid or GridSettings(stride_px=STRIDE_PX, min_tissue_fraction=0.0),
                              tissue=TissueParams(min_tissue_area_um2=0), chunk_cells=8,
                              overview_class=overview_class)
    return RunSettings(out_dir=out, model="analytic@1", analysis=analysis,
                       engine=EngineSettings(batch_size=32, readers=2, device="cpu"))


def _run_analytic(slide: Path, out: Path, settings: RunSettings | None = None) -> Path:
    outcome = analyse_slide(slide, RedMeanClassifier(TILE_PX, TARGET_MPP), ANALYTIC,
                            settings or _analytic_settings(out), secret=b"k" * 32)
    assert outcome.status == "done", outcome.error
    assert outcome.result_dir is not None
    return outcome.result_dir


# -- slides ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ring_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """700 x 500 µm (not a whole number of tiles: the last row and column are padded) with a
    pink square ring (high red) around a blue hole, on a blue ground (low red)."""
    h, w = 1000, 1400  # level-0 px at 0.5 µm/px
    ys, xs = np.mgrid[0:h, 0:w] * MPP
    red = np.full((h, w), 30, np.uint8)
    red[(ys >= 64) & (ys < 384) & (xs >= 96) & (xs < 480)] = 230
    red[(ys >= 160) & (ys < 288) & (xs >= 224) & (xs < 352)] = 30  # the hole: 128 µm square
    image = np.stack([red, np.full_like(red, 90), np.full_like(red, 160)], axis=2)
    return write_pyramid_tiff(tmp_path_factory.mktemp("ring") / "ring.tiff", image, MPP, levels=3,
                              compression="zlib")


@pytest.fixture(scope="module")
def ring_result(ring_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run_analytic(ring_slide, tmp_path_factory.mktemp("ring-out"))


@pytest.fixture(scope="module")
def cmu_result(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model on the real sample slide at stride 112 px (half the tile)."""
    from models import Registry

    slide = shared_file("slides/CMU-1-Small-Region.svs")
    model = Registry().load("tissue-qc")
    m = model.manifest
    info = ModelInfo(m.name, m.version, m.weights_sha256, tuple(c.color for c in m.classes))
    settings = RunSettings(out_dir=tmp_path_factory.mktemp("cmu"), model="tissue-qc",
                           analysis=AnalysisParams(grid=GridSettings(stride_px=112)),
                           engine=EngineSettings(batch_size=16, device="cpu"))
    outcome = analyse_slide(slide, model, info, settings, secret=b"s" * 32)
    assert outcome.status == "done", outcome.error
    assert outcome.result_dir is not None
    return outcome.result_dir


# -- cell polygons --------------------------------------------------------------------------------
def test_cell_polygons_are_exact_simple_and_oriented_on_any_mask():
    rng = np.random.default_rng(7)
    for _ in range(200):
        mask = rng.random((int(rng.integers(1, 25)), int(rng.integers(1, 25)))) < rng.random()
        total = 0.0
        for polygon in cell_polygons(mask):
            rings = [polygon.shell, *polygon.holes]
            for ring in rings:
                assert len({tuple(v) for v in ring.tolist()}) == len(ring)  # simple: no vertex twice
                steps = np.diff(np.vstack([ring, ring[:1]]), axis=0)
                assert np.all((steps != 0).sum(axis=1) == 1)  # along cell edges only
                assert np.all(np.sign(steps[1:]) != np.sign(steps[:-1]))  # no collinear vertex
            closed = [[*r.tolist(), r[0].tolist()] for r in rings]
            assert _shoelace(closed[0]) > 0 and all(_shoelace(h) < 0 for h in closed[1:])
            area = sum(_shoelace(r) for r in closed)
            assert area == polygon.cells
            total += area
        assert total == mask.sum()


def test_cell_polygons_keep_holes_and_split_corner_contacts():
    mask = np.array([
        [1, 1, 1, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],  # touches the ring only at a corner: a polygon of its own
    ], dtype=bool)
    ring, corner = cell_polygons(mask)
    assert ring.cells == 8 and ring.first_cell == (0, 0)
    assert ring.shell.tolist() == [[0, 0], [3, 0], [3, 3], [0, 3]]
    assert [h.tolist() for h in ring.holes] == [[[1, 1], [1, 2], [2, 2], [2, 1]]]
    assert corner.cells == 1 and corner.first_cell == (3, 3) and not corner.holes


# -- OME-NGFF -------------------------------------------------------------------------------------
def _check_ngff(result: Path, tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader
    from ome_zarr_models.v05.image import Image as NgffImage
    from pydantic import ValidationError

    for name, axes in (("heatmap.ome.zarr", ["c", "y", "x"]), ("tissue.ome.zarr", ["y", "x"])):
        group = zarr.open_group(str(result / name), mode="r")
        model = NgffImage.from_zarr(group)  # strict: raises on any violation of NGFF 0.5
        (multiscale,) = model.ome_attributes.multiscales
        assert [a.name for a in multiscale.axes] == axes
        for dataset in multiscale.datasets:
            meta = json.loads((result / name / dataset.path / "zarr.json").read_text())
            assert meta["dimension_names"] == axes
        node = next(iter(Reader(parse_url(str(result / name)))()))
        assert any(isinstance(s, Multiscales) for s in node.specs)
        assert np.asarray(node.data[0]).shape == group["0"].shape
    # The validator is strict: the same heatmap without dimension_names is rejected.
    broken = tmp_path / "broken.ome.zarr"
    shutil.copytree(result / "heatmap.ome.zarr", broken)
    meta_path = broken / "0" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["dimension_names"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValidationError, match="dimension_names"):
        NgffImage.from_zarr(zarr.open_group(str(broken), mode="r"))


def test_both_zarrs_are_strict_ngff_0_5(ring_result, tmp_path):
    _check_ngff(ring_result, tmp_path)


@pytest.mark.slow
def test_both_zarrs_of_the_sample_slide_are_strict_ngff_0_5(cmu_result, tmp_path):
    _check_ngff(cmu_result, tmp_path)
    # Pixel centres (NGFF and napari): a heatmap cell sits at its tile's centre, a mask pixel
    # at half a mask pixel.
    heat = zarr.open_group(str(cmu_result / "heatmap.ome.zarr"), mode="r").attrs["ome"]["multiscales"][0]
    assert heat["datasets"][0]["coordinateTransformations"][1]["translation"] == [0.0, 112.0, 112.0]
    tissue = zarr.open_group(str(cmu_result / "tissue.ome.zarr"), mode="r").attrs["ome"]["multiscales"][0]
    mask_mpp = _summary(cmu_result)["tissue"]["mask_mpp"]
    assert tissue["datasets"][0]["coordinateTransformations"][1]["translation"] == [mask_mpp / 2] * 2


# -- GeoJSON --------------------------------------------------------------------------------------
def _check_within_slide(result: Path) -> None:
    width, height = _slide_size(result)
    features = json.loads((result / "results.geojson").read_text())["features"]
    points = np.array([p for f in features for ring in f["geometry"]["coordinates"] for p in ring])
    assert points[:, 0].min() >= 0 and points[:, 1].min() >= 0
    assert points[:, 0].max() <= width and points[:, 1].max() <= height
    # ...although the padded edge tiles the model saw reach past the slide.
    tiles = [f["properties"]["measurements"] for f in _features(result, "detection")]
    assert (max(t["tile_y"] + t["tile_height"] for t in tiles) > height
            or max(t["tile_x"] + t["tile_width"] for t in tiles) > width)


def _boxes(detections: list[dict]) -> np.ndarray:
    rings = np.array([f["geometry"]["coordinates"][0] for f in detections])  # (n, 5, 2)
    return np.stack([rings[:, :, 0].min(1), rings[:, :, 1].min(1), rings[:, :, 0].max(1), rings[:, :, 1].max(1)], 1)


def _check_no_overlap(result: Path) -> None:
    detections = _features(result, "detection")
    b = _boxes(detections)
    dx = np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0])
    dy = np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1])
    overlap = np.clip(dx, 0, None) * np.clip(dy, 0, None)
    np.fill_diagonal(overlap, 0)
    assert overlap.max() <= 1e-6
    # The tiles themselves overlap (stride < tile): the footprint is kept as measurements.
    m = detections[0]["properties"]["measurements"]
    assert m["tile_width"] > b[0, 2] - b[0, 0]


def _check_areas(result: Path) -> None:
    summary = _summary(result)
    mpp = summary["provenance"]["mpp"]
    um2_per_px = mpp["mpp_x"] * mpp["mpp_y"]
    classes = summary["classes"]
    regions = _features(result, "annotation")
    assert len(regions) == summary["regions"]
    detections = _features(result, "detection")
    for name, entry in classes.items():
        # Region polygons (holes subtracted) cover exactly the cells at or above the threshold...
        mine = [f for f in regions if f["properties"]["classification"]["name"] == name]
        area = sum(_shoelace(ring) for f in mine for ring in f["geometry"]["coordinates"]) * um2_per_px / 1e6
        assert area == pytest.approx(entry["region_area_mm2"], abs=1.5e-6)
        for f in mine:
            measured = sum(_shoelace(ring) for ring in f["geometry"]["coordinates"]) * um2_per_px
            assert f["properties"]["measurements"]["area_um2"] == pytest.approx(measured, abs=1e-3)
        # ...and the detections of a class add up to its area.
        cells = [f for f in detections if f["properties"]["classification"]["name"] == name]
        b = _boxes(cells) if cells else np.zeros((0, 4))
        assert ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum() * um2_per_px / 1e6 == pytest.approx(
            entry["area_mm2"], abs=1.5e-6)
    # Every cell is in exactly one class: the class areas add up to the detections' union.
    table = pq.read_table(result / "tiles.parquet")
    total = sum(e["area_mm2"] for e in classes.values())
    assert total == pytest.approx(table.column("cell_area_um2").to_numpy().sum() / 1e6, abs=1e-5)


def test_geojson_objects_lie_within_the_slide(ring_result):
    _check_within_slide(ring_result)
    tiles = [f["properties"]["measurements"] for f in _features(ring_result, "detection")]
    width, height = _slide_size(ring_result)
    assert max(t["tile_x"] + t["tile_width"] for t in tiles) > width  # padded on both edges
    assert max(t["tile_y"] + t["tile_height"] for t in tiles) > height


def test_detections_are_heatmap_cells_that_do_not_overlap(ring_result):
    _check_no_overlap(ring_result)
    width = _boxes(_features(ring_result, "detection"))
    interior = width[(width[:, 0] > 0) & (width[:, 2] < _slide_size(ring_result)[0])]
    assert (interior[:, 2] - interior[:, 0]) == pytest.approx(STRIDE_PX * TARGET_MPP / MPP)


def test_region_polygons_follow_cell_edges_and_match_the_summary_areas(ring_result):
    _check_areas(ring_result)
    red = [f for f in _features(ring_result, "annotation") if f["properties"]["classification"]["name"] == "red"]
    assert len(red) == 1 and len(red[0]["geometry"]["coordinates"]) == 2  # the ring: a shell and its hole
    shell, hole = red[0]["geometry"]["coordinates"]
    assert _shoelace(shell) > 0 > _shoelace(hole)  # GeoJSON's right-hand rule
    # Along cell edges: every vertex is a cell corner (tile centre +- half a stride, or the slide edge).
    stride, half_tile = STRIDE_PX * TARGET_MPP / MPP, TILE_PX * TARGET_MPP / MPP / 2
    for v in np.array(shell + hole).ravel():
        k = (v - half_tile + stride / 2) / stride
        assert k == pytest.approx(round(k))


def test_feature_ids_are_unique_stable_uuids(ring_slide, ring_result, tmp_path):
    features = json.loads((ring_result / "results.geojson").read_text())["features"]
    ids = [f["id"] for f in features]
    keys = [f["properties"]["metadata"]["wsiflow_id"] for f in features]
    assert len(set(ids)) == len(ids) and len(set(keys)) == len(keys)
    assert all(str(uuid.UUID(i)) == i for i in ids)  # QuPath reads the id as a UUID
    table = pq.read_table(ring_result / "tiles.parquet")
    detections = _features(ring_result, "detection")
    assert [f["properties"]["metadata"]["wsiflow_id"] for f in detections] == [
        f"tile-{r}-{c}" for r, c in zip(table.column("row").to_pylist(), table.column("col").to_pylist(), strict=True)]
    assert {k.rsplit("-", 1)[0] for k in keys if k.startswith("region-")} == {"region-red", "region-not_red"}
    # Recomputed from scratch into another folder: the same ids, in the same order.
    again = _run_analytic(ring_slide, tmp_path, _analytic_settings(tmp_path))
    assert [f["id"] for f in json.loads((again / "results.geojson").read_text())["features"]] == ids
    # Another grid is another set of objects: other ids.
    other = _run_analytic(ring_slide, tmp_path / "other", _analytic_settings(
        tmp_path / "other", grid=GridSettings(stride_px=TILE_PX, min_tissue_fraction=0.0)))
    other_ids = {f["id"] for f in json.loads((other / "results.geojson").read_text())["features"]}
    assert not other_ids & set(ids)


def test_tile_table_has_slide_and_model_columns(ring_result):
    table = pq.read_table(ring_result / "tiles.parquet")
    summary = _summary(ring_result)
    assert table.column_names[:2] == ["slide_id", "model"]
    assert set(table.column("slide_id").to_pylist()) == {summary["slide_id"]}
    assert set(table.column("model").to_pylist()) == {"analytic@1"}
    assert table.num_rows == summary["tiles"] > 0


@pytest.mark.slow
def test_sample_slide_geojson_is_within_bounds_without_overlap_and_matches_the_summary(cmu_result):
    assert _slide_size(cmu_result) == (2220, 2967)
    _check_within_slide(cmu_result)
    _check_no_overlap(cmu_result)
    _check_areas(cmu_result)
    table = pq.read_table(cmu_result / "tiles.parquet")
    assert set(table.column("model").to_pylist()) == {"tissue-qc@2"}


# -- overview.png ---------------------------------------------------------------------------------
def _overview(result: Path) -> tuple[np.ndarray, dict]:
    with Image.open(result / "overview.png") as image:
        return np.asarray(image.convert("RGB")), dict(image.info)


def _note_pixels(rgb: np.ndarray) -> int:
    note = tuple(int(OVERVIEW_NOTE_COLOR[i : i + 2], 16) for i in (1, 3, 5))
    return int(np.all(rgb == note, axis=2).sum())


def test_overview_has_no_stain_coloured_pixel_and_names_its_class(ring_slide, ring_result):
    import tifffile

    slide_pixels = tifffile.imread(ring_slide)
    assert _pink_or_purple(slide_pixels).mean() > 0.1  # the slide itself is pink and purple...
    rgb, info = _overview(ring_result)
    assert _pink_or_purple(rgb).sum() == 0  # ...its overview has none of it
    assert _note_pixels(rgb) == 0
    # The heatmap is there: blue-to-yellow cells cover a good part of the picture.
    from matplotlib.colors import rgb_to_hsv

    hsv = rgb_to_hsv(rgb / 255.0)
    assert ((hsv[..., 1] > 0.25) & (hsv[..., 0] * 360 > 40) & (hsv[..., 0] * 360 < 240)).mean() > 0.05
    overview = _summary(ring_result)["overview"]
    # A two-class model without background/tissue classes: the second class by default.
    assert overview == {"class": "not_red", "reason": "default: highest mean probability among not_red"}
    assert info["Description"] == "P(not_red)"


def test_overview_class_requested_is_shown_and_recorded(ring_slide, tmp_path):
    result = _run_analytic(ring_slide, tmp_path, _analytic_settings(tmp_path, overview_class="red"))
    assert _summary(result)["overview"] == {"class": "red", "reason": "requested (overview_class)"}
    assert _overview(result)[1]["Description"] == "P(red)"


def test_an_empty_slide_says_so_on_its_overview(tmp_path):
    blank = np.full((800, 1000, 3), BACKGROUND, np.uint8)
    slide = write_pyramid_tiff(tmp_path / "blank.tiff", blank, MPP, levels=2, compression="zlib")
    settings = RunSettings(out_dir=tmp_path / "out", model="analytic@1",
                           engine=EngineSettings(batch_size=8, readers=1, device="cpu"))
    result = _run_analytic(slide, tmp_path, settings)
    summary = _summary(result)
    assert summary["tiles"] == 0 and summary["regions"] == 0
    rgb, info = _overview(result)
    assert info["Description"] == "no tissue found: 0 tiles analysed"
    assert _note_pixels(rgb) > 2000  # the notice's box is drawn
    assert json.loads((result / "results.geojson").read_text())["features"] == []
    table = pq.read_table(result / "tiles.parquet")
    assert table.num_rows == 0 and table.column_names[:2] == ["slide_id", "model"]
    _check_ngff(result, tmp_path)


def test_an_overview_of_pink_tissue_stays_free_of_pink(tmp_path):
    """The synthetic H&E-like tissue colour, under the heatmap, shows grey and blue-to-yellow only."""
    image = np.full((1000, 1200, 3), BACKGROUND, np.uint8)
    image[200:800, 200:1000] = TISSUE
    slide = write_pyramid_tiff(tmp_path / "pink.tiff", image, MPP, levels=3, compression="zlib")
    result = _run_analytic(slide, tmp_path / "out", _analytic_settings(tmp_path / "out"))
    assert _summary(result)["tiles"] > 0
    assert _pink_or_purple(_overview(result)[0]).sum() == 0


@pytest.mark.slow
def test_sample_slide_overview_shows_the_worst_artefact_without_stain_colours(cmu_result):
    overview = _summary(cmu_result)["overview"]
    assert overview == {"class": "pen", "reason": "default: highest mean probability among pen, blur"}
    rgb, info = _overview(cmu_result)
    assert info["Description"] == "P(pen)"
    assert _pink_or_purple(rgb).sum() == 0 and _note_pixels(rgb) == 0
