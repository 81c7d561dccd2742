"""Direct reading of DICOM-WSI pyramid levels whose frames are baseline JPEG, with DCT scaling.

A DICOM-WSI slide is a folder of instances, one per pyramid level (plus label, overview,
thumbnail). For each level the backend (OpenSlide) reports, this finds the VOLUME instance of
the same series with that size and, when it is plainly readable, where each frame's JPEG
bytes lie in the file (the encapsulated Pixel Data: one fragment per frame). The frames are
then read and decoded by :class:`JpegTileReader` exactly like TIFF tiles (DCT scaling, cache).

Read directly only: JPEG baseline (1.2.840.10008.1.2.4.50), TILED_FULL, one focal plane and
one optical path, no concatenation, 8-bit 3-sample chunky RGB / YBR_FULL(_422), frames a
multiple of 8 px, one fragment per frame, and a first frame whose JFIF or Adobe marker agrees
with the header's Photometric Interpretation (libjpeg then decodes it as OpenSlide does;
OpenSlide follows the header where they disagree: the CMU lossless conversion's reduced
levels are such, and OpenSlide's decode of them has wrong colours). Everything else (JPEG
2000, TILED_SPARSE, several focal planes, damaged or unusual encapsulation) is read through
the backend. Nothing read here (paths, UIDs, text) is ever reported.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._jpeg_tiles import DIRECT_READER, JpegLevel, JpegTileReader

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["DICOM_READER", "open_dicom_tiles"]

_log = logging.getLogger(__name__)

DICOM_READER = f"dicom-{DIRECT_READER}"
"""The DICOM direct reader's name and pixel version (shares the TIFF reader's version: the
same decoding and the same rule for resampling); part of a run's key."""
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_PHOTOMETRICS = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422"})
_PREAMBLE = 128
_PIXEL_DATA = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
"""(7FE0,0010) OB of undefined length, explicit VR little endian: encapsulated frames."""
_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_END = (0xFFFE, 0xE0DD)
_MAX_FRAMES = 1 << 22
_MAX_FRAME_BYTES = 64 << 20
_HEAD_BYTES = 4096
"""Bytes of the first frame searched for the markers before its scan data."""


class _NotDirect(Exception):
    """An instance the direct reader leaves to the backend."""


def _header(fh: object) -> Dataset:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings about odd headers are not ours to show
        return pydicom.dcmread(fh, stop_before_pixels=True)  # type: ignore[arg-type]


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(_PREAMBLE + 4)[_PREAMBLE:] == b"DICM"
    except OSError:
        return False


def _frame_positions(fd: int, start: int, frames: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and byte counts of each frame's one fragment, from the Pixel Data at ``start``."""
    if os.pread(fd, len(_PIXEL_DATA), start) != _PIXEL_DATA:
        raise _NotDirect("pixel data is not encapsulated")
    offsets = np.empty(frames, dtype=np.int64)
    counts = np.empty(frames, dtype=np.int64)
    pos = start + len(_PIXEL_DATA)
    for i in range(-1, frames + 1):  # the basic offset table, the frames, the end of the sequence
        head = os.pread(fd, 8, pos)
        if len(head) != 8:
            raise _NotDirect("pixel data ends early")
        group, element, length = struct.unpack("<HHI", head)
        if i == frames:
            if (group, element) != _SEQUENCE_END:
                raise _NotDirect("more fragments than frames")
            break
        if (group, element) != _ITEM or pos + 8 + length > size:
            raise _NotDirect("a fragment is damaged")
        if i >= 0:
            if not 2 < length <= _MAX_FRAME_BYTES:
                raise _NotDirect("a fragment has an implausible length")
            offsets[i], counts[i] = pos + 8, length
        pos += 8 + length
    return offsets, counts


def _colour_transform(frame: bytes) -> str | None:
    """What a JPEG stream's markers say its components are: "ycbcr" (JFIF, or Adobe with a
    transform), "rgb" (Adobe without one), or None when no marker says (libjpeg would guess)."""
    i = 2
    while i + 4 <= len(frame) and frame[i] == 0xFF:
        marker = frame[i + 1]
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more header markers
            return None
        length = int.from_bytes(frame[i + 2 : i + 4], "big")
        if marker == 0xE0 and frame[i + 4 : i + 9] == b"JFIF\x00":
            return "ycbcr"
        if marker == 0xEE and frame[i + 4 : i + 9] == b"Adobe" and length >= 14:
            return "ycbcr" if frame[i + 15] != 0 else "rgb"  # the transform flag
        i += 2 + length
    return None


def _level(ds: Dataset, fd: int, start: int, size: int, file: int) -> JpegLevel:
    """The instance as a directly readable level; raises :class:`_NotDirect` otherwise."""
    try:
        syntax = str(ds.file_meta.TransferSyntaxUID)
        width, height = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
        tw, th = int(ds.Columns), int(ds.Rows)
        frames = int(ds.get("NumberOfFrames", 1))
        plain = (
            syntax == _JPEG_BASELINE
            and str(ds.get("DimensionOrganizationType", "")) == "TILED_FULL"
            and int(ds.get("TotalPixelMatrixFocalPlanes", 1) or 1) == 1
            and int(ds.get("NumberOfOpticalPaths", 1) or 1) == 1
            and "ConcatenationUID" not in ds
            and int(ds.SamplesPerPixel) == 3 and int(ds.BitsAllocated) == 8 and int(ds.BitsStored) == 8
            and int(ds.get("PlanarConfiguration", 0) or 0) == 0
            and str(ds.PhotometricInterpretation) in _PHOTOMETRICS
            and tw > 0 and th > 0 and tw % 8 == 0 and th % 8 == 0 and width > 0 and height > 0
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise _NotDirect(f"incomplete header ({type(exc).__name__})") from exc
    if not plain:
        raise _NotDirect("not plain JPEG baseline TILED_FULL")
    across, down = math.ceil(width / tw), math.ceil(height / th)
    if frames != across * down or not 0 < frames <= _MAX_FRAMES:
        raise _NotDirect("frames do not tile the image")
    offsets, counts = _frame_positions(fd, start, frames, size)
    first = os.pread(fd, min(int(counts[0]), _HEAD_BYTES), int(offsets[0]))
    # The header and the stream must agree: OpenSlide follows the header's Photometric
    # Interpretation, libjpeg the stream's markers; a level where they disagree is left to the
    # backend (and its level check), so both readers give the same pixels.
    expected = "rgb" if str(ds.PhotometricInterpretation) == "RGB" else "ycbcr"
    if first[:2] != b"\xff\xd8" or _colour_transform(first) != expected:
        raise _NotDirect("the first frame's colour transform is unnamed or contradicts the header")
    # The frames are whole JPEG streams: nothing to add before them (empty prefix). A frame of
    # another size (some writers cut the last row's) fails to decode, as in OpenSlide: the
    # backend then reads that region and reports it its way.
    return JpegLevel(width, height, tw, th, across, down, offsets, counts, b"", file)


def open_dicom_tiles(
    path: Path | None, vendor: str | None, level_dimensions: tuple[tuple[int, int], ...]
) -> JpegTileReader | None:
    """A direct reader for the levels of the DICOM-WSI series of ``path`` (the instance the
    backend opened) whose VOLUME instances are plain JPEG baseline; None when no level
    qualifies. ``level_dimensions`` are the backend's levels, matched one to one by size."""
    if path is None or vendor != "dicom" or not path.is_file():
        return None
    try:
        with open(path, "rb") as fh:
            series = str(_header(fh).SeriesInstanceUID)
        files = sorted(p for p in path.parent.iterdir() if p.is_file() and not p.name.startswith("."))
    except (OSError, AttributeError, ValueError, TypeError, EOFError, struct.error) as exc:
        _log.debug("no direct DICOM reading (%s)", type(exc).__name__)
        return None
    wanted = {dims: level for level, dims in enumerate(level_dimensions)}
    found: dict[int, list[tuple[Path, Dataset, int]]] = {}
    for candidate in files:
        if not _is_dicom(candidate):
            continue
        try:
            with open(candidate, "rb") as fh:
                ds = _header(fh)
                start = fh.tell()  # pydicom stops at the Pixel Data element's tag
            image_type = [str(v).upper() for v in ds.get("ImageType", [])]
            if (str(ds.get("SOPClassUID", "")) != _WSI_SOP_CLASS or str(ds.get("SeriesInstanceUID", "")) != series
                    or "VOLUME" not in image_type):
                continue
            dims = (int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows))
        except (OSError, AttributeError, ValueError, TypeError, EOFError, struct.error) as exc:
            _log.debug("an instance is skipped by the direct reader (%s)", type(exc).__name__)
            continue
        if dims in wanted:
            found.setdefault(wanted[dims], []).append((candidate, ds, start))
    levels: dict[int, JpegLevel] = {}
    paths: list[Path] = []
    for level, matches in sorted(found.items()):
        if len(matches) != 1:  # several instances of one size (focal planes, optical paths...)
            continue
        candidate, ds, start = matches[0]
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        try:
            levels[level] = _level(ds, fd, start, os.fstat(fd).st_size, len(paths))
            paths.append(candidate)
        except (_NotDirect, OSError) as exc:
            _log.debug("level %d is read through the backend (%s)", level, exc)
        finally:
            os.close(fd)
    if not levels:
        return None
    try:
        return JpegTileReader(paths, levels, name=DICOM_READER)
    except OSError as exc:
        _log.debug("no direct DICOM reading (%s)", type(exc).__name__)
        return None
