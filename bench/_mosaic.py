"""A large generated pyramidal slide made of real tissue texture, written tile by tile."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

__all__ = ["write_mosaic_slide"]

_TILE = 256


def _texture(source: Path) -> np.ndarray:
    """Real tissue crops (RGB) from the sample slide, as a bank of 256 px tiles."""
    from pipeline import open_slide

    with open_slide(source) as slide:
        w, h = slide.dimensions
        image = slide.read_region(0, 0, 0, w, h)
    bank = []
    for y in range(0, h - _TILE + 1, _TILE):
        for x in range(0, w - _TILE + 1, _TILE):
            tile = image[y : y + _TILE, x : x + _TILE]
            if tile.std() > 25:  # mostly tissue
                bank.append(tile)
    return np.stack(bank)


def _reduce(image: np.ndarray) -> np.ndarray:
    """2x box downsample."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    return image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)


def write_mosaic_slide(path: Path, source: Path, size_px: int, tissue_fraction: float, mpp: float = 0.5, seed: int = 0) -> Path:
    """A ``size_px`` square JPEG-tiled pyramid; tissue blocks cover ``tissue_fraction`` of it."""
    bank = _texture(source)
    rng = np.random.default_rng(seed)
    n = size_px // _TILE
    block = 16  # tissue comes in 16 x 16 tile islands, like sections on glass
    islands = rng.random(((n + block - 1) // block,) * 2) < tissue_fraction
    glass = np.full((_TILE, _TILE, 3), 242, np.uint8)

    half = np.zeros((n * _TILE // 2, n * _TILE // 2, 3), np.uint8)  # level 1, filled while writing level 0

    def level0_tiles() -> Iterator[np.ndarray]:
        for r in range(n):
            for c in range(n):
                if islands[r // block, c // block]:
                    tile = bank[(r * 7919 + c * 104729) % len(bank)]
                else:
                    tile = glass
                half[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128] = _reduce(tile)
                yield tile

    def array_tiles(image: np.ndarray) -> Iterator[np.ndarray]:
        rows, cols = -(-image.shape[0] // _TILE), -(-image.shape[1] // _TILE)
        for r in range(rows):
            for c in range(cols):
                tile = np.full((_TILE, _TILE, 3), 242, np.uint8)
                part = image[r * _TILE : (r + 1) * _TILE, c * _TILE : (c + 1) * _TILE]
                tile[: part.shape[0], : part.shape[1]] = part
                yield tile

    levels = 1
    while size_px // 2**levels >= 1024:
        levels += 1
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        image = None
        for level in range(levels):
            side = n * _TILE if level == 0 else image.shape[0]
            writer.write(
                level0_tiles() if level == 0 else array_tiles(image),
                shape=(side, side, 3), dtype=np.uint8, tile=(_TILE, _TILE),
                photometric="rgb", compression="jpeg", compressionargs={"level": 85},
                resolution=(1e4 / (mpp * 2**level),) * 2, resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
            )
            image = half if level == 0 else _reduce(image)
    return path
