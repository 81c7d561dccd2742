"""The bundled tissue-qc model: verified, small, fast enough, and as good as its card says."""

from __future__ import annotations

import numpy as np
import pytest

from models import BUNDLED_ROOT, Registry, classification_metrics
from models._qc_data import QC_CLASSES, load_source, make_qc_patches
from models import train_tissue_qc as recipe
from pipeline import classify_tiles
from tests.conftest import DATA_DIR, shared_file


@pytest.fixture(scope="module")
def bundled():
    return Registry(site_root=BUNDLED_ROOT.parent / "_no_site_").load("tissue-qc")


def test_bundled_model_is_verified_small_and_documented(bundled):
    manifest = bundled.manifest
    assert manifest.ref == "tissue-qc@1"
    assert manifest.class_names == ("background", "tissue", "pen", "blur")
    assert (manifest.tile_size_px, manifest.target_mpp) == (224, 1.0)
    directory = BUNDLED_ROOT / "tissue-qc" / "1"
    assert (directory / manifest.weights_file).stat().st_size < 10 * 1024 * 1024
    for name in ("MODEL_CARD.md", "validation/validation.json", "validation/validation.html", "validation/validation.png"):
        assert (directory / name).exists(), name
    assert manifest.validation is not None and manifest.lineage.training_data_digest


def test_model_card_states_the_recorded_held_out_score(bundled):
    card = (BUNDLED_ROOT / "tissue-qc" / "1" / "MODEL_CARD.md").read_text()
    metrics = bundled.manifest.validation.metrics
    assert f"| accuracy | {metrics['accuracy']:.3f} |" in card
    assert f"| balanced accuracy | {metrics['balanced_accuracy']:.3f} |" in card
    assert metrics["balanced_accuracy"] >= 0.85


@pytest.mark.slow
def test_held_out_score_reproduces(bundled):
    """Regenerate the held-out set (another source image, fixed seed) and re-score."""
    shared_file(recipe.HELD_OUT_SOURCES[0].relative_path)
    sources = [load_source(DATA_DIR, spec, recipe.TARGET_MPP) for spec in recipe.HELD_OUT_SOURCES]
    images, labels = make_qc_patches(sources, recipe.HELD_OUT_PER_CLASS, recipe.TILE_PX, recipe.SEED + 1)
    metrics = classification_metrics(labels, classify_tiles(bundled, images), QC_CLASSES)
    recorded = bundled.manifest.validation.metrics
    assert metrics["accuracy"] == pytest.approx(recorded["accuracy"], abs=0.01)
    assert metrics["balanced_accuracy"] == pytest.approx(recorded["balanced_accuracy"], abs=0.01)


def test_real_tissue_tiles_of_the_sample_slide_are_tissue(bundled, cmu_svs):
    from pipeline import open_slide

    with open_slide(cmu_svs) as slide:
        tissue = slide.read_region_at_mpp(800, 1800, 224, 224, 1.0)
        glass = slide.read_region_at_mpp(0, 0, 224, 224, 1.0)
    probabilities = classify_tiles(bundled, np.stack([tissue, glass]))
    assert [QC_CLASSES[i] for i in probabilities.argmax(1)] == ["tissue", "background"]
