"""Planning a de-identified TIFF: which pages are pyramid levels and which tags each keeps.

Only proven pyramid levels of level 0 are kept: tiled pages of the same kind as level 0
(the largest) whose shape follows it by a consistent downsample. Label, macro, thumbnail,
untiled and mask pages, and tiled pages that are not levels (a label without the word
"label"), are dropped. For each kept level the plan
holds the allow-listed tags' raw values, the input's tile positions, and (for Aperio) a
rebuilt ImageDescription with the allow-listed numeric fields only. Every ASCII value of
every page is collected, cut into pieces, as text that must not reappear in the copy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import DeidentificationError, UnsupportedSlideError

from ._report import DEID_SUPPORTED, DEID_UNSUPPORTED_HINT
from ._tiff_tags import ASCII, COMPRESSIONS, POINTER_TAGS, TIFF_BLANKED_TAGS, TIFF_COPIED_TAGS, TYPE_SIZE, Entry

if TYPE_CHECKING:
    from tifffile import FileHandle

__all__ = ["APERIO_KEPT_FIELDS", "PagePlan", "Plan", "kept_text", "plan_tiff"]

APERIO_KEPT_FIELDS = ("AppMag", "MPP")
"""The only ImageDescription fields kept (numbers OpenSlide needs for µm/px and objective)."""

_NUMBER = re.compile(r"^\s*[0-9]+(\.[0-9]+)?\s*$")
_LABEL_OR_MACRO = re.compile(r"\b(label|macro)\b", re.IGNORECASE)
_HEADER = "Aperio Image Library (de-identified by wsiflow)"
_CLASSIC_LIMIT_BYTES = 2**32 - 2**20  # stay clear of the 4 GiB offset limit of classic TIFF


@dataclass
class PagePlan:
    """One kept pyramid level: its entries (TileOffsets excluded) and input tiles."""

    index: int
    entries: list[Entry]
    tiles: list[tuple[int, int]]  # (offset, byte count) in the input
    compression: int
    size: tuple[int, int]  # (width, height)


@dataclass
class Plan:
    """The whole copy: kept levels, what was dropped, and the text that must not reappear."""

    byteorder: str
    bigtiff: bool
    pages: list[PagePlan]
    dropped: list[str]
    removed_text: set[str]
    fields_removed: int
    kept_fields: tuple[str, ...]


def kept_text(plan: Plan) -> bytes:
    """Bytes deliberately written (kept description fields, ICC profile names, ...)."""
    return b"\0".join(e.data for p in plan.pages for e in p.entries)


def _raw_value(fh: FileHandle, tag: Any) -> bytes:
    size = TYPE_SIZE.get(int(tag.dtype))
    if size is None:
        raise DeidentificationError(f"TIFF tag {tag.code} has unknown type {int(tag.dtype)}")
    fh.seek(tag.valueoffset)
    data = fh.read(size * tag.count)
    if len(data) != size * tag.count:
        raise DeidentificationError(f"TIFF tag {tag.code} points past the end of the file")
    return data


def _text_of(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("latin-1")


def _text_pieces(text: str) -> Iterator[str]:
    """The text and its parts (fields, lines, values): what must not reappear in the copy."""
    yield text.strip()
    for part in re.split(r"[|\r\n]+", text):
        part = part.strip()
        yield part
        if "=" in part:
            key, _, value = part.partition("=")
            yield value.strip()
            yield key.strip()
        for word in part.split(";"):
            yield word.strip()


def _aperio_description(text: str, width: int, height: int) -> tuple[str, list[str], int]:
    """A neutral Aperio description with the allow-listed numeric fields only.

    OpenSlide recognises Aperio by the description starting with "Aperio" and reads
    ``|key = value`` fields after the first ``|``. Returns (description, kept keys,
    number of fields removed).
    """
    parts = text.split("|")
    kept: list[str] = []
    removed = 0
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if sep and key in APERIO_KEPT_FIELDS and _NUMBER.match(value) and key not in kept:
            kept.append(f"{key} = {value}")
        else:
            removed += 1
    # The header's crop geometry and scanner lines are dropped; only the size is restated.
    description = f"{_HEADER}\r\n{width}x{height}" + "".join(f"|{field_}" for field_ in kept)
    return description, [k.split(" =")[0] for k in kept], removed + 1


def plan_tiff(src: Path, fmt: str) -> Plan:
    """Read the TIFF structure of ``src`` (an OpenSlide ``fmt``) and plan the copy; fails closed."""
    import tifffile

    try:
        tif = tifffile.TiffFile(src)
    except (tifffile.TiffFileError, ValueError, OSError) as exc:
        raise UnsupportedSlideError(f"the TIFF structure cannot be read ({type(exc).__name__})") from None
    with tif:
        fh = tif.filehandle
        byteorder = tif.byteorder
        removed_text: set[str] = set()
        dropped: list[tuple[int, str]] = []
        candidates: list[_Page] = []
        for index, page in enumerate(tif.pages):
            if not isinstance(page, tifffile.TiffPage):  # TiffFrames come only with pages.useframes
                raise UnsupportedSlideError(f"TIFF page {index} cannot be read whole")
            tags = {tag.code: tag for tag in page.tags.values()}
            description = _text_of(_raw_value(fh, tags[270])) if 270 in tags else ""
            # Text from every page (kept or not) must not reappear in the copy.
            for tag in tags.values():
                if int(tag.dtype) == ASCII:
                    removed_text.update(_text_pieces(_text_of(_raw_value(fh, tag))))
            role = _page_role(index, page, description, fmt)
            if role == "level":
                candidates.append(_Page(index, page, tags, description))
            else:
                dropped.append((index, role))
        levels, others = _pyramid(candidates)
        dropped += [(c.index, "non-pyramid page") for c in others]
        pages: list[PagePlan] = []
        fields_removed = 0
        kept_fields: tuple[str, ...] = ()
        for level in levels:
            page, tags = level.page, level.tags
            entries, removed, kept = _level_entries(fh, page, tags, level.description, fmt, bigtiff=tif.is_bigtiff)
            fields_removed += removed
            if not pages:
                kept_fields = tuple(kept)
            tiles = list(zip(page.dataoffsets, page.databytecounts, strict=True))
            compression = int(tags[259].value) if 259 in tags else 1
            pages.append(PagePlan(level.index, entries, tiles, compression, (page.imagewidth, page.imagelength)))
        if not pages:
            raise DeidentificationError("the slide has no tiled pyramid level to keep")
        total_bytes = sum(count for _, count in {t for p in pages for t in p.tiles})
        # TileOffsets are rebuilt as LONG8 in a BigTIFF; all other copied tags fit both.
        bigtiff = tif.is_bigtiff or total_bytes + 2**24 > _CLASSIC_LIMIT_BYTES
    roles = [role for _, role in sorted(dropped)]
    return Plan(byteorder, bigtiff, pages, roles, removed_text, fields_removed, kept_fields)


def _page_role(index: int, page: Any, description: str, fmt: str) -> str:
    """"level" for a page that may be a pyramid level, else the name of what is dropped."""
    desc_lower = description.lower()
    if _LABEL_OR_MACRO.search(description):
        return "label" if "label" in desc_lower else "macro"
    if not page.is_tiled:
        if fmt == "aperio" and index == 1:
            return "thumbnail"
        return "untiled page"
    if page.tags.get(254) is not None and int(page.tags[254].value) & 4:
        return "mask page"
    return "level"


@dataclass(frozen=True)
class _Page:
    """A tiled page that may be a pyramid level."""

    index: int
    page: Any
    tags: dict[int, Any]
    description: str


def _image_kind(page: _Page) -> tuple[object, ...]:
    """What levels of one pyramid share: photometric, samples per pixel, bits per sample."""
    return tuple(page.tags[code].value if code in page.tags else None for code in (262, 277, 258))


def _downsample(base: tuple[int, int], size: tuple[int, int]) -> float | None:
    """The downsample at which ``size`` follows ``base``, or None when width and height disagree.

    Levels are rounded to whole pixels: a level of downsample d is within 1 px of
    base / d in both directions, so some d must satisfy both.
    """
    (w0, h0), (w, h) = base, size
    low = max(w0 / (w + 1), h0 / (h + 1))
    high = min(w0 / (w - 1) if w > 1 else math.inf, h0 / (h - 1) if h > 1 else math.inf)
    return (w0 / w + h0 / h) / 2 if low <= high else None


def _pyramid(candidates: list[_Page]) -> tuple[list[_Page], list[_Page]]:
    """Split tiled pages into proven levels of level 0 (the largest) and the rest.

    A level has level 0's photometric, samples and bits per sample, and a shape that
    follows level 0 by one downsample in both directions, larger than 1 and than no
    other level's. A tiled label, macro or thumbnail (whatever its description says)
    fails these and is dropped.
    """
    if not candidates:
        return [], []
    base = max(candidates, key=lambda c: (c.page.imagewidth * c.page.imagelength, -c.index))
    base_size = (base.page.imagewidth, base.page.imagelength)
    levels, others = [], []
    downsamples = [1.0]
    for candidate in candidates:
        if candidate is base:
            levels.append(candidate)
            continue
        factor = _downsample(base_size, (candidate.page.imagewidth, candidate.page.imagelength))
        if (
            _image_kind(candidate) != _image_kind(base)
            or factor is None
            or any(abs(factor - d) <= 0.01 * d for d in downsamples)
            or factor < 1
        ):
            others.append(candidate)
            continue
        downsamples.append(factor)
        levels.append(candidate)
    return levels, others


def _level_entries(
    fh: FileHandle, page: Any, tags: dict[int, Any], description: str, fmt: str, *, bigtiff: bool
) -> tuple[list[Entry], int, list[str]]:
    entries: list[Entry] = []
    removed = 0
    kept: list[str] = []
    for code, tag in sorted(tags.items()):
        if code in POINTER_TAGS:
            raise DeidentificationError(
                f"a pyramid level has a {POINTER_TAGS[code]} pointer (TIFF tag {code}) that could hide metadata"
            )
        if code in TIFF_COPIED_TAGS:
            if code == 259 and int(tag.value) not in COMPRESSIONS:
                raise UnsupportedSlideError(
                    f"TIFF compression {int(tag.value)} is not one deid can check; {DEID_SUPPORTED}",
                    hint=DEID_UNSUPPORTED_HINT,
                )
            entries.append(Entry(code, int(tag.dtype), tag.count, _raw_value(fh, tag)))
        elif code in TIFF_BLANKED_TAGS:
            removed += 1
        elif code == 270:
            if fmt == "aperio":
                text, kept, dropped_fields = _aperio_description(description, page.imagewidth, page.imagelength)
                data = text.encode("ascii") + b"\0"
                entries.append(Entry(270, ASCII, len(data), data))
                removed += dropped_fields
            else:
                removed += 1
        elif code == 324:
            pass  # rebuilt when the tiles are written
        elif code in (273, 278, 279):
            raise DeidentificationError(f"a tiled level also has strip tags (TIFF tag {code})")
        else:
            raise DeidentificationError(
                f"TIFF tag {code} is neither known structure nor known metadata; refusing to guess"
            )
    if 322 not in tags or 323 not in tags or 325 not in tags:
        raise DeidentificationError("a tiled level lacks tile size or tile byte counts")
    return entries, removed, kept
