"""Generated slides for tests: pyramidal TIFFs with known pixels and known µm/px."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

__all__ = ["write_pyramid_tiff", "write_strip_tiff", "write_huge_header_tiff", "BACKGROUND", "TISSUE"]

BACKGROUND = (243, 243, 243)
TISSUE = (196, 96, 170)  # eosin/haematoxylin-like pink-purple


def _downsample(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(
        Image.fromarray(image).resize((max(1, w // factor), max(1, h // factor)), Image.Resampling.BOX)
    )


def write_pyramid_tiff(
    path: Path,
    image: np.ndarray,
    mpp: float | tuple[float, float],
    *,
    levels: int = 3,
    tile_px: int = 256,
    compression: str = "jpeg",
    quality: int = 95,
) -> Path:
    """A generic tiled pyramidal TIFF that OpenSlide reads; level i is downsampled 2**i."""
    mpp_x, mpp_y = (mpp, mpp) if isinstance(mpp, (int, float)) else mpp
    kwargs: dict[str, object] = {"compression": compression}
    if compression == "jpeg":
        kwargs["compressionargs"] = {"level": quality}
    with tifffile.TiffWriter(path) as writer:
        for level in range(levels):
            factor = 2**level
            pixels = image if level == 0 else _downsample(image, factor)
            writer.write(
                pixels,
                tile=(tile_px, tile_px),
                photometric="rgb",
                resolution=(1e4 / (mpp_x * factor), 1e4 / (mpp_y * factor)),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
                **kwargs,
            )
    return path


def write_strip_tiff(path: Path, image: np.ndarray, mpp: float) -> Path:
    """An untiled (strip) TIFF: OpenSlide refuses it, tiffslide reads it."""
    tifffile.imwrite(
        path, image, photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER"
    )
    return path


def write_huge_header_tiff(
    path: Path, width: int, height: int, mpp: float, *, tile_px: int = 2048, real_tiles: int = 4
) -> Path:
    """A single-level tiled RGB TIFF whose header claims ``width`` x ``height`` px at ``mpp``
    µm/px, but which holds only ``real_tiles`` tiles of tissue (deflate, top-left row); every
    other tile is absent (byte count 0). A few MB on disk, like a damaged or forged header."""
    across, down = -(-width // tile_px), -(-height // tile_px)
    count = across * down
    pixels = np.empty((tile_px, tile_px, 3), dtype=np.uint8)
    pixels[...] = TISSUE
    tile = zlib.compress(pixels.tobytes(), 6)
    real = min(real_tiles, count)
    # Layout: header, tile data, tag arrays, then the IFD.
    data_at = 8
    arrays_at = data_at + len(tile)
    offsets = [data_at if i < real else 0 for i in range(count)]
    counts = [len(tile) if i < real else 0 for i in range(count)]
    bits_at = arrays_at
    res_at = bits_at + 8
    offsets_at = res_at + 16
    counts_at = offsets_at + 4 * count
    ifd_at = counts_at + 4 * count
    ppcm = round(1e4 / mpp * 1000)  # pixels per cm, as a rational over 1000
    short, long_, rational = 3, 4, 5
    entries = [
        (256, long_, 1, width), (257, long_, 1, height), (258, short, 3, bits_at),
        (259, short, 1, 8), (262, short, 1, 2), (277, short, 1, 3), (282, rational, 1, res_at),
        (283, rational, 1, res_at + 8), (284, short, 1, 1), (296, short, 1, 3),
        (322, long_, 1, tile_px), (323, long_, 1, tile_px), (324, long_, count, offsets_at),
        (325, long_, count, counts_at),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, n, value in entries:
        inline = kind == short and n == 1
        ifd += struct.pack("<HHI", tag, kind, n)
        ifd += struct.pack("<HH", value, 0) if inline else struct.pack("<I", value)
    ifd += struct.pack("<I", 0)
    with open(path, "wb") as fh:
        fh.write(b"II*\0" + struct.pack("<I", ifd_at))
        fh.write(tile)
        fh.write(struct.pack("<4H", 8, 8, 8, 0))
        fh.write(struct.pack("<4I", ppcm, 1000, ppcm, 1000))
        fh.write(struct.pack(f"<{count}I", *offsets))
        fh.write(struct.pack(f"<{count}I", *counts))
        fh.write(ifd)
    return path
