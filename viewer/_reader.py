"""napari reader (npe2): a wsiflow result folder, or a plain slide. Never raises."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from pipeline import SLIDE_SUFFIXES, WsiflowError, audit_event, content_digest, is_dicom_folder, open_slide, site_secret, slide_id

from ._layers import LayerData, open_result_slide, result_layers, slide_layer

__all__ = ["napari_get_reader", "is_result_folder"]

_log = logging.getLogger(__name__)


def is_result_folder(path: Path) -> bool:
    return path.is_dir() and (path / "result.json").is_file() and (path / "heatmap.ome.zarr").is_dir()


def _audit_view(sid: str | None, model_digest: str | None, kind: str) -> None:
    # The viewer must never fail to show a slide because the log is unwritable; say so loudly.
    try:
        audit_event("view", slide_id=sid, model_digest=model_digest, params={"opened": kind})
    except WsiflowError as exc:
        _log.error("could not record this view in the audit log: %s", exc.one_line())


def _audit_result_view(path: Path) -> None:
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        sid, digest = summary.get("slide_id"), summary["provenance"]["model"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        sid, digest = None, None
    _audit_view(sid, digest, "result")


def _read_slide(path: Path, slide: object) -> list[LayerData]:
    try:
        sid = slide_id(content_digest(path), site_secret())
    except OSError:
        sid = None
    _audit_view(sid, None, "slide")
    return [slide_layer(slide)]  # type: ignore[arg-type]


def _read_result(path: Path) -> list[LayerData]:
    _audit_result_view(path)
    layers: list[LayerData] = []
    try:
        slide = open_result_slide(path)
    except WsiflowError as exc:
        _log.warning("the result's slide cannot be opened (%s); showing the heatmaps only", exc.kind)
        slide = None
    if slide is None:
        _log.warning("this site's index does not know the result's slide; showing the heatmaps only")
    else:
        layers.append(slide_layer(slide))
    return layers + result_layers(path)


def _looks_like_slide(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() in SLIDE_SUFFIXES
    return is_dicom_folder(path)


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """A reader for ``path`` if it is a wsiflow result folder or a slide, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        target = Path(path)
        if is_result_folder(target):
            return lambda _: _read_result(target)
        if _looks_like_slide(target):
            slide = open_slide(target)  # refuse here, not later, what cannot be shown in µm
            return lambda _: _read_slide(target, slide)
    except (WsiflowError, OSError, ValueError) as exc:
        _log.info("wsiflow reader declines the path: %s", type(exc).__name__)
    return None
