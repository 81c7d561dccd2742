"""Slide arguments -> slide paths: files, DICOM-WSI folders, folders of slides, quoted globs.

The one place that decides what a command-line slide argument means, so every command
(``run``, ``inspect``, ``batch``, ...) expands arguments the same way.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ._backend import SLIDE_SUFFIXES, is_dicom_folder

__all__ = ["expand_slide_arguments"]

_log = logging.getLogger(__name__)

_GLOB_CHARS = frozenset("*?[")


def _is_glob(argument: str) -> bool:
    """A pattern for :func:`glob.glob`, unless a file of that very name exists."""
    return any(ch in _GLOB_CHARS for ch in argument) and not os.path.lexists(argument)


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _folder_slides(folder: Path) -> list[Path]:
    """The slide files and DICOM-WSI subfolders of a folder of slides (sorted, one level)."""
    try:
        children = sorted(p for p in folder.iterdir() if not _hidden(p))
    except OSError:
        return [folder]  # unreadable: the analysis reports it (permission denied) as a slide
    slides: list[Path] = []
    stray_dicom = 0
    for child in children:
        if child.is_dir():
            if is_dicom_folder(child):
                slides.append(child)
            continue
        suffix = child.suffix.lower()
        if suffix == ".dcm":
            # One instance of a DICOM series is not a slide on its own; the series' folder is.
            stray_dicom += 1
        elif suffix in SLIDE_SUFFIXES and child.is_file():
            slides.append(child)
    if stray_dicom:
        _log.info(
            "skipped %d .dcm file(s) in a folder of slides: a DICOM-WSI slide is a folder of its "
            "own instances; give that folder instead", stray_dicom,
        )
    if not slides:
        _log.info("a folder argument holds no slide files or DICOM-WSI folders")
    return slides


def _expand_path(path: Path) -> list[Path]:
    """One existing or missing path -> the slides it stands for."""
    if path.is_dir() and not is_dicom_folder(path):
        return _folder_slides(path)
    # A slide file, a DICOM-WSI folder, or a missing path: the analysis reports the latter.
    return [path]


def expand_slide_arguments(arguments: Sequence[str]) -> list[Path]:
    """Slide arguments -> slide paths; order kept, duplicates removed.

    Each argument is a slide file (any suffix), a DICOM-WSI folder (one slide), a folder
    of slides (its slide files and DICOM-WSI subfolders, sorted, hidden entries skipped,
    one level deep; stray ``.dcm`` files in it are skipped), or a glob pattern quoted by
    the user (matches sorted, each expanded by the same rules; no match adds nothing).
    A missing plain path is kept as given, so the analysis reports it as not found.
    """
    if isinstance(arguments, (str, bytes)):
        raise TypeError("expand_slide_arguments takes a sequence of arguments, not one string")
    found: list[Path] = []
    for argument in arguments:
        argument = os.fspath(argument)
        if _is_glob(argument):
            matches = sorted(glob.glob(argument))
            if not matches:
                _log.info("a glob pattern matched nothing")
            for match in matches:
                found.extend(_expand_path(Path(match)))
        else:
            found.extend(_expand_path(Path(argument)))
    unique: list[Path] = []
    seen: set[str] = set()
    for path in found:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique
