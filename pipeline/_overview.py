"""``overview.png``: the slide thumbnail with one class's heatmap and a legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_overview"]


def write_overview(
    thumbnail: np.ndarray,
    thumbnail_mpp: float,
    heatmap: np.ndarray,
    spacing_um: float,
    origin_um: float,
    class_name: str,
    title: str,
    path: Path,
) -> None:
    """Overlay ``heatmap`` (rows, cols of probabilities) on ``thumbnail`` in µm coordinates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h_um, w_um = thumbnail.shape[0] * thumbnail_mpp, thumbnail.shape[1] * thumbnail_mpp
    aspect = h_um / max(w_um, 1e-9)
    fig_w = 8.0
    fig, ax = plt.subplots(figsize=(fig_w, max(3.0, min(12.0, fig_w * aspect * 0.9))))
    ax.imshow(thumbnail, extent=(0, w_um, h_um, 0))
    rows, cols = heatmap.shape
    # Cell centres at origin + i * spacing: the cell edges are half a spacing either side.
    left, top = origin_um - spacing_um / 2, origin_um - spacing_um / 2
    masked = np.ma.masked_less_equal(heatmap, 0.0)
    image = ax.imshow(
        masked, cmap="inferno", vmin=0, vmax=1, alpha=0.55, interpolation="nearest",
        extent=(left, left + cols * spacing_um, top + rows * spacing_um, top),
    )
    ax.set_xlim(0, w_um)
    ax.set_ylim(h_um, 0)
    ax.set_xlabel("µm")
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(f"P({class_name})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
