"""Direct reading of JPEG-tiled levels (Aperio SVS, generic tiled TIFF; DICOM-WSI through
``_dicom_tiles``), with DCT scaling.

OpenSlide decodes every stored tile at full size and the analysis then shrinks it; libjpeg
can instead decode a tile at 1/2, 1/4 or 1/8 of its size in the DCT domain for a fraction
of the cost. This reader reads a level's stored tile bytes itself (``os.pread``, safe across
threads), decodes them with Pillow's libjpeg-turbo at the chosen scale and pastes them
together. At scale 1 its pixels are identical to OpenSlide's for these formats.

Only levels it fully understands are read directly (8-bit, 3-sample, chunky, tiled, JPEG,
RGB or YCbCr, tiles a multiple of 8 px); the caller reads everything else through its
backend. Results are deterministic: the same bytes give the same pixels every run.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ._backend import _TIFF_ERRORS

if TYPE_CHECKING:
    import tifffile

__all__ = ["DIRECT_READER", "DECODER", "DirectReadError", "JpegTileReader", "JpegLevel", "open_jpeg_tiles",
           "decode_tile", "DCT_DENOMINATORS"]

_log = logging.getLogger(__name__)

DIRECT_READER = "jpeg-direct/2"
"""The direct reader's name and pixel version: part of a run's key, so a result computed with
another reader (or another version of this one) is never reused or resumed with this one.
/2: a DCT-scaled block within 1 % of the output size is read as is, without resampling
(``Slide._read_direct``); /1 always resampled with Lanczos."""
DCT_DENOMINATORS = (8, 4, 2, 1)
"""Scales libjpeg decodes in the DCT domain (1/8 .. 1/1), coarsest first."""

_VENDORS = frozenset({"aperio", "generic-tiff", "generic"})
"""Formats whose levels are plain TIFF pages (no overlapping tiles, no vendor colour quirks)."""
_CACHE_BYTES = 96 << 20
"""Decoded tiles kept: neighbouring analysis tiles share stored tiles (a 224 px tile on a grid
of 256 px stored tiles touches up to four), so each stored tile is decoded about once."""
_MAX_TILE_BYTES = 64 << 20  # a larger claimed tile is a damaged header: leave it to the backend
_COMPRESSION_JPEG = 7
_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6
# An Adobe APP14 marker tells libjpeg the colour transform. Aperio (and other TIFF writers)
# store RGB-encoded JPEG without one; libjpeg would then assume YCbCr and shift the colours.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_ADOBE_YCBCR = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01"
_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"


class DirectReadError(Exception):
    """A stored tile could not be read or decoded directly: read the region through the backend."""


@dataclass(frozen=True)
class JpegLevel:
    """Where a level's stored JPEG tiles are: tile ``i`` (row-major) is ``counts[i]`` bytes at
    ``offsets[i]`` of file ``file`` (an index into the reader's files)."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    tiles_across: int
    tiles_down: int
    offsets: np.ndarray
    counts: np.ndarray
    prefix: bytes
    """What goes before a tile's bytes (after its SOI): shared tables and the colour marker."""
    file: int = 0


_Level = JpegLevel


class JpegTileReader:
    """Reads regions of JPEG-tiled levels directly; thread-safe (positional reads only).

    ``paths`` are the files the levels' tiles lie in (one for a TIFF, one per level for DICOM);
    ``name`` (with its version) enters a run's key through ``Slide.reader``."""

    def __init__(self, paths: Path | list[Path], levels: dict[int, JpegLevel], name: str = DIRECT_READER) -> None:
        self.name = name
        self._levels = levels
        self._fds: list[int] = []
        try:
            for path in [paths] if isinstance(paths, Path) else paths:
                self._fds.append(os.open(path, os.O_RDONLY))
        except OSError:
            self.close()
            raise
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._close_files()
        with self._lock:
            self._cache.clear()
            self._cached_bytes = 0

    def _close_files(self) -> None:
        fds, self._fds = getattr(self, "_fds", []), []
        for fd in fds:
            os.close(fd)

    def __del__(self) -> None:
        # A slide dropped without close() must not leak its descriptors.
        self._close_files()

    def supports(self, level: int) -> bool:
        return level in self._levels

    def denominator_for(self, level: int, scale: float) -> int:
        """The coarsest DCT scale 1/d with d <= ``scale`` that keeps whole tiles (1 if none)."""
        info = self._levels[level]
        for d in DCT_DENOMINATORS:
            if d <= scale + 1e-9 and info.tile_w % d == 0 and info.tile_h % d == 0:
                return d
        return 1

    def read(self, level: int, x: int, y: int, width: int, height: int, denominator: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) of ``level`` decoded at 1/``denominator``; (x, y) and the
        size are in those scaled pixels. White outside the level (a partly covered edge pixel too)."""
        info = self._levels[level]
        d = denominator
        stw, sth = info.tile_w // d, info.tile_h // d
        level_w, level_h = info.width // d, info.height // d  # scaled pixels fully inside the level
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level_w), min(y + height, level_h)
        inside = (x0, y0, x1, y1) == (x, y, x + width, y + height)
        # Every pixel is pasted over when the block lies inside the level: no fill needed.
        out = np.empty((height, width, 3), dtype=np.uint8) if inside else np.full((height, width, 3), 255, np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        for ty in range(y0 // sth, (y1 - 1) // sth + 1):
            for tx in range(x0 // stw, (x1 - 1) // stw + 1):
                tile = self._tile(level, ty * info.tiles_across + tx, d)
                # The part of this tile inside the request, in scaled level pixels.
                px0, py0 = max(x0, tx * stw), max(y0, ty * sth)
                px1, py1 = min(x1, (tx + 1) * stw), min(y1, (ty + 1) * sth)
                out[py0 - y : py1 - y, px0 - x : px1 - x] = tile[py0 - ty * sth : py1 - ty * sth,
                                                                 px0 - tx * stw : px1 - tx * stw]
        return out

    def _tile(self, level: int, index: int, d: int) -> np.ndarray:
        key = (level, index, d)
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        # Decoded outside the lock (libjpeg releases the GIL): two threads may decode the same
        # tile at once, and get the same pixels.
        tile = self._decode(self._levels[level], index, d)
        tile.flags.writeable = False
        with self._lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cached_bytes += tile.nbytes
                while self._cached_bytes > _CACHE_BYTES and len(self._cache) > 1:
                    _, dropped = self._cache.popitem(last=False)
                    self._cached_bytes -= dropped.nbytes
        return tile

    def _decode(self, info: _Level, index: int, d: int) -> np.ndarray:
        count = int(info.counts[index])
        if not 2 < count <= _MAX_TILE_BYTES:
            raise DirectReadError(f"tile {index} is missing or implausibly large ({count} bytes)")
        fds = self._fds
        if info.file >= len(fds):
            raise DirectReadError("the reader is closed")
        try:
            data = os.pread(fds[info.file], count, int(info.offsets[index]))
        except OSError as exc:  # the backend reads it again and reports the error its way
            raise DirectReadError(f"tile {index} cannot be read ({type(exc).__name__})") from exc
        if len(data) != count or data[:2] != _SOI:
            raise DirectReadError(f"tile {index} does not start a JPEG stream")
        stream = _SOI + info.prefix + data[2:] if info.prefix else data
        try:
            pixels = decode_tile(stream, info.tile_w // d, info.tile_h // d, (info.tile_w, info.tile_h))
        except (OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError) as exc:
            raise DirectReadError(f"tile {index} cannot be decoded ({type(exc).__name__})") from exc
        if pixels.shape[:2] != (info.tile_h // d, info.tile_w // d):
            raise DirectReadError(f"tile {index} decoded to {pixels.shape[1]} x {pixels.shape[0]} px")
        return pixels


def _decode_pillow(data: bytes, width: int, height: int, full: tuple[int, int] | None = None) -> np.ndarray:
    image = Image.open(io.BytesIO(data), formats=("JPEG",))
    if full is not None and image.size != full:
        raise ValueError(f"the tile claims {image.size[0]} x {image.size[1]} px")  # before any allocation
    if image.size != (width, height):
        image.draft("RGB", (width, height))  # the DCT scale whose size is at least this
    return np.asarray(image.convert("RGB") if image.mode != "RGB" else image)


def _decode_simplejpeg(data: bytes, width: int, height: int, full: tuple[int, int] | None = None) -> np.ndarray:
    if full is not None:
        claimed_h, claimed_w = _simplejpeg.decode_jpeg_header(data)[:2]
        if (claimed_w, claimed_h) != full:
            raise ValueError(f"the tile claims {claimed_w} x {claimed_h} px")  # before any allocation
    # strict: a recoverable libjpeg error (corrupt data) raises instead of giving grey blocks.
    return np.asarray(_simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=height, min_width=width,
                                              strict=True))


try:  # simplejpeg: the same libjpeg-turbo decode as Pillow's (identical pixels), less overhead per call
    import simplejpeg as _simplejpeg  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

DECODER = "simplejpeg" if _simplejpeg is not None else "pillow"
"""Which library decodes the tiles (both libjpeg-turbo with the same settings: same pixels)."""
decode_tile = _decode_simplejpeg if _simplejpeg is not None else _decode_pillow
"""``decode_tile(jpeg, width, height, full=None)``: RGB uint8 at the DCT scale whose size is at least
(width, height); ValueError when ``full`` is given and the stream claims another full size."""


def _level_of(page: tifffile.TiffPage, size: int) -> _Level | None:
    """The page as a directly readable level, or None when anything is unusual."""
    try:
        tw, th = int(page.tilewidth), int(page.tilelength)
        width, height = int(page.imagewidth), int(page.imagelength)
        ok = (
            page.is_tiled and int(page.compression) == _COMPRESSION_JPEG
            and int(page.photometric) in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR)
            and page.samplesperpixel == 3 and page.bitspersample == 8
            and int(page.planarconfig) == 1 and tw % 8 == 0 and th % 8 == 0 and tw > 0 and th > 0
        )
        if not ok:
            return None
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        tables = bytes(page.jpegtables or b"")
        photometric = int(page.photometric)
    except (AttributeError, TypeError, ValueError, OverflowError):
        return None
    across, down = -(-width // tw), -(-height // th)
    if len(offsets) != across * down or len(counts) != len(offsets):
        return None
    if bool(((offsets < 0) | (counts < 0) | (offsets + counts > size)).any()):
        return None
    if tables and not (tables.startswith(_SOI) and tables.endswith(_EOI)):
        return None
    body = tables[2:-2] if tables else b""
    colour = _ADOBE_RGB if photometric == _PHOTOMETRIC_RGB else _ADOBE_YCBCR
    return _Level(width, height, tw, th, across, down, offsets, counts, body + colour)


def open_jpeg_tiles(
    path: Path | None, vendor: str | None, level_dimensions: tuple[tuple[int, int], ...]
) -> JpegTileReader | None:
    """A direct reader for the levels of ``path`` that are plain JPEG-tiled TIFF pages
    matching ``level_dimensions`` one to one; None when no level qualifies (or not a TIFF)."""
    if path is None or vendor not in _VENDORS or not path.is_file():
        return None
    import tifffile  # here: importing pipeline stays fast

    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            pages = [p for p in tif.pages if isinstance(p, tifffile.TiffPage) and p.is_tiled]
            by_size: dict[tuple[int, int], list[tifffile.TiffPage]] = {}
            for page in pages:
                by_size.setdefault((int(page.imagewidth), int(page.imagelength)), []).append(page)
            levels: dict[int, _Level] = {}
            for level, dims in enumerate(level_dimensions):
                found = by_size.get(dims, [])
                if len(found) == 1:  # ambiguous sizes are left to the backend
                    parsed = _level_of(found[0], size)
                    if parsed is not None:
                        levels[level] = parsed
    except _TIFF_ERRORS as exc:
        _log.debug("no direct JPEG reading (%s)", type(exc).__name__)
        return None
    if not levels:
        return None
    try:
        return JpegTileReader(path, levels)
    except OSError as exc:  # the backend could open it; let it read everything then
        _log.debug("no direct JPEG reading (%s)", type(exc).__name__)
        return None
