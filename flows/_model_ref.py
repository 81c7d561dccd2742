"""A model named for other processes: registry root, ``name@version`` and sha256.

The model is resolved and verified once where a run starts; child processes and Dask
workers get this small reference and load the model themselves, once per process,
checked against the same sha256 (so every process computes with the same weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models import LoadedModel, Registry, WeightsIntegrityError
from pipeline import ModelInfo, Preprocessing

__all__ = ["ModelRef", "resolve_model", "describe_model", "load_model_ref"]

# Per process: models by weights digest.
_MODELS: dict[str, LoadedModel] = {}


@dataclass(frozen=True)
class ModelRef:
    """Where a process finds the model: the site registry root, ``name@version``, its sha256."""

    site_root: str | None
    ref: str
    sha256: str


def _registry(site_root: str | Path | None) -> Registry:
    return Registry(site_root=Path(site_root)) if site_root else Registry()


def resolve_model(ref: str, models_dir: Path | None) -> tuple[ModelRef, ModelInfo, LoadedModel]:
    """Load ``ref`` from the registry (every check and the sha256 now; the module is built on
    first use), keep it for this process, and name it."""
    registry = _registry(models_dir)
    model = registry.load(ref, build=False)
    manifest = model.manifest
    _MODELS[manifest.weights_sha256] = model
    info = ModelInfo(manifest.name, manifest.version, manifest.weights_sha256, tuple(c.color for c in manifest.classes))
    return ModelRef(str(registry.site_root.resolve()), manifest.ref, manifest.weights_sha256), info, model


def describe_model(ref: str, models_dir: Path | None) -> tuple[ModelInfo, Preprocessing]:
    """``ref``'s identity and input from its manifest alone (no weights read): for checks
    made before the process that loads (and verifies) the model starts."""
    manifest = _registry(models_dir).resolve(ref).manifest
    info = ModelInfo(manifest.name, manifest.version, manifest.weights_sha256, tuple(c.color for c in manifest.classes))
    return info, manifest.preprocessing


def load_model_ref(model: ModelRef) -> LoadedModel:
    """The model ``model`` names, loaded once per process and checked against its sha256.
    Its module is built on first use (a process that finds its results complete, or only
    names the model, never imports torch): see :class:`models.LoadedModel`."""
    cached = _MODELS.get(model.sha256)
    if cached is None:
        cached = _registry(model.site_root).load(model.ref, build=False)
        if cached.manifest.weights_sha256 != model.sha256:
            raise WeightsIntegrityError(f"{model.ref} in this process is not the model the run was started with")
        _MODELS[model.sha256] = cached
    return cached


def loaded_models() -> int:
    """How many models this process holds (for checks on workers)."""
    return len(_MODELS)
