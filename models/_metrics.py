"""Classification metrics from labels and probabilities: pure numpy."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

__all__ = [
    "classification_metrics", "expected_calibration_error", "confusion_matrix", "fit_temperature", "apply_temperature",
]


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


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from softmax(logits): log-probabilities differ from the logits by a
    per-row constant, which the softmax removes."""
    logits = np.log(np.clip(np.asarray(probabilities, np.float64), 1e-12, 1)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(truth: np.ndarray, probabilities: np.ndarray, bounds: tuple[float, float] = (0.25, 8.0)) -> float:
    """The temperature T minimising the negative log-likelihood of ``apply_temperature``
    (Guo et al. 2017), by golden-section search on log T; deterministic."""
    truth = np.asarray(truth, np.int64)

    def nll(log_t: float) -> float:
        p = apply_temperature(probabilities, float(np.exp(log_t)))
        return float(-np.log(np.clip(p[np.arange(len(truth)), truth], 1e-12, 1)).mean())

    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(np.exp((lo + hi) / 2))
