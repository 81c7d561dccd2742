"""What the review widget draws on napari's canvas (no Qt here): the legend, the threshold
outline, hotspot markers and the review layer's look.

Line widths are given in screen pixels and turned into µm at the current zoom (napari's
shapes measure edges in data units), so outlines stay visible at every zoom.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._layers import UNITS
from ._review import UNLABELLED

__all__ = [
    "OUTLINE_LAYER",
    "REVIEW_LAYER",
    "HOTSPOT_LAYER",
    "LEGEND_OVERLAY",
    "DECISION_COLORS",
    "OUTLINE_COLORS",
    "decision_label",
    "set_legend",
    "show_scale_bar",
    "ensure_outline_layer",
    "draw_outline",
    "ensure_review_layer",
    "style_review_layer",
    "ensure_hotspot_layer",
    "show_hotspots",
    "screen_width_um",
    "set_screen_widths",
]

OUTLINE_LAYER = "threshold outline"
REVIEW_LAYER = "review"
HOTSPOT_LAYER = "hotspots"
LEGEND_OVERLAY = "wsiflow_legend"

# Saturated hues away from H&E's pinks and purples and from each other.
DECISION_COLORS = {"confirm": "#00e5ff", "reject": "#ff1744", "correct": "#ffea00", UNLABELLED: "#ff40ff"}
OUTLINE_COLORS = ("#000000", "#ffffff")
"""The threshold outline: a white line on a black one, visible over any heatmap colour, glass or stain."""
_OUTLINE_PX = (6.0, 2.5)
_REVIEW_PX = 3.0


def decision_label(class_name: str, decision: str) -> str:
    """The text shown on the canvas beside a reviewed polygon."""
    if decision == "confirm":
        return f"{class_name}: confirmed"
    if decision == "reject":
        return f"{class_name}: rejected"
    if decision == "correct":
        return f"corrected to {class_name}"
    return "unlabelled (select, then Shift+C / R / E)"


def show_scale_bar(viewer: Any) -> None:
    viewer.canvas.overlays.scale_bar.visible = True


def set_legend(viewer: Any, text: str) -> None:
    """The text legend in the canvas's top-left corner (created on first use)."""
    from napari.components.overlays import TextOverlay

    overlays = viewer.canvas.overlays
    if LEGEND_OVERLAY not in overlays:
        overlays[LEGEND_OVERLAY] = TextOverlay(position="top_left", box=True, font_size=11)
    overlays[LEGEND_OVERLAY].text = text
    overlays[LEGEND_OVERLAY].visible = bool(text)


def screen_width_um(viewer: Any, pixels: float) -> float:
    """``pixels`` screen pixels in µm at the current zoom, rounded to a quarter octave so
    zooming redraws lines only when their width changes visibly."""
    zoom = max(float(viewer.scene.camera.zoom), 1e-9)
    return float(2 ** (np.round(np.log2(pixels / zoom) * 4) / 4))


def _add_shapes(viewer: Any, name: str, **kwargs: Any) -> Any:
    # Opaque lines (napari's default 0.7 turns the white line grey).
    return viewer.add_shapes(name=name, units=UNITS, blending="translucent_no_depth", opacity=1.0, **kwargs)


def ensure_outline_layer(viewer: Any) -> Any:
    if OUTLINE_LAYER in viewer.layers:
        return viewer.layers[OUTLINE_LAYER]
    layer = _add_shapes(viewer, OUTLINE_LAYER, face_color=[0, 0, 0, 0])
    layer.locked = True  # drawn by the widget; not for editing
    return layer


def draw_outline(viewer: Any, polygons: list[np.ndarray]) -> Any:
    """Each polygon twice, a wide black line under a narrow white one."""
    layer = ensure_outline_layer(viewer)
    layer.selected_data = set()
    layer.data = []
    if polygons:
        layer.add_polygons(polygons + polygons)
        n = len(polygons)
        layer.edge_color = [OUTLINE_COLORS[0]] * n + [OUTLINE_COLORS[1]] * n
        layer.face_color = [[0, 0, 0, 0]] * (2 * n)
    set_screen_widths(viewer)
    return layer


def ensure_review_layer(viewer: Any) -> Any:
    if REVIEW_LAYER in viewer.layers:
        return viewer.layers[REVIEW_LAYER]
    from napari.layers.utils.color_encoding import NominalColorEncoding
    from napari.utils.colormaps.categorical_colormap import CategoricalColormap

    text_colour = NominalColorEncoding(
        feature="decision",
        colormap=CategoricalColormap(colormap=DECISION_COLORS, fallback_color=DECISION_COLORS[UNLABELLED]),
    )
    return _add_shapes(
        viewer, REVIEW_LAYER, shape_type="polygon", edge_color=DECISION_COLORS[UNLABELLED],
        face_color=[1, 1, 1, 0.06],
        # Text columns from the start (empty lists would make float columns that refuse '').
        features={column: np.array([], dtype=object) for column in ("class", "decision", "comment", "label")},
        feature_defaults={"class": "", "decision": UNLABELLED, "comment": "",
                          "label": decision_label("", UNLABELLED)},
        text={"string": "{label}", "color": text_colour, "size": 11, "anchor": "upper_left"},
    )


def style_review_layer(layer: Any) -> None:
    """Edge colours from each polygon's decision (napari would keep the colour last selected)."""
    if not len(layer.data):
        return
    decisions = list(layer.features["decision"]) if "decision" in layer.features.columns else []
    colours = [DECISION_COLORS.get(d, DECISION_COLORS[UNLABELLED]) if isinstance(d, str)
               else DECISION_COLORS[UNLABELLED] for d in decisions]
    colours += [DECISION_COLORS[UNLABELLED]] * (len(layer.data) - len(colours))
    if [tuple(c) for c in layer.edge_color] != [tuple(_rgba(c)) for c in colours]:
        layer.edge_color = colours


def _rgba(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)] + [1.0], dtype=np.float32)


def ensure_hotspot_layer(viewer: Any) -> Any:
    if HOTSPOT_LAYER in viewer.layers:
        return viewer.layers[HOTSPOT_LAYER]
    layer = viewer.add_points(
        np.empty((0, 2)), name=HOTSPOT_LAYER, units=UNITS, symbol="ring", face_color="white",
        border_color="black", border_width=0.15, canvas_size_limits=(16, 32),
        features={"rank": np.empty(0, dtype=int)},
        text={"string": "{rank}", "color": "white", "size": 10, "anchor": "upper_left"},
        blending="translucent_no_depth",
    )
    layer.locked = True
    return layer


def show_hotspots(viewer: Any, spots: list[dict[str, Any]], size_um: float) -> Any:
    """The class's hotspots as numbered rings (1 = most probable)."""
    layer = ensure_hotspot_layer(viewer)
    layer.selected_data = set()
    positions = np.array([[s["y_um"], s["x_um"]] for s in spots], dtype=float).reshape(-1, 2)
    layer.data = positions
    layer.features = {"rank": np.arange(1, len(spots) + 1)}
    layer.size = size_um
    return layer


def set_screen_widths(viewer: Any) -> None:
    """Outline and review edges at their screen-pixel widths for the current zoom."""
    if OUTLINE_LAYER in viewer.layers:
        layer = viewer.layers[OUTLINE_LAYER]
        n = len(layer.data) // 2
        outer, inner = (screen_width_um(viewer, px) for px in _OUTLINE_PX)
        widths = [outer] * n + [inner] * n
        if n and list(layer.edge_width) != widths:
            layer.edge_width = widths
    if REVIEW_LAYER in viewer.layers:
        layer = viewer.layers[REVIEW_LAYER]
        width = screen_width_um(viewer, _REVIEW_PX)
        if layer.current_edge_width != width and not layer.selected_data:
            layer.current_edge_width = width
        if len(layer.data) and any(w != width for w in layer.edge_width):
            layer.edge_width = width
