"""The run settings: one typed object that carries every decision of a run.

Built once at the edge (``flows.cli``: built-in defaults <- config file <- command line),
then passed as is, or as JSON (:meth:`RunSettings.to_json` / :meth:`RunSettings.from_json`),
to the analysis, Prefect tasks, Dask workers and the per-slide child process. Nothing
downstream merges options again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._backend import BackendName
from ._classifier import Preprocessing
from ._engine import EngineSettings
from ._errors import ConfigError
from ._grid import EdgeMode, GridSpec
from ._mpp import MppPolicy, MppResolution
from ._result import ModelInfo
from ._serde import from_data, to_data
from ._tissue import TissueParams

__all__ = ["GridSettings", "AnalysisParams", "RunSettings", "analysis_digest"]


@dataclass(frozen=True)
class GridSettings:
    """The user's choices for the tile grid; tile size and µm/px default to the model's.

    A ``tile_size_px`` or ``target_mpp`` that differs from the model's is refused: a model
    only gives meaningful output on the input it was trained on.
    """

    tile_size_px: int | None = None
    """None: the model's tile size."""
    target_mpp: float | None = None
    """None: the model's µm/px."""
    stride_px: int | None = None
    """Step between tiles at the model's µm/px; None: the tile size (no overlap)."""
    min_tissue_fraction: float = 0.25
    edge: EdgeMode = "pad"

    def __post_init__(self) -> None:
        # Range checks once, here, with GridSpec's messages (placeholders where the model decides).
        GridSpec(
            tile_size_px=self.tile_size_px if self.tile_size_px is not None else 224,
            target_mpp=self.target_mpp if self.target_mpp is not None else 1.0,
            stride_px=self.stride_px, min_tissue_fraction=self.min_tissue_fraction, edge=self.edge,
        )

    def spec(self, preprocessing: Preprocessing, model_ref: str = "the model") -> GridSpec:
        """The grid for a model with ``preprocessing``."""
        if self.tile_size_px is not None and self.tile_size_px != preprocessing.tile_size_px:
            raise ConfigError(
                f"grid.tile_size_px = {self.tile_size_px} but {model_ref} takes {preprocessing.tile_size_px} px tiles",
                hint="remove grid.tile_size_px from the config (null = the model's)",
            )
        if self.target_mpp is not None and abs(self.target_mpp - preprocessing.target_mpp) > 1e-9:
            raise ConfigError(
                f"grid.target_mpp = {self.target_mpp:g} but {model_ref} reads tiles at "
                f"{preprocessing.target_mpp:g} µm/px",
                hint="remove grid.target_mpp from the config (null = the model's)",
            )
        return GridSpec(
            tile_size_px=preprocessing.tile_size_px, target_mpp=preprocessing.target_mpp,
            stride_px=self.stride_px, min_tissue_fraction=self.min_tissue_fraction, edge=self.edge,
        )


@dataclass(frozen=True)
class AnalysisParams:
    """Every parameter that changes a result; all of them are recorded with the results."""

    grid: GridSettings = field(default_factory=GridSettings)
    tissue: TissueParams = field(default_factory=TissueParams)
    chunk_cells: int | None = None
    """Heatmap block edge in grid cells: the unit of work, resume and Zarr chunking.
    None: chosen per slide so that it has enough chunks to resume finely
    (``pipeline.choose_chunk_cells``)."""
    region_threshold: float = 0.5
    """Probability above which tiles form a class region in results.geojson."""
    hotspots: int = 10
    """Top tiles per class listed in summary.json."""
    overview_class: str | None = None
    """Class shown in overview.png; None = the most informative one (highest mean probability
    among the classes other than the first, ``background`` and ``tissue``)."""

    def __post_init__(self) -> None:
        if self.chunk_cells is not None and self.chunk_cells < 1:
            raise ConfigError(f"chunk_cells = {self.chunk_cells} must be at least 1",
                              hint="null (the default) chooses it per slide")
        if not 0.0 < self.region_threshold < 1.0:
            raise ConfigError(f"region_threshold = {self.region_threshold} must be between 0 and 1")
        if self.hotspots < 0:
            raise ConfigError(f"hotspots = {self.hotspots} must be 0 or more")

    def to_json(self) -> dict[str, Any]:
        return to_data(self)


def analysis_digest(
    model: ModelInfo, params: AnalysisParams, grid: GridSpec, mpp: MppResolution, backend: str
) -> str:
    """sha256 (hex) of everything but the slide that decides a result.

    The µm/px enters only when it is an override: from metadata it follows from the slide's
    content, so results of one parameter set share a folder name across slides.
    """
    material = {
        "model": model.sha256, "classes": list(model.class_colors), "params": params.to_json(),
        "grid": asdict(grid), "backend": backend,
        "mpp": [mpp.mpp_x, mpp.mpp_y, mpp.override] if mpp.is_override else "metadata",
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class RunSettings:
    """Everything ``run``, ``batch`` and ``serve`` decide before touching a slide."""

    out_dir: Path
    """Results go to ``out_dir/<slide id>/<model>/...``."""
    model: str
    """``name`` or ``name@version`` in the registry."""
    models_dir: Path | None = None
    """Site model registry; None: $WSIFLOW_MODELS_DIR or the site directory's models/."""
    analysis: AnalysisParams = field(default_factory=AnalysisParams)
    engine: EngineSettings = field(default_factory=EngineSettings)
    mpp: MppPolicy = field(default_factory=MppPolicy)
    backend: BackendName = "auto"
    isolate: bool = True
    """Analyse each slide in a child process (a native crash then fails one slide)."""
    dask_address: str | None = None
    """An existing Dask scheduler (``tcp://host:port``) that runs chunks; None: local."""
    dask_tls_ca_file: Path | None = None
    """With a ``tls://`` scheduler: the certificate authority (PEM); None: Dask's own config."""
    dask_tls_client_cert: Path | None = None
    """With a ``tls://`` scheduler: this client's certificate (PEM)."""
    dask_tls_client_key: Path | None = None
    """With a ``tls://`` scheduler: the client certificate's key (PEM); None: in the certificate file."""
    force: bool = False
    """Recompute even when a complete result with the same run key exists."""

    def to_json(self) -> dict[str, Any]:
        return to_data(self)

    @classmethod
    def from_json(cls, data: object) -> RunSettings:
        return from_data(cls, data, where="run settings")
