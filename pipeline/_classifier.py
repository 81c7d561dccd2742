"""What the pipeline needs of a patch classifier, and how tiles become model input.

The pipeline never loads models itself (that is the registry's job, in ``models``): it
takes any object satisfying :class:`PatchClassifier`. Tiles are RGB uint8 arrays of shape
(n, tile_size_px, tile_size_px, 3), read at the classifier's ``target_mpp``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from ._errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["Preprocessing", "PatchClassifier", "tiles_to_tensor", "classify_tiles"]


@dataclass(frozen=True)
class Preprocessing:
    """How a model expects its input: tile size and µm/px, per-channel mean/std on [0, 1]."""

    tile_size_px: int
    target_mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ConfigError(
                f"normalisation mean/std must be 3 values with std > 0, got {self.mean}/{self.std}"
            )


@runtime_checkable
class PatchClassifier(Protocol):
    """A torch module mapping normalised (n, 3, h, w) tiles to (n, classes) logits."""

    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    module: torch.nn.Module


def tiles_to_tensor(tiles: np.ndarray | Sequence[np.ndarray], preprocessing: Preprocessing) -> torch.Tensor:
    """RGB uint8 (n, h, w, 3) -> float32 (n, 3, h, w), scaled to [0, 1] and normalised."""
    import torch

    batch = np.ascontiguousarray(np.stack(tiles) if not isinstance(tiles, np.ndarray) else tiles)
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
        raise ValueError(f"expected RGB uint8 tiles (n, h, w, 3), got {batch.dtype} {batch.shape}")
    tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1)
    return tensor.sub_(mean).div_(std)


def classify_tiles(
    classifier: PatchClassifier,
    tiles: np.ndarray | Sequence[np.ndarray],
    *,
    batch_size: int = 64,
    device: str = "cpu",
) -> np.ndarray:
    """Class probabilities (n, classes) float32 for RGB uint8 tiles, in batches."""
    import torch

    module = classifier.module.to(device).eval()
    array = np.stack(tiles) if not isinstance(tiles, np.ndarray) else tiles
    out = np.empty((len(array), len(classifier.class_names)), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(array), batch_size):
            batch = tiles_to_tensor(array[start : start + batch_size], classifier.preprocessing)
            logits = module(batch.to(device))
            out[start : start + len(batch)] = torch.softmax(logits.float(), dim=1).cpu().numpy()
    return out
