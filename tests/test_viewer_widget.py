"""The review widget in a real napari viewer (on Xvfb when there is no screen)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from models import Registry
from models._annotations import read_annotations
from pipeline import AnalysisParams, EngineSettings, GridSettings, ModelInfo, RunSettings, analyse_slide, site_dir
from tests.conftest import shared_file

pytest.importorskip("napari")
pytestmark = [
    pytest.mark.slow,  # napari and Qt: see DEVELOPERS.md
    pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="no X display (install xvfb)"),
]


def analyse(slide, out_dir, secret=b"r" * 32):
    """The bundled model on ``slide`` (CPU, stride 112 px): its result folder."""
    model = Registry().load("tissue-qc")
    m = model.manifest
    outcome = analyse_slide(
        slide, model, ModelInfo(m.name, m.version, m.weights_sha256, tuple(c.color for c in m.classes)),
        RunSettings(out_dir=out_dir, model="tissue-qc",
                    analysis=AnalysisParams(grid=GridSettings(stride_px=112), chunk_cells=8),
                    engine=EngineSettings(device="cpu")),
        secret=secret,
    )
    assert outcome.status == "done"
    return outcome.result_dir


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return analyse(shared_file("slides/CMU-1-Small-Region.svs"), tmp_path_factory.mktemp("review"))


@pytest.fixture
def fresh_result(result, tmp_path):
    """A copy of the result without a review, for tests that save one."""
    import shutil

    copy = tmp_path / "result"
    shutil.copytree(result, copy, symlinks=True)
    (copy / "review.geojson").unlink(missing_ok=True)
    return copy


def _open(make_napari_viewer, result, show=False):
    from viewer._widget import ReviewWidget

    viewer = make_napari_viewer(show=show)
    viewer.open(str(result), plugin="wsiflow")
    return viewer, ReviewWidget(viewer)


def _press(viewer, key, shift=False):
    """A real key press on the canvas, through Qt and napari's key bindings."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    canvas = viewer.window._qt_viewer.canvas.native
    modifier = Qt.KeyboardModifier.ShiftModifier if shift else Qt.KeyboardModifier.NoModifier
    QTest.keyClick(canvas, getattr(Qt.Key, f"Key_{key}"), modifier)


def test_qt6_binding_and_no_deprecation_notice(make_napari_viewer, result):
    import qtpy
    from napari.utils.notifications import notification_manager

    assert qtpy.API_NAME in ("PyQt6", "PySide6"), qtpy.API_NAME
    seen = []
    notification_manager.notification_ready.connect(lambda n: seen.append(str(n.message)))
    _open(make_napari_viewer, result, show=True)
    assert not [m for m in seen if "deprecated" in m.lower()], seen


def test_every_layer_is_in_micrometres(make_napari_viewer, result):
    viewer, _ = _open(make_napari_viewer, result)
    names = [layer.name for layer in viewer.layers]
    assert {"P(tissue)", "tissue", "threshold outline", "hotspots", "review"} <= set(names)
    for layer in viewer.layers:
        assert [str(u) for u in layer.units] == ["micrometer", "micrometer"], layer.name
    assert [str(u) for u in viewer.layers.units] == ["micrometer", "micrometer"]  # what the scale bar uses
    assert viewer.canvas.overlays.scale_bar.visible


def test_class_one_opacity_outline_and_hotspots(make_napari_viewer, result):
    viewer, widget = _open(make_napari_viewer, result)
    assert [widget.class_box.itemText(i) for i in range(widget.class_box.count())] == ["background", "tissue", "pen", "blur"]
    summary = json.loads((result / "summary.json").read_text())
    # The class overview.png shows (summary.json says which and why), else the second one.
    assert widget.class_box.currentText() == (summary.get("overview") or {}).get("class", "tissue")
    widget.class_box.setCurrentText("tissue")
    assert viewer.layers["P(tissue)"].colorbar.visible
    outline = viewer.layers["threshold outline"]
    assert len(outline.data) >= 2 and len(outline.data) % 2 == 0  # black under white, per region
    assert {tuple(np.round(c, 2)) for c in outline.edge_color} == {(0, 0, 0, 1), (1, 1, 1, 1)}
    legend = viewer.canvas.overlays["wsiflow_legend"]
    assert legend.visible and "P(tissue)" in legend.text and "≥ 0.50" in legend.text

    widget.class_box.setCurrentText("pen")
    assert viewer.layers["P(pen)"].visible and not viewer.layers["P(tissue)"].visible
    assert viewer.layers["P(pen)"].colorbar.visible and not viewer.layers["P(tissue)"].colorbar.visible
    # One opacity: the dock's slider and napari's layer controls move the same value.
    widget.opacity.setValue(25)
    assert viewer.layers["P(pen)"].opacity == pytest.approx(0.25)
    viewer.layers["P(pen)"].opacity = 0.8  # as napari's own slider does
    assert widget.opacity.value() == 80 and viewer.layers["P(tissue)"].opacity == pytest.approx(0.8)

    spots = summary["hotspots"]["pen"]
    assert widget.hotspots.count() == len(spots) == 10
    markers = viewer.layers["hotspots"]
    np.testing.assert_allclose(markers.data, [[s["y_um"], s["x_um"]] for s in spots])
    assert list(markers.features["rank"]) == list(range(1, 11))
    widget._go_to(widget.hotspots.item(0))
    assert tuple(viewer.scene.camera.center[-2:]) == pytest.approx((spots[0]["y_um"], spots[0]["x_um"]))
    _press(viewer, "N")
    assert tuple(viewer.scene.camera.center[-2:]) == pytest.approx((spots[1]["y_um"], spots[1]["x_um"]))
    _press(viewer, "N", shift=True)
    _press(viewer, "N", shift=True)
    assert widget.hotspots.currentRow() == 9  # wraps around
    assert tuple(viewer.scene.camera.center[-2:]) == pytest.approx((spots[9]["y_um"], spots[9]["x_um"]))


def test_outline_width_follows_the_zoom(make_napari_viewer, result):
    viewer, widget = _open(make_napari_viewer, result)
    widget.class_box.setCurrentText("tissue")
    outline = viewer.layers["threshold outline"]
    camera = viewer.scene.camera
    camera.zoom = 0.25
    wide = np.asarray(outline.edge_width)
    camera.zoom = 4.0
    narrow = np.asarray(outline.edge_width)
    n = len(outline.data) // 2
    # A few screen pixels at any zoom: the µm width scales with 1/zoom; black wider than white.
    assert wide[0] / narrow[0] == pytest.approx(16, rel=0.2)
    assert 4 <= narrow[0] * 4.0 <= 8 and 2 <= narrow[n] * 4.0 <= 3.5


def test_readout_shows_every_class_whatever_layer_is_active(make_napari_viewer, result):
    viewer, widget = _open(make_napari_viewer, result)
    table = pq.read_table(result / "tiles.parquet").to_pandas()
    tile = table.sort_values("prob_pen").iloc[-1]
    viewer.layers.selection.active = viewer.layers["slide"]
    viewer.cursor.position = (tile["y_um"] + 10, tile["x_um"] - 10)
    text = widget.readout.text()
    for name in ("background", "tissue", "pen", "blur"):
        assert f"{name} {tile[f'prob_{name}']:.2f}" in text, text
    assert f"tissue {tile['tissue_fraction']:.0%} of the tile" in text
    assert f"x {tile['x_um'] - 10:.1f} µm, y {tile['y_um'] + 10:.1f} µm" in text
    # napari's status bar carries the same, although the slide layer is the active one.
    viewer.mouse_over_canvas = True
    viewer.update_status_from_cursor()
    assert viewer.status["coordinates"] == text.removeprefix("under the cursor: ")
    viewer.cursor.position = (10.0, 10.0)  # a glass corner: no tile there
    assert "no tile here" in widget.readout.text()


def test_empty_results_say_so(make_napari_viewer, result, tmp_path):
    viewer, widget = _open(make_napari_viewer, result)
    widget.class_box.setCurrentText("blur")  # never reaches 0.5 on this slide
    assert len(viewer.layers["threshold outline"].data) == 0
    assert widget.message.isVisibleTo(widget) and "No region of blur" in widget.message.text()
    assert "no region with P ≥ 0.50" in viewer.canvas.overlays["wsiflow_legend"].text

    from tests._synthetic import BACKGROUND, write_pyramid_tiff

    blank = write_pyramid_tiff(tmp_path / "glass.tiff", np.full((1200, 1200, 3), BACKGROUND, np.uint8), 0.5, levels=1)
    empty = analyse(blank, tmp_path / "out")
    viewer2, widget2 = _open(make_napari_viewer, empty)
    assert "0 tiles" in widget2.message.text() and widget2.hotspots.count() == 0
    assert viewer2.canvas.overlays["wsiflow_legend"].text.startswith("0 tiles analysed")
    assert len(viewer2.layers["threshold outline"].data) == 0


def test_review_with_keys_table_labels_save_restore_and_train(make_napari_viewer, fresh_result):
    from viewer._canvas import DECISION_COLORS

    viewer, widget = _open(make_napari_viewer, fresh_result)
    widget.class_box.setCurrentText("tissue")
    assert "Shift+C" in widget.instructions.text() and "press <b>P</b>" in widget.instructions.text()
    layer = viewer.layers["review"]
    assert viewer.layers.selection.active is layer
    square = np.array([[500.0, 300.0], [500.0, 600.0], [800.0, 600.0], [800.0, 300.0]])  # (y, x) µm
    triangle = np.array([[1000.0, 300.0], [1000.0, 600.0], [1200.0, 450.0]])
    layer.add_polygons([square, triangle])
    assert list(layer.features["decision"]) == ["unlabelled", "unlabelled"]
    assert widget.table.rowCount() == 2
    layer.selected_data = {0}
    widget.review_class.setCurrentText("blur")
    widget.comment.setText("out of focus here")
    _press(viewer, "E", shift=True)  # correct to the chosen class
    assert list(layer.features["decision"]) == ["correct", "unlabelled"]
    assert layer.text.values[0] == "corrected to blur"  # the text drawn beside the polygon
    assert tuple(np.round(layer.edge_color[0] * 255)) == (255, 234, 0, 255) == (
        *(int(DECISION_COLORS["correct"][i : i + 2], 16) for i in (1, 3, 5)), 255)
    assert [widget.table.item(0, c).text() for c in range(4)] == ["1", "correct", "blur", "out of focus here"]

    widget.go_to_polygon(1)  # a click on the table's second row
    assert layer.selected_data == {1}
    assert tuple(viewer.scene.camera.center[-2:]) == pytest.approx(((1000 + 1200) / 2, 450))
    _press(viewer, "R", shift=True)
    assert list(layer.features["decision"]) == ["correct", "reject"]
    assert layer.features["class"][1] == "tissue"  # the class shown: the model's call is rejected

    widget.reviewer.setText("dr-test")
    path = widget.save(blocking=True)
    document = json.loads(path.read_text())
    first, second = document["features"]
    props = first["properties"]
    assert (props["review"], props["classification"]["name"], props["comment"], props["reviewer"]) == (
        "correct", "blur", "out of focus here", "dr-test")
    assert second["properties"]["review"] == "reject"
    assert props["model_sha256"] == document["wsiflow_review"]["model"]["sha256"]
    ring = np.array(first["geometry"]["coordinates"][0])
    assert ring[0] == pytest.approx([300 / 0.499, 500 / 0.499])  # level-0 pixels (x, y)
    regions = read_annotations(path)
    assert [r.class_name for r in regions] == ["blur"]  # the rejected one is skipped

    viewer2, widget2 = _open(make_napari_viewer, fresh_result)
    restored = viewer2.layers["review"]
    assert len(restored.data) == 2
    np.testing.assert_allclose(restored.data[0][:, -2:], square, atol=1e-6)
    assert list(restored.features["decision"]) == ["correct", "reject"]
    assert list(restored.text.values) == ["corrected to blur", "tissue: rejected"]
    assert widget2.reviewer.text() == "dr-test" and widget2.table.rowCount() == 2


def test_reviewer_asked_once_and_sign_off(make_napari_viewer, fresh_result):
    from privacy import read_audit_log, verify_audit_log

    (site_dir() / "reviewer.json").unlink(missing_ok=True)
    viewer, widget = _open(make_napari_viewer, fresh_result)
    assert widget.reviewer.text() == ""  # never the OS user
    layer = viewer.layers["review"]
    layer.add_polygons([np.array([[500.0, 300.0], [500.0, 600.0], [800.0, 600.0]])])
    assert widget.save(blocking=True) is None  # no name yet: asked for, nothing written
    assert "reviewer" in widget.message.text() and not (fresh_result / "review.geojson").exists()
    widget.reviewer.setText("  Dr Ada Lovelace ")
    assert widget.sign_off(blocking=True) is None  # an unlabelled polygon
    assert "not labelled" in widget.message.text()
    assert json.loads((site_dir() / "reviewer.json").read_text()) == {"reviewer": "Dr Ada Lovelace"}

    layer.selected_data = {0}
    _press(viewer, "C", shift=True)
    before = len(read_audit_log())
    path = widget.sign_off(blocking=True)
    meta = json.loads(path.read_text())["wsiflow_review"]
    assert meta["reviewer"] == "Dr Ada Lovelace" and meta["signoff"]["status"] == "review complete"
    assert meta["signoff"]["signed_at"].endswith("+00:00")
    assert "signed off by Dr Ada Lovelace" in widget.signoff_label.text()
    events = read_audit_log()[before:]
    assert [e["action"] for e in events] == ["review-save", "review-signoff"]
    assert events[1]["slide_id"] == meta["slide_id"] and events[1]["params_digest"]
    assert verify_audit_log().ok
    assert widget.save(blocking=True) is None and "Nothing changed" in widget.message.text()

    viewer2, widget2 = _open(make_napari_viewer, fresh_result)  # remembered, and the sign-off shown
    assert widget2.reviewer.text() == "Dr Ada Lovelace"
    assert "signed off by Dr Ada Lovelace" in widget2.signoff_label.text()
    viewer2.layers["review"].add_polygons([np.array([[900.0, 300.0], [900.0, 600.0], [1000.0, 600.0]])])
    assert "changed since" in widget2.signoff_label.text()
    widget2.save(blocking=True)
    assert "signoff" not in json.loads(path.read_text())["wsiflow_review"]
    assert "withdrawn" in widget2.message.text() and widget2.signoff_label.text() == "not signed off"
