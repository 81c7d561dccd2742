"""De-identified copies of slides (``wsiflow deid``), failing closed.

A TIFF/SVS slide is *rewritten*, not edited in place: the new file holds only the tiled
pyramid levels, each level's compressed tiles copied byte for byte (so pixels are
identical), and only tags from an explicit structural allow-list. Label, macro and
thumbnail pages are never copied, the Aperio ImageDescription is rebuilt from a neutral
header plus the allow-listed numeric fields, and every other tag is either on a known
blank-list (text metadata, not written) or makes the whole run fail. The copy is checked
(it reopens in OpenSlide with the same levels and byte-identical regions, and none of
the removed text is in it) before it is moved into place; on any failure nothing is left
behind. DICOM-WSI is handled by :mod:`._deid_dicom`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ._errors import DeidentificationError, OutputError, SlideNotFoundError, UnsupportedSlideError

__all__ = [
    "DeidReport",
    "deidentify_slide",
    "deidentify_tiff",
    "DEID_SUPPORTED",
    "DEID_UNSUPPORTED_HINT",
    "TIFF_COPIED_TAGS",
    "TIFF_BLANKED_TAGS",
    "APERIO_KEPT_FIELDS",
    "compare_slides",
]

_log = logging.getLogger(__name__)

DEID_SUPPORTED = "deid supports Aperio SVS, generic tiled TIFF and DICOM-WSI"
DEID_UNSUPPORTED_HINT = "convert the slide to one of these, or de-identify it with the scanner vendor's tools"

# Tags copied verbatim: each is needed to decode or place the pixels, and none holds
# free text. Values are numbers (or codec tables), so they cannot carry names or dates.
TIFF_COPIED_TAGS: dict[int, str] = {
    254: "NewSubfileType (page role bits: reduced resolution / mask)",
    256: "ImageWidth",
    257: "ImageLength",
    258: "BitsPerSample",
    259: "Compression (checked against the codecs below)",
    262: "PhotometricInterpretation",
    266: "FillOrder",
    274: "Orientation",
    277: "SamplesPerPixel",
    280: "MinSampleValue",
    281: "MaxSampleValue",
    282: "XResolution (generic TIFF µm/px comes from it)",
    283: "YResolution",
    284: "PlanarConfiguration",
    296: "ResolutionUnit",
    317: "Predictor (LZW/deflate decoding)",
    318: "WhitePoint (colour)",
    319: "PrimaryChromaticities (colour)",
    320: "ColorMap (palette images)",
    322: "TileWidth",
    323: "TileLength",
    325: "TileByteCounts",
    338: "ExtraSamples (alpha)",
    339: "SampleFormat",
    340: "SMinSampleValue",
    341: "SMaxSampleValue",
    347: "JPEGTables (scanned for comment/APP segments)",
    529: "YCbCrCoefficients",
    530: "YCbCrSubSampling",
    531: "YCbCrPositioning",
    532: "ReferenceBlackWhite",
    32997: "ImageDepth (Aperio writes it)",
    32998: "TileDepth",
    34675: "InterColorProfile (ICC; OpenSlide exposes it)",
}
_REWRITTEN_TAGS = {270: "ImageDescription (rebuilt)", 324: "TileOffsets (new positions)"}

# Tags known to hold text or metadata that identify or date the scan: not written.
TIFF_BLANKED_TAGS: dict[int, str] = {
    269: "DocumentName",
    271: "Make",
    272: "Model",
    285: "PageName",
    286: "XPosition",
    287: "YPosition",
    297: "PageNumber",
    305: "Software",
    306: "DateTime",
    315: "Artist",
    316: "HostComputer",
    700: "XMP",
    33432: "Copyright",
    33723: "IPTC",
    34377: "Photoshop",
    37724: "ImageSourceData",
    42016: "ImageUniqueID",
    42112: "GDAL_METADATA",
    42113: "GDAL_NODATA",
    50838: "ImageJMetaDataByteCounts",
    50839: "ImageJMetaData",
    65000: "vendor private text",
}
_POINTER_TAGS = {330: "SubIFDs", 34665: "ExifIFD", 34853: "GPSIFD", 40965: "InteroperabilityIFD"}

APERIO_KEPT_FIELDS = ("AppMag", "MPP")
"""The only ImageDescription fields kept (numbers OpenSlide needs for µm/px and objective)."""

_NUMBER = re.compile(r"^\s*[0-9]+(\.[0-9]+)?\s*$")
_LABEL_OR_MACRO = re.compile(r"\b(label|macro)\b", re.IGNORECASE)
_HEADER = "Aperio Image Library (de-identified by wsiflow)"

# Codecs whose tile bytes wsiflow copies and whose embedded text it can check.
_COMPRESSIONS = {1: "none", 5: "lzw", 7: "jpeg", 8: "deflate", 32946: "deflate", 33003: "jpeg2000", 33005: "jpeg2000"}
# JPEG 2000 codestream comments written by encoders; any other comment fails closed.
_J2K_COMMENT_OK = re.compile(rb"^(Kakadu-v[0-9.]+|Kdu-Layer-Info:|Created by OpenJPEG|Created by Aperio|ImageMagick)")

_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_ASCII, _SHORT, _LONG, _LONG8 = 2, 3, 4, 16
_CLASSIC_LIMIT_BYTES = 2**32 - 2**20  # stay clear of the 4 GiB offset limit of classic TIFF
_MAX_SAMPLE_TILES = 64


@dataclass(frozen=True)
class DeidReport:
    """What :func:`deidentify_slide` kept and dropped (no paths, no removed values)."""

    format: str
    levels_kept: int
    level_dimensions: tuple[tuple[int, int], ...]
    dropped: tuple[str, ...]
    fields_removed: int
    regions_verified: int
    regions_undecodable: int = 0
    kept_fields: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "levels_kept": self.levels_kept,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "dropped": list(self.dropped),
            "fields_removed": self.fields_removed,
            "regions_verified": self.regions_verified,
            "regions_undecodable": self.regions_undecodable,
            "kept_fields": list(self.kept_fields),
        }

    def summary(self) -> str:
        """One line: what was kept and dropped."""
        dropped = ", ".join(self.dropped) if self.dropped else "nothing"
        kept = ", ".join(self.kept_fields) if self.kept_fields else "none"
        return (
            f"de-identified {self.format}: kept {self.levels_kept} level(s), dropped {dropped}; "
            f"removed {self.fields_removed} metadata field(s), kept fields: {kept}; "
            f"verified {self.regions_verified} region(s) pixel-identical"
            + (f" ({self.regions_undecodable} undecodable in the input too)" if self.regions_undecodable else "")
        )


# ---------------------------------------------------------------------------- entry point


def deidentify_slide(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False
) -> DeidReport:
    """Write a de-identified copy of slide ``src`` to ``dst`` and verify it.

    Aperio SVS and generic tiled TIFF become one TIFF file; a DICOM-WSI folder (or one
    of its instances) becomes a folder of ``<n>.dcm``. Anything else raises
    :class:`UnsupportedSlideError`; anything the copy cannot safely remove or verify
    raises :class:`DeidentificationError`. Either way nothing is left at ``dst``.
    """
    src_path, dst_path = Path(src), Path(dst)
    if not src_path.exists():
        raise SlideNotFoundError("the slide does not exist")
    _check_destination(src_path, dst_path, overwrite=overwrite)
    if src_path.is_dir() or src_path.suffix.lower() == ".dcm" or _detect_format(src_path) == "dicom":
        from ._deid_dicom import deidentify_dicom

        return deidentify_dicom(src_path, dst_path, overwrite=overwrite)
    return deidentify_tiff(src_path, dst_path, overwrite=overwrite)


def _detect_format(path: Path) -> str | None:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError):
        return None


def _check_destination(src: Path, dst: Path, *, overwrite: bool) -> None:
    src_real, dst_real = src.resolve(), dst.resolve()
    if src_real == dst_real or (src.is_dir() and src_real in dst_real.parents):
        raise DeidentificationError(
            "the output would replace or sit inside the input", hint="choose an output outside the input slide"
        )
    if dst.exists() and not overwrite:
        raise OutputError("the output already exists", hint="choose a new output or pass --overwrite")
    if not dst_real.parent.is_dir():
        raise OutputError("the output's folder does not exist", hint="create the folder first")


# ------------------------------------------------------------------------------ TIFF side


@dataclass
class _Entry:
    code: int
    dtype: int
    count: int
    data: bytes


@dataclass
class _PagePlan:
    index: int
    entries: list[_Entry]
    tiles: list[tuple[int, int]]  # (offset, byte count) in the input
    compression: int


@dataclass
class _Plan:
    byteorder: str
    bigtiff: bool
    pages: list[_PagePlan]
    dropped: list[str]
    removed_text: set[str]
    fields_removed: int
    kept_fields: tuple[str, ...]


def deidentify_tiff(src: Path, dst: Path, *, overwrite: bool = False) -> DeidReport:
    """De-identify an Aperio SVS or generic tiled TIFF (see :func:`deidentify_slide`)."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise SlideNotFoundError("the slide does not exist")
    _check_destination(src, dst, overwrite=overwrite)
    fmt = _detect_format(src)
    if fmt not in ("aperio", "generic-tiff"):
        raise UnsupportedSlideError(
            f"OpenSlide reads this slide as {fmt or 'no known format'}; {DEID_SUPPORTED}",
            hint=DEID_UNSUPPORTED_HINT,
        )
    _open_openslide(src, "the input")  # fails early (unsupported) when OpenSlide cannot open it
    plan = _plan_tiff(src, fmt)
    tmp = dst.with_name(f".wsiflow-deid-{secrets.token_hex(8)}.tmp{dst.suffix}")
    try:
        meta = _write_tiff(src, tmp, plan)
        _check_removed_text(meta, plan.removed_text, _kept_text(plan))
        dims, regions, undecodable = _verify_copy(src, tmp, fmt)
        _move_into_place(tmp, dst, overwrite=overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _log.info("de-identified a %s slide: %d level(s) kept", fmt, len(plan.pages))
    return DeidReport(
        format=fmt,
        levels_kept=len(plan.pages),
        level_dimensions=dims,
        dropped=tuple(plan.dropped),
        fields_removed=plan.fields_removed,
        regions_verified=regions,
        regions_undecodable=undecodable,
        kept_fields=plan.kept_fields,
    )


def _move_into_place(tmp: Path, dst: Path, *, overwrite: bool) -> None:
    try:
        if overwrite:
            os.replace(tmp, dst)
        else:
            # link() never clobbers: an OUT created meanwhile by someone else survives.
            os.link(tmp, dst)
            tmp.unlink()
    except FileExistsError:
        raise OutputError("the output already exists", hint="choose a new output or pass --overwrite") from None
    except OSError as exc:
        raise OutputError(f"moving the copy into place failed: {exc.strerror or type(exc).__name__}") from None


def _raw_value(fh: BinaryIO, tag: Any) -> bytes:
    size = _TYPE_SIZE.get(int(tag.dtype))
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


def _plan_tiff(src: Path, fmt: str) -> _Plan:
    import tifffile

    try:
        tif = tifffile.TiffFile(src)
    except (tifffile.TiffFileError, ValueError, OSError) as exc:
        raise UnsupportedSlideError(f"the TIFF structure cannot be read ({type(exc).__name__})") from None
    with tif:
        fh = tif.filehandle
        byteorder = tif.byteorder
        pages: list[_PagePlan] = []
        dropped: list[str] = []
        removed_text: set[str] = set()
        fields_removed = 0
        kept_fields: tuple[str, ...] = ()
        for index, page in enumerate(tif.pages):
            tags = {tag.code: tag for tag in page.tags.values()}
            desc_raw = _raw_value(fh, tags[270]) if 270 in tags else b""
            description = _text_of(desc_raw)
            # Text from every page (kept or not) must not reappear in the copy.
            for tag in tags.values():
                if int(tag.dtype) == _ASCII:
                    removed_text.update(_text_pieces(_text_of(_raw_value(fh, tag))))
            role = _page_role(index, page, description, fmt)
            if role != "level":
                dropped.append(role)
                continue
            entries, removed, kept = _level_entries(fh, page, tags, description, fmt, bigtiff=tif.is_bigtiff)
            fields_removed += removed
            if not pages:
                kept_fields = tuple(kept)
            tiles = list(zip(page.dataoffsets, page.databytecounts, strict=True))
            pages.append(_PagePlan(index, entries, tiles, int(tags[259].value) if 259 in tags else 1))
        if not pages:
            raise DeidentificationError("the slide has no tiled pyramid level to keep")
        total_bytes = sum(count for _, count in {t for p in pages for t in p.tiles})
        # TileOffsets are rebuilt as LONG8 in a BigTIFF; all other copied tags fit both.
        bigtiff = tif.is_bigtiff or total_bytes + 2**24 > _CLASSIC_LIMIT_BYTES
    return _Plan(byteorder, bigtiff, pages, dropped, removed_text, fields_removed, kept_fields)


def _page_role(index: int, page: Any, description: str, fmt: str) -> str:
    """"level" for a pyramid level to keep, else the name of what is dropped."""
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


def _level_entries(
    fh: BinaryIO, page: Any, tags: dict[int, Any], description: str, fmt: str, *, bigtiff: bool
) -> tuple[list[_Entry], int, list[str]]:
    entries: list[_Entry] = []
    removed = 0
    kept: list[str] = []
    for code, tag in sorted(tags.items()):
        if code in _POINTER_TAGS:
            raise DeidentificationError(
                f"a pyramid level has a {_POINTER_TAGS[code]} pointer (TIFF tag {code}) that could hide metadata"
            )
        if code in TIFF_COPIED_TAGS:
            if code == 259 and int(tag.value) not in _COMPRESSIONS:
                raise UnsupportedSlideError(
                    f"TIFF compression {int(tag.value)} is not one deid can check; {DEID_SUPPORTED}",
                    hint=DEID_UNSUPPORTED_HINT,
                )
            entries.append(_Entry(code, int(tag.dtype), tag.count, _raw_value(fh, tag)))
        elif code in TIFF_BLANKED_TAGS:
            removed += 1
        elif code == 270:
            if fmt == "aperio":
                text, kept, dropped_fields = _aperio_description(description, page.imagewidth, page.imagelength)
                data = text.encode("ascii") + b"\0"
                entries.append(_Entry(270, _ASCII, len(data), data))
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


# ----------------------------------------------------------------------- embedded text scan


def _check_jpeg_segments(data: bytes, what: str) -> None:
    """Fail on JPEG comment or APP segments (EXIF, XMP, ...) before the scan data."""
    pos = 0
    length = len(data)
    while pos + 4 <= length:
        if data[pos] != 0xFF:
            raise DeidentificationError(f"a JPEG {what} is malformed")
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            return  # end of image / start of scan: no headers after this
        seg_len = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        segment = data[pos + 4:pos + 2 + seg_len]
        if marker == 0xFE or (0xE1 <= marker <= 0xED) or marker == 0xEF:
            raise DeidentificationError(f"a JPEG {what} has a comment or metadata segment (0xFF{marker:02X})")
        if marker == 0xE0 and not (segment.startswith(b"JFIF\0") and segment[12:14] == b"\0\0"):
            raise DeidentificationError(f"a JPEG {what} has an APP0 segment that is not a bare JFIF header")
        if marker == 0xEE and not segment.startswith(b"Adobe"):
            raise DeidentificationError(f"a JPEG {what} has an unknown APP14 segment")
        pos += 2 + seg_len


def _check_j2k_comments(data: bytes) -> None:
    """Fail on JPEG 2000 main-header comments other than known encoder boilerplate."""
    pos = 2 if data[:2] == b"\xff\x4f" else -1
    if pos < 0:
        raise DeidentificationError("a JPEG 2000 tile is not a bare codestream")
    while pos + 4 <= len(data):
        marker = struct.unpack(">H", data[pos:pos + 2])[0]
        if marker == 0xFF90:  # start of tile-part: the main header ends here
            return
        seg_len = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xFF64 and not _J2K_COMMENT_OK.match(data[pos + 6:pos + 2 + seg_len]):
            raise DeidentificationError("a JPEG 2000 tile has a comment that is not encoder boilerplate")
        pos += 2 + seg_len


def _check_tile(data: bytes, compression: int) -> None:
    if not data:
        return
    if compression == 7:
        _check_jpeg_segments(data, "tile")
    elif compression in (33003, 33005):
        _check_j2k_comments(data)


# ----------------------------------------------------------------------------- TIFF writer


class _Writer:
    """Appends to the output, keeping a copy of every non-pixel byte for the text check."""

    def __init__(self, fh: BinaryIO, byteorder: str, bigtiff: bool) -> None:
        self.fh = fh
        self.bo = byteorder
        self.big = bigtiff
        self.meta = bytearray()

    def tell(self) -> int:
        return self.fh.tell()

    def write(self, data: bytes, *, metadata: bool = True) -> int:
        pos = self.fh.tell()
        self.fh.write(data)
        if metadata:
            self.meta += data
        return pos

    def align(self, size: int = 8) -> None:
        pad = -self.fh.tell() % size
        if pad:
            self.write(b"\0" * pad)

    def patch(self, pos: int, value: int) -> None:
        end = self.fh.tell()
        self.fh.seek(pos)
        self.fh.write(struct.pack(self.bo + ("Q" if self.big else "I"), value))
        self.fh.seek(end)


def _write_tiff(src: Path, tmp: Path, plan: _Plan) -> bytes:
    bo = plan.byteorder
    magic = b"II" if bo == "<" else b"MM"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with open(src, "rb") as inp, os.fdopen(fd, "wb") as raw:
            out = _Writer(raw, bo, plan.bigtiff)
            if plan.bigtiff:
                out.write(magic + struct.pack(bo + "HHH", 43, 8, 0))
                next_ptr = out.write(struct.pack(bo + "Q", 0))
            else:
                out.write(magic + struct.pack(bo + "H", 42))
                next_ptr = out.write(struct.pack(bo + "I", 0))
            for page in plan.pages:
                tables = next((e.data for e in page.entries if e.code == 347), None)
                if tables is not None and page.compression == 7:
                    _check_jpeg_segments(tables, "table")
                offsets = _copy_tiles(inp, out, page)
                entries = [*page.entries, _offsets_entry(offsets, bo, plan.bigtiff)]
                ifd_pos = _write_ifd(out, sorted(entries, key=lambda e: e.code))
                out.patch(next_ptr, ifd_pos)
                next_ptr = ifd_pos + (8 if plan.bigtiff else 2) + len(entries) * (20 if plan.bigtiff else 12)
            raw.flush()
            os.fsync(raw.fileno())
            return bytes(out.meta)
    except OSError as exc:
        raise OutputError(f"writing the copy failed: {exc.strerror or type(exc).__name__}") from None


def _copy_tiles(inp: BinaryIO, out: _Writer, page: _PagePlan) -> list[int]:
    seen: dict[tuple[int, int], int] = {}
    offsets: list[int] = []
    for offset, count in page.tiles:
        if count == 0:
            offsets.append(0)  # a sparse (absent) tile stays absent
            continue
        key = (offset, count)
        if key not in seen:
            inp.seek(offset)
            data = inp.read(count)
            if len(data) != count:
                raise DeidentificationError("a tile points past the end of the file")
            _check_tile(data, page.compression)
            seen[key] = out.write(data, metadata=False)
        offsets.append(seen[key])
    if not out.big and offsets and max(offsets) >= 2**32:
        raise DeidentificationError("the copy outgrew classic TIFF offsets")
    return offsets


def _offsets_entry(offsets: list[int], bo: str, bigtiff: bool) -> _Entry:
    if bigtiff:
        return _Entry(324, _LONG8, len(offsets), struct.pack(f"{bo}{len(offsets)}Q", *offsets))
    return _Entry(324, _LONG, len(offsets), struct.pack(f"{bo}{len(offsets)}I", *offsets))


def _write_ifd(out: _Writer, entries: list[_Entry]) -> int:
    bo, big = out.bo, out.big
    inline = 8 if big else 4
    value_pos: dict[int, int] = {}
    for entry in entries:
        if len(entry.data) > inline:
            out.align(2)  # TIFF values start on a word boundary
            value_pos[entry.code] = out.write(entry.data)
    out.align(8)
    count_fmt, entry_fmt = ("Q", "HHQ") if big else ("H", "HHI")
    ifd_pos = out.write(struct.pack(bo + count_fmt, len(entries)))
    for entry in entries:
        head = struct.pack(bo + entry_fmt, entry.code, entry.dtype, entry.count)
        if entry.code in value_pos:
            value = struct.pack(bo + ("Q" if big else "I"), value_pos[entry.code])
        else:
            value = entry.data.ljust(inline, b"\0")
        out.write(head + value)
    out.write(struct.pack(bo + ("Q" if big else "I"), 0))
    return ifd_pos


# ------------------------------------------------------------------------------ verifying


def _kept_text(plan: _Plan) -> bytes:
    """Bytes deliberately written (kept description fields, ICC profile names, ...)."""
    return b"\0".join(e.data for p in plan.pages for e in p.entries)


def _check_removed_text(meta: bytes, removed: Iterable[str], kept: bytes) -> None:
    """No removed text (pieces of 4+ characters) may appear in the copy's metadata bytes."""
    for text in removed:
        if len(text) < 4:
            continue
        needle = text.encode("latin-1", "replace")
        if needle in kept:
            continue  # deliberately kept: an MPP value, or an ICC profile name the description repeats
        if needle in meta:
            raise DeidentificationError("removed metadata text was found in the copy")


def _open_openslide(path: Path, what: str) -> Any:
    import openslide

    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise UnsupportedSlideError(f"OpenSlide cannot open {what}; {DEID_SUPPORTED}", hint=DEID_UNSUPPORTED_HINT) from None
    except openslide.OpenSlideError as exc:
        raise UnsupportedSlideError(
            f"OpenSlide cannot open {what} ({type(exc).__name__}); {DEID_SUPPORTED}", hint=DEID_UNSUPPORTED_HINT
        ) from None


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
    reference_path: Path, copy_path: Path, *, vendor: str, fail: Callable[[str], Exception]
) -> tuple[tuple[tuple[int, int], ...], int, int]:
    """Check the copy against the input in OpenSlide; returns (level dims, regions equal, regions undecodable).

    Same levels, µm/px, objective and vendor, no associated images, and byte-identical
    tile-aligned regions at every level. A region the input itself cannot decode must
    fail the same way in the copy (its bytes were copied verbatim); it is counted apart.
    """
    import openslide

    def open_copy(path: Path) -> Any:
        try:
            return openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as exc:
            raise fail(f"the copy does not reopen in OpenSlide ({type(exc).__name__})") from None

    reference = _Reader(reference_path, lambda path: _open_openslide(path, "the input"))
    try:
        copy = _Reader(copy_path, open_copy)
        try:
            return _compare_open(reference, copy, vendor=vendor, fail=fail)
        finally:
            copy.close()
    finally:
        reference.close()


def _compare_open(
    reference: _Reader, copy: _Reader, *, vendor: str, fail: Callable[[str], Exception]
) -> tuple[tuple[tuple[int, int], ...], int, int]:
    ref, cp = reference.slide, copy.slide
    if cp.properties.get("openslide.vendor") != vendor:
        raise fail("the copy is not read as the same format as the input")
    if cp.level_dimensions != ref.level_dimensions:
        raise fail("the copy's pyramid levels differ from the input's")
    for key in ("openslide.mpp-x", "openslide.mpp-y", "openslide.objective-power"):
        if ref.properties.get(key) != cp.properties.get(key):
            raise fail(f"the copy's {key.split('.')[-1]} differs from the input's")
    if cp.associated_images:
        raise fail("the copy still has associated images")
    dims = tuple(ref.level_dimensions)
    downsamples = tuple(ref.level_downsamples)
    props = dict(ref.properties)
    equal = undecodable = 0
    for level, (width, height) in enumerate(dims):
        tile_w = int(props.get(f"openslide.level[{level}].tile-width", 256))
        tile_h = int(props.get(f"openslide.level[{level}].tile-height", 256))
        cols, rows = -(-width // tile_w), -(-height // tile_h)
        for col, row in _sample_tiles(cols, rows):
            size = (min(tile_w, width - col * tile_w), min(tile_h, height - row * tile_h))
            location = (int(col * tile_w * downsamples[level]), int(row * tile_h * downsamples[level]))
            a = reference.region(location, level, size)
            b = copy.region(location, level, size)
            if a is None and b is None:
                undecodable += 1
            elif a != b:
                raise fail(f"pixels of the copy differ from the input at level {level}")
            else:
                equal += 1
    if undecodable:
        _log.info("%d region(s) cannot be decoded in the input either; compared as equally broken", undecodable)
    return dims, equal, undecodable


def _verify_copy(src: Path, tmp: Path, fmt: str) -> tuple[tuple[tuple[int, int], ...], int, int]:
    return compare_slides(src, tmp, vendor=fmt, fail=DeidentificationError)
