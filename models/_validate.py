"""Validate a model on labelled data; the metrics and a report for the lab's records."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import classify_tiles

from ._loading import LoadedModel
from ._manifest import Validation, now_iso
from ._metrics import classification_metrics
from ._report import write_validation_report

__all__ = ["validate_arrays", "dataset_digest"]


def dataset_digest(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


def validate_arrays(
    model: LoadedModel,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    dataset: str,
    out_dir: Path,
    batch_size: int = 64,
) -> tuple[dict[str, Any], Validation, dict[str, Path]]:
    """Classify, compute metrics, write the report; return metrics, a Validation and paths."""
    probabilities = classify_tiles(model, images, batch_size=batch_size)
    metrics = classification_metrics(labels, probabilities, model.class_names)
    validation = Validation(
        date=now_iso(),
        dataset=dataset,
        dataset_digest=dataset_digest(images, labels),
        metrics={k: metrics[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "ece")},
    )
    paths = write_validation_report(
        metrics,
        out_dir,
        title=f"{model.manifest.ref}: validation",
        context={"model": model.manifest.ref, "weights_sha256": model.manifest.weights_sha256, "dataset": dataset,
                 "dataset_digest": validation.dataset_digest, "date": validation.date},
    )
    return metrics, validation, paths
