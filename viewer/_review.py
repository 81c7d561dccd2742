"""Pathologist review records: polygons with a decision, saved as QuPath-style GeoJSON.

Pure functions (no Qt): coordinates are converted between napari world (y, x) in µm and
level-0 pixels (x, y), which QuPath and ``wsiflow train --annotations`` use.
"""

from __future__ import annotations

import getpass
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import ResultFolder
from privacy import audit_event

__all__ = ["REVIEW_FILE", "DECISIONS", "ReviewedShape", "ResultInfo", "save_review", "load_review", "default_reviewer"]

REVIEW_FILE = ResultFolder(Path()).review.name
DECISIONS = ("confirm", "reject", "correct")


@dataclass(frozen=True)
class ResultInfo:
    """What a review needs to know about the result it belongs to."""

    result_dir: Path
    slide_id: str
    mpp_x: float
    mpp_y: float
    model: dict[str, Any]
    class_names: tuple[str, ...]
    class_colors: tuple[str, ...]

    @classmethod
    def from_result(cls, result_dir: Path) -> ResultInfo:
        import zarr

        folder = ResultFolder(result_dir)
        summary = folder.read_summary()
        attrs: dict[str, Any] = zarr.open_group(str(folder.heatmap), mode="r").attrs.asdict()
        classes = attrs["wsiflow"]["classes"]
        model = {"name": summary.model.name, "version": summary.model.version, "sha256": summary.model.sha256}
        return cls(result_dir, summary.slide_id, summary.mpp.mpp_x, summary.mpp.mpp_y, model,
                   tuple(c["name"] for c in classes), tuple(c["color"] for c in classes))


@dataclass(frozen=True)
class ReviewedShape:
    """A polygon (world (y, x) µm vertices) with the reviewer's decision on it."""

    vertices_um: np.ndarray
    class_name: str
    decision: str
    comment: str = ""


def default_reviewer() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def save_review(info: ResultInfo, shapes: list[ReviewedShape], reviewer: str) -> Path:
    """Write ``review.geojson`` beside the result (atomically); its path."""
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    features = []
    for shape in shapes:
        if shape.decision not in DECISIONS:
            raise ValueError(f"decision {shape.decision!r} is not one of {DECISIONS}")
        ring = [[float(x / info.mpp_x), float(y / info.mpp_y)] for y, x in shape.vertices_um]
        if ring and ring[0] != ring[-1]:
            ring.append(ring[0])
        colour = (
            info.class_colors[info.class_names.index(shape.class_name)]
            if shape.class_name in info.class_names
            else "#808080"
        )
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": shape.class_name,
                                   "color": [int(colour.lstrip("#")[i : i + 2], 16) for i in (0, 2, 4)]},
                "review": shape.decision,
                "comment": shape.comment,
                "reviewer": reviewer,
                "reviewed_at": now,
                "model_sha256": info.model["sha256"],
            },
        })
    document = {
        "type": "FeatureCollection",
        "wsiflow_review": {"slide_id": info.slide_id, "reviewer": reviewer, "reviewed_at": now, "model": info.model,
                           "coordinates": "level-0 pixels (x, y)"},
        "features": features,
    }
    path = ResultFolder(info.result_dir).review
    tmp = path.with_name(f".{REVIEW_FILE}.tmp")
    tmp.write_text(json.dumps(document, indent=1), encoding="utf-8")
    tmp.replace(path)
    counts = {d: sum(s.decision == d for s in shapes) for d in DECISIONS}
    audit_event("review-save", slide_id=info.slide_id, model_digest=info.model.get("sha256"), params=counts)
    return path


def load_review(info: ResultInfo) -> tuple[list[ReviewedShape], str | None]:
    """The saved review's shapes (world µm) and reviewer, or nothing."""
    path = ResultFolder(info.result_dir).review
    if not path.exists():
        return [], None
    document = json.loads(path.read_text(encoding="utf-8"))
    shapes = []
    for feature in document.get("features", []):
        props = feature.get("properties") or {}
        ring = np.asarray(feature["geometry"]["coordinates"][0], dtype=float)
        if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
            ring = ring[:-1]
        vertices = np.column_stack([ring[:, 1] * info.mpp_y, ring[:, 0] * info.mpp_x])
        shapes.append(ReviewedShape(vertices, (props.get("classification") or {}).get("name", ""),
                                    props.get("review", "confirm"), props.get("comment", "")))
    return shapes, (document.get("wsiflow_review") or {}).get("reviewer")
