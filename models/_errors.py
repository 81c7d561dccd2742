"""Model errors: leaves of the one wsiflow exception tree."""

from __future__ import annotations

from pipeline import WsiflowError

__all__ = [
    "ModelNotFoundError",
    "ManifestError",
    "WeightsIntegrityError",
    "UnsafeWeightsError",
    "AcceptanceError",
    "ReadOnlyModelError",
    "TrainingDataError",
]


class ModelNotFoundError(WsiflowError, LookupError):
    """No model of that name/version in the bundled or site registry."""

    kind = "model-not-found"
    hint = "list the available models with `wsiflow models list`"


class ManifestError(WsiflowError, ValueError):
    """A model manifest does not follow the schema."""

    kind = "bad-manifest"
    hint = "fix the named field in manifest.json (see README, 'Model manifests')"


class WeightsIntegrityError(WsiflowError, ValueError):
    """The weights file does not match the sha256 pinned in the manifest."""

    kind = "weights-tampered"
    hint = "the weights changed since the manifest was written: reinstall the model from a trusted copy"


class UnsafeWeightsError(WsiflowError, ValueError):
    """Weights in a pickle-based format (.pt/.pth/.ckpt/.bin) were offered for loading."""

    kind = "unsafe-weights"
    hint = (
        "wsiflow only loads safetensors; convert a trusted checkpoint with "
        "`wsiflow models import ... --allow-pickle-conversion`"
    )


class AcceptanceError(WsiflowError, ValueError):
    """A model version does not meet the site's acceptance thresholds."""

    kind = "not-accepted"
    hint = "validate the model with `wsiflow validate` and check acceptance thresholds in the config"


class ReadOnlyModelError(WsiflowError, PermissionError):
    """Bundled models cannot be changed or removed."""

    kind = "read-only-model"
    hint = "bundled models ship with wsiflow; copy one to the site registry to change it"


class TrainingDataError(WsiflowError, ValueError):
    """Annotations or labelled images cannot be used for training or validation."""

    kind = "bad-training-data"
    hint = "check the annotation class names and that polygons lie on the slide"
