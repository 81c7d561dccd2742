"""Build a verified model: manifest -> timm architecture -> checked safetensors weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import Preprocessing

from ._errors import ManifestError
from ._manifest import ModelManifest, check_architecture
from ._weights import read_verified_weights, state_dict_from_safetensors

if TYPE_CHECKING:
    import torch

__all__ = ["LoadedModel", "build_module", "load_model_from_dir"]


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A verified model ready for inference; satisfies ``pipeline.PatchClassifier``."""

    manifest: ModelManifest
    module: torch.nn.Module

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.manifest.class_names

    @property
    def preprocessing(self) -> Preprocessing:
        return self.manifest.preprocessing


def build_module(manifest: ModelManifest, num_classes: int | None = None) -> torch.nn.Module:
    """The manifest's timm architecture with random weights (never downloads or reads
    anything: only plain architecture names and allowed arguments reach timm)."""
    import timm

    check_architecture(manifest.timm_name, manifest.timm_kwargs)  # a manifest changed after it was made
    if not timm.is_model(manifest.timm_name):
        raise ManifestError(
            f"manifest field architecture.timm_name {manifest.timm_name!r} is not an architecture of the "
            f"installed timm ({timm.__version__})",
            hint="name one of timm.list_models(), or install the timm version the model was trained with",
        )
    try:
        return timm.create_model(
            manifest.timm_name,
            pretrained=False,
            num_classes=num_classes or len(manifest.classes),
            **manifest.timm_kwargs,
        )
    except (RuntimeError, TypeError, ValueError) as exc:
        # timm's text names arguments and shapes only: the name and arguments are plain values.
        raise ManifestError(
            f"timm cannot build architecture {manifest.timm_name!r} with {manifest.timm_kwargs}: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from exc


def load_model_from_dir(manifest: ModelManifest, directory: Path) -> LoadedModel:
    """Verify the weights' sha256, then build the module and load them (strictly)."""
    data = read_verified_weights(directory / manifest.weights_file, manifest.weights_sha256)
    module = build_module(manifest)
    state = state_dict_from_safetensors(data)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ManifestError(
            f"the weights do not fit architecture {manifest.timm_name!r}: {str(exc)[:300]}"
        ) from exc
    module.eval()
    return LoadedModel(manifest, module)
