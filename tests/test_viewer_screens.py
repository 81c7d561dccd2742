"""What the pathologist sees, checked on real screenshots (napari on Xvfb), by pixels.

Each check toggles one thing (the colour bar, the legend, the outline, ...) and compares two
screenshots of the canvas, so it finds where that thing was drawn and in which colours.
The last screenshots are saved to $WSIFLOW_SHOTS (default /tmp/viewer-shots) to look at.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared_file

pytest.importorskip("napari")
pytestmark = [
    pytest.mark.slow,  # napari and Qt: see DEVELOPERS.md
    pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="no X display (install xvfb)"),
]

SHOTS = Path(os.environ.get("WSIFLOW_SHOTS", "/tmp/viewer-shots"))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from tests.test_viewer_widget import analyse

    return analyse(shared_file("slides/CMU-1-Small-Region.svs"), tmp_path_factory.mktemp("screens"), b"s" * 32)


def _viewer(make_napari_viewer, result):
    from viewer._widget import ReviewWidget

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1280, 900)
    viewer.open(str(result), plugin="wsiflow")
    widget = ReviewWidget(viewer)
    viewer.window.add_dock_widget(widget, name="wsiflow review", area="right")
    widget.class_box.setCurrentText("tissue")
    _settle()
    viewer.reset_view()
    return viewer, widget


def _settle() -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(3):
        QApplication.processEvents()


def _shot(viewer) -> np.ndarray:
    return viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)


def _changed(before: np.ndarray, after: np.ndarray, tolerance: int = 30) -> np.ndarray:
    return np.abs(after - before).sum(axis=2) > tolerance


def _toggle(viewer, thing) -> tuple[np.ndarray, np.ndarray]:
    """Screenshots with ``thing`` (anything with ``visible``) shown and hidden; (shown, changed)."""
    thing.visible = True
    shown = _shot(viewer)
    thing.visible = False
    hidden = _shot(viewer)
    thing.visible = True
    return shown, _changed(hidden, shown)


def _save(image: np.ndarray, name: str) -> None:
    from PIL import Image

    SHOTS.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)[..., :3]).save(SHOTS / name)


def _to_screen(viewer, world, shape):
    centre, zoom = np.array(viewer.scene.camera.center[-2:]), viewer.scene.camera.zoom
    return (np.asarray(world) - centre) * zoom + np.array(shape[:2]) / 2


def test_colour_bar_legend_and_micrometre_scale_bar(make_napari_viewer, result):
    viewer, widget = _viewer(make_napari_viewer, result)
    heat = viewer.layers["P(tissue)"]
    shown, changed = _toggle(viewer, heat.colorbar)
    height, width = changed.shape
    rows, cols = np.nonzero(changed)
    assert rows.size > 500, "no colour bar drawn"
    assert cols.min() > 0.75 * width and rows.max() < 0.5 * height  # top right, out of the way
    bar = shown[changed]
    greenish = (bar[:, 1] > bar[:, 0] + 40) & (bar[:, 1] > bar[:, 2] + 40)
    assert greenish.sum() > 200, "the colour bar does not show the class colour (tissue: green)"

    legend = viewer.canvas.overlays["wsiflow_legend"]
    shown, changed = _toggle(viewer, legend)
    rows, cols = np.nonzero(changed)
    assert rows.size > 300 and cols.max() < 0.75 * width and rows.max() < 0.25 * height  # top left
    assert (shown[changed].min(axis=1) > 200).sum() > 100, "no light legend text"

    scale_bar = viewer.canvas.overlays.scale_bar
    shown, changed = _toggle(viewer, scale_bar)
    rows, cols = np.nonzero(changed)
    assert rows.size > 100 and rows.min() > 0.75 * height and cols.min() > 0.6 * width  # bottom right
    visual = viewer.window._qt_viewer.canvas._viewer_overlay_to_visual[scale_bar][0]
    assert visual.node.text.text.endswith(" µm"), visual.node.text.text  # never "pixel"

    # The readout in napari's status bar and in the dock, as a mouse over the tissue leaves it.
    viewer.layers.selection.active = viewer.layers["slide"]
    viewer.cursor.position = (1200.0, 700.0)
    viewer.mouse_over_canvas = True
    viewer.update_status_from_cursor()
    assert viewer.status["coordinates"].startswith("x 700.0 µm, y 1200.0 µm · P: background ")
    _settle()
    _save(viewer.screenshot(canvas_only=False, flash=False), "review-window.png")


def test_threshold_outline_is_white_on_black_not_the_heatmap_colour(make_napari_viewer, result):
    viewer, widget = _viewer(make_napari_viewer, result)
    heat, outline = viewer.layers["P(tissue)"], viewer.layers["threshold outline"]
    heat.opacity = 1.0
    shown, changed = _toggle(viewer, outline)
    _save(shown, "outline-canvas.png")
    assert changed.sum() > 500, "the outline is not visible"
    colours = shown[changed]
    white = (colours.min(axis=1) >= 235).sum()
    black = (colours.max(axis=1) <= 40).sum()
    assert white > 200 and black > 200, (white, black)
    # The heatmap's own colours (the class colour at every probability) are neither.
    cmap = heat.colormap.map(np.linspace(0, 1, 64))[:, :3] * 255
    assert cmap.min(axis=1).max() < 200 and cmap.max(axis=1).min() > 60
    # Where the outline is drawn: along the regions' edges, a few pixels wide.
    rows, cols = np.nonzero(changed)
    polygons = outline.data[: len(outline.data) // 2]
    corners = np.concatenate([_to_screen(viewer, p, changed.shape) for p in polygons])
    assert abs(rows.min() - corners[:, 0].min()) <= 6 and abs(cols.max() - corners[:, 1].max()) <= 6


def test_heatmap_lies_over_its_tiles(make_napari_viewer, result):
    viewer, _ = _viewer(make_napari_viewer, result)
    heat = viewer.layers["P(tissue)"]
    for layer in viewer.layers:
        layer.visible = layer.name in ("slide", "P(tissue)")
    heat.opacity = 1.0
    heat.colorbar.visible = False
    viewer.canvas.overlays["wsiflow_legend"].visible = False
    viewer.reset_view()
    _, changed = _toggle(viewer, heat)
    rows, cols = np.nonzero(changed)
    assert rows.size > 0
    # Where the geometry says the heatmap must be: its cells' extent in world µm, to screen.
    data = np.asarray(heat.data)
    r, c = np.nonzero(data > 0.05)
    spacing, origin = np.array(heat.scale), np.array(heat.translate)
    (y0, x0) = _to_screen(viewer, origin + np.array([r.min(), c.min()]) * spacing - spacing / 2, changed.shape)
    (y1, x1) = _to_screen(viewer, origin + np.array([r.max(), c.max()]) * spacing + spacing / 2, changed.shape)
    tolerance = spacing[0] * viewer.scene.camera.zoom  # one heatmap cell
    assert abs(rows.min() - y0) <= tolerance and abs(cols.min() - x0) <= tolerance
    assert abs(rows.max() - y1) <= tolerance and abs(cols.max() - x1) <= tolerance


def test_labelled_polygon_and_hotspot_markers_are_drawn(make_napari_viewer, result, tmp_path):
    import shutil

    copy = tmp_path / "result"
    shutil.copytree(result, copy, symlinks=True)
    viewer, widget = _viewer(make_napari_viewer, copy)
    review = viewer.layers["review"]
    review.add_polygons([np.array([[600.0, 400.0], [600.0, 900.0], [1100.0, 900.0], [1100.0, 400.0]])])
    review.selected_data = {0}
    widget.label_selected("confirm")
    review.selected_data = set()
    shown, changed = _toggle(viewer, review)
    colours = shown[changed]
    cyan = (colours[:, 0] < 90) & (colours[:, 1] > 170) & (colours[:, 2] > 200)
    assert cyan.sum() > 100, "no confirm-coloured outline and label"
    assert review.text.values[0] == "tissue: confirmed"

    markers = viewer.layers["hotspots"]
    shown, changed = _toggle(viewer, markers)
    first = _to_screen(viewer, markers.data[0], changed.shape).round().astype(int)
    window = changed[first[0] - 12 : first[0] + 13, first[1] - 12 : first[1] + 13]
    assert window.sum() > 20, "no marker at the first hotspot"
    _save(shown, "review-canvas.png")

    widget.class_box.setCurrentText("blur")  # an empty state: no region above the threshold
    _settle()
    _save(viewer.screenshot(canvas_only=False, flash=False), "empty-state-window.png")
    assert widget.message.isVisibleTo(widget) and "No region of blur" in widget.message.text()
