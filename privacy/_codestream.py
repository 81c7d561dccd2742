"""Text hidden in compressed tiles: JPEG comment/APP segments and JPEG 2000 comments."""

from __future__ import annotations

import re
import struct

from pipeline import DeidentificationError

__all__ = ["check_j2k_comments", "check_jpeg_segments", "check_tile"]

# JPEG 2000 codestream comments written by encoders; any other comment fails closed.
_J2K_COMMENT_OK = re.compile(rb"^(Kakadu-v[0-9.]+|Kdu-Layer-Info:|Created by OpenJPEG|Created by Aperio|ImageMagick)")


def check_jpeg_segments(data: bytes, what: str) -> None:
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


def check_j2k_comments(data: bytes) -> None:
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


def check_tile(data: bytes, compression: int) -> None:
    """Check one compressed tile (TIFF ``compression`` code) for embedded text."""
    if not data:
        return
    if compression == 7:
        check_jpeg_segments(data, "tile")
    elif compression in (33003, 33005):
        check_j2k_comments(data)
