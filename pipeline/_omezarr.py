"""OME-Zarr 0.5 (Zarr v3) images: the per-class heatmap and the tissue mask.

Coordinates are micrometres. NGFF puts array index i at ``i * scale + translation`` and
that point is the pixel's centre (the convention napari follows too), so a heatmap cell's
translation is its tile's centre and a mask pixel's is half a mask pixel. Every array
carries ``dimension_names`` equal to the axes' names, which NGFF 0.5 requires.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "HeatmapGeometry",
    "create_heatmap",
    "write_heatmap_block",
    "read_heatmap_level0",
    "finalize_heatmap",
    "write_mask_image",
    "multiscale_metadata",
]

_MIN_LEVEL_CELLS = 32
_HEATMAP_AXES = ("c", "y", "x")
_MASK_AXES = ("y", "x")


@dataclass(frozen=True)
class HeatmapGeometry:
    """Cell (0, 0)'s centre and the cell spacing, in µm, at level 0 of the heatmap."""

    spacing_um: float
    """stride_px x target_mpp."""
    origin_um: float
    """tile_size_px x target_mpp / 2: the centre of the first tile."""


def _open_group(path: Path, mode: Literal["r", "r+", "w"]) -> Any:
    import zarr

    return zarr.open_group(str(path), mode=mode, zarr_format=3)


def create_heatmap(path: Path, n_classes: int, n_rows: int, n_cols: int, chunk_cells: int) -> None:
    """An empty level-0 heatmap array ``0`` of shape (classes, rows, cols), zeros."""
    group = _open_group(path, "w")
    group.create_array(
        "0",
        shape=(n_classes, max(n_rows, 1), max(n_cols, 1)),
        chunks=(n_classes, chunk_cells, chunk_cells),
        dtype="float32",
        fill_value=0.0,
        dimension_names=_HEATMAP_AXES,
    )


def write_heatmap_block(
    path: Path,
    row_range: tuple[int, int],
    col_range: tuple[int, int],
    rows: Sequence[int],
    cols: Sequence[int],
    probabilities: np.ndarray,
) -> None:
    """Write one chunk's block: its tiles' probabilities, zero elsewhere in the block."""
    import zarr

    array = zarr.open_array(str(path / "0"), mode="r+")
    r0, r1 = row_range
    c0, c1 = col_range
    block = np.zeros((array.shape[0], r1 - r0, c1 - c0), dtype=np.float32)
    block[:, np.asarray(rows) - r0, np.asarray(cols) - c0] = probabilities.T
    array[:, r0:r1, c0:c1] = block


def read_heatmap_level0(path: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(str(path / "0"), mode="r")[...])


def _downsample_mean(array: np.ndarray) -> np.ndarray:
    """2x2 mean over the last two axes; partial edge blocks average what they have."""
    c, h, w = array.shape
    padded = np.full((c, h + h % 2, w + w % 2), np.nan, dtype=np.float64)
    padded[:, :h, :w] = array
    blocks = padded.reshape(c, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2)
    return np.nanmean(blocks, axis=(2, 4)).astype(np.float32)


def _downsample_max(array: np.ndarray) -> np.ndarray:
    h, w = array.shape
    padded = np.zeros((h + h % 2, w + w % 2), dtype=array.dtype)
    padded[:h, :w] = array
    return padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).max(axis=(1, 3))


def multiscale_metadata(
    name: str, axes: Sequence[str], n_levels: int, spacing_um: float, origin_um: float,
    downsampling: str | None = None,
) -> dict[str, Any]:
    """The NGFF ``multiscales`` entry; level k has spacing x 2**k, centred on its block.

    ``downsampling`` (NGFF's optional ``type``) names how the coarser levels were made.
    """
    axis_meta = [
        {"name": a, "type": "channel"} if a == "c" else {"name": a, "type": "space", "unit": "micrometer"}
        for a in axes
    ]
    datasets = []
    for k in range(n_levels):
        factor = 2**k
        scale = spacing_um * factor
        translation = origin_um + (factor - 1) / 2 * spacing_um
        space = len([a for a in axes if a != "c"])
        prefix = [1.0] if "c" in axes else []
        prefix_t = [0.0] if "c" in axes else []
        datasets.append({
            "path": str(k),
            "coordinateTransformations": [
                {"type": "scale", "scale": prefix + [scale] * space},
                {"type": "translation", "translation": prefix_t + [translation] * space},
            ],
        })
    entry: dict[str, Any] = {"name": name, "axes": axis_meta, "datasets": datasets}
    if downsampling is not None:
        entry["type"] = downsampling
    return entry


def finalize_heatmap(
    path: Path,
    class_names: Sequence[str],
    class_colors: Sequence[str],
    geometry: HeatmapGeometry,
    extra: dict[str, Any],
) -> int:
    """Build the pyramid from level 0 and write the OME metadata; the number of levels."""
    group = _open_group(path, "r+")
    level = read_heatmap_level0(path)
    chunks = group["0"].chunks
    n_levels = 1
    while max(level.shape[1:]) > _MIN_LEVEL_CELLS:
        level = _downsample_mean(level)
        cell = min(chunks[1], max(level.shape[1:]))
        group.create_array(
            str(n_levels), shape=level.shape, chunks=(level.shape[0], cell, cell), dtype="float32",
            fill_value=0.0, overwrite=True, dimension_names=_HEATMAP_AXES,
        )[...] = level
        n_levels += 1
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            multiscale_metadata("heatmap", _HEATMAP_AXES, n_levels, geometry.spacing_um, geometry.origin_um,
                                "mean")
        ],
        "omero": {
            "channels": [
                {"label": n, "color": c.lstrip("#").upper(), "active": True,
                 "window": {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0}}
                for n, c in zip(class_names, class_colors, strict=False)
            ],
            "rdefs": {"model": "color"},
        },
    }
    group.attrs["wsiflow"] = {
        "classes": [{"name": n, "color": c} for n, c in zip(class_names, class_colors, strict=False)],
        "values": "class probability per tile, 0-1",
        **extra,
    }
    return n_levels


def write_mask_image(path: Path, mask: np.ndarray, mpp_um: float) -> int:
    """The tissue mask as an OME-Zarr uint8 image (1 = tissue) with a max-pooled pyramid."""
    group = _open_group(path, "w")
    level = mask.astype(np.uint8)
    n_levels = 0
    while True:
        cell = min(512, max(level.shape))
        array = group.create_array(str(n_levels), shape=level.shape, chunks=(cell, cell), dtype="uint8",
                                   fill_value=0, dimension_names=_MASK_AXES)
        array[...] = level
        n_levels += 1
        if max(level.shape) <= 256:
            break
        level = _downsample_max(level)
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [multiscale_metadata("tissue", _MASK_AXES, n_levels, mpp_um, mpp_um / 2, "max")],
    }
    group.attrs["wsiflow"] = {"values": "1 = tissue, 0 = glass/excluded (pen, debris)"}
    return n_levels
