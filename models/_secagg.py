"""Secure aggregation's pure maths: fixed point in uint64, pairwise masks, unmasking.

Protocol (honest-but-curious coordinator; docs/federation.md): every site of a round has an
ephemeral X25519 key; each pair of sites derives a shared seed (X25519, then HKDF-SHA256 bound
to the round and both sites' ids) and expands it with ChaCha20 into one uint64 per parameter.
A site sends ``quantise(n * update) + sum(+mask for higher ids, -mask for lower ids)`` mod
2^64: every mask cancels in the sum over all sites, so the coordinator learns only the sum.
When a site drops after the keys were exchanged, the survivors reveal their seeds with it
(never with each other) and the coordinator removes those masks. Nothing here knows about the
network; ``flows._federate`` carries the keys and arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ._errors import FederationError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

__all__ = [
    "MASK_KEY_BYTES",
    "SECAGG_PROTOCOL",
    "SEED_BYTES",
    "SecAggParams",
    "dequantise",
    "mask_key_pair",
    "mask_stream",
    "mask_update",
    "pair_seed",
    "quantise",
    "unmask_sum",
]

SECAGG_PROTOCOL = "wsiflow-secagg/1: pairwise masks, X25519 + HKDF-SHA256 + ChaCha20, uint64 fixed point"
MASK_KEY_BYTES = 32
SEED_BYTES = 32
_DOMAIN = b"wsiflow-secagg/1"
_HEADROOM_BITS = 62
"""|sum of all sites| stays below 2^62 (uint64 wraps at 2^64; int64 reads it back below 2^63)."""


@dataclass(frozen=True)
class SecAggParams:
    """Fixed point of one federation: a site's weighted update ``n * delta`` is clipped per
    element to ``n * element_range`` and stored as ``round(n * delta * 2^scale_bits)``.

    The scale is the largest power of two with ``max_sites * max_examples * element_range *
    2^scale_bits <= 2^62``, so the sum over every site of a round cannot overflow int64, let
    alone wrap mod 2^64. Defaults: 64 sites, 2^20 examples a site, |delta| <= 1024 per element
    -> 26 bits (a step of 1.5e-8 per example-weighted unit, below float32's resolution of the
    averaged weights).
    """

    max_sites: int = 64
    max_examples: int = 1 << 20
    element_range: float = 1024.0

    def __post_init__(self) -> None:
        if self.max_sites < 2 or self.max_examples < 1:
            raise FederationError(f"secure aggregation needs max_sites >= 2 and max_examples >= 1, got "
                                  f"{self.max_sites} and {self.max_examples}")
        if not (math.isfinite(self.element_range) and self.element_range > 0):
            raise FederationError(f"secure aggregation's element range {self.element_range} must be positive")
        if self.scale_bits < 8:
            raise FederationError(f"secure aggregation would keep only {self.scale_bits} fraction bits",
                                  hint="lower max_sites, max_examples or element_range")

    @property
    def scale_bits(self) -> int:
        return math.floor(_HEADROOM_BITS - math.log2(self.max_sites * self.max_examples * self.element_range))

    def to_json(self) -> dict[str, object]:
        return {"protocol": SECAGG_PROTOCOL, "modulus_bits": 64, "scale_bits": self.scale_bits,
                "max_sites": self.max_sites, "max_examples": self.max_examples,
                "element_range": self.element_range}


def mask_key_pair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh ephemeral X25519 key (one per site per round) and its raw 32-byte public key."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = X25519PrivateKey.generate()
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def pair_seed(own_key: X25519PrivateKey, peer_public: bytes, round_: int, own_id: str, peer_id: str) -> bytes:
    """The seed two sites share in ``round_``: X25519, then HKDF-SHA256 bound to the round and
    both ids (in sorted order, so both ends derive the same bytes)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if len(peer_public) != MASK_KEY_BYTES:
        raise FederationError(f"a peer's mask key has {len(peer_public)} bytes, not {MASK_KEY_BYTES}")
    if own_id == peer_id:
        raise FederationError("a site has no mask with itself")
    try:
        shared = own_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # an all-zero shared secret: a low-order point, not a real key
        raise FederationError("a peer's mask key is not a usable X25519 key") from None
    low, high = sorted((own_id, peer_id))
    info = b"|".join((_DOMAIN, b"pair", round_.to_bytes(8, "big"), low.encode(), high.encode()))
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def mask_stream(seed: bytes, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """uint64 masks of ``shapes`` from ``seed``: the ChaCha20 keystream (zero nonce: each seed
    is used for one round and one pair only), 8 bytes per element, split in order."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    if len(seed) != SEED_BYTES:
        raise FederationError(f"a mask seed has {len(seed)} bytes, not {SEED_BYTES}")
    sizes = [math.prod(s) for s in shapes]
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    stream = np.frombuffer(encryptor.update(bytes(8 * sum(sizes))), dtype="<u8").astype(np.uint64)
    out, start = [], 0
    for size, shape in zip(sizes, shapes, strict=True):
        out.append(stream[start:start + size].reshape(shape))
        start += size
    return out


def quantise(deltas: Sequence[np.ndarray], num_examples: int, params: SecAggParams) -> tuple[list[np.ndarray], int]:
    """``num_examples * deltas`` in fixed point (two's complement in uint64), each element of
    ``deltas`` clipped to +-``element_range`` first; and how many elements were clipped."""
    if not 1 <= num_examples <= params.max_examples:
        raise FederationError(f"{num_examples} training examples: secure aggregation allows 1 to "
                              f"{params.max_examples} a site", hint="sample fewer patches (--per-class)")
    scale = float(2**params.scale_bits) * num_examples
    out, clipped = [], 0
    for delta in deltas:
        d = np.asarray(delta, np.float64)
        if not np.isfinite(d).all():
            raise FederationError("an update holds NaN or infinite values")
        bounded = np.clip(d, -params.element_range, params.element_range)
        clipped += int(np.count_nonzero(bounded != d))
        out.append(np.rint(bounded * scale).astype(np.int64).view(np.uint64))
    return out, clipped


def mask_update(quantised: Sequence[np.ndarray], own_id: str, seeds: Mapping[str, bytes]) -> list[np.ndarray]:
    """The quantised update plus each peer's mask (+ for a peer whose id sorts after this
    site's, - before), mod 2^64."""
    shapes = [tuple(q.shape) for q in quantised]
    out = [np.array(q, dtype=np.uint64, copy=True) for q in quantised]
    for peer_id, seed in seeds.items():
        if peer_id == own_id:
            raise FederationError("a site has no mask with itself")
        for target, mask in zip(out, mask_stream(seed, shapes), strict=True):
            if peer_id > own_id:
                target += mask
            else:
                target -= mask
    return out


def unmask_sum(masked: Sequence[Sequence[np.ndarray]], revealed: Sequence[tuple[str, str, bytes]],
               shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """The sum (mod 2^64) of the survivors' masked updates, less the masks each survivor
    added for a dropped site: ``revealed`` holds (survivor id, dropped id, their seed)."""
    total = [np.zeros(shape, np.uint64) for shape in shapes]
    for update in masked:
        if [tuple(a.shape) for a in update] != [tuple(s) for s in shapes] or any(a.dtype != np.uint64
                                                                                  for a in update):
            raise FederationError("a masked update is not uint64 arrays of the model's shapes")
        for target, array in zip(total, update, strict=True):
            target += array
    for survivor, dropped, seed in revealed:
        for target, mask in zip(total, mask_stream(seed, shapes), strict=True):
            if dropped > survivor:  # the survivor added this mask: take it away
                target -= mask
            else:
                target += mask
    return total


def dequantise(total: Sequence[np.ndarray], total_examples: int, params: SecAggParams) -> list[np.ndarray]:
    """The example-weighted mean update (float64) from the unmasked fixed-point sum."""
    if total_examples < 1:
        raise FederationError("no training examples behind the aggregate")
    scale = float(2**params.scale_bits) * total_examples
    return [np.asarray(t, np.uint64).view(np.int64).astype(np.float64) / scale for t in total]
