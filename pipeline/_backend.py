"""The slide backend Protocol and the two backends (OpenSlide, tiffslide).

A backend gives raw pixel access to one open slide. Coordinates passed to
:meth:`SlideBackend.read_region` are (x, y) at level 0, sizes are (width, height) at the
requested level, and pixels come back as ``uint8`` RGB arrays of shape (height, width, 3),
with transparency composited on white and white outside the slide.

Backends are chosen by argument (:func:`open_backend`), never by a global switch.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from pathlib import Path
from typing import Literal, Protocol, SupportsFloat, SupportsIndex, SupportsInt, get_args, runtime_checkable

import numpy as np

from ._errors import (
    CorruptSlideError,
    SlideNotFoundError,
    SlidePermissionError,
    UnsupportedSlideError,
    WsiflowError,
)
from ._scrub import scrub_text

__all__ = ["BackendName", "SlideBackend", "open_backend", "BACKEND_NAMES", "SLIDE_SUFFIXES", "is_dicom_folder"]

_log = logging.getLogger(__name__)

BackendName = Literal["auto", "openslide", "tiffslide"]
BACKEND_NAMES: tuple[BackendName, ...] = get_args(BackendName)
SLIDE_SUFFIXES = frozenset({
    ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".tif", ".tiff", ".vms", ".vmu", ".svslide", ".dcm",
})
"""File name endings of the slide formats wsiflow reads (a DICOM-WSI slide may also be a folder)."""

MAX_SIDE_PX = 1 << 20
"""Largest level width/height accepted: 1,048,576 px is 26 cm at 0.25 µm/px, more than any glass
slide. Larger values come from damaged headers and would make readers allocate absurd buffers."""
MAX_TILE_PIXELS = 1 << 26
"""Largest stored tile (or strip) accepted: OpenSlide allocates a whole tile with g_malloc, which
aborts the process (no exception) when a damaged header claims a tile of terabytes."""

# What tifffile/tiffslide/imagecodecs raise on damaged files: a mix of builtins (ZeroDivisionError
# from zero tile sizes, KeyError from zarr for missing chunks, struct.error for short reads,
# MemoryError when a damaged header drives an allocation, AttributeError from tiffslide's
# metadata parser when a tag holds a value outside its enum, e.g. ResolutionUnit 77).
_TIFF_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, RuntimeError, OSError, KeyError, IndexError, TypeError, ArithmeticError, struct.error,
    MemoryError, AttributeError,
)


@runtime_checkable
class SlideBackend(Protocol):
    """Raw access to one open slide. All coordinates are (x, y) at level 0."""

    name: BackendName
    """The backend that opened the slide ("openslide" or "tiffslide", never "auto")."""
    level_dimensions: tuple[tuple[int, int], ...]
    """(width, height) of each pyramid level, finest first."""
    level_downsamples: tuple[float, ...]
    metadata_mpp: tuple[float | None, float | None]
    """(x, y) µm/px as written in the file's metadata, unchecked; None where absent."""
    objective_power: float | None
    vendor: str | None
    native_tile_size: tuple[int, int] | None
    """(width, height) of the stored tiles of level 0, when the format has tiles."""

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) from level ``level``; (x, y) at level 0."""
        ...

    def close(self) -> None:
        """Release the file handle."""
        ...


_scrub = scrub_text
"""The scrubber under the name ``tests/test_scrub.py`` imports."""


def _int_or_none(value: object) -> int | None:
    if not isinstance(value, (str, bytes, SupportsInt, SupportsIndex)):
        return None  # absent (None), or nothing int() accepts
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _check_geometry(
    dimensions: tuple[tuple[int, int], ...],
    downsamples: tuple[float, ...],
    tiles: list[tuple[int | None, int | None]],
) -> None:
    """Refuse pyramid geometry no real slide has, before anything is read or allocated from it."""
    if not dimensions or len(downsamples) != len(dimensions):
        raise CorruptSlideError("the slide has no readable pyramid levels")
    for level, ((w, h), ds) in enumerate(zip(dimensions, downsamples, strict=True)):
        if not (1 <= w <= MAX_SIDE_PX and 1 <= h <= MAX_SIDE_PX):
            raise CorruptSlideError(f"level {level} claims an implausible size of {w} x {h} px")
        if not (math.isfinite(ds) and ds >= 0.999):
            raise CorruptSlideError(f"level {level} claims an implausible downsample of {ds!r}")
    for level, (tw, th) in enumerate(tiles):
        if not tw or not th:
            continue  # no tiles (strips, or the format does not say): nothing to check
        if not (1 <= tw <= MAX_SIDE_PX and 1 <= th <= MAX_SIDE_PX and tw * th <= MAX_TILE_PIXELS):
            raise CorruptSlideError(f"level {level} claims implausible {tw} x {th} px tiles")


def _float_or_none(value: object) -> float | None:
    if not isinstance(value, (str, bytes, SupportsFloat, SupportsIndex)):
        return None  # absent (None), or nothing float() accepts
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if np.isfinite(result) else None


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA uint8 (non-premultiplied) -> RGB uint8 over a white background."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if bool((alpha == 255).all()):
        return np.ascontiguousarray(rgb)
    out = np.array(rgb, order="C")  # a copy: rgba may be read-only (PIL) and a 1x1 slice is already contiguous
    # Only partly transparent pixels need the arithmetic; regions outside the image or
    # missing tiles (alpha 0) are large and just become white.
    out[alpha == 0] = 255
    partial = (alpha != 0) & (alpha != 255)
    if bool(partial.any()):
        a = alpha[partial].astype(np.uint16)[:, None]
        out[partial] = ((rgb[partial].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    return out


class _OpenSlideBackend:
    """OpenSlide 4 (SVS, NDPI, MIRAX, SCN, BIF, Philips TIFF, tiled TIFF, DICOM-WSI)."""

    name: BackendName = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide  # imported here so tiffslide-only use never loads the C library

        self._error_type = openslide.OpenSlideError
        self._path = path
        self.path = path
        """The file opened (for a direct reader of its stored tiles); never reported."""
        self._slide = openslide.OpenSlide(str(path))
        props = self._slide.properties
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.metadata_mpp = (
            _float_or_none(props.get("openslide.mpp-x")),
            _float_or_none(props.get("openslide.mpp-y")),
        )
        self.objective_power = _float_or_none(props.get("openslide.objective-power"))
        self.vendor = props.get("openslide.vendor")
        tiles = [
            (_int_or_none(props.get(f"openslide.level[{i}].tile-width")),
             _int_or_none(props.get(f"openslide.level[{i}].tile-height")))
            for i in range(len(self.level_dimensions))
        ]
        try:
            _check_geometry(self.level_dimensions, self.level_downsamples, tiles)
        except CorruptSlideError:
            self._slide.close()
            raise
        tw, th = tiles[0]
        self.native_tile_size = (tw, th) if tw and th else None

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        try:
            image = self._slide.read_region((int(x), int(y)), int(level), (int(width), int(height)))
        except self._error_type as exc:
            self._reopen()
            raise CorruptSlideError(
                f"tile data of level {level} cannot be decoded ({scrub_text(str(exc), self._path)})"
            ) from exc
        return _composite_on_white(np.asarray(image))

    def _reopen(self) -> None:
        """OpenSlide handles stay in an error state after a failure: get a fresh one."""
        import openslide

        self._slide.close()
        try:
            self._slide = openslide.OpenSlide(str(self._path))
        except self._error_type as exc:
            raise CorruptSlideError(
                f"the slide cannot be reopened after a decode error ({scrub_text(str(exc), self._path)})"
            ) from exc

    def close(self) -> None:
        self._slide.close()


class _TiffSlideBackend:
    """tiffslide (pure Python, tifffile + imagecodecs): TIFF variants OpenSlide refuses."""

    name: BackendName = "tiffslide"

    def __init__(self, path: Path) -> None:
        import tiffslide

        self._path = path
        self.path = path
        self._slide = tiffslide.TiffSlide(str(path))
        try:
            self._describe()
        except BaseException:
            self._slide.close()
            raise

    def _describe(self) -> None:
        props = self._slide.properties
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.metadata_mpp = (
            _float_or_none(props.get("tiffslide.mpp-x")),
            _float_or_none(props.get("tiffslide.mpp-y")),
        )
        self.objective_power = _float_or_none(props.get("tiffslide.objective-power"))
        self.vendor = props.get("tiffslide.vendor")
        tiles = [
            (_int_or_none(props.get(f"tiffslide.level[{i}].tile-width")),
             _int_or_none(props.get(f"tiffslide.level[{i}].tile-height")))
            for i in range(len(self.level_dimensions))
        ]
        _check_geometry(self.level_dimensions, self.level_downsamples, tiles)
        tw, th = tiles[0]
        self.native_tile_size = (tw, th) if tw and th else None
        # Decode one pixel now so a file tiffslide cannot decode fails at open, not later.
        self.read_region(0, 0, len(self.level_dimensions) - 1, 1, 1)

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        # tiffslide returns black outside the image; clip and paste onto white instead.
        out = np.full((int(height), int(width), 3), 255, dtype=np.uint8)
        level_w, level_h = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        lx, ly = int(np.floor(x / ds)), int(np.floor(y / ds))
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + int(width), level_w), min(ly + int(height), level_h)
        if x1 <= x0 or y1 <= y0:
            return out
        try:
            part = self._slide.read_region(
                (round(x0 * ds), round(y0 * ds)), level, (x1 - x0, y1 - y0), as_array=True
            )
        except _TIFF_ERRORS as exc:
            reason = scrub_text(str(exc), self._path)
            raise CorruptSlideError(
                f"tile data of level {level} cannot be decoded ({type(exc).__name__}: {reason})"
            ) from exc
        part = np.asarray(part)
        if part.ndim == 2:
            part = np.repeat(part[..., None], 3, axis=2)
        if part.shape[2] == 4:
            part = _composite_on_white(part.astype(np.uint8))
        out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = part[..., :3]
        return out

    def close(self) -> None:
        self._slide.close()


def _check_readable(path: Path) -> None:
    """Raise the right wsiflow error when ``path`` is missing or unreadable."""
    if not path.exists():
        raise SlideNotFoundError.at(path)
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            with open(path, "rb") as fh:
                fh.read(1)
    except PermissionError as exc:
        raise SlidePermissionError("the slide cannot be read: permission denied") from exc


_WSI_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.77.1.6"
"""VL Whole Slide Microscopy Image Storage: the SOP class of every DICOM-WSI instance."""
_DICOM_PREAMBLE = 128
_DICOM_MAGIC = b"DICM"
_SOP_CLASS_TAG = 0x00080016
_DICOM_HEAD_BYTES = 1 << 16
"""Bytes read to find the SOP class: the file meta group and the first elements are far smaller."""


def _is_wsi_dicom_file(path: Path) -> bool:
    """Whether a file is a DICOM instance of the WSI SOP class, whatever its suffix.

    Checks the 128-byte preamble + ``DICM`` first, then parses the file meta group and the
    dataset up to SOP Class UID, from the file's head in memory (so pydicom's warnings about
    a damaged header never name the file).
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(_DICOM_PREAMBLE + len(_DICOM_MAGIC))
            if head[_DICOM_PREAMBLE:] != _DICOM_MAGIC:
                return False  # most files of a folder end here, after 132 bytes
            head += fh.read(_DICOM_HEAD_BYTES - len(head))
    except OSError:
        return False
    import io
    import warnings

    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_partial

    def past_sop_class(tag: int, vr: str | None, length: int) -> bool:
        return tag > _SOP_CLASS_TAG

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a damaged or cut header: pydicom warns, we say False
            ds = read_partial(io.BytesIO(head), stop_when=past_sop_class, specific_tags=[_SOP_CLASS_TAG])
    except (InvalidDicomError, OSError, ValueError, EOFError, struct.error):
        return False  # a damaged header: not a slide instance to go by
    sop_class = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    return str(sop_class or "").strip() == _WSI_SOP_CLASS_UID


def is_dicom_folder(folder: Path) -> bool:
    """Whether a folder is one DICOM-WSI slide, judged by content, not by file names.

    True when it holds at least one DICOM file (any suffix, or none) of the WSI SOP class
    and no other slide file (a suffix of :data:`SLIDE_SUFFIXES` other than ``.dcm``).
    Only file names are listed, and headers are read until the first WSI instance.
    """
    try:
        if not folder.is_dir():
            return False
        with os.scandir(folder) as entries:
            files = [
                Path(entry.path) for entry in entries
                if not entry.name.startswith(".") and entry.is_file()
            ]
    except OSError:
        return False
    suffixes = [p.suffix.lower() for p in files]
    if any(s in SLIDE_SUFFIXES and s != ".dcm" for s in suffixes):
        return False
    # Most likely DICOM first: *.dcm, then files without a suffix, then the rest.
    order = {".dcm": 0, "": 1}
    candidates = sorted(zip(suffixes, files, strict=True), key=lambda pair: (order.get(pair[0], 2), pair[1].name))
    return any(_is_wsi_dicom_file(path) for _, path in candidates)


def _dicom_candidates(folder: Path) -> list[Path]:
    """Files of a DICOM-WSI folder, the largest (most likely a pyramid level) first."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise UnsupportedSlideError("the folder is empty; give a DICOM-WSI folder or a slide file")
    return sorted(files, key=lambda p: (-p.stat().st_size, p.name))


_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def _check_tiff_layout(path: Path) -> None:
    """Refuse a TIFF whose tiles or strips lie outside the file, before OpenSlide sees it.

    OpenSlide allocates each tile's byte count with g_malloc, which aborts the whole process
    (no exception to catch) when a damaged header claims exabytes. tifffile reads the same
    tables lazily and safely. Files tifffile cannot parse are left to OpenSlide to judge.
    """
    import tifffile

    with open(path, "rb") as fh:
        header = fh.read(16)
    if header[:4] not in _TIFF_MAGIC:
        return
    size = path.stat().st_size
    order = "<" if header[:2] == b"II" else ">"
    bigtiff = header[2:4] in (b"+\0", b"\0+")
    if len(header) < (16 if bigtiff else 8):
        raise CorruptSlideError("the file ends inside its TIFF header (it is truncated)")
    first_ifd = struct.unpack(order + ("Q" if bigtiff else "I"), header[8:16] if bigtiff else header[4:8])[0]
    if first_ifd >= size:
        # Aperio and others write the directory after the pixels: a cut file loses it.
        raise CorruptSlideError("the file ends before its first image directory (it is truncated)")
    outside = False
    try:
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                offsets = np.asarray(page.dataoffsets, dtype=np.uint64)
                counts = np.asarray(page.databytecounts, dtype=np.uint64)
                if len(offsets) == len(counts):
                    outside = outside or bool(((counts > size) | (offsets + counts > size)).any())
    except _TIFF_ERRORS:
        return
    if outside:
        raise CorruptSlideError("image data lies past the end of the file (the file is truncated or damaged)")


def _open_openslide(path: Path) -> _OpenSlideBackend:
    import openslide

    if path.is_file():
        _check_tiff_layout(path)

    candidates = _dicom_candidates(path) if path.is_dir() else [path]
    last: Exception | None = None
    for candidate in candidates:
        try:
            return _OpenSlideBackend(candidate)
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as exc:
            last = exc
        except PermissionError as exc:
            raise SlidePermissionError("the slide cannot be read: permission denied") from exc
    raise UnsupportedSlideError(
        f"OpenSlide cannot open it ({scrub_text(str(last), path)})"
    ) from last


def _open_tiffslide(path: Path) -> _TiffSlideBackend:
    if path.is_dir():
        raise UnsupportedSlideError("tiffslide reads single TIFF files, not folders")
    try:
        return _TiffSlideBackend(path)
    except CorruptSlideError:
        raise
    except PermissionError as exc:
        raise SlidePermissionError("the slide cannot be read: permission denied") from exc
    except _TIFF_ERRORS as exc:
        # tifffile/tiffslide signal "not a TIFF I know" with a mix of builtins.
        raise UnsupportedSlideError(
            f"tiffslide cannot open it ({type(exc).__name__}: {scrub_text(str(exc), path)})"
        ) from exc


def open_backend(path: str | os.PathLike[str], backend: BackendName = "auto") -> SlideBackend:
    """Open ``path`` (a slide file, or a DICOM-WSI folder) with the chosen backend.

    ``auto`` tries OpenSlide first and falls back to tiffslide when OpenSlide refuses the
    file. Raises :class:`SlideNotFoundError`, :class:`SlidePermissionError`,
    :class:`UnsupportedSlideError` or :class:`CorruptSlideError`.
    """
    slide_path = Path(path)
    _check_readable(slide_path)
    if backend == "openslide":
        return _open_openslide(slide_path)
    if backend == "tiffslide":
        return _open_tiffslide(slide_path)
    if backend != "auto":
        raise UnsupportedSlideError(
            f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKEND_NAMES)}"
        )
    try:
        return _open_openslide(slide_path)
    except UnsupportedSlideError as first:
        if slide_path.is_dir():
            raise
        try:
            opened = _open_tiffslide(slide_path)
        except WsiflowError:
            raise first from None
        _log.info("OpenSlide refused the slide; opened it with tiffslide")
        return opened
