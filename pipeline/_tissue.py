"""Tissue detection on a low-resolution RGB image: a pure function of arrays.

The image is (row, col) indexed RGB uint8 with square pixels of ``mpp`` µm. Tissue is
told from glass by optical density relative to the estimated background colour (so grey
backgrounds work as well as white ones) or by colour saturation (which catches faint,
pale tissue). Pen ink (green, blue, black, red) is excluded, debris below a minimum area
is dropped and holes inside tissue are filled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ._errors import ConfigError

__all__ = ["TissueParams", "TissueMask", "detect_tissue", "pen_mask"]


@dataclass(frozen=True)
class TissueParams:
    """Knobs of :func:`detect_tissue`; the defaults suit H&E and IHC at about 8 µm/px."""

    mask_mpp: float = 8.0
    """µm/px of the image the mask is computed on."""
    min_tissue_area_um2: float = 10_000.0
    """Connected regions smaller than this (dust, debris) are not tissue."""
    min_optical_density: float = 0.03
    """Floor of the mean-OD threshold; pixels fainter than this are glass."""
    min_saturation: float = 0.08
    """Pixels at least this saturated (and not glass-bright) count as tissue too."""
    exclude_pen: bool = True
    fill_holes: bool = True

    def __post_init__(self) -> None:
        if not 0.1 <= self.mask_mpp <= 200:
            raise ConfigError(
                f"tissue mask_mpp = {self.mask_mpp!r} µm/px is out of range",
                hint="use a value between 0.1 and 200; 8 suits most slides",
            )
        if self.min_tissue_area_um2 < 0:
            raise ConfigError(
                f"min_tissue_area_um2 = {self.min_tissue_area_um2!r} is negative",
                hint="use 0 to keep every tissue fragment",
            )


@dataclass(frozen=True)
class TissueMask:
    """A boolean (row, col) tissue mask whose square pixels are ``mpp`` µm wide.

    Pixel (0, 0) covers level-0 (x, y) = (0, 0) to (mpp / mpp_x, mpp / mpp_y).
    """

    mask: np.ndarray
    mpp: float

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * self.mpp * self.mpp / 1e6

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def _background_rgb(rgb: np.ndarray) -> np.ndarray:
    """The glass colour: the brightest few percent of pixels, never darker than 150."""
    luminance = rgb.mean(axis=2, dtype=np.float32)
    cut = np.percentile(luminance, 97)
    bright = rgb[luminance >= cut]
    background = np.median(bright, axis=0).astype(np.float64)
    return np.clip(background, 150.0, 255.0)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of a 1-D array (256 bins)."""
    if values.size == 0 or float(values.min()) == float(values.max()):
        return float(values.max()) if values.size else 0.0
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    weight1 = np.cumsum(hist)
    weight2 = np.cumsum(hist[::-1])[::-1]
    mean1 = np.cumsum(hist * centres) / np.maximum(weight1, 1)
    mean2 = (np.cumsum((hist * centres)[::-1]) / np.maximum(weight2[::-1], 1))[::-1]
    variance = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centres[:-1][np.argmax(variance)])


def _saturation(rgb: np.ndarray, mx: np.ndarray) -> np.ndarray:
    """(max - min) / max per pixel, float32 (HSV saturation)."""
    spread = mx.astype(np.float32)
    spread -= rgb.min(axis=2)
    spread /= np.maximum(mx, 1)
    return spread


def _mean_optical_density(rgb: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Mean over channels of max(0, log10(background / I)), float32, one channel at a time.

    Working per channel keeps the memory to a few bytes per pixel: the mask of a whole
    gigapixel slide is computed on a rendering of millions of pixels.
    """
    total = np.zeros(rgb.shape[:2], dtype=np.float32)
    for channel in range(3):
        od = rgb[..., channel].astype(np.float32)
        np.maximum(od, 1.0, out=od)
        np.log10(od, out=od)
        np.subtract(np.float32(np.log10(background[channel])), od, out=od)
        np.maximum(od, 0.0, out=od)
        total += od
    total /= 3
    return total


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of pathologists' ink: green, blue, black or red marker.

    Stained tissue is pink to purple (red channel above green); blue and green inks have
    green at or above red, black ink is dark in every channel and red ink lacks the blue
    that eosin has.
    """
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    mx = rgb.max(axis=2)
    saturation = _saturation(rgb, mx)
    blue_green = (g - r > 25) & (saturation > 0.25)
    black = mx < 60
    red = (r > 120) & (g < 0.45 * r) & (b < 0.5 * r)
    return blue_green | black | red


def _remove_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    if min_pixels <= 1 or not mask.any():
        return mask
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def detect_tissue(rgb: np.ndarray, mpp: float, params: TissueParams | None = None) -> TissueMask:
    """Boolean tissue mask of an RGB uint8 (row, col, 3) image with ``mpp`` µm square pixels."""
    params = params or TissueParams()
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (rows, cols, 3) image, got {rgb.dtype} {rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        return TissueMask(np.zeros(rgb.shape[:2], dtype=bool), mpp)
    background = _background_rgb(rgb)
    od_mean = _mean_optical_density(rgb, background)
    saturation = _saturation(rgb, rgb.max(axis=2))

    threshold = max(params.min_optical_density, min(_otsu(od_mean), 0.15))
    tissue = (od_mean > threshold) | (
        (saturation > params.min_saturation) & (od_mean > params.min_optical_density / 2)
    )
    if params.exclude_pen:
        ink = pen_mask(rgb)
        ink = _remove_small(ink, 4)
        ink = ndimage.binary_dilation(ink, iterations=1)
        tissue &= ~ink
    min_pixels = params.min_tissue_area_um2 / (mpp * mpp)
    # A light closing joins tissue broken up by pale stroma before fragments are judged.
    tissue = ndimage.binary_closing(tissue, structure=np.ones((3, 3), bool), border_value=0)
    tissue = _remove_small(tissue, min_pixels)
    if params.fill_holes:
        tissue = ndimage.binary_fill_holes(tissue)
    if params.exclude_pen:
        tissue &= ~ink
        tissue = _remove_small(tissue, min_pixels)
    return TissueMask(np.asarray(tissue, dtype=bool), mpp)
