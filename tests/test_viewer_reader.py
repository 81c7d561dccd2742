"""The napari reader through npe2, without a window: layers, laziness and µm alignment."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from models import Registry
from pipeline import AnalysisParams, EngineSettings, GridSettings, ModelInfo, RunSettings, analyse_slide
from tests.conftest import shared_file

npe2 = pytest.importorskip("npe2")


@pytest.fixture(scope="module")
def result(tmp_path_factory, cmu_svs_module):
    model = Registry().load("tissue-qc")
    m = model.manifest
    outcome = analyse_slide(
        cmu_svs_module, model, ModelInfo(m.name, m.version, m.weights_sha256, tuple(c.color for c in m.classes)),
        RunSettings(out_dir=tmp_path_factory.mktemp("viewer"), model="tissue-qc",
                    analysis=AnalysisParams(grid=GridSettings(stride_px=112), chunk_cells=8),
                    engine=EngineSettings(device="cpu")),
        secret=b"v" * 32,
    )
    assert outcome.status == "done"
    return outcome.result_dir


@pytest.fixture(scope="module")
def cmu_svs_module():
    return shared_file("slides/CMU-1-Small-Region.svs")


def _read(path):
    npe2.PluginManager.instance().discover()
    return npe2.read([str(path)], plugin_name="wsiflow", stack=False)


def test_result_folder_gives_slide_heatmaps_and_mask_aligned_in_micrometres(result):
    layers = _read(result)
    kinds = [(meta["name"], kind) for _, meta, kind in layers]
    # The model folder (OUT/<slide id>/<model>/) opens its `latest` result, the same layers.
    assert [(meta["name"], kind) for _, meta, kind in _read(result.parent)] == kinds
    assert kinds[0] == ("slide", "image")
    assert [n for n, _ in kinds[1:5]] == ["P(background)", "P(tissue)", "P(pen)", "P(blur)"]
    assert kinds[5] == ("tissue", "labels")

    slide_data, slide_meta, _ = layers[0]
    assert slide_meta["rgb"] and not slide_meta["multiscale"]  # this slide has a single level
    assert slide_data.shape == (2967, 2220, 3)
    assert slide_meta["scale"] == pytest.approx((0.499, 0.499))
    assert slide_meta["translate"] == pytest.approx((0.2495, 0.2495))

    # Every layer in µm, so napari's scale bar and cursor read µm (one layer without would make it "pixel").
    assert all(meta["units"] == ("um", "um") for _, meta, _ in layers)

    heat_data, heat_meta, _ = layers[2]  # P(tissue)
    assert heat_meta["scale"] == pytest.approx((112.0, 112.0))
    assert heat_meta["translate"] == pytest.approx((112.0, 112.0))
    assert heat_meta["contrast_limits"] == (0.0, 1.0)
    # The class visible is the one overview.png shows (summary.json says which), else the second.
    summary = json.loads((result / "summary.json").read_text(encoding="utf-8"))
    shown = (summary.get("overview") or {}).get("class", "tissue")
    assert [meta["name"] for _, meta, _ in layers[1:5] if meta["visible"]] == [f"P({shown})"]

    table = pq.read_table(result / "tiles.parquet")
    rows, cols = table.column("row").to_numpy(), table.column("col").to_numpy()
    x_um, y_um = table.column("x_um").to_numpy(), table.column("y_um").to_numpy()
    x0, y0 = table.column("x").to_numpy(), table.column("y").to_numpy()
    width = table.column("width").to_numpy()
    prob = table.column("prob_tissue").to_numpy()
    level0 = np.asarray(heat_data[0] if heat_meta["multiscale"] else heat_data)
    for k in range(0, len(rows), 7):
        # World position of the heatmap cell = the tile's centre in µm...
        world = np.array(heat_meta["translate"]) + np.array([rows[k], cols[k]]) * np.array(heat_meta["scale"])
        assert world == pytest.approx((y_um[k], x_um[k]))
        # ...which is, on the slide layer, the centre of the tile's level-0 pixels.
        pixel = (world - np.array(slide_meta["translate"])) / np.array(slide_meta["scale"])
        assert pixel == pytest.approx((y0[k] + width[k] / 2 - 0.5, x0[k] + width[k] / 2 - 0.5), abs=1e-6)
        assert level0[rows[k], cols[k]] == pytest.approx(prob[k])


def test_slide_pixels_are_read_lazily_and_correctly(result, cmu_svs_module):
    from pipeline import open_slide

    data = _read(result)[0][0]
    assert data.chunksize[:2] == (1024, 1024)  # read chunk by chunk, never level 0 whole
    with open_slide(cmu_svs_module) as slide:
        np.testing.assert_array_equal(np.asarray(data[1000:1100, 500:640]), slide.read_region(500, 1000, 0, 140, 100))


def test_plain_slide_and_refusals(tmp_path):
    layers = _read(shared_file("slides/CMU-1-Small-Region.svs"))
    assert len(layers) == 1 and layers[0][1]["name"] == "slide"
    from viewer import napari_get_reader

    (tmp_path / "notes.txt").write_text("hello")
    for path in [tmp_path / "notes.txt", tmp_path / "missing.svs", shared_file("bad/not-a-tiff.svs"),
                 shared_file("slides/TCGA-CR-7395-crop-jp2k-no-mpp.svs"), shared_file("images/he-tile-240px.png"), tmp_path]:
        assert napari_get_reader(str(path)) is None, path.name
    assert napari_get_reader([str(tmp_path), str(tmp_path)]) is None


def test_pyramidal_slide_is_a_lazy_multiscale_layer(tmp_path):
    from tests._synthetic import write_pyramid_tiff

    image = np.full((3000, 4000, 3), 230, np.uint8)
    image[1000:2000, 1000:3000] = (180, 60, 150)
    path = write_pyramid_tiff(tmp_path / "pyramid.tiff", image, 0.25, levels=3)
    (levels, meta, kind), = _read(path)
    assert kind == "image" and meta["multiscale"]
    assert [lv.shape[:2] for lv in levels] == [(3000, 4000), (1500, 2000), (750, 1000)]
    assert meta["scale"] == pytest.approx((0.25, 0.25)) and meta["translate"] == pytest.approx((0.125, 0.125))
    assert np.abs(np.asarray(levels[2][300:320, 400:420]).astype(int) - (180, 60, 150)).max() <= 12


def test_sample_data_contribution(result, monkeypatch):
    npe2.PluginManager.instance().discover()
    manifest = npe2.PluginManager.instance().get_manifest("wsiflow")
    assert [s.key for s in manifest.contributions.sample_data] == ["demo"]
    monkeypatch.setenv("WSIFLOW_DEMO_OUT", str(result.parents[2]))  # OUT/<slide id>/<model>/<result>
    from viewer._sample import demo_result

    names = [meta["name"] for _, meta, _ in demo_result()]
    assert names[0] == "slide" and "P(tissue)" in names


def test_opening_a_result_or_a_slide_is_recorded_in_the_audit_log(result, cmu_svs_module):
    from privacy import read_audit_log, verify_audit_log

    before = len(read_audit_log())
    _read(result)
    _read(cmu_svs_module)
    views = [e for e in read_audit_log()[before:] if e["action"] == "view"]
    summary = json.loads((result / "summary.json").read_text(encoding="utf-8"))
    assert [e["slide_id"] for e in views][:1] == [summary["slide_id"]]
    assert views[0]["model_digest"] == summary["provenance"]["model"]["sha256"]
    assert len(views) == 2 and views[1]["slide_id"].startswith("s-")
    assert verify_audit_log().ok
