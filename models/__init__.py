"""Local model registry, verified loading, the bundled tissue-QC model, training, validation."""

from ._errors import (
    AcceptanceError,
    ManifestError,
    ModelNotFoundError,
    ReadOnlyModelError,
    TrainingDataError,
    UnsafeWeightsError,
    WeightsIntegrityError,
)
from ._finetune import annotated_dataset, check_training_inputs, finetune
from ._import import import_model
from ._loading import LoadedModel, build_module, load_model_from_dir
from ._manifest import ClassInfo, Lineage, ModelManifest, Validation, parse_manifest, read_manifest, write_manifest
from ._metrics import classification_metrics, confusion_matrix, expected_calibration_error
from ._patches import labelled_patch_folder, load_patch
from ._registry import (
    BUNDLED_ROOT,
    DEFAULT_MODEL,
    AcceptanceThresholds,
    ModelEntry,
    Registry,
    parse_ref,
    site_models_dir,
)
from ._train import EpochStats, TrainSettings, train_module
from ._validate import validate_arrays

__all__ = [
    "BUNDLED_ROOT",
    "DEFAULT_MODEL",
    "AcceptanceError",
    "AcceptanceThresholds",
    "ClassInfo",
    "EpochStats",
    "LoadedModel",
    "Lineage",
    "ManifestError",
    "ModelEntry",
    "ModelManifest",
    "ModelNotFoundError",
    "ReadOnlyModelError",
    "Registry",
    "TrainSettings",
    "TrainingDataError",
    "UnsafeWeightsError",
    "Validation",
    "WeightsIntegrityError",
    "annotated_dataset",
    "check_training_inputs",
    "build_module",
    "finetune",
    "import_model",
    "labelled_patch_folder",
    "load_patch",
    "validate_arrays",
    "classification_metrics",
    "confusion_matrix",
    "expected_calibration_error",
    "load_model_from_dir",
    "parse_manifest",
    "parse_ref",
    "read_manifest",
    "site_models_dir",
    "train_module",
    "write_manifest",
]
