"""A slide opened for analysis: a backend plus a resolved µm/px.

Coordinates are (x, y) at level 0 in pixels unless a name says otherwise; arrays are
(row, col) = (y, x) indexed, RGB uint8.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image

from ._backend import BackendName, SlideBackend, open_backend
from ._dicom_tiles import open_dicom_tiles
from ._errors import CorruptSlideError, UnsupportedSlideError
from ._jpeg_tiles import DirectReadError, JpegTileReader, open_jpeg_tiles
from ._mpp import MppPolicy, MppResolution, resolve_mpp

__all__ = ["SlideInfo", "Slide", "open_slide", "slide_info", "backend_mpp", "MAX_RENDER_PIXELS",
           "MAX_RENDER_SOURCE_PIXELS", "MAX_EXTENT_MM"]

_MPP_REL_TOL = 1e-3  # a level within 0.1 % of the target counts as "at" the target
_THUMBNAIL_BLOCK_PX = 2048
MAX_READ_PIXELS = 1 << 27
"""Most pixels one backend read may return (512 MiB as RGBA): a read larger than this means
the slide has no pyramid level near the requested resolution, or a damaged header."""
MAX_RENDER_PIXELS = 1 << 26
"""Most pixels of a whole-slide rendering (the tissue mask's, 64 Mi px: 192 MiB as RGB, about
2.3 GiB at the peak of tissue detection). A 75 x 50 mm slide at the default 8 µm/px is 59 Mpx."""
MAX_RENDER_SOURCE_PIXELS = 1 << 31
"""Most source pixels a whole-slide rendering may read (2.1 Gpx: a 46,000 px square level, a few
minutes of reading): more means the slide has no pyramid level near the rendering's µm/px
(or a damaged header claims a huge one), and reading it would take hours."""
_RENDER_READ_PIXELS = 1 << 25
"""Most pixels one read of a rendering may return (about 0.8 GiB at the peak of decoding and
resizing it); reads of a level far finer than the rendering are cut into smaller blocks."""
MAX_EXTENT_MM = 300.0
"""Largest side a slide may claim at its µm/px: no glass slide (whole-mount ones included) is
longer; more comes from a damaged header or a wrong µm/px."""
_DIRECT_FILTER = Image.Resampling.BICUBIC
"""The filter that resizes DCT-scaled pixels to the output when they are not within
:data:`_SNAP_REL_TOL` of it (see ``_read_direct``). Bicubic: 1.2-1.3 x Lanczos' speed, mean
abs diff to OpenSlide + Lanczos 0.6-2.2 (bilinear: 1.45 x, 1.8-3.0); docs/benchmarks.md."""
_FILTER_SUPPORT = {Image.Resampling.BILINEAR: 1, Image.Resampling.BICUBIC: 2, Image.Resampling.LANCZOS: 3}
"""Source pixels each filter reads on either side, per output pixel (sets the read's margin)."""
_SNAP_REL_TOL = 0.01
"""A DCT-scaled block within 1 % of the output size (both axes) is read as is, not resampled:
the output's footprint then differs from the nominal one by < 1 % (project decision, issue 18)."""
_LEVEL_CHECK_PX = 64  # side of the patch compared between a pyramid level and level 0
_LEVEL_CHECK_MAX_L0_PX = 4096
_LEVEL_CHECK_MAX_DIFF = 24.0  # mean abs RGB difference; JPEG pyramids differ by < 8

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideInfo:
    """What wsiflow reports about a slide: geometry and scanner facts, never free text.

    Label/macro images and free-text fields (date, user, file name...) are deliberately
    absent: they can carry patient data.
    """

    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    metadata_mpp_x: float | None
    metadata_mpp_y: float | None
    objective_power: float | None
    vendor: str | None
    backend: BackendName
    native_tile_size: tuple[int, int] | None


def slide_info(backend: SlideBackend) -> SlideInfo:
    """The reportable facts of an open backend."""
    width, height = backend.level_dimensions[0]
    return SlideInfo(
        width=width,
        height=height,
        level_dimensions=backend.level_dimensions,
        level_downsamples=backend.level_downsamples,
        metadata_mpp_x=backend.metadata_mpp[0],
        metadata_mpp_y=backend.metadata_mpp[1],
        objective_power=backend.objective_power,
        vendor=backend.vendor,
        backend=backend.name,
        native_tile_size=backend.native_tile_size,
    )


class Slide:
    """An open slide with a known physical scale; use as a context manager."""

    def __init__(self, backend: SlideBackend, mpp: MppResolution, *, direct_reader: bool = True) -> None:
        self.backend = backend
        self.mpp = mpp
        self.info = slide_info(backend)
        self._level_ok: dict[int, bool] = {0: True}
        # JPEG-tiled TIFF levels and JPEG DICOM-WSI frames are decoded directly (DCT-scaled)
        # unless asked not to.
        self._direct: JpegTileReader | None = None
        if direct_reader:
            opener = open_dicom_tiles if backend.vendor == "dicom" else open_jpeg_tiles
            self._direct = opener(getattr(backend, "path", None), backend.vendor, backend.level_dimensions)

    @property
    def reader(self) -> str:
        """Which code decodes the pixels: the backend's name, plus the direct JPEG reader's
        name and version when it reads some levels. Part of a run's key: pixels may differ
        slightly between readers, and resuming relies on bit-identical tiles."""
        return self.info.backend if self._direct is None else f"{self.info.backend}+{self._direct.name}"

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        self.backend.close()

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self.info.width, self.info.height

    def level_mpp(self, level: int) -> tuple[float, float]:
        """(x, y) µm/px of a pyramid level."""
        ds = self.info.level_downsamples[level]
        return self.mpp.mpp_x * ds, self.mpp.mpp_y * ds

    def level_is_usable(self, level: int) -> bool:
        """Whether a pyramid level decodes and agrees with level 0 (checked once, on a patch).

        Some writers produce reduced levels that fail to decode or have swapped colour
        spaces; wsiflow then reads from a finer level instead of trusting them.
        """
        if level not in self._level_ok:
            self._level_ok[level] = self._check_level(level)
            if not self._level_ok[level]:
                _log.warning("pyramid level %d is unusable; reading finer levels instead", level)
        return self._level_ok[level]

    def _check_level(self, level: int) -> bool:
        ds = self.info.level_downsamples[level]
        level_w, level_h = self.info.level_dimensions[level]
        side = min(_LEVEL_CHECK_PX, level_w, level_h, int(_LEVEL_CHECK_MAX_L0_PX // ds))
        if side < 1:
            return True
        lx, ly = (level_w - side) // 2, (level_h - side) // 2
        x0, y0 = round(lx * ds), round(ly * ds)
        l0_side = round(side * ds)
        try:
            coarse = self.read_region(x0, y0, level, side, side).astype(np.float32)
            fine = self.read_region(x0, y0, 0, l0_side, l0_side)
        except CorruptSlideError:
            return False
        reduced = np.asarray(
            Image.fromarray(fine).resize((side, side), Image.Resampling.BOX), dtype=np.float32
        )
        return float(np.abs(coarse - reduced).mean()) <= _LEVEL_CHECK_MAX_DIFF

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest usable level whose pixels are at or finer than ``target_mpp``.

        Level 0 when the target is finer than every level.
        """
        for level in reversed(range(len(self.info.level_downsamples))):
            mx, my = self.level_mpp(level)
            if max(mx, my) <= target_mpp * (1 + _MPP_REL_TOL) and self.level_is_usable(level):
                return level
        return 0

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Pixels of ``level`` as RGB uint8 (height, width, 3); (x, y) at level 0."""
        self._check_read_size(level, width, height)
        return self.backend.read_region(x, y, level, width, height)

    @staticmethod
    def _check_read_size(level: int, width: int, height: int) -> None:
        if width * height > MAX_READ_PIXELS:
            # Refuse instead of letting the reader allocate gigabytes (or abort in g_malloc).
            raise UnsupportedSlideError(
                f"a read of {width} x {height} px at level {level} is too large: the slide has no "
                "pyramid level near the requested resolution",
                hint="convert the slide to a pyramidal format (e.g. with vips tiffsave --pyramid --tile)",
            )

    def read_region_at_mpp(
        self, x: float, y: float, width_px: int, height_px: int, target_mpp: float, *,
        nominal_footprint: bool = False,
    ) -> np.ndarray:
        """A (height_px, width_px, 3) RGB image at ``target_mpp`` whose top-left is (x, y) at level 0.

        The output spans ``width_px * target_mpp / mpp_x`` level-0 pixels across (likewise
        down). It is read from the level at or just finer than the target and resized with
        an antialiasing filter; sub-pixel offsets are honoured. Outside the slide is white.

        Exception (the direct JPEG reader only, see ``_read_direct``): when the stored tiles
        decoded at a DCT scale are within 1 % of the output size, that block is returned
        without resampling, from the decoded pixel nearest (x, y): the footprint then differs
        from the nominal one by < 1 % and its origin by < half a decoded pixel.
        ``nominal_footprint=True`` always resamples (blocks that are stitched together).
        """
        if width_px <= 0 or height_px <= 0:
            raise ValueError(f"region size must be positive, got {width_px} x {height_px} px")
        while True:
            level = self.best_level_for_mpp(target_mpp)
            try:
                return self._read_at_mpp_from(level, x, y, width_px, height_px, target_mpp,
                                              snap=not nominal_footprint)
            except CorruptSlideError:
                if level == 0:
                    raise
                _log.warning("pyramid level %d failed to decode; reading finer levels", level)
                self._level_ok[level] = False

    def _read_at_mpp_from(
        self, level: int, x: float, y: float, width_px: int, height_px: int, target_mpp: float, *,
        snap: bool = True,
    ) -> np.ndarray:
        ds = self.info.level_downsamples[level]
        level_mpp_x, level_mpp_y = self.level_mpp(level)
        lx, ly = x / ds, y / ds  # top-left in level pixels (float)
        lw = width_px * target_mpp / level_mpp_x
        lh = height_px * target_mpp / level_mpp_y
        exact = (
            math.isclose(lw, width_px, rel_tol=1e-9)
            and math.isclose(lh, height_px, rel_tol=1e-9)
            and math.isclose(lx, round(lx), abs_tol=1e-6)
            and math.isclose(ly, round(ly), abs_tol=1e-6)
        )
        direct = self._direct
        if direct is not None and direct.supports(level):
            try:
                if exact:
                    self._check_read_size(level, width_px, height_px)
                    return direct.read(level, round(lx), round(ly), width_px, height_px, 1)
                return self._read_direct(direct, level, (lx, ly, lw, lh), width_px, height_px, snap=snap)
            except DirectReadError as exc:
                # A damaged tile: the backend decides (it may still decode it, or say why not).
                _log.debug("direct read of level %d failed (%s); reading through the backend", level, exc)
        if exact:
            return self.read_region(round(lx * ds), round(ly * ds), level, width_px, height_px)
        # Read a margin around the box so the resampling filter sees real neighbours.
        margin = 3 * math.ceil(max(lw / width_px, lh / height_px, 1.0)) + 1
        ix0, iy0 = math.floor(lx) - margin, math.floor(ly) - margin
        ix1, iy1 = math.ceil(lx + lw) + margin, math.ceil(ly + lh) + margin
        pixels = self.read_region(
            round(ix0 * ds), round(iy0 * ds), level, ix1 - ix0, iy1 - iy0
        )
        box = (lx - ix0, ly - iy0, lx - ix0 + lw, ly - iy0 + lh)
        resized = Image.fromarray(pixels).resize(
            (width_px, height_px), Image.Resampling.LANCZOS, box=box
        )
        return np.asarray(resized)

    def _read_direct(self, direct: JpegTileReader, level: int, box_l: tuple[float, float, float, float],
                     width_px: int, height_px: int, *, snap: bool = True) -> np.ndarray:
        """Like the resize path of :meth:`_read_at_mpp_from`, from tiles decoded at the coarsest
        DCT scale 1/d that still has about as many pixels as the output.

        No resampling when that block is within :data:`_SNAP_REL_TOL` (1 %) of the output size
        in both axes (e.g. 0.499 µm/px read at 1 µm/px: 224.4 px at 1/2 for 224 px) and ``snap``:
        the output is then the ``width_px`` x ``height_px`` decoded pixels starting at the one
        nearest the box's top-left, so its footprint differs from the nominal box by < 1 % (and
        its origin by < half a decoded pixel). Otherwise the block is resized with
        :data:`_DIRECT_FILTER`."""
        lx, ly, lw, lh = box_l
        scale = min(lw / width_px, lh / height_px)
        if snap:
            # A scale just below a DCT step (e.g. 1.995) snaps to it too: the block is then < 1 % small.
            d = direct.denominator_for(level, scale * (1 + _SNAP_REL_TOL))
            sw, sh = lw / d, lh / d
            if abs(sw / width_px - 1) <= _SNAP_REL_TOL and abs(sh / height_px - 1) <= _SNAP_REL_TOL:
                self._check_read_size(level, width_px, height_px)
                return direct.read(level, math.floor(lx / d + 0.5), math.floor(ly / d + 0.5), width_px, height_px, d)
        d = direct.denominator_for(level, scale)
        sx, sy, sw, sh = lx / d, ly / d, lw / d, lh / d  # the box in decoded pixels
        support = _FILTER_SUPPORT.get(_DIRECT_FILTER, 3)
        margin = support * math.ceil(max(sw / width_px, sh / height_px, 1.0)) + 1
        ix0, iy0 = math.floor(sx) - margin, math.floor(sy) - margin
        ix1, iy1 = math.ceil(sx + sw) + margin, math.ceil(sy + sh) + margin
        self._check_read_size(level, ix1 - ix0, iy1 - iy0)
        pixels = direct.read(level, ix0, iy0, ix1 - ix0, iy1 - iy0, d)
        box = (sx - ix0, sy - iy0, sx - ix0 + sw, sy - iy0 + sh)
        resized = Image.fromarray(pixels).resize((width_px, height_px), _DIRECT_FILTER, box=box)
        return np.asarray(resized)

    def thumbnail_shape(self, mpp: float) -> tuple[int, int]:
        """(rows, cols) of the whole slide rendered at ``mpp`` µm/px."""
        rows = max(1, round(self.info.height * self.mpp.mpp_y / mpp))
        cols = max(1, round(self.info.width * self.mpp.mpp_x / mpp))
        return rows, cols

    def _source_per_out(self, mpp: float) -> tuple[int, float, float]:
        """The level a rendering at ``mpp`` reads, and its pixels per output pixel (x, y)."""
        level = self.best_level_for_mpp(mpp)
        level_mpp_x, level_mpp_y = self.level_mpp(level)
        return level, max(1.0, mpp / level_mpp_x), max(1.0, mpp / level_mpp_y)

    def check_rendering(self, mpp: float) -> tuple[int, int]:
        """(rows, cols) of the whole slide at ``mpp``, refused before anything is allocated
        when the slide claims an implausible size or the rendering would exceed
        :data:`MAX_RENDER_PIXELS` pixels or :data:`MAX_RENDER_SOURCE_PIXELS` pixels read."""
        width_mm = self.info.width * self.mpp.mpp_x / 1000
        height_mm = self.info.height * self.mpp.mpp_y / 1000
        if max(width_mm, height_mm) > MAX_EXTENT_MM:
            raise CorruptSlideError(
                f"the slide claims {width_mm:,.0f} x {height_mm:,.0f} mm ({self.info.width:,} x "
                f"{self.info.height:,} px at {self.mpp.mpp_x:g} µm/px from {_SOURCE_WORDS[self.mpp.source]}), "
                f"larger than any glass slide (at most {MAX_EXTENT_MM:g} mm a side)",
                hint="its header is damaged or its µm/px is wrong: check it with `wsiflow inspect`, fix any "
                     "--mpp or mpp_overrides entry, or copy the file again from the scanner",
            )
        rows, cols = self.thumbnail_shape(mpp)
        if rows * cols > MAX_RENDER_PIXELS:
            fits = mpp * math.sqrt(rows * cols / MAX_RENDER_PIXELS)
            raise UnsupportedSlideError(
                f"the whole slide at {mpp:g} µm/px would be {cols:,} x {rows:,} px, more than the "
                f"{MAX_RENDER_PIXELS / 2**20:g} Mi px a rendering may have (the slide claims "
                f"{width_mm:,.0f} x {height_mm:,.0f} mm)",
                hint=f"if the slide really is this large, set tissue.mask_mpp to {math.ceil(fits):d} or more in the "
                     "config; otherwise its header is damaged: check it with `wsiflow inspect`",
            )
        level, per_x, per_y = self._source_per_out(mpp)
        source = rows * cols * per_x * per_y
        if source > MAX_RENDER_SOURCE_PIXELS:
            raise UnsupportedSlideError(_too_much_reading(level, mpp), hint=_PYRAMID_HINT)
        return rows, cols

    def read_thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` µm/px (square pixels), read block by block; bounded in
        memory and reading by :meth:`check_rendering`."""
        rows, cols = self.check_rendering(mpp)
        out = np.empty((rows, cols, 3), dtype=np.uint8)
        step_x = mpp / self.mpp.mpp_x  # level-0 pixels per output pixel
        step_y = mpp / self.mpp.mpp_y
        # Without a pyramid level near ``mpp`` each output pixel costs many source pixels:
        # shrink the blocks so one read stays within _RENDER_READ_PIXELS (memory stays bounded).
        _, per_x, per_y = self._source_per_out(mpp)
        source_per_out = max(per_x, per_y)
        block = int(min(_THUMBNAIL_BLOCK_PX, max(64, math.isqrt(_RENDER_READ_PIXELS) / source_per_out - 16)))
        read = 0.0
        for r0 in range(0, rows, block):
            h = min(block, rows - r0)
            for c0 in range(0, cols, block):
                w = min(block, cols - c0)
                # A reduced level found broken mid-way sends reads to finer levels: count them too.
                level, per_x, per_y = self._source_per_out(mpp)
                read += w * h * per_x * per_y
                if read > MAX_RENDER_SOURCE_PIXELS:
                    raise UnsupportedSlideError(_too_much_reading(level, mpp), hint=_PYRAMID_HINT)
                out[r0 : r0 + h, c0 : c0 + w] = self.read_region_at_mpp(
                    c0 * step_x, r0 * step_y, w, h, mpp, nominal_footprint=True  # stitched: no seams
                )
        return out


_SOURCE_WORDS = {"metadata": "its metadata", "cli": "--mpp", "config": "mpp_overrides"}

_PYRAMID_HINT = (
    "convert the slide to a pyramidal format (e.g. with vips tiffsave --pyramid --tile); if its header "
    "is damaged, copy the file again from the scanner"
)


def _too_much_reading(level: int, mpp: float) -> str:
    return (
        f"rendering the whole slide at {mpp:g} µm/px would read more than {MAX_RENDER_SOURCE_PIXELS / 1e9:.1f} "
        f"gigapixels from pyramid level {level}: the slide has no level near {mpp:g} µm/px"
    )


def backend_mpp(
    opened: SlideBackend, path: str | os.PathLike[str], policy: MppPolicy | None
) -> MppResolution:
    """The µm/px of an open slide under ``policy`` (see :func:`resolve_mpp`)."""
    return resolve_mpp(
        opened.metadata_mpp,
        slide_path=Path(path),
        vendor=opened.vendor,
        objective_power=opened.objective_power,
        policy=policy or MppPolicy(),
    )


def open_slide(
    path: str | os.PathLike[str],
    *,
    backend: BackendName = "auto",
    mpp_policy: MppPolicy | None = None,
    direct_reader: bool = True,
) -> Slide:
    """Open a slide for analysis; raises :class:`MissingMppError` when its scale is unknown.

    ``direct_reader=False`` reads every level through the backend (see :attr:`Slide.reader`)."""
    opened = open_backend(path, backend)
    try:
        resolution = backend_mpp(opened, path, mpp_policy)
    except BaseException:
        opened.close()
        raise
    return Slide(opened, resolution, direct_reader=direct_reader)
