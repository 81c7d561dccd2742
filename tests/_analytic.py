"""A deterministic analytic 'model' for geometry tests: P(red) = mean red level of the tile."""

from __future__ import annotations

import torch

from pipeline import Preprocessing


class _RedMean(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Input is x/255 (mean 0, std 1): the mean red level is a probability in [0, 1];
        # log-probabilities as logits make the engine's softmax return it unchanged.
        p = x[:, 0].mean(dim=(1, 2)).clamp(1e-6, 1 - 1e-6)
        return torch.stack([torch.log(p), torch.log1p(-p)], dim=1)


class RedMeanClassifier:
    """Satisfies pipeline.PatchClassifier."""

    class_names = ("red", "not_red")

    def __init__(self, tile_size_px: int, target_mpp: float) -> None:
        self.preprocessing = Preprocessing(tile_size_px, target_mpp, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.module = _RedMean()
