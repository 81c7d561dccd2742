"""Pathologist review records: polygons with a decision, saved as QuPath-style GeoJSON.

Pure functions (no Qt): coordinates are converted between napari world (y, x) in µm and
level-0 pixels (x, y), which QuPath and ``wsiflow train --annotations`` use. A polygon not
labelled yet is saved as an unclassified annotation (QuPath's convention), which training
skips. The sign-off ("review complete", the reviewer and the UTC time) is stored in the
review file and recorded in the site's audit log.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import ConfigError, OutputError, ResultFolder, site_dir
from privacy import audit_event

__all__ = [
    "REVIEW_FILE",
    "DECISIONS",
    "UNLABELLED",
    "SIGNOFF_STATUS",
    "ReviewedShape",
    "ResultInfo",
    "SignOff",
    "LoadedReview",
    "save_review",
    "load_review",
    "check_reviewer",
    "remembered_reviewer",
    "remember_reviewer",
]

REVIEW_FILE = ResultFolder(Path()).review.name
DECISIONS = ("confirm", "reject", "correct")
UNLABELLED = "unlabelled"
SIGNOFF_STATUS = "review complete"
_REVIEWER_FILE = "reviewer.json"
_MAX_NAME = 80


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
    tiles: int = 0
    region_threshold: float = 0.5
    hotspots: dict[str, list[dict[str, Any]]] = field(default_factory=dict, compare=False)

    @classmethod
    def from_result(cls, result_dir: Path) -> ResultInfo:
        import zarr

        folder = ResultFolder(result_dir)
        summary = folder.read_summary()
        attrs: dict[str, Any] = zarr.open_group(str(folder.heatmap), mode="r").attrs.asdict()
        classes = attrs["wsiflow"]["classes"]
        model = {"name": summary.model.name, "version": summary.model.version, "sha256": summary.model.sha256}
        parameters = (summary.data.get("provenance") or {}).get("parameters") or {}
        threshold = parameters.get("region_threshold", 0.5)
        return cls(result_dir, summary.slide_id, summary.mpp.mpp_x, summary.mpp.mpp_y, model,
                   tuple(c["name"] for c in classes), tuple(c["color"] for c in classes),
                   tiles=summary.tiles,
                   region_threshold=float(threshold) if isinstance(threshold, (int, float)) else 0.5,
                   hotspots=summary.hotspots)


@dataclass(frozen=True)
class ReviewedShape:
    """A polygon (world (y, x) µm vertices) with the reviewer's decision on it."""

    vertices_um: np.ndarray
    class_name: str
    decision: str
    """One of ``DECISIONS``, or ``UNLABELLED`` (then ``class_name`` is empty)."""
    comment: str = ""


@dataclass(frozen=True)
class SignOff:
    """A reviewer's statement that the review of this result is complete."""

    reviewer: str
    signed_at: str
    """UTC, ISO 8601."""


@dataclass(frozen=True)
class LoadedReview:
    shapes: list[ReviewedShape]
    reviewer: str | None
    signoff: SignOff | None


def check_reviewer(name: str) -> str:
    """The reviewer's name, trimmed; ConfigError when empty or not one short line."""
    name = name.strip()
    if not name:
        raise ConfigError("no reviewer name", hint="type your name in the dock's 'reviewer' field (asked once)")
    if len(name) > _MAX_NAME or any(ch in name for ch in "\r\n\t"):
        raise ConfigError(f"reviewer name {name[:20]!r}... is not one short line",
                          hint=f"use at most {_MAX_NAME} characters on one line")
    return name


def remembered_reviewer(directory: Path | None = None) -> str:
    """The reviewer name last used on this site ('' if none): asked once, then remembered."""
    path = (directory or site_dir()) / _REVIEWER_FILE
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("reviewer", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return name if isinstance(name, str) else ""


def remember_reviewer(name: str, directory: Path | None = None) -> None:
    """Keep ``name`` in the site directory (owner-only), for the next review."""
    directory = directory or site_dir()
    path = directory / _REVIEWER_FILE
    tmp = path.with_name(f".{_REVIEWER_FILE}.tmp")
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"reviewer": check_reviewer(name)}, fh)
        tmp.replace(path)
    except OSError as exc:
        raise OutputError(f"could not remember the reviewer name: {exc.strerror or type(exc).__name__}") from None


def _feature(info: ResultInfo, shape: ReviewedShape, reviewer: str, now: str) -> dict[str, Any]:
    ring = [[float(x / info.mpp_x), float(y / info.mpp_y)] for y, x in shape.vertices_um]
    if ring and ring[0] != ring[-1]:
        ring.append(ring[0])
    props: dict[str, Any] = {"objectType": "annotation"}
    if shape.decision != UNLABELLED:
        colour = (
            info.class_colors[info.class_names.index(shape.class_name)]
            if shape.class_name in info.class_names
            else "#808080"
        )
        props["classification"] = {"name": shape.class_name,
                                   "color": [int(colour.lstrip("#")[i : i + 2], 16) for i in (0, 2, 4)]}
        props["review"] = shape.decision
    props.update({"comment": shape.comment, "reviewer": reviewer, "reviewed_at": now,
                  "model_sha256": info.model["sha256"]})
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props}


def save_review(info: ResultInfo, shapes: list[ReviewedShape], reviewer: str, *, signoff: bool = False) -> Path:
    """Write ``review.geojson`` beside the result (atomically) and audit it; its path.

    With ``signoff`` the review is marked complete by ``reviewer`` now (UTC), which every
    polygon must be labelled for, and a ``review-signoff`` event joins the audit log.
    """
    reviewer = check_reviewer(reviewer)
    for shape in shapes:
        if shape.decision not in (*DECISIONS, UNLABELLED):
            raise ValueError(f"decision {shape.decision!r} is not one of {DECISIONS}")
    unlabelled = sum(s.decision == UNLABELLED for s in shapes)
    if signoff and unlabelled:
        raise ConfigError(f"{unlabelled} polygon(s) are not labelled yet",
                          hint="label them (confirm, reject or correct) or delete them, then sign off")
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    meta: dict[str, Any] = {"slide_id": info.slide_id, "reviewer": reviewer, "reviewed_at": now,
                            "model": info.model, "coordinates": "level-0 pixels (x, y)"}
    if signoff:
        # The signer is the document's reviewer (kept out of exports with it).
        meta["signoff"] = {"status": SIGNOFF_STATUS, "signed_at": now}
    document = {
        "type": "FeatureCollection",
        "wsiflow_review": meta,
        "features": [_feature(info, shape, reviewer, now) for shape in shapes],
    }
    text = json.dumps(document, indent=1)
    path = ResultFolder(info.result_dir).review
    tmp = path.with_name(f".{REVIEW_FILE}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise OutputError(f"writing the review failed: {exc.strerror or type(exc).__name__}") from None
    counts = {d: sum(s.decision == d for s in shapes) for d in (*DECISIONS, UNLABELLED)}
    digest = info.model.get("sha256")
    audit_event("review-save", slide_id=info.slide_id, model_digest=digest, params=counts)
    if signoff:
        audit_event("review-signoff", slide_id=info.slide_id, model_digest=digest,
                    params={"reviewer": reviewer, "signed_at": now, **counts,
                            "review_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()})
    return path


def load_review(info: ResultInfo) -> LoadedReview:
    """The saved review's shapes (world µm), reviewer and sign-off, or nothing."""
    path = ResultFolder(info.result_dir).review
    if not path.exists():
        return LoadedReview([], None, None)
    document = json.loads(path.read_text(encoding="utf-8"))
    shapes = []
    for feature in document.get("features", []):
        props = feature.get("properties") or {}
        ring = np.asarray(feature["geometry"]["coordinates"][0], dtype=float)
        if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
            ring = ring[:-1]
        vertices = np.column_stack([ring[:, 1] * info.mpp_y, ring[:, 0] * info.mpp_x])
        name = (props.get("classification") or {}).get("name", "")
        decision = props.get("review", "confirm" if name else UNLABELLED)
        shapes.append(ReviewedShape(vertices, name if decision != UNLABELLED else "",
                                    decision if decision in DECISIONS else UNLABELLED, props.get("comment", "")))
    meta = document.get("wsiflow_review") or {}
    reviewer = meta.get("reviewer")
    signed = meta.get("signoff") or {}
    signoff = (SignOff(str(reviewer), str(signed.get("signed_at", "")))
               if signed.get("status") == SIGNOFF_STATUS and reviewer else None)
    return LoadedReview(shapes, reviewer, signoff)
