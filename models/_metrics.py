"""Classification metrics from labels and probabilities: pure numpy."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

__all__ = ["classification_metrics", "expected_calibration_error", "confusion_matrix"]


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """(true class, predicted class) counts."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def expected_calibration_error(truth: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class confidence over ``bins`` equal-width bins."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == truth
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def _reliability(truth: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == truth
    edges = np.linspace(0, 1, bins + 1)
    rows = []
    for lo, hi in itertools.pairwise(edges):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            rows.append(
                {"lo": float(lo), "hi": float(hi), "count": int(inside.sum()),
                 "confidence": float(confidence[inside].mean()), "accuracy": float(correct[inside].mean())}
            )
    return rows


def classification_metrics(
    truth: np.ndarray, probabilities: np.ndarray, class_names: tuple[str, ...] | list[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class precision/recall/F1, confusion matrix, ECE."""
    truth = np.asarray(truth, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n = len(class_names)
    if probabilities.shape != (len(truth), n):
        raise ValueError(f"probabilities must be ({len(truth)}, {n}), got {probabilities.shape}")
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(truth, predicted, n)
    per_class = {}
    recalls = []
    for i, name in enumerate(class_names):
        tp = matrix[i, i]
        support = matrix[i].sum()
        predicted_count = matrix[:, i].sum()
        precision = tp / predicted_count if predicted_count else 0.0
        recall = tp / support if support else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if support and (precision + recall) else 0.0
        if support:
            recalls.append(recall)
        per_class[name] = {
            "precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(support)
        }
    return {
        "n": len(truth),
        "accuracy": float((predicted == truth).mean()) if len(truth) else float("nan"),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values() if c["support"]])) if recalls else float("nan"),
        "ece": expected_calibration_error(truth, probabilities),
        "per_class": per_class,
        "classes": list(class_names),
        "confusion_matrix": matrix.tolist(),
        "reliability": _reliability(truth, probabilities),
    }
