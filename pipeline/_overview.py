"""``overview.png``: the slide in grey with one class's probability heatmap and a colour bar.

The slide is drawn in grey and the heatmap in the upper three quarters of viridis (blue ->
teal -> green -> yellow, perceptually uniform, readable with colour-vision deficiencies), so no
pixel of the picture has the pink or purple of H&E stain: a colour on it is always the model's
output, never the tissue's. Cells are nearly transparent at probability 0 and more opaque the
more probable the class; the colour bar shows the same colours and opacities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OverviewChoice", "choose_overview_class", "write_overview", "OVERVIEW_NOTE_COLOR"]

_VIRIDIS_FROM = 0.25
"""Where the map starts in viridis: its lower quarter is purple."""
_ALPHA = (0.12, 0.9)
"""Opacity of an analysed cell at probability 0 and 1."""
OVERVIEW_NOTE_COLOR = "#dceeff"
"""Face colour of the box that states why there is no heatmap (tests find it by its pixels)."""
_USUAL_CLASSES = ("background", "tissue")
"""Names of the expected, uninformative classes of a QC model."""


@dataclass(frozen=True)
class OverviewChoice:
    """Which class overview.png shows, and why (recorded in summary.json)."""

    class_name: str
    reason: str


def choose_overview_class(
    class_names: Sequence[str], probabilities: np.ndarray, requested: str | None
) -> OverviewChoice:
    """``requested`` when the model has it; else the most informative class.

    That is, of the classes other than the first (background by convention) and those named
    background or tissue, the one with the highest mean probability over the slide's tiles:
    for a QC model the worst artefact. A model with no such class shows its second class.
    """
    names = tuple(class_names)
    if requested is not None and requested in names:
        return OverviewChoice(requested, "requested (overview_class)")
    candidates = [i for i in range(1, len(names)) if names[i].lower() not in _USUAL_CLASSES]
    if candidates:
        means = probabilities.mean(axis=0) if len(probabilities) else np.zeros(len(names))
        best = max(candidates, key=lambda i: (float(means[i]), -i))  # ties: the earlier class
        reason = f"default: highest mean probability among {', '.join(names[i] for i in candidates)}"
    else:
        best = min(1, len(names) - 1)
        reason = "default: the second class (no class other than background and tissue)"
    if requested is not None:
        reason = f"{requested!r} is not a class of this model; {reason}"
    return OverviewChoice(names[best], reason)


def _colormap() -> Any:
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    t = np.linspace(0.0, 1.0, 256)
    colors = colormaps["viridis"](_VIRIDIS_FROM + (1 - _VIRIDIS_FROM) * t)
    colors[:, 3] = _ALPHA[0] + (_ALPHA[1] - _ALPHA[0]) * t
    return ListedColormap(colors, name="wsiflow-probability")


def _grey(thumbnail: np.ndarray) -> np.ndarray:
    rgb = thumbnail[..., :3].astype(np.float32)
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def write_overview(
    thumbnail: np.ndarray,
    thumbnail_mpp: float,
    heatmap: np.ndarray,
    kept: np.ndarray,
    spacing_um: float,
    origin_um: float,
    class_name: str,
    title: str,
    path: Path,
    note: str | None = None,
) -> None:
    """Overlay ``heatmap`` (rows, cols of probabilities; ``kept`` marks the analysed cells) on
    ``thumbnail`` in µm coordinates. ``note`` replaces the heatmap (e.g. 0 tiles) with a notice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    h_um, w_um = thumbnail.shape[0] * thumbnail_mpp, thumbnail.shape[1] * thumbnail_mpp
    aspect = h_um / max(w_um, 1e-9)
    fig_w = 8.0
    fig_h = max(3.0, min(12.0, fig_w * aspect * 0.9))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    # Fixed margins (inches) for the axis labels, the two-line title and the colour bar's
    # label, instead of tight_layout(), which draws the whole figure once more to measure it
    # (a quarter of the overview's time).
    fig.subplots_adjust(left=0.85 / fig_w, right=1 - 0.75 / fig_w, bottom=0.6 / fig_h, top=1 - 0.6 / fig_h)
    ax.imshow(_grey(thumbnail), cmap="gray", vmin=0, vmax=255, extent=(0, w_um, h_um, 0))
    cmap = _colormap()
    if note is None:
        rows, cols = heatmap.shape
        overlay = cmap(np.clip(heatmap, 0.0, 1.0))
        overlay[~kept, 3] = 0.0
        # Cell centres at origin + i * spacing: the cell edges are half a spacing either side.
        left, top = origin_um - spacing_um / 2, origin_um - spacing_um / 2
        ax.imshow(overlay, interpolation="nearest",
                  extent=(left, left + cols * spacing_um, top + rows * spacing_um, top))
    else:
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=14, wrap=True,
                bbox={"boxstyle": "round,pad=0.8", "facecolor": OVERVIEW_NOTE_COLOR, "edgecolor": "black"})
    ax.set_xlim(0, w_um)
    ax.set_ylim(h_um, 0)
    ax.set_xlabel("µm")
    ax.set_ylabel("µm")
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(f"P({class_name})")
    # zlib level 1: lossless either way, and a greyscale photo of tissue barely compresses
    # better at the default level 6, which took a third of the overview's time.
    fig.savefig(path, dpi=110, metadata={"Title": title, "Description": note or f"P({class_name})"},
                pil_kwargs={"compress_level": 1})
    plt.close(fig)
