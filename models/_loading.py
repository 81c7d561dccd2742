"""Build a verified model: manifest -> timm architecture -> checked safetensors weights."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import Preprocessing

from ._errors import ManifestError
from ._manifest import ModelManifest, check_architecture
from ._weights import check_safetensors, read_verified_weights, state_dict_from_safetensors

if TYPE_CHECKING:
    import torch

__all__ = ["LoadedModel", "build_module", "load_model_from_dir"]


class LoadedModel:
    """A verified model ready for inference; satisfies ``pipeline.PatchClassifier``.

    Built from verified weights either at once or, when loaded with ``build=False``, on first
    use of :attr:`module` (thread-safe, once): importing torch and timm and building the
    architecture takes seconds, which a process that only names the model, or finds its
    result already complete, never pays. The weights' sha256 is checked when loading either
    way; their fit to the architecture when the module is built.
    """

    __slots__ = ("_lock", "_manifest", "_module", "_weights")

    def __init__(self, manifest: ModelManifest, module: torch.nn.Module | None = None, *,
                 weights: bytes | None = None) -> None:
        if (module is None) == (weights is None):
            raise TypeError("give either the module or the verified weights to build it from")
        self._manifest = manifest
        self._module = module
        self._weights = weights or b""
        self._lock = threading.Lock()

    def __getstate__(self) -> tuple[ModelManifest, torch.nn.Module | None, bytes]:
        return self._manifest, self._module, self._weights  # pickled without its lock

    def __setstate__(self, state: tuple[ModelManifest, torch.nn.Module | None, bytes]) -> None:
        self._manifest, self._module, self._weights = state
        self._lock = threading.Lock()

    @property
    def manifest(self) -> ModelManifest:
        return self._manifest

    @property
    def module(self) -> torch.nn.Module:
        module = self._module
        if module is None:
            with self._lock:
                module = self._module
                if module is None:
                    module = self._module = _module_from_weights(self._manifest, self._weights)
                    self._weights = b""
        return module

    @property
    def built(self) -> bool:
        """Whether :attr:`module` exists yet."""
        return self._module is not None

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


def _module_from_weights(manifest: ModelManifest, data: bytes) -> torch.nn.Module:
    """The architecture with ``data`` (verified safetensors bytes) loaded strictly, in eval mode."""
    module = build_module(manifest)
    state = state_dict_from_safetensors(data)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ManifestError(
            f"the weights do not fit architecture {manifest.timm_name!r}: {str(exc)[:300]}"
        ) from exc
    module.eval()
    return module


def load_model_from_dir(manifest: ModelManifest, directory: Path, *, build: bool = True) -> LoadedModel:
    """Verify the weights' sha256, then build the module and load them (strictly); with
    ``build=False`` the module is built on first use (see :class:`LoadedModel`)."""
    data = read_verified_weights(directory / manifest.weights_file, manifest.weights_sha256)
    if not build:
        check_safetensors(data)  # refused now, like a wrong digest, not at first use
        return LoadedModel(manifest, weights=data)
    return LoadedModel(manifest, _module_from_weights(manifest, data))
