"""Slide arguments -> slide paths: files, DICOM-WSI folders, folders of slides, quoted globs.

The one place that decides what a command-line slide argument means, so every command
(``run``, ``inspect``, ``batch``, ...) expands arguments the same way.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ._backend import SLIDE_SUFFIXES, is_dicom_folder
from ._errors import ConfigError
from ._scrub import os_error_reason

__all__ = ["expand_slide_arguments"]

_log = logging.getLogger(__name__)

_GLOB_CHARS = frozenset("*?[")


def _is_glob(argument: str) -> bool:
    """A pattern for :func:`glob.glob`, unless a file of that very name exists."""
    return any(ch in _GLOB_CHARS for ch in argument) and not os.path.lexists(argument)


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _dangling(path: Path) -> str | None:
    """``"a broken link"`` or ``"a link loop"`` for a symbolic link that leads nowhere, else None."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as exc:
        return "a link loop" if exc.errno == errno.ELOOP else "a broken link"
    return None


def _folder_slides(folder: Path, where: str, keep_broken_links: bool) -> list[Path]:
    """The slide files and DICOM-WSI subfolders of a folder of slides (sorted, one level)."""
    try:
        children = sorted(p for p in folder.iterdir() if not _hidden(p))
    except OSError:
        return [folder]  # unreadable: the analysis reports it (permission denied) as a slide
    slides: list[Path] = []
    stray_dicom = 0
    for position, child in enumerate(children, start=1):
        suffix = child.suffix.lower()
        dangling = _dangling(child)
        if dangling is not None and (suffix in SLIDE_SUFFIXES or not suffix):  # could be a slide or DICOM folder
            # Never silently: the command reports it as a failed slide, the inbox logs it.
            if keep_broken_links:
                slides.append(child)
            else:
                _log.warning("%s, entry %d of %d: %s (its target cannot be read); skipped -- fix or remove "
                             "the link", where, position, len(children), dangling)
            continue
        if child.is_dir():
            if is_dicom_folder(child):
                slides.append(child)
            continue
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


def _expand_path(path: Path, where: str, keep_broken_links: bool) -> list[Path]:
    """One existing or missing path -> the slides it stands for."""
    if path.is_dir() and not is_dicom_folder(path):
        return _folder_slides(path, f"{where} (a folder)", keep_broken_links)
    # A slide file, a DICOM-WSI folder, or a missing path: the analysis reports the latter.
    return [path]


_UNREACHABLE_HINT = ("give the user running wsiflow read access to the slides and their folders (and search "
                     "access, x, to every folder on the way), or leave the argument out")


def _which(position: int, count: int) -> str:
    return "the slide argument" if count == 1 else f"slide argument {position} of {count}"


def _unreachable(error: OSError) -> str:
    """Why an argument could not be looked at, in words (never its path)."""
    if isinstance(error, PermissionError):
        return "cannot be reached: permission denied (on it or on a folder of its path)"
    return f"cannot be looked at ({os_error_reason(error)})"


def _refuse_missing(arguments: Sequence[str]) -> None:
    """ConfigError naming (by position, never by path) each plain argument that leads nowhere."""
    problems = []
    for position, argument in enumerate(arguments, start=1):
        if _is_glob(argument) or os.path.exists(argument):
            continue
        which = _which(position, len(arguments))
        try:
            os.lstat(argument)  # os.path.exists says False for a path it may not look at, too
            dangling = _dangling(Path(argument))
        except (FileNotFoundError, NotADirectoryError):
            dangling = None
        except OSError as exc:
            problems.append(f"{which} {_unreachable(exc)}")
            continue
        problems.append(f"{which} is {dangling}" if dangling else f"{which} does not exist")
    if problems:
        hint = "check the path: a slide file, a DICOM-WSI folder, a folder of slides or a quoted glob"
        if any("cannot be" in p for p in problems):
            hint = _UNREACHABLE_HINT
        raise ConfigError("; ".join(problems) + "; nothing was run", hint=hint)


def expand_slide_arguments(
    arguments: Sequence[str], *, refuse_missing: bool = False, keep_broken_links: bool = False
) -> list[Path]:
    """Slide arguments -> slide paths; order kept, duplicates removed.

    Each argument is a slide file (any suffix), a DICOM-WSI folder (one slide), a folder
    of slides (its slide files and DICOM-WSI subfolders, sorted, hidden entries skipped,
    one level deep; stray ``.dcm`` files in it are skipped), or a glob pattern quoted by
    the user (matches sorted, each expanded by the same rules; no match adds nothing).

    A missing plain path is kept as given, so the analysis reports it as not found; with
    ``refuse_missing`` (the commands: a typing error should stop them before anything
    starts) it raises :class:`ConfigError` naming the argument's position. A broken link
    or a link loop in a folder is skipped with a warning naming its position, or with
    ``keep_broken_links`` kept in its place so the command reports it as a failed slide.
    An argument the OS refuses to look at (a file in a folder this user may not search, a
    folder of slides whose entries it may not look at) raises :class:`ConfigError` naming
    its position and the reason, never the path; an unreadable folder or slide is kept, so
    the command reports it as a failed slide (permission denied).
    """
    if isinstance(arguments, (str, bytes)):
        raise TypeError("expand_slide_arguments takes a sequence of arguments, not one string")
    arguments = [os.fspath(a) for a in arguments]
    if refuse_missing:
        _refuse_missing(arguments)
    found: list[Path] = []
    problems: list[str] = []
    for position, argument in enumerate(arguments, start=1):
        where = f"slide argument {position}"
        try:
            if _is_glob(argument):
                matches = sorted(glob.glob(argument))
                if not matches:
                    _log.info("a glob pattern matched nothing")
                for match in matches:
                    found.extend(_expand_path(Path(match), where, keep_broken_links))
            else:
                found.extend(_expand_path(Path(argument), where, keep_broken_links))
        except OSError as exc:
            # A folder on its path (or of a folder argument) this user may not search: the
            # OS error's text names the file, so it becomes a one-line error by position.
            problems.append(f"{_which(position, len(arguments))} {_unreachable(exc)}")
    if problems:
        raise ConfigError("; ".join(problems) + "; nothing was run", hint=_UNREACHABLE_HINT)
    unique: list[Path] = []
    seen: set[str] = set()
    for path in found:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique
