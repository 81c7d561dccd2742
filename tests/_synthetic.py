"""Generated slides for tests: pyramidal TIFFs with known pixels and known µm/px."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

__all__ = ["write_pyramid_tiff", "write_strip_tiff", "BACKGROUND", "TISSUE"]

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
