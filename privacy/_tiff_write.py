"""Writing the planned TIFF: tiles copied byte for byte, fresh directories, no stray bytes.

Only the plan's entries are written, plus a rebuilt TileOffsets. Every tile and JPEG
table is scanned for embedded text on the way. Every non-pixel byte written is kept
aside so the caller can check that no removed text reappears in the copy.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

from pipeline import DeidentificationError, OutputError

from ._codestream import check_jpeg_segments, check_tile
from ._tiff_plan import PagePlan, Plan
from ._tiff_tags import LONG, LONG8, Entry

__all__ = ["write_tiff"]


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


def write_tiff(src: Path, tmp: Path, plan: Plan) -> bytes:
    """Write the planned copy of ``src`` to the new file ``tmp``; returns its non-pixel bytes."""
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
                    check_jpeg_segments(tables, "table")
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


def _copy_tiles(inp: BinaryIO, out: _Writer, page: PagePlan) -> list[int]:
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
            check_tile(data, page.compression)
            seen[key] = out.write(data, metadata=False)
        offsets.append(seen[key])
    if not out.big and offsets and max(offsets) >= 2**32:
        raise DeidentificationError("the copy outgrew classic TIFF offsets")
    return offsets


def _offsets_entry(offsets: list[int], bo: str, bigtiff: bool) -> Entry:
    if bigtiff:
        return Entry(324, LONG8, len(offsets), struct.pack(f"{bo}{len(offsets)}Q", *offsets))
    return Entry(324, LONG, len(offsets), struct.pack(f"{bo}{len(offsets)}I", *offsets))


def _write_ifd(out: _Writer, entries: list[Entry]) -> int:
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
