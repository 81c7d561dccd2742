"""The review dock widget: class, opacity, threshold outline, readout, hotspots, review, sign-off."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSlider,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from pipeline import WsiflowError, class_regions

from ._canvas import (
    REVIEW_LAYER,
    decision_label,
    draw_outline,
    ensure_hotspot_layer,
    ensure_outline_layer,
    ensure_review_layer,
    set_legend,
    set_screen_widths,
    show_hotspots,
    show_scale_bar,
    style_review_layer,
)
from ._readout import ResultGrid
from ._review import (
    DECISIONS,
    UNLABELLED,
    ResultInfo,
    ReviewedShape,
    SignOff,
    check_reviewer,
    load_review,
    remember_reviewer,
    remembered_reviewer,
    save_review,
)

__all__ = ["ReviewWidget", "KEYS"]

_log = logging.getLogger(__name__)

KEYS = {
    "confirm": "Shift-C",
    "reject": "Shift-R",
    "correct": "Shift-E",
    "next hotspot": "N",
    "previous hotspot": "Shift-N",
}
"""Viewer key bindings (none of napari's layers uses these keys)."""

_INSTRUCTIONS = (
    "<b>How to review</b><ol style='margin-left:-20px'>"
    "<li><b>Draw</b>: in the <i>review</i> layer press <b>P</b>, click the corners of a region, "
    "<b>Enter</b> to close it (<b>R</b>: rectangle).</li>"
    "<li><b>Select</b>: press <b>S</b>, click a polygon (Shift-click adds more), or click a row below.</li>"
    "<li><b>Label</b> the selection: <b>Shift+C</b> confirm · <b>Shift+R</b> reject · "
    "<b>Shift+E</b> correct to the class chosen below.</li>"
    "<li><b>N</b> / <b>Shift+N</b>: next / previous hotspot.</li>"
    "<li><b>Save review</b> as you go; <b>Sign off</b> when the review is complete.</li></ol>"
)
_TABLE_COLUMNS = ("#", "decision", "class", "comment")


def _say_style(error: bool) -> str:
    return "color: #ff6e6e; font-weight: bold;" if error else ""


class ReviewWidget(QWidget):
    """Dock widget for reviewing one wsiflow result open in the viewer."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.info: ResultInfo | None = None
        self.grid: ResultGrid | None = None
        self.signoff: SignOff | None = None
        self.changed_since_signoff = False
        self._readout_text = ""
        self._syncing_opacity = False
        layout = QVBoxLayout(self)

        self.status = QLabel("open a wsiflow result folder")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        self.message.setVisible(False)
        layout.addWidget(self.message)

        form = QFormLayout()
        layout.addLayout(form)
        self.class_box = QComboBox()
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(60)
        self.opacity.setToolTip("opacity of the heatmaps (the same slider as napari's layer controls)")
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(0.5)
        self.threshold.setToolTip("the white-and-black outline surrounds cells at or above this probability")
        form.addRow("class", self.class_box)
        form.addRow("heatmap opacity", self.opacity)
        form.addRow("outline at P ≥", self.threshold)

        self.readout = QLabel("under the cursor: move the mouse over the slide")
        self.readout.setWordWrap(True)
        self.readout.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.readout)

        layout.addWidget(QLabel("hotspots (click, N, Shift+N)"))
        self.hotspots = QListWidget()
        self.hotspots.setMaximumHeight(140)
        layout.addWidget(self.hotspots)

        self.instructions = QLabel(_INSTRUCTIONS)
        self.instructions.setWordWrap(True)
        self.instructions.setTextFormat(Qt.TextFormat.RichText)
        layout.addWidget(self.instructions)

        buttons = QHBoxLayout()
        self.decision_buttons: dict[str, QPushButton] = {}
        for decision in DECISIONS:
            button = QPushButton(f"{decision.capitalize()}\n{KEYS[decision].replace('-', '+')}")
            button.clicked.connect(self._decider(decision))
            buttons.addWidget(button)
            self.decision_buttons[decision] = button
        layout.addLayout(buttons)
        review = QFormLayout()
        layout.addLayout(review)
        self.review_class = QComboBox()
        self.comment = QLineEdit()
        self.comment.setPlaceholderText("optional, saved with the next label")
        self.reviewer = QLineEdit(remembered_reviewer())
        self.reviewer.setPlaceholderText("your name (asked once, then remembered)")
        review.addRow("correct to class", self.review_class)
        review.addRow("comment", self.comment)
        review.addRow("reviewer", self.reviewer)

        layout.addWidget(QLabel("reviewed polygons (click one)"))
        self.table = QTableWidget(0, len(_TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(list(_TABLE_COLUMNS))
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        rows_header, columns_header = self.table.verticalHeader(), self.table.horizontalHeader()
        if rows_header is not None and columns_header is not None:
            rows_header.setVisible(False)
            for column in range(len(_TABLE_COLUMNS) - 1):
                columns_header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
            columns_header.setStretchLastSection(True)
        self.table.setMaximumHeight(160)
        layout.addWidget(self.table)

        self.save_button = QPushButton("Save review")
        self.signoff_button = QPushButton("Sign off: review complete")
        row = QHBoxLayout()
        row.addWidget(self.save_button)
        row.addWidget(self.signoff_button)
        layout.addLayout(row)
        self.signoff_label = QLabel("not signed off")
        self.signoff_label.setWordWrap(True)
        layout.addWidget(self.signoff_label)
        layout.addStretch(1)

        self.class_box.currentTextChanged.connect(self._show_class)
        self.opacity.valueChanged.connect(self._set_opacity)
        self.threshold.valueChanged.connect(self._draw_outline)
        self.hotspots.itemClicked.connect(self._go_to)
        self.table.cellClicked.connect(lambda row, _column: self.go_to_polygon(row))
        self.save_button.clicked.connect(lambda: self.save())
        self.signoff_button.clicked.connect(lambda: self.sign_off())
        self.viewer.layers.events.inserted.connect(lambda event: self.refresh())
        self.refresh()

    def sizeHint(self) -> QSize:
        # Word-wrapped labels ask for more width than they need; leave the canvas room.
        hint = super().sizeHint()
        return QSize(min(hint.width(), 330), hint.height())

    # -- discovery -------------------------------------------------------------------
    def _heatmaps(self) -> dict[str, Any]:
        return {
            layer.metadata["wsiflow"]["class"]: layer
            for layer in self.viewer.layers
            if layer.metadata.get("wsiflow", {}).get("kind") == "heatmap"
        }

    def _result_loaded(self) -> bool:
        # The reader adds the tissue mask last: wait for it, so the widget's layers go on top.
        kinds = [layer.metadata.get("wsiflow", {}).get("kind") for layer in self.viewer.layers]
        return "heatmap" in kinds and "tissue" in kinds

    def refresh(self) -> None:
        if self.info is not None or not self._result_loaded():
            return
        heatmaps = self._heatmaps()
        first = next(iter(heatmaps.values()))
        result_dir = Path(first.metadata["wsiflow"]["result_dir"])
        self.info = ResultInfo.from_result(result_dir)
        self.grid = ResultGrid.from_result(result_dir)
        self.status.setText(f"slide {self.info.slide_id} · {self.info.model['name']}@{self.info.model['version']}"
                            f" · {self.info.tiles} tiles")
        self.threshold.blockSignals(True)
        self.threshold.setValue(self.info.region_threshold)
        self.threshold.blockSignals(False)
        self.class_box.blockSignals(True)
        self.class_box.clear()
        self.class_box.addItems(list(self.info.class_names))
        visible = [name for name, layer in heatmaps.items() if layer.visible]
        self.class_box.setCurrentText(visible[0] if visible else self.info.class_names[0])
        self.class_box.blockSignals(False)
        self.review_class.clear()
        self.review_class.addItems(list(self.info.class_names))
        shown = heatmaps.get(self.class_box.currentText())
        if shown is not None:
            self.opacity.setValue(round(shown.opacity * 100))
        for layer in heatmaps.values():
            layer.events.opacity.connect(self._on_layer_opacity)

        ensure_outline_layer(self.viewer)
        ensure_hotspot_layer(self.viewer)
        review = ensure_review_layer(self.viewer)
        self._restore()
        review.events.data.connect(self._on_review_changed)
        review.events.features.connect(self._on_review_changed)
        self.viewer.scene.camera.events.zoom.connect(lambda event: set_screen_widths(self.viewer))
        self.viewer.cursor.events.position.connect(self._on_cursor)
        self.viewer.events.status.connect(self._on_status)
        for action, key in KEYS.items():
            self.viewer.bind_key(key, self._key_handler(action), overwrite=True)
        show_scale_bar(self.viewer)
        self._show_class(self.class_box.currentText())
        self._refresh_table()
        self.viewer.layers.selection.active = review
        if self.info.tiles == 0:
            self._say("0 tiles were analysed: no tissue was found on this slide, so the heatmaps are empty "
                      "and there is nothing to review.", error=True)

    # -- display ---------------------------------------------------------------------
    def _say(self, text: str, *, error: bool = False) -> None:
        self.message.setText(text)
        self.message.setStyleSheet(_say_style(error))
        self.message.setVisible(bool(text))

    def _show_class(self, name: str) -> None:
        for class_name, layer in self._heatmaps().items():
            layer.visible = class_name == name
            layer.colorbar.visible = class_name == name
        self._set_opacity(self.opacity.value())
        self._draw_outline()
        self._fill_hotspots(name)

    def _set_opacity(self, value: int) -> None:
        """One opacity for every heatmap, so switching class keeps it."""
        if self._syncing_opacity:
            return
        self._syncing_opacity = True
        try:
            for layer in self._heatmaps().values():
                layer.opacity = value / 100
        finally:
            self._syncing_opacity = False

    def _on_layer_opacity(self, event: Any) -> None:
        # napari's own layer-controls slider moved: follow it, here and on the other heatmaps.
        if self._syncing_opacity:
            return
        value = round(float(event.source.opacity) * 100)
        self.opacity.blockSignals(True)
        self.opacity.setValue(value)
        self.opacity.blockSignals(False)
        self._set_opacity(value)

    def _draw_outline(self) -> None:
        name = self.class_box.currentText()
        layer = self._heatmaps().get(name)
        if layer is None or self.info is None or self.grid is None:
            return
        index = self.grid.class_names.index(name)
        threshold = self.threshold.value()
        scale, translate = np.asarray(self.grid.scale), np.asarray(self.grid.translate)
        regions = class_regions(self.grid.probabilities, index, threshold)
        polygons = [translate + outline[:, ::-1] * scale for outline in regions]
        draw_outline(self.viewer, polygons)
        if REVIEW_LAYER in self.viewer.layers:
            self.viewer.layers.selection.active = self.viewer.layers[REVIEW_LAYER]
        self._legend(name, threshold, len(polygons))

    def _legend(self, name: str, threshold: float, regions: int) -> None:
        if self.info is None or self.grid is None:
            return
        if self.info.tiles == 0:
            text = "0 tiles analysed: no tissue found on this slide.\nThe heatmaps are empty; nothing to review."
            set_legend(self.viewer, text)
            return
        heat = f"P({name}) heatmap: colour bar 0-1"
        if regions:
            line = f"outline: P ≥ {threshold:.2f} ({regions} region{'s' * (regions != 1)})"
            self._say("")
        else:
            top = self.grid.max_probability(name)
            line = f"no region with P ≥ {threshold:.2f} (max {top:.2f})"
            self._say(f"No region of {name} reaches P ≥ {threshold:.2f} on this slide (highest: {top:.2f}). "
                      "Lower the threshold to outline weaker areas.")
        set_legend(self.viewer, f"{heat}\n{line}")

    def _fill_hotspots(self, name: str) -> None:
        self.hotspots.clear()
        if self.info is None or self.grid is None:
            return
        spots = self.info.hotspots.get(name, [])
        for rank, spot in enumerate(spots, start=1):
            item = QListWidgetItem(f"{rank}. P {spot['probability']:.2f} at "
                                   f"({spot['x_um']:.0f}, {spot['y_um']:.0f}) µm")
            item.setData(Qt.ItemDataRole.UserRole, (spot["y_um"], spot["x_um"]))
            self.hotspots.addItem(item)
        show_hotspots(self.viewer, spots, 0.5 * max(self.grid.scale))

    def _centre_on(self, y: float, x: float, zoom: float | None = None) -> None:
        camera = self.viewer.scene.camera
        camera.center = (y, x)
        camera.zoom = zoom if zoom is not None else max(camera.zoom, 2.0)

    def _go_to(self, item: QListWidgetItem) -> None:
        y, x = item.data(Qt.ItemDataRole.UserRole)
        self.hotspots.setCurrentItem(item)
        self._centre_on(y, x)

    def step_hotspot(self, step: int) -> None:
        """Go to the next (``step`` 1) or previous (-1) hotspot, wrapping around."""
        count = self.hotspots.count()
        if not count:
            return
        current = self.hotspots.currentRow()
        row = (current + step) % count if current >= 0 else (0 if step > 0 else count - 1)
        item = self.hotspots.item(row)
        if item is not None:
            self._go_to(item)

    # -- readout -----------------------------------------------------------------------
    def _on_cursor(self, event: Any = None) -> None:
        if self.grid is None:
            return
        position = self.viewer.cursor.position
        if len(position) < 2:
            return
        self._readout_text = self.grid.at(float(position[-2]), float(position[-1])).text()
        self.readout.setText(f"under the cursor: {self._readout_text}")

    def _on_status(self, event: Any) -> None:
        """Put every class's probability in napari's status bar, whichever layer is active."""
        status = self.viewer.status
        if not self._readout_text or not isinstance(status, dict):
            return
        if status.get("coordinates") != self._readout_text:
            self.viewer.status = {**status, "coordinates": self._readout_text}

    # -- review ----------------------------------------------------------------------
    def _decider(self, decision: str) -> Callable[[], None]:
        def click() -> None:
            self.label_selected(decision)

        return click

    def _key_handler(self, action: str) -> Callable[[Any], None]:
        def handle(viewer: Any) -> None:
            if action in DECISIONS:
                self.label_selected(action)
            else:
                self.step_hotspot(1 if action == "next hotspot" else -1)

        handle.__doc__ = f"wsiflow review: {action}"
        return handle

    def label_selected(self, decision: str) -> int:
        """Give the selected polygons ``decision`` (``correct``: to the class chosen in the dock);
        how many were labelled."""
        if decision not in DECISIONS:
            raise ValueError(f"decision {decision!r} is not one of {DECISIONS}")
        layer = ensure_review_layer(self.viewer)
        selected = sorted(layer.selected_data)
        if not selected:
            self._say("Select polygons first: press S in the review layer and click them "
                      "(or click a row of the table).", error=True)
            return 0
        cls = self.review_class.currentText() if decision == "correct" else self.class_box.currentText()
        features = layer.features.copy()
        for column in ("class", "decision", "comment", "label"):
            # Shapes drawn before the columns existed hold NaN (a float column): make them text.
            features[column] = features[column].astype(object) if column in features else None
        for index in selected:
            features.loc[index, ["class", "decision", "comment", "label"]] = [
                cls, decision, self.comment.text(), decision_label(cls, decision)]
        layer.features = features
        layer.refresh_text()
        style_review_layer(layer)
        self._say(f"{len(selected)} polygon(s): {decision_label(cls, decision)}")
        return len(selected)

    def shapes(self) -> list[ReviewedShape]:
        layer = ensure_review_layer(self.viewer)
        features = layer.features
        out = []
        for index, vertices in enumerate(layer.data):
            row = features.iloc[index].to_dict() if index < len(features) else {}
            cls, decision, comment = row.get("class"), row.get("decision"), row.get("comment")
            labelled = decision in DECISIONS and isinstance(cls, str) and bool(cls)
            out.append(ReviewedShape(
                np.asarray(vertices)[:, -2:],
                cls if labelled and isinstance(cls, str) else "",
                decision if labelled and isinstance(decision, str) else UNLABELLED,
                comment if isinstance(comment, str) else "",
            ))
        return out

    def _on_review_changed(self, event: Any = None) -> None:
        layer = ensure_review_layer(self.viewer)
        style_review_layer(layer)
        self._refresh_table()
        if self.signoff is not None and not self.changed_since_signoff:
            self.changed_since_signoff = True
            self._show_signoff()

    def _refresh_table(self) -> None:
        shapes = self.shapes()
        self.table.setRowCount(len(shapes))
        for row, shape in enumerate(shapes):
            values = (str(row + 1), shape.decision, shape.class_name, shape.comment)
            for column, value in enumerate(values):
                self.table.setItem(row, column, QTableWidgetItem(value))

    def go_to_polygon(self, index: int) -> None:
        """Centre on polygon ``index``, zoomed to fit it, and select it for labelling."""
        layer = ensure_review_layer(self.viewer)
        if not 0 <= index < len(layer.data):
            return
        vertices = np.asarray(layer.data[index])[:, -2:]
        low, high = vertices.min(axis=0), vertices.max(axis=0)
        height, width = self.viewer.canvas.size
        extent = np.maximum(high - low, 1e-6) * 1.5
        centre = (low + high) / 2
        self._centre_on(float(centre[0]), float(centre[1]), zoom=float(min(height / extent[0], width / extent[1])))
        self.viewer.layers.selection.active = layer
        layer.mode = "select"
        layer.selected_data = {index}

    def _reviewer_name(self) -> str | None:
        try:
            name = check_reviewer(self.reviewer.text())
        except WsiflowError as exc:
            self._say(f"{exc.message}: {exc.hint}", error=True)
            self.reviewer.setFocus()
            return None
        if name != remembered_reviewer():
            try:
                remember_reviewer(name)
            except WsiflowError as exc:
                _log.warning("%s", exc.one_line())
        return name

    def save(self, *, blocking: bool = False, signoff: bool = False) -> Any:
        """Write review.geojson beside the result, off the GUI thread (``blocking`` for tests);
        with ``signoff``, mark the review complete (every polygon must be labelled)."""
        if self.info is None:
            return None
        reviewer = self._reviewer_name()
        if reviewer is None:
            return None
        shapes = self.shapes()
        unlabelled = sum(s.decision == UNLABELLED for s in shapes)
        if signoff and unlabelled:
            self._say(f"{unlabelled} polygon(s) are not labelled yet: label them (Shift+C / R / E) or delete them, "
                      "then sign off.", error=True)
            return None
        if not signoff and self.signoff is not None and not self.changed_since_signoff:
            self._say("Nothing changed since the sign-off; the review is complete as saved.")
            return None
        info = self.info
        if blocking:
            path = save_review(info, shapes, reviewer, signoff=signoff)
            self._saved(shapes, reviewer, signoff)
            return path
        from napari.qt.threading import thread_worker

        worker = thread_worker(save_review)(info, shapes, reviewer, signoff=signoff)
        worker.returned.connect(lambda path: self._saved(shapes, reviewer, signoff))
        worker.errored.connect(lambda exc: self._say(f"the review was not saved: {exc}", error=True))
        worker.start()
        return worker

    def sign_off(self, *, blocking: bool = False) -> Any:
        """Save the review marked "review complete" by the reviewer, now (UTC), and audit it."""
        return self.save(blocking=blocking, signoff=True)

    def _saved(self, shapes: list[ReviewedShape], reviewer: str, signoff: bool) -> None:
        if self.info is None:
            return
        withdrawn = self.signoff is not None and not signoff
        self.signoff = load_review(self.info).signoff if signoff else None
        self.changed_since_signoff = False
        self._show_signoff()
        note = " The earlier sign-off is withdrawn: sign off again when complete." if withdrawn else ""
        self._say(f"review saved ({len(shapes)} polygons) by {reviewer}.{note}")

    def _show_signoff(self) -> None:
        if self.signoff is None:
            self.signoff_label.setText("not signed off")
        elif self.changed_since_signoff:
            self.signoff_label.setText(f"changed since {self.signoff.reviewer} signed off: save, then sign off again")
        else:
            when = self.signoff.signed_at.replace("T", " ").replace("+00:00", " UTC")
            self.signoff_label.setText(f"review complete: signed off by {self.signoff.reviewer} at {when}")

    def _restore(self) -> None:
        if self.info is None:
            return
        loaded = load_review(self.info)
        self.signoff = loaded.signoff
        self.changed_since_signoff = False
        self._show_signoff()
        if not loaded.shapes:
            return
        layer = ensure_review_layer(self.viewer)
        layer.add_polygons([s.vertices_um for s in loaded.shapes])
        layer.features = {
            "class": [s.class_name for s in loaded.shapes],
            "decision": [s.decision for s in loaded.shapes],
            "comment": [s.comment for s in loaded.shapes],
            "label": [decision_label(s.class_name, s.decision) for s in loaded.shapes],
        }
        style_review_layer(layer)
        if loaded.reviewer:
            self.status.setText(f"{self.status.text()} · review last saved by {loaded.reviewer}")
