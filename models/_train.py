"""Training and fine-tuning loop: augmentation, fixed seeds, a progress bar."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline import Preprocessing

if TYPE_CHECKING:
    import torch

__all__ = ["TrainSettings", "EpochStats", "train_module", "seed_everything", "hed_jitter"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    augment: bool = True
    colour_jitter: float = 0.12
    """Max relative change of brightness, contrast and saturation."""
    hed_jitter: float = 0.0
    """Max relative change of each stain's amount in HED space (haematoxylin, eosin, DAB;
    Tellez et al. 2019); the stain bias is a quarter of it, in optical density. 0: off."""
    hed_p: float = 0.8
    """Share of tiles that get HED jitter."""
    label_smoothing: float = 0.05
    progress: bool = True


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float
    accuracy: float
    tiles_per_s: float


def seed_everything(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in scikit-image.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


def hed_jitter(
    batch: torch.Tensor, generator: torch.Generator, amount: float, p: float = 1.0
) -> torch.Tensor:
    """Stain augmentation on a [0, 1] (n, 3, h, w) batch: each tile's haematoxylin, eosin and
    DAB optical densities are scaled by U(1 - amount, 1 + amount) and shifted by
    U(-amount/4, amount/4), like another lab's staining protocol."""
    import torch

    n = batch.shape[0]
    od = -torch.log(batch.clamp(min=1 / 255))
    hed = torch.einsum("nchw,cd->ndhw", od, torch.from_numpy(_HED_FROM_RGB))
    scale = 1 + (torch.rand(n, 3, generator=generator) * 2 - 1) * amount
    bias = (torch.rand(n, 3, generator=generator) * 2 - 1) * amount / 4
    apply = (torch.rand(n, generator=generator) < p).float().view(n, 1)
    scale = 1 + (scale - 1) * apply
    bias = bias * apply
    hed = hed * scale.view(n, 3, 1, 1) + bias.view(n, 3, 1, 1)
    od = torch.einsum("ndhw,dc->nchw", hed, torch.from_numpy(_RGB_FROM_HED))
    return torch.exp(-od).clamp_(0, 1)


def _augment(
    batch: torch.Tensor, generator: torch.Generator, jitter: float, hed: float = 0.0, hed_p: float = 0.8
) -> torch.Tensor:
    """Flips, 90° rotations, HED stain jitter and colour jitter on a [0, 1] (n, 3, h, w) batch."""
    import torch

    n = batch.shape[0]
    if hed > 0:
        batch = hed_jitter(batch, generator, hed, hed_p)
    flip = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip.view(n, 1, 1, 1), batch.flip(3), batch)
    turns = torch.randint(0, 4, (n,), generator=generator)
    batch = torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(batch, turns, strict=True)])
    if jitter > 0:
        def factor() -> torch.Tensor:
            return (1 + (torch.rand(n, generator=generator) * 2 - 1) * jitter).view(n, 1, 1, 1)

        batch = batch * factor()  # brightness
        mean = batch.mean(dim=(1, 2, 3), keepdim=True)
        batch = mean + (batch - mean) * factor()  # contrast
        grey = batch.mean(dim=1, keepdim=True)
        batch = grey + (batch - grey) * factor()  # saturation
    return batch.clamp_(0, 1)


def train_module(
    module: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    preprocessing: Preprocessing,
    settings: TrainSettings,
) -> list[EpochStats]:
    """Train ``module`` in place on RGB uint8 (n, h, w, 3) images with integer labels."""
    import torch
    from tqdm import tqdm

    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images, got {len(images)} images and {len(labels)} labels")
    seed_everything(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    optimiser = torch.optim.AdamW(module.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps = settings.epochs * int(np.ceil(len(images) / settings.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=settings.learning_rate, total_steps=steps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    targets_all = torch.as_tensor(labels, dtype=torch.long)
    history: list[EpochStats] = []
    module.train()
    for epoch in range(1, settings.epochs + 1):
        order = torch.randperm(len(images), generator=generator).numpy()
        seen = correct = 0
        total_loss = 0.0
        start = time.perf_counter()
        bar = tqdm(
            range(0, len(order), settings.batch_size),
            desc=f"epoch {epoch}/{settings.epochs}",
            unit="batch",
            disable=not settings.progress,
            leave=False,
        )
        for offset in bar:
            index = np.sort(order[offset : offset + settings.batch_size])
            batch = torch.from_numpy(np.ascontiguousarray(images[index])).permute(0, 3, 1, 2).float().div_(255)
            if settings.augment:
                batch = _augment(batch, generator, settings.colour_jitter, settings.hed_jitter, settings.hed_p)
            batch = (batch - mean) / std
            targets = targets_all[index]
            logits = module(batch)
            loss = loss_fn(logits, targets)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            seen += len(index)
            total_loss += float(loss) * len(index)
            correct += int((logits.argmax(1) == targets).sum())
            rate = seen / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.2f}", tiles_s=f"{rate:.0f}")
        stats = EpochStats(epoch, total_loss / seen, correct / seen, seen / (time.perf_counter() - start))
        _log.info(
            "epoch %d: loss %.4f, accuracy %.3f, %.0f tiles/s", epoch, stats.loss, stats.accuracy, stats.tiles_per_s
        )
        history.append(stats)
    module.eval()
    return history
