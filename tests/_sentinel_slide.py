"""A "sentinel" Aperio SVS: every place a real scanner puts identifying data holds one marker.

The folder name, file name, every ImageDescription field, the TIFF text tags and the
pixels of the label and macro images all carry :data:`SENTINEL`, so a de-identified copy
can be checked for leaks with one ``bytes.find`` (and the label/macro pixels by their
absence). Geometry: level 0 2048x1536 RGB at 0.5 µm/px (20x), JPEG tiles of 256 px,
reduced levels 1024x768 and 512x384, in Aperio page order (level 0, thumbnail, levels,
label, macro).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFont

__all__ = ["SENTINEL", "SENTINEL_DATE", "SENTINEL_TIME", "write_sentinel_svs", "tissue_image"]

SENTINEL = "ZQXSENTINEL7"
SENTINEL_DATE = "11/27/26"
SENTINEL_TIME = "10:00:00"
_WIDTH, _HEIGHT = 2048, 1536
_TILE = 256
_HEADER = "Aperio Image Library v12.0.0"


def tissue_image(width: int = _WIDTH, height: int = _HEIGHT, seed: int = 7) -> np.ndarray:
    """Near-white glass with pink (eosin) blobs and purple (haematoxylin) nuclei."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.empty((height, width, 3), np.float32)
    image[:] = (242, 240, 244)
    for _ in range(6):
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
        rx, ry = rng.uniform(0.08, 0.18) * width, rng.uniform(0.08, 0.18) * height
        blob = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        image[blob] = (222, 140, 185)
    nuclei = (rng.random((height // 8, width // 8)) < 0.08).repeat(8, 0).repeat(8, 1)
    tissue = image[..., 1] < 200
    image[nuclei & tissue] = (120, 70, 150)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _text_image(width: int, height: int, text: str, background: tuple[int, int, int]) -> np.ndarray:
    picture = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(12, width // 9))
    draw.text((10, height // 3), text, fill=(0, 0, 0), font=font)
    return np.asarray(picture)


def _reduce(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape[0] // factor, image.shape[1] // factor
    return image[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).mean((1, 3)).astype(np.uint8)


def write_sentinel_svs(parent: Path, sentinel: str = SENTINEL) -> Path:
    """Write ``parent/case-<sentinel>/<sentinel>-slide.svs`` and return its path."""
    folder = Path(parent) / f"case-{sentinel}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sentinel}-slide.svs"
    s = sentinel
    fields = (
        f"|AppMag = 20|StripeWidth = 1000|ScanScope ID = {s}|Filename = {s}|Date = {SENTINEL_DATE}"
        f"|Time = {SENTINEL_TIME}|Time Zone = GMT+0100|User = {s}-user|MPP = 0.5|Left = 20.1|Top = 19.9"
        f"|Patient = {s}^PATIENT|Barcode = {s}-BARCODE|OriginalWidth = {_WIDTH}|OriginalHeight = {_HEIGHT}"
    )
    text_tags = [
        (269, "s", 0, f"{s} document", True),
        (271, "s", 0, f"{s} make", True),
        (272, "s", 0, f"{s} model", True),
        (285, "s", 0, f"{s} page", True),
        (315, "s", 0, f"{s} artist", True),
        (316, "s", 0, f"{s}-host", True),
        (33432, "s", 0, f"(c) {s}", True),
    ]
    level0 = tissue_image()
    levels = [level0, _reduce(level0, 2), _reduce(level0, 4)]
    thumbnail = _reduce(level0, 4)
    label = _text_image(387, 463, s, (250, 250, 250))
    macro = _text_image(1280, 431, s, (200, 200, 210))
    common = {"photometric": "rgb", "metadata": None, "software": f"{s} scanner software"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            levels[0], tile=(_TILE, _TILE), compression="jpeg", subfiletype=0, datetime="2026:11:27 10:00:00",
            description=f"{_HEADER}\r\n{_WIDTH}x{_HEIGHT} [0,0 {_WIDTH}x{_HEIGHT}] ({_TILE}x{_TILE}) JPEG/RGB Q=70{fields}",
            extratags=text_tags, **common,
        )
        tif.write(
            thumbnail, compression="jpeg", subfiletype=0, rowsperstrip=16,
            description=f"{_HEADER}\r\n{_WIDTH}x{_HEIGHT} -> {thumbnail.shape[1]}x{thumbnail.shape[0]} - {fields}",
            extratags=text_tags, **common,
        )
        for level in levels[1:]:
            tif.write(
                level, tile=(_TILE, _TILE), compression="jpeg", subfiletype=0,
                description=f"{_HEADER}\r\n{_WIDTH}x{_HEIGHT} [0,0 {_WIDTH}x{_HEIGHT}] ({_TILE}x{_TILE}) "
                f"-> {level.shape[1]}x{level.shape[0]} JPEG/RGB Q=70{fields}",
                extratags=text_tags, **common,
            )
        tif.write(
            label, compression="lzw", subfiletype=1, rowsperstrip=16,
            description=f"{_HEADER}\r\nlabel 387x463\r\nBarcode = {s}-BARCODE", extratags=text_tags, **common,
        )
        tif.write(
            macro, compression="jpeg", subfiletype=9, rowsperstrip=16,
            description=f"{_HEADER}\r\nmacro 1280x431\r\nSlide = {s}", extratags=text_tags, **common,
        )
    return path
