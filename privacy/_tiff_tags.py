"""The TIFF vocabulary of deid: which tags are copied, blanked or refused, and value types.

Every tag of a kept page is on exactly one list here, or the run fails: tags copied
verbatim (structure, no free text), tags rewritten by the writer, tags known to hold
identifying text (not written), and pointer tags that could hide more metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ASCII",
    "COMPRESSIONS",
    "LONG",
    "LONG8",
    "POINTER_TAGS",
    "SHORT",
    "TIFF_BLANKED_TAGS",
    "TIFF_COPIED_TAGS",
    "TYPE_SIZE",
    "Entry",
]

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
POINTER_TAGS = {330: "SubIFDs", 34665: "ExifIFD", 34853: "GPSIFD", 40965: "InteroperabilityIFD"}

# Codecs whose tile bytes wsiflow copies and whose embedded text it can check.
COMPRESSIONS = {1: "none", 5: "lzw", 7: "jpeg", 8: "deflate", 32946: "deflate", 33003: "jpeg2000", 33005: "jpeg2000"}

TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
"""Bytes per value of each TIFF field type."""
ASCII, SHORT, LONG, LONG8 = 2, 3, 4, 16


@dataclass
class Entry:
    """One directory entry to write: tag code, field type, value count and raw value bytes."""

    code: int
    dtype: int
    count: int
    data: bytes
