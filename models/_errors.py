"""Model errors: leaves of the one wsiflow exception tree."""

from __future__ import annotations

from pipeline import WsiflowError

__all__ = [
    "ModelNotFoundError",
    "FederationError",
    "FederationPayloadError",
    "FederationAuthError",
    "ManifestError",
    "WeightsIntegrityError",
    "UnsafeWeightsError",
    "AcceptanceError",
    "ReadOnlyModelError",
    "TrainingDataError",
    "RegistryIntegrityError",
    "BundleError",
    "UnsignedBundleError",
    "UntrustedPublisherError",
    "TamperedBundleError",
    "DowngradeError",
    "ValidationOverlapError",
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


class RegistryIntegrityError(WsiflowError, ValueError):
    """A site registry record (seal, promotion record, defaults, trust list) does not match the
    site secret, or a model changed since it was sealed, or a file links out of the registry."""

    kind = "registry-tampered"
    hint = (
        "the registry was changed outside wsiflow: check `wsiflow audit verify`, remove the named version "
        "(`wsiflow models remove NAME@VERSION`) and install it again from a trusted copy"
    )


class BundleError(WsiflowError, ValueError):
    """A model bundle cannot be packed, or was refused at install."""

    kind = "bundle-refused"
    hint = "ask the publisher for a new bundle, signed with a key this site trusts"


class UnsignedBundleError(BundleError):
    kind = "bundle-unsigned"
    hint = "install only bundles made with `wsiflow models pack --key ...`"


class UntrustedPublisherError(BundleError):
    kind = "bundle-untrusted"
    hint = "check the publisher's key fingerprint with them, then `wsiflow models trust add KEY.pub --name NAME`"


class TamperedBundleError(BundleError):
    kind = "bundle-tampered"
    hint = "the bundle changed after it was signed: get a fresh copy from the publisher"


class DowngradeError(BundleError):
    kind = "bundle-downgrade"
    hint = "install a newer version than the site has had; `wsiflow models rollback NAME` restores an older one"


class ValidationOverlapError(TrainingDataError):
    """Validation slides that the model (or an ancestor) was trained on."""

    kind = "validation-overlap"
    hint = "validate on slides the model never saw in training; its lineage lists the training slides' digests"


class FederationError(WsiflowError, RuntimeError):
    """A federation cannot start or go on (base model differs, too few sites, no result)."""

    kind = "federation"
    hint = "check that every site has the same verified base model and that enough sites joined"


class FederationPayloadError(FederationError, ValueError):
    """An outgoing message would hold something other than parameters and allowed metrics."""

    kind = "federation-payload"
    hint = "only parameter arrays of the model's shapes and the allowed scalar metrics may leave a site"


class FederationAuthError(FederationError, PermissionError):
    """A site's identity key is missing, unreadable, not on the coordinator's allow-list, or its
    signature does not verify."""

    kind = "federation-auth"
    hint = ("give the site's key (`wsiflow federate join --site-key KEY.pem`) and ask the coordinator's operator "
            "to list its public key's fingerprint (`--site-keys FILE`)")
