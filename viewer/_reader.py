"""napari reader (npe2): a wsiflow result folder, or a plain slide. Never raises."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pipeline import (
    SLIDE_SUFFIXES,
    ResultFolder,
    Slide,
    WsiflowError,
    identify_slide,
    is_dicom_folder,
    open_slide,
    site_secret,
)
from privacy import audit_event

from ._layers import LayerData, open_result_slide, result_layers, slide_layer

__all__ = ["napari_get_reader", "is_result_folder"]

_log = logging.getLogger(__name__)


def is_result_folder(path: Path) -> bool:
    """A result folder, or a model folder with a ``latest`` result (see ``pipeline.ResultFolder``)."""
    return ResultFolder.find(path) is not None


def _audit_view(sid: str | None, model_digest: str | None, kind: str) -> None:
    # The viewer must never fail to show a slide because the log is unwritable; say so loudly.
    try:
        audit_event("view", slide_id=sid, model_digest=model_digest, params={"opened": kind})
    except WsiflowError as exc:
        _log.error("could not record this view in the audit log: %s", exc.one_line())


def _audit_result_view(path: Path) -> None:
    try:
        summary = ResultFolder(path).read_summary()
        sid, digest = summary.slide_id, summary.model.sha256
    except WsiflowError:
        sid, digest = None, None
    _audit_view(sid, digest, "result")


def _read_slide(path: Path, slide: Slide) -> list[LayerData]:
    try:
        sid: str | None = identify_slide(path, site_secret()).slide_id
    except WsiflowError:
        sid = None
    _audit_view(sid, None, "slide")
    return [slide_layer(slide)]


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
        folder = ResultFolder.find(target)
        if folder is not None:
            return lambda _: _read_result(folder.path)
        if _looks_like_slide(target):
            slide = open_slide(target)  # refuse here, not later, what cannot be shown in µm
            return lambda _: _read_slide(target, slide)
    except (WsiflowError, OSError, ValueError) as exc:
        _log.info("wsiflow reader declines the path: %s", type(exc).__name__)
    return None
