"""Realistic synthetic slide artefacts for training QC models: ink, defocus, folds, bubbles, glass.

All functions take and return RGB uint8 (rows, cols, 3) patches and draw randomness only
from the ``numpy.random.Generator`` they are given (reproducible with a seed). Sizes that
have a physical meaning (marker stroke width, defocus radius) are in µm and converted with
the patch's µm/px, so the artefacts look the same at any model resolution.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "INK_COLOURS", "add_ink", "defocus", "disc_psf", "add_fold", "add_bubble", "soften",
    "synthetic_glass", "jpeg_roundtrip",
]

INK_COLOURS: dict[str, tuple[int, int, int]] = {
    "green": (20, 120, 60),
    "blue": (25, 55, 165),
    "black": (25, 25, 30),
    "red": (195, 25, 40),
}
"""Marker colours pathologists use to circle regions of interest (transmitted colour of the dried ink)."""

_OPACITY = {"green": (0.55, 0.95), "blue": (0.6, 0.95), "black": (0.6, 0.95), "red": (0.5, 0.95)}
"""Per ink: translucent (a light pass) to opaque (several passes). Below ~0.5 blue ink over
eosin is indistinguishable from haematoxylin, so weaker ink is not called pen."""


def _low_frequency_noise(rng: np.random.Generator, size: int, scale_px: float, anisotropy: float = 1.0) -> np.ndarray:
    """Zero-mean, unit-std smooth noise (streaks when ``anisotropy`` > 1)."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.normal(0, 1, (size, size)), (scale_px, scale_px * anisotropy), mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-9)


def _stroke_mask(rng: np.random.Generator, size: int, width_px: float) -> np.ndarray:
    """Coverage in [0, 1] of a marker stroke ``width_px`` wide near or across the patch.

    The stroke is a quadratic Bezier on a canvas three patches wide so that wide strokes
    (a marker line is 0.3-2 mm, i.e. wider than a tile at 1 µm/px) show as an edge or cover
    the patch, as they do on real slides.
    """
    span = 3 * size
    canvas = Image.new("L", (span, span), 0)
    draw = ImageDraw.Draw(canvas)
    centre = np.array([1.5 * size, 1.5 * size])
    # Put the stroke's centre line within about half a width of the patch so it is seen.
    reach = size * 0.5 + width_px * 0.5
    offset = rng.uniform(-reach, reach, 2)
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)]) * span
    p0, p2 = centre + offset - direction, centre + offset + direction
    ctrl = centre + offset + rng.normal(0, size * 0.6, 2)
    t = np.linspace(0, 1, 96)[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t**2 * p2
    draw.line([tuple(p) for p in points], fill=255, width=max(1, int(width_px)), joint="curve")
    soft = rng.uniform(0.6, 2.5)  # ink edges bleed a little into the mountant
    canvas = canvas.crop((size, size, 2 * size, 2 * size)).filter(ImageFilter.GaussianBlur(soft))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def add_ink(
    patch: np.ndarray, rng: np.random.Generator, *, mpp: float = 1.0, min_coverage: float = 0.12
) -> tuple[np.ndarray, float]:
    """Translucent marker ink over a patch (subtractive); returns (patch, coverage).

    Strokes are 60-1500 µm wide (fine-tip to broad markers), of one ink per patch, with
    uneven density (streaks along the stroke) and a darker rim where the ink dried.
    """
    size = patch.shape[0]
    colour_name = str(rng.choice(list(INK_COLOURS)))
    colour = np.clip(np.array(INK_COLOURS[colour_name], float) + rng.normal(0, 10, 3), 0, 255)
    coverage_map = np.zeros(patch.shape[:2], np.float32)
    for _ in range(12):
        width_um = float(np.exp(rng.uniform(np.log(60), np.log(1500))))
        coverage_map = np.maximum(coverage_map, _stroke_mask(rng, size, width_um / mpp))
        if (coverage_map > 0.5).mean() >= min_coverage and rng.random() < 0.7:
            break
    if (coverage_map > 0.5).mean() < min_coverage:
        coverage_map = np.maximum(coverage_map, _stroke_mask(rng, size, 3 * size))
    opacity = rng.uniform(*_OPACITY[colour_name])
    density = 1 + rng.uniform(0.05, 0.25) * _low_frequency_noise(rng, size, rng.uniform(3, 12), rng.uniform(1, 6))
    edge = coverage_map * (1 - coverage_map) * 4  # 1 on the stroke's edge, 0 inside and outside
    alpha = np.clip(coverage_map * opacity * density + edge * rng.uniform(0, 0.2), 0, 1)[..., None]
    transmit = colour / 255.0
    out = patch.astype(np.float32) * (1 - alpha + alpha * transmit)
    return np.clip(out, 0, 255).astype(np.uint8), float((coverage_map > 0.5).mean())


def disc_psf(radius_px: float, sigma_px: float) -> np.ndarray:
    """A defocus point-spread function: a uniform disc (geometric defocus of a circular
    aperture) of ``radius_px``, softened by a Gaussian of ``sigma_px``; sums to 1."""
    from scipy.ndimage import gaussian_filter

    half = int(np.ceil(radius_px + 3 * sigma_px)) + 1
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    # Anti-aliased disc: coverage of each pixel by the disc, approximated on the distance.
    disc = np.clip(radius_px + 0.5 - np.hypot(yy, xx), 0, 1)
    if sigma_px > 0:
        disc = gaussian_filter(disc, sigma_px, mode="constant")
    return disc / disc.sum()


def defocus(
    patch: np.ndarray,
    rng: np.random.Generator,
    *,
    mpp: float = 1.0,
    radius_um: tuple[float, float] = (2.0, 6.0),
) -> np.ndarray:
    """Out-of-focus blur: the patch convolved with a disc PSF of radius ``radius_um`` µm
    (converted with ``mpp``), then sensor noise, since a defocused scan is still noisy."""
    from scipy.signal import fftconvolve

    radius_px = rng.uniform(*radius_um) / mpp
    psf = disc_psf(radius_px, radius_px * rng.uniform(0.15, 0.5))
    pad = psf.shape[0] // 2
    padded = np.pad(patch.astype(np.float32), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = np.stack([fftconvolve(padded[..., c], psf, mode="valid") for c in range(3)], axis=-1)
    out = out + rng.normal(0, rng.uniform(0.5, 2.5), out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def soften(patch: np.ndarray, rng: np.random.Generator, *, mpp: float = 1.0) -> np.ndarray:
    """Slight optical softness (Gaussian sigma 0.2-0.6 µm) that scanners in focus still show:
    a negative example for ``blur``."""
    sigma_px = rng.uniform(0.2, 0.6) / mpp
    return np.asarray(Image.fromarray(patch).filter(ImageFilter.GaussianBlur(sigma_px)))


def _to_od(patch: np.ndarray) -> np.ndarray:
    return -np.log((patch.astype(np.float32) + 1) / 256)


def _from_od(od: np.ndarray) -> np.ndarray:
    return np.clip(np.exp(-od) * 256 - 1, 0, 255).astype(np.uint8)


def add_fold(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A tissue fold: a band where the section lies doubled (optical density x 1.6-2.4), with a
    dark crease on one side. Still tissue: the QC classes have no fold class, and a fold must
    not be taken for pen ink."""
    size = patch.shape[0]
    band = _stroke_mask(rng, size, rng.uniform(0.1, 0.6) * size)
    crease = np.clip(_stroke_mask(rng, size, rng.uniform(2, 6)) * band, 0, 1)
    od = _to_od(patch)
    factor = 1 + band[..., None] * rng.uniform(0.6, 1.4) + crease[..., None] * 0.8
    return _from_od(od * factor)


def add_bubble(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An air bubble in the mountant: a dark refractive rim, the inside slightly brighter."""
    size = patch.shape[0]
    x, y = rng.uniform(-0.2, 1.2, 2) * size
    r = rng.uniform(0.2, 1.0) * size
    inside = Image.new("L", (size, size), 0)
    ImageDraw.Draw(inside).ellipse([x - r, y - r, x + r, y + r], fill=255)
    rim = Image.new("L", (size, size), 0)
    ImageDraw.Draw(rim).ellipse([x - r, y - r, x + r, y + r], outline=255, width=int(rng.integers(2, 7)))
    inner = np.asarray(inside.filter(ImageFilter.GaussianBlur(1.5)), np.float32)[..., None] / 255
    ring = np.asarray(rim.filter(ImageFilter.GaussianBlur(1.0)), np.float32)[..., None] / 255
    out: np.ndarray = patch.astype(np.float32)
    out = out + inner * (255 - out) * rng.uniform(0.05, 0.25)
    out = out * (1 - ring * rng.uniform(0.3, 0.6))
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
