"""The bundled tissue-qc model: verified, small, fast enough, and as good as its card says."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from models import BUNDLED_ROOT, Registry, classification_metrics
from models import train_tissue_qc as recipe
from models._qc_data import QC_CLASSES
from pipeline import classify_tiles
from tests.conftest import DATA_DIR, shared_file

VERSION_DIR = BUNDLED_ROOT / "tissue-qc" / str(recipe.VERSION)


@pytest.fixture(scope="module")
def registry():
    return Registry(site_root=BUNDLED_ROOT.parent / "_no_site_")


@pytest.fixture(scope="module")
def bundled(registry):
    return registry.load("tissue-qc")


def test_bundled_model_is_verified_small_and_documented(bundled):
    manifest = bundled.manifest
    assert manifest.ref == f"tissue-qc@{recipe.VERSION}"
    assert manifest.class_names == ("background", "tissue", "pen", "blur")
    assert (manifest.tile_size_px, manifest.target_mpp) == (224, 1.0)
    assert (VERSION_DIR / manifest.weights_file).stat().st_size < 10 * 1024 * 1024
    for name in ("MODEL_CARD.md", "validation/validation.json", "validation/validation.html",
                 "validation/validation.png"):
        assert (VERSION_DIR / name).exists(), name
    assert manifest.validation is not None and manifest.lineage.training_data_digest
    # The training slides are in the lineage, so a validation on them can be recognised.
    assert len(manifest.lineage.slide_digests) == len(recipe.TRAIN_SOURCES)


def test_previous_version_stays_bundled_for_rollback(registry):
    previous = registry.load("tissue-qc@1")
    assert previous.manifest.ref == "tissue-qc@1"


def test_model_card_states_the_recorded_external_score(bundled):
    card = (VERSION_DIR / "MODEL_CARD.md").read_text()
    metrics = bundled.manifest.validation.metrics
    assert f"| accuracy | {metrics['accuracy']:.3f} |" in card
    assert f"| balanced accuracy | {metrics['balanced_accuracy']:.3f} |" in card
    assert f"| ECE | {metrics['ece']:.3f} |" in card
    assert "kept apart by source" in card and "Acceptance thresholds" in card
    assert metrics["balanced_accuracy"] >= 0.85
    assert metrics["ece"] <= recipe.ACCEPTANCE["ece"]
    report = json.loads((VERSION_DIR / "validation" / "validation.json").read_text())
    assert report["metrics"]["temperature"] > 0 and report["metrics"]["reliability"]


def test_external_sources_were_never_used_in_training():
    train = {s.relative_path for s in recipe.TRAIN_SOURCES}
    assert train.isdisjoint(s.relative_path for s in recipe.EXTERNAL_SOURCES)
    assert train.isdisjoint(s.relative_path for s in recipe.SHIFT_SOURCES)


@pytest.mark.slow
def test_external_score_reproduces(bundled):
    """Regenerate the external set (other sources, fixed seed) and re-score."""
    for spec in recipe.EXTERNAL_SOURCES:
        shared_file(spec.relative_path)
    images, labels, _ = recipe.external_set(DATA_DIR)
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


@pytest.mark.slow
def test_demo_slide_has_no_pen_tiles_with_default_settings(wsiflow_cli, cmu_svs, tmp_path):
    """The first thing a user sees: `wsiflow run` on the demo slide must not flag dense H&E as pen."""
    import pyarrow.parquet as pq

    completed = subprocess.run(
        [*wsiflow_cli, "run", str(cmu_svs), "--out", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    (row,) = json.loads(completed.stdout)["slides"]
    assert row["model"] == f"tissue-qc@{recipe.VERSION}"
    (tiles,) = tmp_path.glob("*/tissue-qc/latest/tiles.parquet")
    predicted = pq.read_table(tiles).column("predicted_class").to_pylist()
    assert predicted and "pen" not in predicted, {c: predicted.count(c) for c in set(predicted)}
    summary = json.loads(tiles.with_name("summary.json").read_text())
    assert summary["classes"]["pen"]["tiles"] == 0
