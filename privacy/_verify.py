"""Verifying a de-identified copy before it is moved into place.

The copy must hold none of the removed text in its metadata bytes, and must reopen in
OpenSlide as the same slide: same levels, µm/px, objective and vendor, no associated
images, and byte-identical tile-aligned regions at every level.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pipeline import DeidentificationError

from ._input import open_openslide

__all__ = ["check_removed_text", "compare_slides"]

_log = logging.getLogger(__name__)

_MAX_SAMPLE_TILES = 64


def check_removed_text(meta: bytes, removed: Iterable[str], kept: bytes) -> None:
    """No removed text (pieces of 4+ characters) may appear in the copy's metadata bytes."""
    for text in removed:
        if len(text) < 4:
            continue
        needle = text.encode("latin-1", "replace")
        if needle in kept:
            continue  # deliberately kept: an MPP value, or an ICC profile name the description repeats
        if needle in meta:
            raise DeidentificationError("removed metadata text was found in the copy")


def _sample_tiles(cols: int, rows: int) -> list[tuple[int, int]]:
    """Every tile of a small level; else corners plus an even spread."""
    if cols * rows <= _MAX_SAMPLE_TILES * 4:
        return [(c, r) for r in range(rows) for c in range(cols)]
    picks = {(0, 0), (cols - 1, 0), (0, rows - 1), (cols - 1, rows - 1)}
    side = math.isqrt(_MAX_SAMPLE_TILES)
    for i in range(side):
        for j in range(side):
            picks.add((i * (cols - 1) // max(side - 1, 1), j * (rows - 1) // max(side - 1, 1)))
    return sorted(picks)


class _Reader:
    """An OpenSlide handle that is reopened after a read error (OpenSlide errors are sticky)."""

    def __init__(self, path: Path, opener: Callable[[Path], Any]) -> None:
        self.path, self.opener = path, opener
        self.slide = opener(path)

    def region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> bytes | None:
        import openslide

        try:
            return self.slide.read_region(location, level, size).tobytes()
        except openslide.OpenSlideError:
            self.slide.close()
            self.slide = self.opener(self.path)
            return None

    def close(self) -> None:
        self.slide.close()


def compare_slides(
    reference_path: Path,
    copy_path: Path,
    *,
    vendor: str,
    fail: Callable[[str], Exception],
    kept: tuple[tuple[int, int], ...] | None = None,
) -> tuple[tuple[tuple[int, int], ...], int, int]:
    """Check the copy against the input in OpenSlide; returns (level dims, regions equal, regions undecodable).

    Same levels (or, with ``kept``, the input's levels of those sizes: OpenSlide reads
    any tiled page as a level, including the dropped ones that are not), µm/px,
    objective and vendor, no associated images, and byte-identical tile-aligned regions
    at every level. A region the input itself cannot decode must fail the same way in
    the copy (its bytes were copied verbatim); it is counted apart.
    """
    import openslide

    def open_copy(path: Path) -> Any:
        try:
            return openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as exc:
            raise fail(f"the copy does not reopen in OpenSlide ({type(exc).__name__})") from None

    reference = _Reader(reference_path, lambda path: open_openslide(path, "the input"))
    try:
        copy = _Reader(copy_path, open_copy)
        try:
            return _compare_open(reference, copy, vendor=vendor, fail=fail, kept=kept)
        finally:
            copy.close()
    finally:
        reference.close()


def _compare_open(
    reference: _Reader,
    copy: _Reader,
    *,
    vendor: str,
    fail: Callable[[str], Exception],
    kept: tuple[tuple[int, int], ...] | None,
) -> tuple[tuple[tuple[int, int], ...], int, int]:
    ref, cp = reference.slide, copy.slide
    if cp.properties.get("openslide.vendor") != vendor:
        raise fail("the copy is not read as the same format as the input")
    ref_dims = tuple(ref.level_dimensions)
    expected = ref_dims if kept is None else tuple(d for d in ref_dims if d in set(kept))
    if tuple(cp.level_dimensions) != expected or len(set(expected)) != len(expected):
        raise fail("the copy's pyramid levels differ from the input's")
    for key in ("openslide.mpp-x", "openslide.mpp-y", "openslide.objective-power"):
        if ref.properties.get(key) != cp.properties.get(key):
            raise fail(f"the copy's {key.split('.')[-1]} differs from the input's")
    if cp.associated_images:
        raise fail("the copy still has associated images")
    downsamples = tuple(ref.level_downsamples)
    props = dict(ref.properties)
    equal = undecodable = 0
    for copy_level, (width, height) in enumerate(expected):
        level = ref_dims.index((width, height))
        tile_w = int(props.get(f"openslide.level[{level}].tile-width", 256))
        tile_h = int(props.get(f"openslide.level[{level}].tile-height", 256))
        cols, rows = -(-width // tile_w), -(-height // tile_h)
        for col, row in _sample_tiles(cols, rows):
            size = (min(tile_w, width - col * tile_w), min(tile_h, height - row * tile_h))
            location = (int(col * tile_w * downsamples[level]), int(row * tile_h * downsamples[level]))
            a = reference.region(location, level, size)
            b = copy.region(location, copy_level, size)
            if a is None and b is None:
                undecodable += 1
            elif a != b:
                raise fail(f"pixels of the copy differ from the input at level {level}")
            else:
                equal += 1
    if undecodable:
        _log.info("%d region(s) cannot be decoded in the input either; compared as equally broken", undecodable)
    return expected, equal, undecodable
