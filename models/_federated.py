"""Pure parts of federated fine-tuning: the parameter arrays, FedProx, DP, the payload rule.

What a site sends is a list of float32 arrays, one per floating-point entry of the model's
``state_dict`` (in its order), a sample count and the scalar metrics in
:data:`ALLOWED_METRIC_KEYS`. :func:`check_payload` enforces that before anything leaves a
site; nothing here knows about the network (see ``flows._federate``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import FederationError, FederationPayloadError
from ._loading import LoadedModel
from ._manifest import Lineage, ModelManifest, now_iso
from ._weights import sha256_bytes, state_dict_to_safetensors

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALLOWED_METRIC_KEYS",
    "FederationError",
    "FederationPayloadError",
    "PrivacySettings",
    "check_payload",
    "clip_and_noise",
    "federated_candidate",
    "federation_digest",
    "load_parameter_arrays",
    "parameter_arrays",
    "parameter_shapes",
    "proximal_hooks",
]

ALLOWED_METRIC_KEYS = frozenset({"loss"})
"""Scalar metrics a site may send beside its arrays and its sample count."""


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy of a site's update: clip its L2 norm, add Gaussian noise.

    ``noise_multiplier`` is the noise standard deviation in units of ``clip_norm`` (the
    usual DP-FedAvg parametrisation); both None/0 mean no DP.
    """

    clip_norm: float | None = None
    noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise FederationError(f"DP clip norm {self.clip_norm} must be a positive number", hint="e.g. --dp-clip 1.0")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise FederationError(f"DP noise multiplier {self.noise_multiplier} must be >= 0")
        if self.noise_multiplier > 0 and self.clip_norm is None:
            raise FederationError("DP noise needs a clip norm (noise is scaled by it)", hint="add --dp-clip")

    @property
    def enabled(self) -> bool:
        return self.clip_norm is not None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _float_entries(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def parameter_arrays(module: torch.nn.Module) -> list[np.ndarray]:
    """The floating-point ``state_dict`` entries (weights and norm statistics) as float32 arrays.

    Integer buffers (batch counters) are local bookkeeping and never leave a site.
    """
    state = module.state_dict()
    return [state[k].detach().cpu().numpy().astype(np.float32, copy=True) for k in _float_entries(state)]


def parameter_shapes(module: torch.nn.Module) -> list[tuple[int, ...]]:
    state = module.state_dict()
    return [tuple(state[k].shape) for k in _float_entries(state)]


def load_parameter_arrays(module: torch.nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Copy ``arrays`` (as :func:`parameter_arrays` orders them) into ``module`` in place."""
    import torch

    state = module.state_dict()
    keys = _float_entries(state)
    check_payload(arrays, {}, [tuple(state[k].shape) for k in keys])
    with torch.no_grad():
        for key, array in zip(keys, arrays, strict=True):
            state[key].copy_(torch.from_numpy(np.asarray(array)).to(state[key].dtype))


def check_payload(
    arrays: Sequence[np.ndarray], metrics: Mapping[str, object], shapes: Sequence[tuple[int, ...]]
) -> None:
    """Raise :class:`FederationPayloadError` unless ``arrays`` are finite float32 arrays of
    exactly ``shapes`` and ``metrics`` holds only allowed keys with finite numbers."""
    if len(arrays) != len(shapes):
        raise FederationPayloadError(f"{len(arrays)} arrays for a model of {len(shapes)} parameter tensors")
    for i, (array, shape) in enumerate(zip(arrays, shapes, strict=True)):
        if not isinstance(array, np.ndarray) or array.dtype != np.float32 or tuple(array.shape) != tuple(shape):
            got = f"{getattr(array, 'dtype', type(array).__name__)} {getattr(array, 'shape', '')}"
            raise FederationPayloadError(f"array {i} is {got}, not float32 {tuple(shape)}")
        if not np.isfinite(array).all():
            raise FederationPayloadError(f"array {i} holds NaN or infinite values")
    unknown = sorted(set(metrics) - ALLOWED_METRIC_KEYS)
    if unknown:
        allowed = sorted(ALLOWED_METRIC_KEYS)
        raise FederationPayloadError(f"metric key(s) {unknown} are not allowed (allowed: {allowed})")
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FederationPayloadError(f"metric {key!r} must be a finite number, got {type(value).__name__}")


def clip_and_noise(
    global_arrays: Sequence[np.ndarray],
    local_arrays: Sequence[np.ndarray],
    privacy: PrivacySettings,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], float]:
    """The local model with its update (local - global) clipped to ``clip_norm`` (L2 over all
    arrays) plus Gaussian noise of std ``noise_multiplier * clip_norm``; and the update's
    norm before clipping (kept at the site, never sent)."""
    deltas = [np.asarray(a, np.float64) - np.asarray(g, np.float64) for a, g in zip(local_arrays, global_arrays,
                                                                                     strict=True)]
    norm = float(math.sqrt(sum(float(np.sum(d * d)) for d in deltas)))
    if privacy.clip_norm is None:
        return [np.asarray(a, np.float32) for a in local_arrays], norm
    scale = min(1.0, privacy.clip_norm / max(norm, 1e-12))
    sigma = privacy.noise_multiplier * privacy.clip_norm
    out = []
    for g, d in zip(global_arrays, deltas, strict=True):
        noisy = d * scale + (rng.normal(0.0, sigma, d.shape) if sigma > 0 else 0.0)
        out.append((np.asarray(g, np.float64) + noisy).astype(np.float32))
    return out, norm


def proximal_hooks(module: torch.nn.Module, global_arrays: Sequence[np.ndarray], mu: float) -> list[Callable[[], None]]:
    """FedProx: add ``mu * (w - w_global)`` to each trainable parameter's gradient (the
    gradient of ``mu/2 * ||w - w_global||^2``) through tensor hooks, so the unchanged
    training loop minimises the proximal objective. Returns the hooks' removers."""
    import torch

    if mu <= 0:
        return []
    state = module.state_dict()
    by_key = dict(zip(_float_entries(state), global_arrays, strict=True))
    removers = []
    for name, param in module.named_parameters():
        if not param.requires_grad or name not in by_key:
            continue
        anchor = torch.from_numpy(np.asarray(by_key[name], np.float32)).to(param.dtype)

        def hook(grad: torch.Tensor, p: torch.Tensor = param, w0: torch.Tensor = anchor) -> torch.Tensor:
            return grad + mu * (p.detach() - w0)

        removers.append(param.register_hook(hook).remove)
    return removers


def federation_digest(record: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a federation's lineage record."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def federated_candidate(
    base: LoadedModel, arrays: Sequence[np.ndarray], *, name: str, version: int, record: Mapping[str, Any]
) -> tuple[ModelManifest, bytes, dict[str, Any]]:
    """The manifest and safetensors bytes of the global model ``arrays`` (on ``base``'s
    architecture), and the lineage record completed with the weights' sha256.

    ``record`` holds only federation parameters (base digest, rounds, sites, strategy,
    privacy); the manifest's lineage names the parent and the record's digest.
    """
    import copy

    module = copy.deepcopy(base.module)
    load_parameter_arrays(module, arrays)
    weights = state_dict_to_safetensors(module.state_dict())
    full = {**record, "weights_sha256": sha256_bytes(weights)}
    strategy, sites, rounds = full.get("strategy"), full.get("sites"), full.get("rounds_completed")
    manifest = replace(
        base.manifest, name=name, version=version, weights_file="weights.safetensors",
        weights_sha256=full["weights_sha256"], created_at=now_iso(),
        lineage=Lineage(parent=base.manifest.ref, parent_sha256=base.manifest.weights_sha256,
                        training_data_digest=federation_digest(full)),
        intended_use=(f"{base.manifest.intended_use} Federated fine-tune ({strategy}, {sites} sites, {rounds} "
                      "rounds); a candidate until validated at this site and promoted."),
        validation=None,
    )
    return manifest, weights, full
