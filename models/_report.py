"""Validation reports: JSON (machine), PNG (figures) and HTML (for the lab's records)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_validation_report"]


def _figure(metrics: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = metrics["classes"]
    matrix = np.array(metrics["confusion_matrix"], dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    left.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    left.set_xticks(range(len(classes)), classes, rotation=30)
    left.set_yticks(range(len(classes)), classes)
    left.set_xlabel("predicted")
    left.set_ylabel("true")
    left.set_title("confusion matrix (row-normalised)")
    for i in range(len(classes)):
        for j in range(len(classes)):
            left.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center",
                      color="white" if normalised[i, j] > 0.5 else "black")
    bins = metrics["reliability"]
    right.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    before = metrics.get("reliability_uncalibrated")
    if before:
        right.plot([b["confidence"] for b in before], [b["accuracy"] for b in before], marker="x", color="#999999",
                   label=f"before temperature scaling (ECE {metrics.get('ece_uncalibrated', float('nan')):.3f})")
    if bins:
        right.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label="model")
        right.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["count"] / metrics["n"] for b in bins],
                  width=0.09, color="#1f77b4", alpha=0.15, label="share of tiles")
    right.set_xlim(0, 1)
    right.set_ylim(0, 1)
    right.set_xlabel("confidence")
    right.set_ylabel("accuracy")
    right.set_title(f"reliability (ECE {metrics['ece']:.3f})")
    right.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _tables_html(tables: dict[str, list[dict[str, Any]]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))

    parts = []
    for name, rows in tables.items():
        if not rows:
            continue
        head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
        parts.append(f"<h2>{html.escape(name)}</h2><table><tr>{head}</tr>{body}</table>")
    return "\n".join(parts)


def _html(metrics: dict[str, Any], title: str, context: dict[str, Any], figure_name: str) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{c['precision']:.3f}</td><td>{c['recall']:.3f}</td>"
        f"<td>{c['f1']:.3f}</td><td>{c['support']}</td></tr>"
        for name, c in metrics["per_class"].items()
    )
    facts = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in context.items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}</style></head><body>
<h1>{html.escape(title)}</h1>
<table>{facts}
<tr><th>patches</th><td>{metrics['n']}</td></tr>
<tr><th>accuracy</th><td>{metrics['accuracy']:.3f}</td></tr>
<tr><th>balanced accuracy</th><td>{metrics['balanced_accuracy']:.3f}</td></tr>
<tr><th>macro F1</th><td>{metrics['macro_f1']:.3f}</td></tr>
<tr><th>ECE</th><td>{metrics['ece']:.3f}</td></tr></table>
<h2>Per class</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{rows}</table>
<h2>Confusion matrix and calibration</h2><img src="{figure_name}" alt="confusion matrix and reliability diagram">
{{tables}}
</body></html>
"""


def write_validation_report(
    metrics: dict[str, Any],
    out_dir: Path,
    *,
    title: str,
    context: dict[str, Any],
    tables: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Path]:
    """Write ``validation.json``, ``validation.png`` and ``validation.html`` into ``out_dir``;
    ``tables`` (name -> rows) are extra results (per source, failure modes) shown in both."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "validation.json",
        "png": out_dir / "validation.png",
        "html": out_dir / "validation.html",
    }
    document = {**context, "metrics": metrics, **({"tables": tables} if tables else {})}
    paths["json"].write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    _figure(metrics, title, paths["png"])
    page = _html(metrics, title, context, paths["png"].name).replace("{tables}", _tables_html(tables or {}))
    paths["html"].write_text(page, encoding="utf-8")
    return paths
