"""Tissue detection on real tissue images placed on various backgrounds."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline import ConfigError, TissueParams, detect_tissue, pen_mask
from tests.conftest import shared_file

MPP = 8.0


def _real_tissue(size: tuple[int, int]) -> np.ndarray:
    """A real H&E image resized to (width, height)."""
    image = Image.open(shared_file("images/he-tumour-1000px.png")).convert("RGB")
    return np.asarray(image.resize(size, Image.Resampling.BOX))


def _canvas(background: tuple[int, int, int], noise: float = 2.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    canvas = np.empty((200, 300, 3), float)
    canvas[:] = background
    canvas += rng.normal(0, noise, canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("background", [(245, 245, 245), (225, 222, 228), (200, 200, 205)])
def test_tissue_found_on_white_and_grey_backgrounds(background):
    canvas = _canvas(background)
    canvas[50:150, 100:220] = _real_tissue((120, 100))
    mask = detect_tissue(canvas, MPP)
    truth = np.zeros(canvas.shape[:2], bool)
    truth[50:150, 100:220] = True
    assert (mask.mask & truth).sum() / truth.sum() > 0.95
    assert (mask.mask & ~truth).sum() / (~truth).sum() < 0.01
    assert mask.mpp == MPP
    assert mask.area_mm2 == pytest.approx(mask.mask.sum() * 64 / 1e6)


def test_faint_tissue_is_found():
    canvas = _canvas((244, 244, 244))
    tissue = _real_tissue((120, 100)).astype(float)
    # Fade the tissue 75 % towards the glass colour: a pale, under-stained section.
    faint = (244 + 0.25 * (tissue - 244)).astype(np.uint8)
    canvas[50:150, 100:220] = faint
    mask = detect_tissue(canvas, MPP)
    assert mask.mask[50:150, 100:220].mean() > 0.9
    assert mask.mask[:40].mean() < 0.01


@pytest.mark.parametrize(
    "ink", [(40, 140, 70), (40, 70, 170), (25, 25, 30), (205, 35, 45), (30, 120, 150)], ids=["green", "blue", "black", "red", "teal"]
)
def test_pen_marks_are_not_tissue(ink):
    canvas = _canvas((245, 245, 245))
    canvas[50:150, 100:220] = _real_tissue((120, 100))
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    draw.line([(10, 20), (90, 180)], fill=ink, width=6)  # on glass
    draw.line([(240, 30), (290, 190)], fill=ink, width=3)  # a thin stroke
    mask = detect_tissue(np.asarray(image), MPP)
    stroke = np.asarray(pen_mask(np.asarray(image)))
    assert stroke[:, :95].sum() > 200, "the ink stroke should be recognised as pen"
    assert mask.mask[:, :95].sum() == 0
    assert mask.mask[:, 232:].sum() == 0
    assert mask.mask[50:150, 100:220].mean() > 0.9


def test_translucent_ink_on_glass_is_not_tissue():
    canvas = _canvas((245, 245, 245)).astype(float)
    ink = np.array((30, 140, 80), float)
    canvas[20:180, 20:40] = 0.5 * canvas[20:180, 20:40] + 0.5 * ink
    mask = detect_tissue(canvas.astype(np.uint8), MPP)
    assert mask.mask.sum() == 0


def test_pen_does_not_swallow_real_h_and_e_or_ihc():
    for name in ("images/he-tumour-1000px.png", "images/he-500x300.jpg", "images/ihc-colon-512px.png"):
        image = np.asarray(Image.open(shared_file(name)).convert("RGB"))
        assert pen_mask(image).mean() < 0.02, name


def test_small_debris_is_dropped_and_holes_filled():
    canvas = _canvas((245, 245, 245))
    canvas[50:150, 100:220] = _real_tissue((120, 100))
    canvas[90:110, 150:170] = 245  # a hole (e.g. a lumen) inside the tissue
    canvas[10:13, 10:13] = (120, 60, 110)  # 3x3 px speck = 576 µm² of debris
    mask = detect_tissue(canvas, MPP, TissueParams(min_tissue_area_um2=5_000))
    assert not mask.mask[5:20, 5:20].any()
    assert mask.mask[90:110, 150:170].all()
    keep_all = detect_tissue(canvas, MPP, TissueParams(min_tissue_area_um2=0, fill_holes=False))
    assert keep_all.mask[10:13, 10:13].any()
    assert not keep_all.mask[95:105, 155:165].any()


def test_blank_and_empty_images():
    assert detect_tissue(_canvas((245, 245, 245)), MPP).mask.sum() == 0
    assert detect_tissue(np.full((50, 50, 3), 255, np.uint8), MPP).fraction == 0
    assert detect_tissue(np.zeros((0, 5, 3), np.uint8), MPP).mask.shape == (0, 5)
    with pytest.raises(ValueError):
        detect_tissue(np.zeros((5, 5), np.uint8), MPP)


def test_params_are_validated():
    with pytest.raises(ConfigError):
        TissueParams(mask_mpp=0)
    with pytest.raises(ConfigError):
        TissueParams(min_tissue_area_um2=-1)
