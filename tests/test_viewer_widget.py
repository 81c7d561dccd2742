"""The review widget in a real napari viewer (on Xvfb when there is no screen)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from models import Registry
from models._annotations import read_annotations
from pipeline import AnalysisParams, EngineSettings, GridSettings, ModelInfo, RunSettings, analyse_slide
from tests.conftest import shared_file

pytest.importorskip("napari")
pytestmark = [
    pytest.mark.slow,  # napari and Qt: see DEVELOPERS.md
    pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="no X display (install xvfb)"),
]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    model = Registry().load("tissue-qc")
    m = model.manifest
    outcome = analyse_slide(
        shared_file("slides/CMU-1-Small-Region.svs"), model,
        ModelInfo(m.name, m.version, m.weights_sha256, tuple(c.color for c in m.classes)),
        RunSettings(out_dir=tmp_path_factory.mktemp("review"), model="tissue-qc",
                    analysis=AnalysisParams(grid=GridSettings(stride_px=112), chunk_cells=8),
                    engine=EngineSettings(device="cpu")),
        secret=b"r" * 32,
    )
    assert outcome.status == "done"
    return outcome.result_dir


def _open(make_napari_viewer, result, show=False):
    from viewer._widget import ReviewWidget

    viewer = make_napari_viewer(show=show)
    viewer.open(str(result), plugin="wsiflow")
    return viewer, ReviewWidget(viewer)


def test_class_opacity_threshold_and_hotspots(make_napari_viewer, result):
    viewer, widget = _open(make_napari_viewer, result)
    assert [widget.class_box.itemText(i) for i in range(widget.class_box.count())] == ["background", "tissue", "pen", "blur"]
    assert widget.class_box.currentText() == "tissue"
    assert "threshold outline" in viewer.layers  # tissue >= 0.5 somewhere on this slide
    widget.class_box.setCurrentText("pen")
    assert viewer.layers["P(pen)"].visible and not viewer.layers["P(tissue)"].visible
    widget.opacity.setValue(25)
    assert viewer.layers["P(pen)"].opacity == pytest.approx(0.25)
    summary = json.loads((result / "summary.json").read_text())
    assert widget.hotspots.count() == len(summary["hotspots"]["pen"]) == 10
    widget._go_to(widget.hotspots.item(0))
    first = summary["hotspots"]["pen"][0]
    assert tuple(viewer.camera.center[-2:]) == pytest.approx((first["y_um"], first["x_um"]))


def test_review_save_restore_and_train_accepts_it(make_napari_viewer, result):
    viewer, widget = _open(make_napari_viewer, result)
    layer = viewer.layers["review"]
    square = np.array([[500.0, 300.0], [500.0, 600.0], [800.0, 600.0], [800.0, 300.0]])  # (y, x) µm
    layer.add_polygons([square])
    layer.selected_data = {0}
    widget.decision.setCurrentText("correct")
    widget.review_class.setCurrentText("blur")
    widget.comment.setText("out of focus here")
    widget.reviewer.setText("dr-test")
    widget.label_selected()
    path = widget.save(blocking=True)
    document = json.loads(path.read_text())
    (feature,) = document["features"]
    props = feature["properties"]
    assert (props["review"], props["classification"]["name"], props["comment"], props["reviewer"]) == (
        "correct", "blur", "out of focus here", "dr-test")
    assert props["model_sha256"] == document["wsiflow_review"]["model"]["sha256"]
    ring = np.array(feature["geometry"]["coordinates"][0])
    assert ring[0] == pytest.approx([300 / 0.499, 500 / 0.499])  # level-0 pixels (x, y)
    regions = read_annotations(path)
    assert [r.class_name for r in regions] == ["blur"]

    viewer2, widget2 = _open(make_napari_viewer, result)
    restored = viewer2.layers["review"]
    assert len(restored.data) == 1
    np.testing.assert_allclose(restored.data[0][:, -2:], square, atol=1e-6)
    assert list(restored.features["decision"]) == ["correct"] and widget2.reviewer.text() == "dr-test"


def test_screenshot_shows_the_heatmap_over_the_tissue(make_napari_viewer, result):
    viewer, _ = _open(make_napari_viewer, result, show=True)
    heat = viewer.layers["P(tissue)"]
    for layer in viewer.layers:
        layer.visible = layer.name in ("slide", "P(tissue)")
    heat.opacity = 1.0
    viewer.reset_view()
    with_heat = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    heat.visible = False
    without = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    changed = np.abs(with_heat - without).sum(axis=2) > 30
    rows, cols = np.nonzero(changed)
    assert rows.size > 0
    # Where the geometry says the heatmap must be: its cells' extent in world µm, to screen.
    data = np.asarray(heat.data)
    r, c = np.nonzero(data > 0.05)
    spacing, origin = np.array(heat.scale), np.array(heat.translate)
    top_left = origin + np.array([r.min(), c.min()]) * spacing - spacing / 2
    bottom_right = origin + np.array([r.max(), c.max()]) * spacing + spacing / 2
    height, width = changed.shape
    centre, zoom = np.array(viewer.camera.center[-2:]), viewer.camera.zoom

    def to_screen(world):
        return (world - centre) * zoom + np.array([height, width]) / 2

    (y0, x0), (y1, x1) = to_screen(top_left), to_screen(bottom_right)
    tolerance = spacing[0] * zoom  # one heatmap cell
    assert abs(rows.min() - y0) <= tolerance and abs(cols.min() - x0) <= tolerance
    assert abs(rows.max() - y1) <= tolerance and abs(cols.max() - x1) <= tolerance
