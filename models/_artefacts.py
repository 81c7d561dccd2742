"""Realistic synthetic slide artefacts for training QC models: ink, defocus, glass debris.

All functions take and return RGB uint8 (rows, cols, 3) patches and draw randomness only
from the ``numpy.random.Generator`` they are given (reproducible with a seed).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["INK_COLOURS", "add_ink", "defocus", "synthetic_glass", "jpeg_roundtrip"]

INK_COLOURS: dict[str, tuple[int, int, int]] = {
    "green": (20, 120, 60),
    "blue": (25, 55, 165),
    "black": (25, 25, 30),
    "red": (195, 25, 40),
}
"""Marker colours pathologists use to circle regions of interest."""


def _stroke_mask(rng: np.random.Generator, size: int, width_px: float) -> np.ndarray:
    """A smooth curved stroke crossing the patch, as float coverage in [0, 1]."""
    canvas = Image.new("L", (size * 2, size * 2), 0)
    draw = ImageDraw.Draw(canvas)
    # A quadratic Bezier between two points outside/at the edge, through a random control.
    p0 = rng.uniform(-0.2, 1.2, 2) * size * 2
    p2 = rng.uniform(-0.2, 1.2, 2) * size * 2
    ctrl = rng.uniform(0.2, 0.8, 2) * size * 2
    t = np.linspace(0, 1, 64)[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t**2 * p2
    draw.line([tuple(p) for p in points], fill=255, width=max(1, int(width_px * 2)), joint="curve")
    canvas = canvas.filter(ImageFilter.GaussianBlur(1.2)).resize((size, size), Image.Resampling.BOX)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def add_ink(
    patch: np.ndarray, rng: np.random.Generator, *, min_coverage: float = 0.08
) -> tuple[np.ndarray, float]:
    """Marker strokes over a patch (subtractive, often translucent); returns (patch, coverage)."""
    size = patch.shape[0]
    colour_name = rng.choice(list(INK_COLOURS))
    colour = np.clip(np.array(INK_COLOURS[colour_name], float) + rng.normal(0, 12, 3), 0, 255)
    coverage_map = np.zeros(patch.shape[:2], np.float32)
    for _ in range(20):
        width = rng.uniform(4, 32)
        coverage_map = np.maximum(coverage_map, _stroke_mask(rng, size, width))
        if (coverage_map > 0.5).mean() >= min_coverage and rng.random() < 0.6:
            break
    # Strokes of one marker share an opacity: dried ink ranges from translucent to opaque.
    opacity = rng.uniform(0.45, 0.95)
    alpha = (coverage_map * opacity)[..., None]
    transmit = colour / 255.0
    out = patch.astype(np.float32) * (1 - alpha + alpha * transmit)
    return np.clip(out, 0, 255).astype(np.uint8), float((coverage_map > 0.5).mean())


def defocus(patch: np.ndarray, rng: np.random.Generator, sigma_range: tuple[float, float] = (1.6, 4.5)) -> np.ndarray:
    """Out-of-focus blur: a disk (lens) blur plus a Gaussian, of random strength."""
    sigma = rng.uniform(*sigma_range)
    image = Image.fromarray(patch)
    radius = round(sigma)
    if radius >= 1:
        image = image.filter(ImageFilter.BoxBlur(radius))
    image = image.filter(ImageFilter.GaussianBlur(sigma * 0.8))
    out = np.asarray(image, dtype=np.float32)
    # Defocus also lowers contrast slightly.
    mean = out.mean(axis=(0, 1), keepdims=True)
    out = mean + (out - mean) * rng.uniform(0.85, 1.0)
    return np.clip(out, 0, 255).astype(np.uint8)


def synthetic_glass(rng: np.random.Generator, size: int) -> np.ndarray:
    """Empty slide glass: tinted white/grey, uneven light, noise, dust, fibres, debris."""
    base = rng.uniform(200, 250)
    tint = rng.normal(0, 3, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    gradient = (rng.normal(0, 4) * xx + rng.normal(0, 4) * yy)[..., None]
    image = np.clip(base + tint + gradient + rng.normal(0, 1.5, (size, size, 3)), 0, 255)
    canvas = Image.fromarray(image.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(0, 25)):  # dust specks
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.5, 2.5)
        grey = int(rng.uniform(90, 190))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(grey, grey, int(grey * 0.95)))
    for _ in range(rng.integers(0, 3)):  # fibres
        points = np.cumsum(rng.normal(0, 6, (12, 2)), axis=0) + rng.uniform(0, size, 2)
        grey = int(rng.uniform(120, 200))
        draw.line([tuple(p) for p in points], fill=(grey, grey, grey), width=1)
    for _ in range(rng.integers(0, 3)):  # small debris, sometimes stained
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(2, 6)
        colour = tuple(int(c) for c in rng.uniform([120, 70, 120], [200, 150, 200]))
        draw.ellipse([x - r, y - r * rng.uniform(0.5, 1), x + r, y + r], fill=colour)
    if rng.random() < 0.2:  # an air bubble's rim
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(20, 80)
        grey = int(rng.uniform(150, 200))
        draw.ellipse([x - r, y - r, x + r, y + r], outline=(grey, grey, grey), width=2)
    return np.asarray(canvas.filter(ImageFilter.GaussianBlur(0.6)))


def jpeg_roundtrip(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Compress like a scanner (JPEG quality 70-95) so artefacts are not a give-away."""
    buffer = io.BytesIO()
    Image.fromarray(patch).save(buffer, format="JPEG", quality=int(rng.integers(70, 96)))
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
