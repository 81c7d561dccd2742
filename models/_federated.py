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
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._bundle import read_private_key
from ._errors import BundleError, FederationAuthError, FederationError, FederationPayloadError
from ._loading import LoadedModel
from ._manifest import Lineage, ModelManifest, now_iso
from ._secagg import MASK_KEY_BYTES, SEED_BYTES
from ._trust import fingerprint, raw_key_fingerprint, short_fingerprint
from ._weights import sha256_bytes, state_dict_to_safetensors

if TYPE_CHECKING:
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "ALLOWED_METRIC_KEYS",
    "ALLOWED_PROPERTY_KEYS",
    "FederationAuthError",
    "FederationError",
    "FederationPayloadError",
    "PrivacySettings",
    "SiteAllowList",
    "check_payload",
    "check_properties",
    "clip_and_noise",
    "clipped_update",
    "load_site_key",
    "read_site_keys",
    "sign_challenge",
    "site_auth_message",
    "site_fingerprint",
    "site_public_key",
    "verify_site",
    "federated_candidate",
    "federation_digest",
    "load_parameter_arrays",
    "parameter_arrays",
    "parameter_shapes",
    "proximal_hooks",
]

ALLOWED_METRIC_KEYS = frozenset({"loss"})
"""Scalar metrics a site may send beside its arrays and its sample count."""

ALLOWED_PROPERTY_KEYS: Mapping[str, int] = {"site_key": 32, "signature": 64, "mask_key": MASK_KEY_BYTES}
"""What a site may answer to the coordinator's questions (key -> exact byte length): its
Ed25519 public key and a signature over the coordinator's challenge, its ephemeral mask key
(secure aggregation); besides these only ``seed:<peer id>`` (the pairwise mask seed with a
site that dropped out, :data:`SEED_BYTES` bytes)."""
_SEED_KEY_RE = re.compile(r"^seed:[0-9a-f]{32}$")


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
    arrays: Sequence[np.ndarray], metrics: Mapping[str, object], shapes: Sequence[tuple[int, ...]], *,
    masked: bool = False,
) -> None:
    """Raise :class:`FederationPayloadError` unless ``arrays`` are finite float32 arrays of
    exactly ``shapes`` (``masked``, secure aggregation: uint64 arrays of exactly ``shapes``,
    nothing else) and ``metrics`` holds only allowed keys with finite numbers."""
    if len(arrays) != len(shapes):
        raise FederationPayloadError(f"{len(arrays)} arrays for a model of {len(shapes)} parameter tensors")
    dtype = np.dtype(np.uint64) if masked else np.dtype(np.float32)
    for i, (array, shape) in enumerate(zip(arrays, shapes, strict=True)):
        if not isinstance(array, np.ndarray) or array.dtype != dtype or tuple(array.shape) != tuple(shape):
            got = f"{getattr(array, 'dtype', type(array).__name__)} {getattr(array, 'shape', '')}"
            raise FederationPayloadError(f"array {i} is {got}, not {dtype} {tuple(shape)}")
        if not masked and not np.isfinite(array).all():
            raise FederationPayloadError(f"array {i} holds NaN or infinite values")
    unknown = sorted(set(metrics) - ALLOWED_METRIC_KEYS)
    if unknown:
        allowed = sorted(ALLOWED_METRIC_KEYS)
        raise FederationPayloadError(f"metric key(s) {unknown} are not allowed (allowed: {allowed})")
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FederationPayloadError(f"metric {key!r} must be a finite number, got {type(value).__name__}")


def clipped_update(
    global_arrays: Sequence[np.ndarray],
    local_arrays: Sequence[np.ndarray],
    privacy: PrivacySettings,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], float]:
    """The update (local - global, float64) clipped to ``clip_norm`` (L2 over all arrays) plus
    Gaussian noise of std ``noise_multiplier * clip_norm`` (unchanged without DP); and its norm
    before clipping (kept at the site, never sent)."""
    deltas = [np.asarray(a, np.float64) - np.asarray(g, np.float64) for a, g in zip(local_arrays, global_arrays,
                                                                                     strict=True)]
    norm = float(math.sqrt(sum(float(np.sum(d * d)) for d in deltas)))
    if privacy.clip_norm is None:
        return deltas, norm
    scale = min(1.0, privacy.clip_norm / max(norm, 1e-12))
    sigma = privacy.noise_multiplier * privacy.clip_norm
    return [d * scale + (rng.normal(0.0, sigma, d.shape) if sigma > 0 else 0.0) for d in deltas], norm


def clip_and_noise(
    global_arrays: Sequence[np.ndarray],
    local_arrays: Sequence[np.ndarray],
    privacy: PrivacySettings,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], float]:
    """The local model with its update clipped and noised as :func:`clipped_update` does
    (float32); and the update's norm before clipping."""
    deltas, norm = clipped_update(global_arrays, local_arrays, privacy, rng)
    if privacy.clip_norm is None:
        return [np.asarray(a, np.float32) for a in local_arrays], norm
    out = [(np.asarray(g, np.float64) + d).astype(np.float32) for g, d in zip(global_arrays, deltas, strict=True)]
    return out, norm


# -- site identity (node authentication) -------------------------------------------------------
_AUTH_DOMAIN = b"wsiflow-federation-auth/1"
_MAX_KEY_FILE_BYTES = 1 << 20


def site_auth_message(round_: int, site_id: str, challenge: bytes, mask_key: bytes) -> bytes:
    """What a site signs: a domain string, the round, the id the coordinator gave its
    connection, the coordinator's fresh challenge and the site's mask key (empty without
    secure aggregation), so a signature answers one question once and vouches for the key."""
    return b"|".join((_AUTH_DOMAIN, round_.to_bytes(8, "big"), site_id.encode(), challenge, mask_key))


def load_site_key(path: Path) -> Ed25519PrivateKey:
    """A site's Ed25519 identity key (PKCS8 PEM, as ``wsiflow federate keygen`` writes it;
    encrypted ones need ``$WSIFLOW_KEY_PASSPHRASE``)."""
    return read_private_key(path, FederationAuthError, "site key",
                            "make one with `wsiflow federate keygen --out site.pem`",
                            read_hint="check --site-key (or federation.join.site_key_file)")


def site_public_key(key: Ed25519PrivateKey) -> bytes:
    """The site's raw 32-byte Ed25519 public key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign_challenge(key: Ed25519PrivateKey, message: bytes) -> tuple[bytes, bytes]:
    """The site's raw 32-byte public key and its signature over ``message``."""
    return site_public_key(key), key.sign(message)


@dataclass(frozen=True)
class SiteAllowList:
    """The sites a coordinator admits: fingerprints (``SHA256:<hex>`` of the raw public key)."""

    fingerprints: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> SiteAllowList:
        """One entry per line, or PEM public key blocks: ``SHA256:<64 hex>`` (what ``wsiflow
        federate keygen`` prints) or a site's ``.pub`` PEM; ``#`` starts a comment."""
        from ._trust import parse_public_key

        found: set[str] = set()
        pem: list[str] | None = None
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if pem is not None:
                pem.append(line)
                if line == "-----END PUBLIC KEY-----":
                    try:
                        found.add(fingerprint(parse_public_key("\n".join(pem).encode())))
                    except BundleError as exc:
                        raise FederationAuthError(
                            f"site key list: the PEM block ending on line {number} is not an Ed25519 public key "
                            f"({exc.message})", hint="give the site's .pub file from `wsiflow federate keygen`"
                        ) from None
                    pem = None
            elif line == "-----BEGIN PUBLIC KEY-----":
                pem = [line]
            elif re.fullmatch(r"SHA256:[0-9a-fA-F]{64}", line):
                found.add("SHA256:" + line[7:].lower())
            elif line:
                raise FederationAuthError(f"site key list: line {number} is neither a SHA256:<hex> fingerprint nor "
                                          "a PEM public key", hint="one fingerprint or .pub block per site")
        if pem is not None:
            raise FederationAuthError("site key list: a PEM block has no END line")
        if not found:
            raise FederationAuthError("the site key list names no site",
                                      hint="add each site's fingerprint, or serve with --allow-any-site")
        return cls(frozenset(found))


def read_site_keys(path: Path) -> SiteAllowList:
    """The coordinator's allow-list file (see :meth:`SiteAllowList.parse`)."""
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise FederationAuthError(f"the site key list cannot be read ({exc.strerror or type(exc).__name__})",
                                  hint="check --site-keys (or federation.serve.site_keys_file)") from None
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise FederationAuthError("the site key list is over 1 MiB", hint="list fingerprints, one a line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise FederationAuthError("the site key list is not UTF-8 text") from None
    return SiteAllowList.parse(text)


def site_fingerprint(public_key: bytes) -> str:
    """``SHA256:<hex>`` of a site's raw 32-byte Ed25519 public key (as ``wsiflow federate keygen``
    prints it); "unknown" for anything else."""
    return raw_key_fingerprint(public_key) if len(public_key) == 32 else "unknown"


def verify_site(allowed: SiteAllowList | None, public_key: bytes, signature: bytes, message: bytes) -> str:
    """The site's fingerprint if its key is allowed (any key with ``allowed`` None) and its
    signature over ``message`` verifies; else :class:`FederationAuthError` naming the fingerprint."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if len(public_key) != 32 or len(signature) != 64:
        raise FederationAuthError("a site answered without a well-formed key and signature")
    key = Ed25519PublicKey.from_public_bytes(public_key)
    print_ = fingerprint(key)
    if allowed is not None and print_ not in allowed.fingerprints:
        raise FederationAuthError(f"site key {short_fingerprint(print_)} is not on the coordinator's allow-list")
    try:
        key.verify(signature, message)
    except InvalidSignature:
        raise FederationAuthError(f"site key {short_fingerprint(print_)}: the signature over this round's "
                                  "challenge does not verify") from None
    return print_


def check_properties(properties: Mapping[str, object]) -> None:
    """Raise :class:`FederationPayloadError` unless ``properties`` holds only the keys of
    :data:`ALLOWED_PROPERTY_KEYS` and ``seed:<peer id>``, each bytes of its exact length."""
    for key, value in properties.items():
        length = SEED_BYTES if _SEED_KEY_RE.match(key) else ALLOWED_PROPERTY_KEYS.get(key)
        if length is None:
            raise FederationPayloadError(f"property {key!r} is not allowed (allowed: "
                                         f"{sorted(ALLOWED_PROPERTY_KEYS)} and seed:<peer id>)")
        if not isinstance(value, bytes) or len(value) != length:
            raise FederationPayloadError(f"property {key!r} must be {length} bytes")


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
