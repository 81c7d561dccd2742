"""The review dock widget: class, opacity, threshold outline, hotspots, review and save."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from pipeline import ResultFolder, class_regions

from ._review import DECISIONS, ResultInfo, ReviewedShape, default_reviewer, load_review, save_review

__all__ = ["ReviewWidget"]

_log = logging.getLogger(__name__)
_REVIEW_LAYER = "review"
_OUTLINE_LAYER = "threshold outline"


class ReviewWidget(QWidget):
    """Dock widget for reviewing one wsiflow result open in the viewer."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.info: ResultInfo | None = None
        layout = QVBoxLayout(self)
        form = QFormLayout()
        layout.addLayout(form)
        self.status = QLabel("open a wsiflow result folder")
        self.status.setWordWrap(True)
        layout.insertWidget(0, self.status)
        self.class_box = QComboBox()
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(60)
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(0.5)
        form.addRow("class", self.class_box)
        form.addRow("opacity", self.opacity)
        form.addRow("threshold", self.threshold)
        layout.addWidget(QLabel("hotspots (click to go there)"))
        self.hotspots = QListWidget()
        layout.addWidget(self.hotspots)
        review = QFormLayout()
        layout.addLayout(review)
        self.decision = QComboBox()
        self.decision.addItems(list(DECISIONS))
        self.review_class = QComboBox()
        self.comment = QLineEdit()
        self.reviewer = QLineEdit(default_reviewer())
        review.addRow("decision", self.decision)
        review.addRow("class (for correct)", self.review_class)
        review.addRow("comment", self.comment)
        review.addRow("reviewer", self.reviewer)
        self.apply_button = QPushButton("Label selected polygons")
        self.save_button = QPushButton("Save review")
        layout.addWidget(self.apply_button)
        layout.addWidget(self.save_button)
        self.class_box.currentTextChanged.connect(self._show_class)
        self.opacity.valueChanged.connect(self._set_opacity)
        self.threshold.valueChanged.connect(self._draw_outline)
        self.hotspots.itemClicked.connect(self._go_to)
        self.apply_button.clicked.connect(self.label_selected)
        self.save_button.clicked.connect(self.save)
        self.viewer.layers.events.inserted.connect(lambda event: self.refresh())
        self.refresh()

    # -- discovery -------------------------------------------------------------------
    def _heatmaps(self) -> dict[str, Any]:
        return {
            layer.metadata["wsiflow"]["class"]: layer
            for layer in self.viewer.layers
            if layer.metadata.get("wsiflow", {}).get("kind") == "heatmap"
        }

    def refresh(self) -> None:
        heatmaps = self._heatmaps()
        if not heatmaps or self.info is not None:
            return
        first = next(iter(heatmaps.values()))
        self.info = ResultInfo.from_result(Path(first.metadata["wsiflow"]["result_dir"]))
        self.status.setText(f"slide {self.info.slide_id} · {self.info.model['name']}@{self.info.model['version']}")
        self.class_box.blockSignals(True)
        self.class_box.clear()
        self.class_box.addItems(list(self.info.class_names))
        visible = [name for name, layer in heatmaps.items() if layer.visible]
        self.class_box.setCurrentText(visible[0] if visible else self.info.class_names[0])
        self.class_box.blockSignals(False)
        self.review_class.clear()
        self.review_class.addItems(list(self.info.class_names))
        self._ensure_review_layer()
        self._restore()
        self._show_class(self.class_box.currentText())

    def _ensure_review_layer(self) -> Any:
        if _REVIEW_LAYER in self.viewer.layers:
            return self.viewer.layers[_REVIEW_LAYER]
        layer = self.viewer.add_shapes(
            name=_REVIEW_LAYER, shape_type="polygon", edge_width=4, edge_color="yellow",
            face_color=[1, 1, 0, 0.1], features={"class": [], "decision": [], "comment": []},
        )
        return layer

    # -- display ---------------------------------------------------------------------
    def _show_class(self, name: str) -> None:
        for class_name, layer in self._heatmaps().items():
            layer.visible = class_name == name
        self._set_opacity(self.opacity.value())
        self._draw_outline()
        self._fill_hotspots(name)

    def _set_opacity(self, value: int) -> None:
        layer = self._heatmaps().get(self.class_box.currentText())
        if layer is not None:
            layer.opacity = value / 100

    def _draw_outline(self) -> None:
        layer = self._heatmaps().get(self.class_box.currentText())
        if layer is None or self.info is None:
            return
        data = layer.data[0] if layer.multiscale else layer.data
        heat = np.asarray(data)[None]
        scale, translate = np.asarray(layer.scale), np.asarray(layer.translate)
        polygons = [translate + outline[:, ::-1] * scale for outline in class_regions(heat, 0, self.threshold.value())]
        if _OUTLINE_LAYER in self.viewer.layers:
            self.viewer.layers.remove(_OUTLINE_LAYER)
        if polygons:
            colour = layer.metadata["wsiflow"]["color"]
            self.viewer.add_shapes(polygons, shape_type="polygon", name=_OUTLINE_LAYER, edge_color=colour,
                                   face_color=[0, 0, 0, 0], edge_width=3)
            self.viewer.layers.selection.active = self.viewer.layers[_REVIEW_LAYER]

    def _fill_hotspots(self, name: str) -> None:
        self.hotspots.clear()
        if self.info is None:
            return
        for spot in ResultFolder(self.info.result_dir).read_summary().hotspots.get(name, []):
            item = QListWidgetItem(f"{spot['probability']:.2f} at ({spot['x_um']:.0f}, {spot['y_um']:.0f}) µm")
            item.setData(Qt.ItemDataRole.UserRole, (spot["y_um"], spot["x_um"]))
            self.hotspots.addItem(item)

    def _go_to(self, item: QListWidgetItem) -> None:
        y, x = item.data(Qt.ItemDataRole.UserRole)
        self.viewer.camera.center = (y, x)
        self.viewer.camera.zoom = max(self.viewer.camera.zoom, 2.0)

    # -- review ----------------------------------------------------------------------
    def label_selected(self) -> None:
        layer = self._ensure_review_layer()
        decision = self.decision.currentText()
        cls = self.review_class.currentText() if decision == "correct" else self.class_box.currentText()
        features = layer.features.copy()
        for column in ("class", "decision", "comment"):
            # New shapes get NaN features (a float column): make them hold text.
            features[column] = features[column].astype(object) if column in features else None
        for index in layer.selected_data:
            features.loc[index, ["class", "decision", "comment"]] = [cls, decision, self.comment.text()]
        layer.features = features

    def shapes(self) -> list[ReviewedShape]:
        layer = self._ensure_review_layer()
        features = layer.features
        out = []
        for index, vertices in enumerate(layer.data):
            row = features.iloc[index].to_dict() if index < len(features) else {}
            cls, decision, comment = row.get("class"), row.get("decision"), row.get("comment")
            out.append(ReviewedShape(
                np.asarray(vertices)[:, -2:],
                cls if isinstance(cls, str) and cls else self.class_box.currentText(),
                decision if decision in DECISIONS else "confirm",
                comment if isinstance(comment, str) else "",
            ))
        return out

    def save(self, *, blocking: bool = False) -> Any:
        """Write review.geojson beside the result, off the GUI thread (``blocking`` for tests)."""
        if self.info is None:
            return None
        info, shapes, reviewer = self.info, self.shapes(), self.reviewer.text() or default_reviewer()
        if blocking:
            return save_review(info, shapes, reviewer)
        from napari.qt.threading import thread_worker

        worker = thread_worker(save_review)(info, shapes, reviewer)
        worker.returned.connect(lambda path: self.status.setText(f"review saved ({len(shapes)} polygons)"))
        worker.start()
        return worker

    def _restore(self) -> None:
        if self.info is None:
            return
        shapes, reviewer = load_review(self.info)
        if not shapes:
            return
        layer = self._ensure_review_layer()
        layer.add_polygons([s.vertices_um for s in shapes])
        layer.features = {
            "class": [s.class_name for s in shapes],
            "decision": [s.decision for s in shapes],
            "comment": [s.comment for s in shapes],
        }
        if reviewer:
            self.reviewer.setText(reviewer)
