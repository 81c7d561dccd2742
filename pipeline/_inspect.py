"""``inspect``: what a lab needs to know about a slide before analysing it.

The report has a stable JSON form (:meth:`SlideReport.to_json`). It holds geometry and
scanner facts only: no path, no file name, no label/macro image, no free-text field.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ._backend import BackendName, open_backend
from ._errors import WsiflowError
from ._grid import GridSpec, make_tile_grid
from ._identity import identify_slide
from ._mpp import MppPolicy, MppResolution
from ._slide import Slide, SlideInfo, backend_mpp, slide_info
from ._tissue import TissueParams, detect_tissue

__all__ = ["SlideReport", "inspect_slide"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideReport:
    """One slide's inspection. ``error`` is set (and most numbers None) when it failed."""

    slide_id: str | None
    info: SlideInfo | None = None
    mpp: MppResolution | None = None
    grid: GridSpec = field(default_factory=GridSpec)
    tissue_mpp: float | None = None
    tissue_area_mm2: float | None = None
    tissue_fraction: float | None = None
    grid_rows: int | None = None
    grid_cols: int | None = None
    tiles_kept: int | None = None
    error: WsiflowError | None = None

    def to_json(self) -> dict[str, object]:
        """The stable JSON contract (see README, "wsiflow inspect")."""
        info = self.info
        return {
            "slide_id": self.slide_id,
            "width": info.width if info else None,
            "height": info.height if info else None,
            "levels": len(info.level_dimensions) if info else None,
            "level_dimensions": [list(d) for d in info.level_dimensions] if info else None,
            "level_downsamples": list(info.level_downsamples) if info else None,
            "mpp_x": self.mpp.mpp_x if self.mpp else None,
            "mpp_y": self.mpp.mpp_y if self.mpp else None,
            "mpp_source": self.mpp.source if self.mpp else None,
            "mpp_override": self.mpp.override if self.mpp else None,
            "mpp_declined": self.mpp.declined if self.mpp else None,
            "metadata_mpp_x": info.metadata_mpp_x if info else None,
            "metadata_mpp_y": info.metadata_mpp_y if info else None,
            "objective_power": info.objective_power if info else None,
            "vendor": info.vendor if info else None,
            "backend": info.backend if info else None,
            "native_tile_size": list(info.native_tile_size) if info and info.native_tile_size else None,
            "tile_size_px": self.grid.tile_size_px,
            "target_mpp": self.grid.target_mpp,
            "stride_px": self.grid.effective_stride_px,
            "min_tissue_fraction": self.grid.min_tissue_fraction,
            "edge": self.grid.edge,
            "tissue_mpp": self.tissue_mpp,
            "tissue_area_mm2": self.tissue_area_mm2,
            "tissue_fraction": self.tissue_fraction,
            "grid_rows": self.grid_rows,
            "grid_cols": self.grid_cols,
            "tiles": self.tiles_kept,
            "error": (
                {"kind": self.error.kind, "message": self.error.message, "hint": self.error.hint}
                if self.error
                else None
            ),
        }


def inspect_slide(
    path: str | os.PathLike[str],
    *,
    secret: bytes,
    backend: BackendName = "auto",
    mpp_policy: MppPolicy | None = None,
    tissue: TissueParams | None = None,
    grid: GridSpec | None = None,
) -> SlideReport:
    """Inspect one slide. wsiflow errors are captured in the report, never raised."""
    grid = grid or GridSpec()
    tissue = tissue or TissueParams()
    sid: str | None = None
    info: SlideInfo | None = None
    try:
        opened = open_backend(path, backend)
        try:
            sid = identify_slide(path, secret).slide_id
            info = slide_info(opened)
            resolution = backend_mpp(opened, path, mpp_policy)
            slide = Slide(opened, resolution)
            thumbnail = slide.read_thumbnail(tissue.mask_mpp)
        except BaseException:
            opened.close()
            raise
        with slide:
            mask = detect_tissue(thumbnail, tissue.mask_mpp, tissue)
            tiles = make_tile_grid(
                info.width, info.height, resolution.mpp_x, resolution.mpp_y, grid, mask
            )
        return SlideReport(
            slide_id=sid,
            info=info,
            mpp=resolution,
            grid=grid,
            tissue_mpp=mask.mpp,
            tissue_area_mm2=round(mask.area_mm2, 4),
            tissue_fraction=round(mask.fraction, 4),
            grid_rows=tiles.n_rows,
            grid_cols=tiles.n_cols,
            tiles_kept=len(tiles),
        )
    except WsiflowError as exc:
        _log.info("slide %s: %s", sid, exc.kind)
        return SlideReport(slide_id=sid, info=info, grid=grid, error=exc)
