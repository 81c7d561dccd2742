"""Weights: safetensors only, verified against the manifest's sha256 before use."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import UnsafeWeightsError, WeightsIntegrityError

if TYPE_CHECKING:
    import torch

__all__ = [
    "PICKLE_SUFFIXES",
    "sha256_bytes",
    "read_weights_file",
    "check_safetensors",
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


def read_weights_file(path: Path, *, what: str = "the weights file") -> bytes:
    """The bytes of a weights file, which must be a regular file (a link to one is fine).

    A device (a link to ``/dev/zero`` never ends), a pipe (blocks until written) or a
    folder is refused before it is read, and the read stops at the size the file had when
    opened, so it always ends.
    """
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; no effect on regular files.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        reason = "it does not exist" if exc.errno == errno.ENOENT else errno.errorcode.get(exc.errno or 0, "error")
        raise WeightsIntegrityError(f"{what} cannot be opened ({reason})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise WeightsIntegrityError(
                f"{what} is not a regular file (a device, pipe or folder, perhaps through a link); refusing to "
                "read it",
            )
        try:
            return fh.read(info.st_size)
        except OSError as exc:
            raise WeightsIntegrityError(
                f"reading {what} failed ({errno.errorcode.get(exc.errno or 0, 'error')})"
            ) from None


def check_safetensors(data: bytes) -> None:
    """Refuse bytes that are not a safetensors file before they reach a parser: a pickle or
    a zip archive (``torch.save`` checkpoints, TorchScript) renamed ``.safetensors`` is
    named as such. Format: an 8-byte little-endian header length, then a JSON header."""
    header = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if 0 < header <= len(data) - 8 and data[8:9] == b"{":
        return
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise UnsafeWeightsError(
            "the weights are a Python pickle named .safetensors: loading a pickle can run code",
            hint="convert a trusted checkpoint with `wsiflow models import CHECKPOINT.pt --allow-pickle-conversion`",
        )
    if data[:4] == b"PK\x03\x04":
        raise UnsafeWeightsError(
            "the weights are a zip archive (a torch.save checkpoint or a TorchScript program) named .safetensors",
            hint="save the model's state_dict (torch.save(model.state_dict(), 'm.pt')) and import that with "
                 "--allow-pickle-conversion, or save it with safetensors",
        )
    raise UnsafeWeightsError(
        "the weights are not a safetensors file (no safetensors header)",
        hint="give weights saved with safetensors (safetensors.torch.save_file)",
    )


def read_verified_weights(path: Path, sha256: str) -> bytes:
    """The bytes of a safetensors file, only if they hash to ``sha256``.

    The bytes that were hashed are the bytes that get loaded (no re-read), so the file
    cannot be swapped between the check and the use.
    """
    refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise UnsafeWeightsError(f"weights must be a .safetensors file, not {path.suffix or 'no suffix'}")
    data = read_weights_file(path)
    actual = sha256_bytes(data)
    if actual != sha256:
        raise WeightsIntegrityError(
            f"weights sha256 is {actual[:16]}..., the manifest pins {sha256[:16]}..."
        )
    return data


def state_dict_from_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes; anything else is refused, never parsed as a pickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    check_safetensors(data)
    try:
        return load(data)
    except SafetensorError as exc:
        raise UnsafeWeightsError(f"the weights are not a valid safetensors file ({exc})",
                                 hint="give weights saved with safetensors (safetensors.torch.save_file)") from None


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
