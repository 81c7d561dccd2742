"""What the pipeline needs of a patch classifier, and how tiles become model input.

The pipeline never loads models itself (that is the registry's job, in ``models``): it
takes any object satisfying :class:`PatchClassifier`. Tiles are RGB uint8 arrays of shape
(n, tile_size_px, tile_size_px, 3), read at the classifier's ``target_mpp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ._errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["Preprocessing", "PatchClassifier"]


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
    """A torch module mapping normalised (n, 3, h, w) tiles to (n, classes) logits.

    The members are read-only, so plain attributes, dataclass fields and properties
    (``models.LoadedModel``) all satisfy it.
    """

    @property
    def class_names(self) -> tuple[str, ...]: ...

    @property
    def preprocessing(self) -> Preprocessing: ...

    @property
    def module(self) -> torch.nn.Module: ...
