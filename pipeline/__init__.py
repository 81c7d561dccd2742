"""wsiflow's pure core: slide access, mpp policy, tissue detection, tile grids, privacy.

Imports nothing from ``models``, ``flows`` or ``viewer``.
"""

from ._analysis import analyse_slide
from ._backend import BACKEND_NAMES, SLIDE_SUFFIXES, BackendName, SlideBackend, is_dicom_folder, open_backend
from ._chunk_run import ChunkExecutor, ChunkJob, run_chunk
from ._chunks import ChunkTask, plan_chunks
from ._classifier import PatchClassifier, Preprocessing
from ._dicom_results import DicomResults, build_dicom_results, read_source_level0, write_dicom_results
from ._discover import expand_slide_arguments
from ._engine import EngineSettings, EngineStats, classify_stream, classify_tiles, default_readers, resolve_device
from ._errors import (
    ConfigError,
    CorruptSlideError,
    DeidentificationError,
    MissingMppError,
    NotAResultError,
    OutputError,
    SlideNotFoundError,
    SlidePermissionError,
    UnsupportedSlideError,
    WorkerError,
    WsiflowError,
)
from ._grid import MAX_GRID_POSITIONS, GridSpec, TileGrid, grid_shape, make_tile_grid
from ._identity import SlideIdentity, identify_slide
from ._inspect import SlideReport, inspect_slide
from ._mpp import (
    PLAUSIBLE_MPP_RANGE,
    MppOverride,
    MppPolicy,
    MppResolution,
    MppSource,
    check_plausible_mpp,
    resolve_mpp,
)
from ._outcome import SlideOutcome, SlideStatus
from ._privacy import (
    OFFLINE_ENV,
    apply_offline_env,
    content_digest,
    lookup_slide_location,
    record_slide_location,
    site_dir,
    site_secret,
    slide_id,
)
from ._progress import ANALYSIS_STAGES, Progress
from ._result import (
    LATEST_LINK,
    RESULT_FILES,
    RESULT_MANIFEST,
    ModelInfo,
    ModelProvenance,
    ResultFolder,
    ResultManifest,
    ResultSummary,
)
from ._serde import from_data, to_data
from ._settings import AnalysisParams, GridSettings, RunSettings, analysis_digest
from ._slide import Slide, SlideInfo, open_slide, slide_info
from ._tables import class_regions
from ._tissue import TissueMask, TissueParams, detect_tissue, pen_mask

__all__ = [
    "DicomResults",
    "build_dicom_results",
    "read_source_level0",
    "write_dicom_results",
    "RESULT_MANIFEST",
    "RESULT_FILES",
    "LATEST_LINK",
    "ModelProvenance",
    "ResultFolder",
    "ResultManifest",
    "ResultSummary",
    "GridSettings",
    "RunSettings",
    "analysis_digest",
    "SlideIdentity",
    "identify_slide",
    "SlideStatus",
    "Progress",
    "ANALYSIS_STAGES",
    "from_data",
    "to_data",
    "default_readers",
    "NotAResultError",
    "MppSource",
    "AnalysisParams",
    "ChunkExecutor",
    "ChunkJob",
    "ChunkTask",
    "EngineSettings",
    "EngineStats",
    "ModelInfo",
    "OutputError",
    "WorkerError",
    "SlideOutcome",
    "analyse_slide",
    "classify_stream",
    "class_regions",
    "plan_chunks",
    "resolve_device",
    "run_chunk",
    "PatchClassifier",
    "Preprocessing",
    "classify_tiles",
    "MAX_GRID_POSITIONS",
    "BACKEND_NAMES",
    "SLIDE_SUFFIXES",
    "is_dicom_folder",
    "expand_slide_arguments",
    "BackendName",
    "ConfigError",
    "CorruptSlideError",
    "DeidentificationError",
    "GridSpec",
    "MissingMppError",
    "MppOverride",
    "MppPolicy",
    "MppResolution",
    "OFFLINE_ENV",
    "PLAUSIBLE_MPP_RANGE",
    "Slide",
    "SlideBackend",
    "SlideInfo",
    "SlideNotFoundError",
    "SlidePermissionError",
    "SlideReport",
    "TileGrid",
    "TissueMask",
    "TissueParams",
    "UnsupportedSlideError",
    "WsiflowError",
    "apply_offline_env",
    "check_plausible_mpp",
    "content_digest",
    "detect_tissue",
    "grid_shape",
    "inspect_slide",
    "make_tile_grid",
    "open_backend",
    "open_slide",
    "pen_mask",
    "resolve_mpp",
    "site_dir",
    "site_secret",
    "slide_id",
    "slide_info",
    "lookup_slide_location",
    "record_slide_location",
]
