"""The one scrubber for text wsiflow did not write: library messages and OS errors.

Library and OS messages quote file names and paths (``[Errno 13] Permission denied:
'/scans/S-24-1234.svs'``, OpenSlide naming a DICOM instance), and labs build those names
from accession numbers. Every such text passes :func:`scrub_text` before it becomes part
of a wsiflow message, so an error line, a log record or a Prefect state message never
carries a path, a file name of the slide's folder or a DICOM UID.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path

__all__ = ["scrub_text", "os_error_reason"]

_SLIDE_NAME_SUFFIXES = (
    "svs", "ndpi", "mrxs", "scn", "bif", "tif", "tiff", "vms", "vmu", "svslide", "dcm", "dicom", "isyntax",
    "czi", "jpg", "jpeg", "png", "jp2", "j2k", "zarr", "json", "yaml", "yml", "safetensors", "pt", "pth", "ckpt",
)
_TOKEN = r"[^\s'\"()<>,;=\[\]{}]"
"""A character of a path-like token: anything but blanks, quotes and delimiters."""
_ABSOLUTE_PATH = re.compile(rf"(?<![\w.~-])(?:[A-Za-z]:)?(?:~|\.{{1,2}})?[/\\]{_TOKEN}*")
"""``/a/b``, ``/x.svs``, ``C:\\x``, ``~/x``, ``./x``, ``../x``: a separator at the start of a token."""
_NESTED_PATH = re.compile(rf"(?<![\w./\\-]){_TOKEN}+[/\\]{_TOKEN}*[/\\]{_TOKEN}*")
"""``a/b/c``: a token with two separators (``µm/px`` and ``tiles/s`` have one)."""
_RELATIVE_FILE = re.compile(rf"(?<![\w./\\-]){_TOKEN}+[/\\]{_TOKEN}*\.[A-Za-z0-9]{{1,9}}\b")
"""``dir/x.dcm``: a token with a separator that ends in a file suffix."""
_FILE_NAME = re.compile(
    rf"(?<![\w.-])[\w.+~#%@-]*\.(?:{'|'.join(_SLIDE_NAME_SUFFIXES)})\b", re.IGNORECASE,
)
"""A bare file name with a suffix of a slide, image, table, config or model file."""
_QUOTED = re.compile(r"'[^'\n]{0,512}'|\"[^\"\n]{0,512}\"")
"""A quoted value: OS errors and many libraries quote the file name they failed on."""
_DICOM_UID = re.compile(r"\b\d+(?:\.\d+){4,}\b")
"""A DICOM UID (SOP instance, series...): keyed to a patient's study in the hospital's PACS."""


def _path_names(path: str | os.PathLike[str]) -> set[str]:
    """The spellings of ``path`` and of its folder, and for a DICOM-WSI (a folder, or a
    ``.dcm`` instance) the names of the folder's other files, which are the scanner's or
    the PACS export's. Nothing here raises: an unreadable or unsearchable folder gives
    what can be known without reading it (the path patterns still apply)."""
    given = Path(path)
    names = {os.fspath(path), str(given), given.name}
    try:
        is_dir = given.is_dir()
    except OSError:
        is_dir = False
    folder = given if is_dir else given.parent
    names.update({str(folder), folder.name})
    with contextlib.suppress(OSError, RuntimeError):  # a link loop: the spellings given are enough
        names.update({str(given.resolve()), str(folder.resolve())})
    if is_dir or given.suffix.lower() == ".dcm":
        try:
            with os.scandir(folder) as entries:
                names.update(entry.name for entry in entries)
        except OSError:
            pass  # an unreadable folder: the path patterns still apply
    return {n for n in names if len(n) > 2 and n not in (".", "..")}


def _scrub_quoted(match: re.Match[str]) -> str:
    inner = match.group(0)[1:-1]
    if _FILE_NAME.search(inner) or "/" in inner or "\\" in inner:
        return "<path>"
    return match.group(0)


def scrub_text(message: str, path: str | os.PathLike[str] | None = None) -> str:
    """``message`` without anything that can name a patient: the spellings of ``path``
    (the input it is about, if known) and its DICOM folder's file names (``<slide>``),
    quoted values and tokens that look like paths or file names (``<path>``), and DICOM
    UIDs (``<uid>``); blanks collapsed to one line. Ordinary words, numbers, ``µm/px``
    and ``tiles/s`` are kept."""
    if path is not None:
        for text in sorted(_path_names(path), key=len, reverse=True):
            message = message.replace(text, "<slide>")
    message = _QUOTED.sub(_scrub_quoted, message)
    for pattern in (_ABSOLUTE_PATH, _NESTED_PATH, _RELATIVE_FILE, _FILE_NAME):
        message = pattern.sub("<path>", message)
    message = _DICOM_UID.sub("<uid>", message)
    return " ".join(message.split())


def os_error_reason(exc: OSError) -> str:
    """What went wrong in an OS error, in words, without the file names ``str(exc)`` holds:
    ``permission denied``, ``input/output error``, ``a loop of symbolic links``..."""
    if exc.errno == errno.ELOOP:
        return "a loop of symbolic links"
    if exc.strerror:
        return scrub_text(exc.strerror).lower()
    name = errno.errorcode.get(exc.errno or 0)
    return name or type(exc).__name__
