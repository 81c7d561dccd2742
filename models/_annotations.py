"""Annotated polygons (QuPath GeoJSON conventions) and patch sampling inside them.

Coordinates in the GeoJSON are level-0 pixels (x, y), as QuPath writes them. The label
of a feature is ``properties.classification.name``. Features a reviewer rejected
(``properties.review == "reject"``) are skipped; ``correct-to`` reviews use the class
they were corrected to (wsiflow's review export writes it as the classification).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline import MppPolicy, Preprocessing, open_slide

from ._errors import TrainingDataError

__all__ = ["AnnotatedRegion", "read_annotations", "sample_annotated_patches", "file_digest"]

_MASK_MPP = 4.0  # µm/px of the rasterised polygons used to pick patch centres


@dataclass(frozen=True)
class AnnotatedRegion:
    class_name: str
    polygons: tuple[tuple[np.ndarray, ...], ...]
    """Each polygon: its exterior ring then holes, as (n, 2) level-0 (x, y) arrays."""


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _features(document: object) -> list[dict]:
    if isinstance(document, list):
        return [f for f in document if isinstance(f, dict)]
    if isinstance(document, dict):
        if document.get("type") == "FeatureCollection":
            return [f for f in document.get("features", []) if isinstance(f, dict)]
        if document.get("type") == "Feature":
            return [document]
    raise TrainingDataError("the annotation file is not GeoJSON (a Feature, FeatureCollection or list)")


def read_annotations(path: Path) -> list[AnnotatedRegion]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrainingDataError(f"the annotation file is not valid JSON ({exc})") from exc
    except OSError as exc:
        raise TrainingDataError(f"the annotation file cannot be read ({exc.strerror or type(exc).__name__})") from None
    regions = []
    for feature in _features(document):
        props = feature.get("properties") or {}
        if props.get("review") == "reject":
            continue
        name = (props.get("classification") or {}).get("name")
        geometry = feature.get("geometry") or {}
        if not name or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        polys = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
        try:
            rings = tuple(tuple(np.asarray(ring, dtype=np.float64)[:, :2] for ring in poly) for poly in polys)
        except (ValueError, IndexError, TypeError) as exc:
            raise TrainingDataError(f"a {name!r} polygon has malformed coordinates") from exc
        regions.append(AnnotatedRegion(str(name), rings))
    if not regions:
        raise TrainingDataError(
            "no classified polygons in the annotation file",
            hint="annotate with QuPath (or the wsiflow viewer) and set each polygon's class",
        )
    return regions


def _class_mask(
    regions: list[AnnotatedRegion], name: str, shape: tuple[int, int], scale_x: float, scale_y: float
) -> np.ndarray:
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for region in regions:
        if region.class_name != name:
            continue
        for polygon in region.polygons:
            for k, ring in enumerate(polygon):
                points = [(float(x * scale_x), float(y * scale_y)) for x, y in ring]
                if len(points) >= 3:
                    draw.polygon(points, fill=255 if k == 0 else 0)
    return np.asarray(canvas) > 0


def sample_annotated_patches(
    slide_path: Path,
    regions: list[AnnotatedRegion],
    class_names: tuple[str, ...],
    preprocessing: Preprocessing,
    per_class: int,
    rng: np.random.Generator,
    mpp_policy: MppPolicy | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_class`` tiles per class whose centres lie inside that class's polygons."""
    unknown = sorted({r.class_name for r in regions} - set(class_names))
    if unknown:
        raise TrainingDataError(
            f"annotation class(es) {', '.join(unknown)} are not among the model's classes ({', '.join(class_names)})",
            hint="pass --classes to train a model with new classes",
        )
    tile = preprocessing.tile_size_px
    images, labels = [], []
    with open_slide(slide_path, mpp_policy=mpp_policy) as slide:
        rows, cols = slide.thumbnail_shape(_MASK_MPP)
        sx, sy = slide.mpp.mpp_x / _MASK_MPP, slide.mpp.mpp_y / _MASK_MPP
        half_x = tile * preprocessing.target_mpp / slide.mpp.mpp_x / 2
        half_y = tile * preprocessing.target_mpp / slide.mpp.mpp_y / 2
        for label, name in enumerate(class_names):
            mask = _class_mask(regions, name, (rows, cols), sx, sy)
            candidates = np.flatnonzero(mask)
            if candidates.size == 0:
                continue
            picks = rng.choice(candidates, size=min(per_class, candidates.size), replace=candidates.size < per_class)
            for flat in picks:
                r, c = divmod(int(flat), cols)
                cx, cy = (c + rng.random()) / sx, (r + rng.random()) / sy
                images.append(slide.read_region_at_mpp(cx - half_x, cy - half_y, tile, tile, preprocessing.target_mpp))
                labels.append(label)
    if not images:
        raise TrainingDataError(
            "the polygons cover no part of the slide", hint="check that the annotations belong to this slide"
        )
    return np.stack(images), np.array(labels, dtype=np.int64)
