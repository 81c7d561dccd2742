"""wsiflow's pure core: slide access, mpp policy, tissue detection, tile grids, privacy.

Imports nothing from ``models``, ``flows`` or ``viewer``.
"""

from ._classifier import PatchClassifier, Preprocessing, classify_tiles
from ._analysis import RESULT_MANIFEST, AnalysisParams, ChunkExecutor, ChunkJob, ModelInfo, SlideOutcome, analyse_slide, run_chunk
from ._chunks import ChunkTask, plan_chunks
from ._engine import EngineSettings, classify_stream, resolve_device
from ._backend import BACKEND_NAMES, SLIDE_SUFFIXES, BackendName, SlideBackend, is_dicom_folder, open_backend
from ._deid import DeidReport, deidentify_slide
from ._errors import (
    ConfigError,
    CorruptSlideError,
    DeidentificationError,
    OutputError,
    WorkerError,
    MissingMppError,
    SlideNotFoundError,
    SlidePermissionError,
    UnsupportedSlideError,
    WsiflowError,
)
from ._grid import MAX_GRID_POSITIONS, GridSpec, TileGrid, grid_shape, make_tile_grid
from ._inspect import SlideReport, inspect_slide
from ._mpp import (
    PLAUSIBLE_MPP_RANGE,
    MppOverride,
    MppPolicy,
    MppResolution,
    check_plausible_mpp,
    resolve_mpp,
)
from ._audit import (
    AUDIT_ACTIONS,
    AuditRecord,
    AuditVerification,
    audit_event,
    audit_log_path,
    params_digest,
    read_audit_log,
    verify_audit_log,
)
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
from ._slide import Slide, SlideInfo, open_slide, slide_info
from ._tables import class_regions
from ._tissue import TissueMask, TissueParams, detect_tissue, pen_mask

__all__ = [
    "AUDIT_ACTIONS",
    "AuditRecord",
    "AuditVerification",
    "audit_event",
    "audit_log_path",
    "params_digest",
    "read_audit_log",
    "verify_audit_log",
    "RESULT_MANIFEST",
    "AnalysisParams",
    "ChunkExecutor",
    "ChunkJob",
    "ChunkTask",
    "EngineSettings",
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
    "BackendName",
    "ConfigError",
    "CorruptSlideError",
    "DeidReport",
    "DeidentificationError",
    "deidentify_slide",
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
