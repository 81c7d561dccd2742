"""Training augmentations and calibration for the QC model: physically sized, reproducible, exact."""

from __future__ import annotations

import numpy as np
import pytest

from models._artefacts import INK_COLOURS, add_fold, add_ink, defocus, disc_psf
from models._metrics import apply_temperature, expected_calibration_error, fit_temperature


def _tissue_like(seed: int = 0, size: int = 224) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([200, 120, 180], float) + rng.normal(0, 30, (size, size, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def test_disc_psf_is_normalised_and_sized_in_pixels():
    psf = disc_psf(4.0, 0.0)
    assert psf.sum() == pytest.approx(1.0)
    centre = psf.shape[0] // 2
    row = psf[centre]
    assert (row > 0).sum() == pytest.approx(9, abs=1)  # diameter 2r + 1 px


def test_defocus_radius_is_in_micrometres():
    """The same defocus in µm spans more pixels (and removes more pixel detail) at a finer µm/px."""
    patch = _tissue_like()
    coarse = defocus(patch, np.random.default_rng(1), mpp=1.0, radius_um=(4.0, 4.0)).astype(float)
    fine = defocus(patch, np.random.default_rng(1), mpp=0.25, radius_um=(4.0, 4.0)).astype(float)
    # At 0.25 µm/px a 4 µm radius is 16 px: far smoother than 4 px at 1 µm/px.
    assert np.abs(np.diff(fine, axis=1)).mean() < np.abs(np.diff(coarse, axis=1)).mean()
    assert np.abs(np.diff(coarse, axis=1)).mean() < np.abs(np.diff(patch.astype(float), axis=1)).mean()


def test_ink_is_reproducible_covers_enough_and_darkens():
    patch = _tissue_like()
    a, coverage = add_ink(patch, np.random.default_rng(3))
    b, _ = add_ink(patch, np.random.default_rng(3))
    assert np.array_equal(a, b)
    assert coverage >= 0.12
    assert a.astype(float).mean() < patch.astype(float).mean()  # ink only absorbs light
    assert set(INK_COLOURS) == {"blue", "green", "black", "red"}


def test_fold_darkens_but_keeps_the_patch_shape():
    patch = _tissue_like()
    folded = add_fold(patch, np.random.default_rng(5))
    assert folded.shape == patch.shape and folded.dtype == np.uint8
    assert folded.astype(float).mean() < patch.astype(float).mean()


def test_hed_jitter_zero_is_identity_and_stays_in_range():
    torch = pytest.importorskip("torch")
    from models._train import hed_jitter

    batch = torch.rand(4, 3, 16, 16) * 0.9 + 0.05
    same = hed_jitter(batch, torch.Generator().manual_seed(0), 0.0)
    assert torch.allclose(same, batch, atol=1e-4)
    jittered = hed_jitter(batch, torch.Generator().manual_seed(0), 0.2)
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.allclose(jittered, batch)


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4000, 4))
    truth = np.array([rng.choice(4, p=p) for p in apply_temperature(np.exp(logits), 1.0)])
    overconfident = apply_temperature(np.exp(logits), 0.5)  # logits x 2
    temperature = fit_temperature(truth, overconfident)
    assert temperature == pytest.approx(2.0, rel=0.1)
    calibrated = apply_temperature(overconfident, temperature)
    assert expected_calibration_error(truth, calibrated) < expected_calibration_error(truth, overconfident)
