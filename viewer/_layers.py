"""Layer data for napari from a slide and a wsiflow result. No napari import needed.

Everything is placed in micrometres. napari, like OME-NGFF, puts a pixel's *centre* at
``index * scale + translate``: slide pixel (0, 0) spans [0, mpp) µm, so its centre, and
the translate, is mpp / 2; a heatmap cell's centre is its tile's centre, as the NGFF
metadata already says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline import MppPolicy, ResultFolder, Slide, lookup_slide_location, open_slide

__all__ = ["slide_layer", "result_layers", "LayerData", "open_result_slide", "UNITS", "heatmap_colormap"]

LayerData = tuple[Any, dict[str, Any], str]
UNITS = ("um", "um")
"""Every wsiflow layer is in micrometres: napari's scale bar and cursor read µm only when all
layers say so (a layer without units makes napari fall back to "pixel" for all)."""
_CHUNK_PX = 1024


def _pyramid(levels: list[Any]) -> tuple[Any, bool]:
    """napari wants a plain array, not a one-level list, when there is no pyramid."""
    return (levels, True) if len(levels) > 1 else (levels[0], False)


def _lazy_level(slide: Slide, level: int) -> Any:
    """A dask array (rows, cols, 3) of one pyramid level, read a chunk at a time on demand."""
    import dask.array as da

    width, height = slide.info.level_dimensions[level]
    downsample = slide.info.level_downsamples[level]

    def read(block: np.ndarray, block_info: dict[Any, Any] | None = None) -> np.ndarray:
        if block_info is None:  # dask probing for the output type: nothing to read
            return np.zeros((0, 0, 0), dtype=np.uint8)
        (r0, r1), (c0, c1), _ = block_info[None]["array-location"]
        return slide.read_region(round(c0 * downsample), round(r0 * downsample), level, c1 - c0, r1 - r0)

    template = da.zeros((height, width, 3), dtype=np.uint8, chunks=(_CHUNK_PX, _CHUNK_PX, 3))
    return template.map_blocks(read, dtype=np.uint8)


def slide_layer(slide: Slide, name: str = "slide") -> LayerData:
    """The slide as a lazy multiscale RGB image in µm (level 0 is never loaded whole)."""
    data, multiscale = _pyramid([_lazy_level(slide, k) for k in range(len(slide.info.level_dimensions))])
    sy, sx = slide.mpp.mpp_y, slide.mpp.mpp_x
    return (
        data,
        {
            "name": name,
            "rgb": True,
            "multiscale": multiscale,
            "scale": (sy, sx),
            "translate": (sy / 2, sx / 2),
            "units": UNITS,
            "metadata": {"wsiflow": {"kind": "slide", "mpp": [sx, sy], "backend": slide.info.backend}},
        },
        "image",
    )


def _transform(dataset: dict[str, Any]) -> tuple[list[float], list[float]]:
    scale = next(t["scale"] for t in dataset["coordinateTransformations"] if t["type"] == "scale")
    translation = next(
        (t["translation"] for t in dataset["coordinateTransformations"] if t["type"] == "translation"),
        [0.0] * len(scale),
    )
    return scale, translation


def heatmap_colormap(name: str, color: str) -> dict[str, Any]:
    """The class colour, see-through at 0 and opaque at 1; light at low and dark at high
    probabilities, so a faint class still shows (any P >= 0.05 is at least half opaque) and
    a pale class colour still reads over white glass."""
    rgb = np.array([int(color.lstrip("#")[i : i + 2], 16) / 255 for i in (0, 2, 4)])
    light, dark = 1 - 0.7 * (1 - rgb), 0.7 * rgb
    return {
        "name": f"wsiflow-{name}",
        "colors": [[*light, 0.0], [*light, 0.5], [*rgb, 0.8], [*dark, 1.0]],
        "controls": [0.0, 0.05, 0.5, 1.0],
    }


def _default_class(folder: ResultFolder, names: list[str]) -> str:
    """The class overview.png shows (``summary.json``'s ``overview.class``), else the second."""
    overview = folder.read_summary().data.get("overview")
    chosen = overview.get("class") if isinstance(overview, dict) else None
    return chosen if chosen in names else names[min(1, len(names) - 1)]


def result_layers(result_dir: Path, visible_class: str | None = None) -> list[LayerData]:
    """One heatmap layer per class (``visible_class``, by default the one overview.png shows,
    visible) and the tissue mask, from a result folder."""
    import dask.array as da
    import zarr

    folder = ResultFolder(result_dir)
    heatmap = zarr.open_group(str(folder.heatmap), mode="r")
    heatmap_attrs: dict[str, Any] = heatmap.attrs.asdict()  # the JSON pipeline._omezarr wrote
    multiscale = heatmap_attrs["ome"]["multiscales"][0]
    classes = heatmap_attrs["wsiflow"]["classes"]
    scale, translation = _transform(multiscale["datasets"][0])
    levels = [da.from_zarr(heatmap[d["path"]]) for d in multiscale["datasets"]]
    visible = visible_class or _default_class(folder, [c["name"] for c in classes])
    layers: list[LayerData] = []
    for index, cls in enumerate(classes):
        data, multiscale = _pyramid([level[index] for level in levels])
        layers.append((
            data,
            {
                "name": f"P({cls['name']})",
                "multiscale": multiscale,
                "scale": tuple(scale[1:]),
                "translate": tuple(translation[1:]),
                "contrast_limits": (0.0, 1.0),
                "colormap": heatmap_colormap(cls["name"], cls["color"]),
                "units": UNITS,
                "opacity": 0.6,
                "blending": "translucent",
                "visible": cls["name"] == visible,
                "metadata": {"wsiflow": {"kind": "heatmap", "class": cls["name"], "color": cls["color"],
                                         "result_dir": str(result_dir)}},
            },
            "image",
        ))
    tissue = zarr.open_group(str(folder.tissue), mode="r")
    tissue_attrs: dict[str, Any] = tissue.attrs.asdict()
    tissue_ms = tissue_attrs["ome"]["multiscales"][0]
    t_scale, t_translation = _transform(tissue_ms["datasets"][0])
    data, multiscale = _pyramid([da.from_zarr(tissue[d["path"]]) for d in tissue_ms["datasets"]])
    layers.append((
        data,
        {"name": "tissue", "multiscale": multiscale, "scale": tuple(t_scale), "translate": tuple(t_translation),
         "units": UNITS, "opacity": 0.3, "visible": False, "metadata": {"wsiflow": {"kind": "tissue"}}},
        "labels",
    ))
    return layers


def open_result_slide(result_dir: Path) -> Slide | None:
    """The slide a result was computed from, via the site's private index (None if unknown)."""
    folder = ResultFolder(result_dir)
    location = lookup_slide_location(folder.read_manifest().slide_id)
    if location is None:
        return None
    summary = folder.read_summary()
    # The same µm/px the analysis used (overrides included), so layers line up.
    return open_slide(location, backend=summary.backend,
                      mpp_policy=MppPolicy.fixed(summary.mpp.mpp_x, summary.mpp.mpp_y))
