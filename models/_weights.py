"""Weights: safetensors only, verified against the manifest's sha256 before use."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import UnsafeWeightsError, WeightsIntegrityError

if TYPE_CHECKING:
    import torch

__all__ = [
    "PICKLE_SUFFIXES",
    "sha256_bytes",
    "read_verified_weights",
    "state_dict_from_safetensors",
    "state_dict_to_safetensors",
    "state_dict_from_pickle",
]

PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar"})


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeWeightsError(
            f"refusing to load pickle-based weights ({path.suffix}): loading a pickle can run code"
        )


def read_verified_weights(path: Path, sha256: str) -> bytes:
    """The bytes of a safetensors file, only if they hash to ``sha256``.

    The bytes that were hashed are the bytes that get loaded (no re-read), so the file
    cannot be swapped between the check and the use.
    """
    refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise UnsafeWeightsError(f"weights must be a .safetensors file, not {path.suffix or 'no suffix'}")
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if actual != sha256:
        raise WeightsIntegrityError(
            f"weights sha256 is {actual[:16]}..., the manifest pins {sha256[:16]}..."
        )
    return data


def state_dict_from_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def state_dict_to_safetensors(state_dict: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})


def state_dict_from_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .pt/.pth/.ckpt, loaded with ``weights_only=True`` (no code runs)."""
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as exc:
        raise UnsafeWeightsError(
            f"the checkpoint holds more than tensors and cannot be loaded safely ({type(exc).__name__})",
            hint="export a plain state_dict (torch.save(model.state_dict(), ...)) and import that",
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UnsafeWeightsError("the checkpoint is not a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}
