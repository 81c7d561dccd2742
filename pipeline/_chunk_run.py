"""Running chunks: read a chunk's tiles, classify them, write its heatmap block, mark it done.

:class:`ChunkJob` is what any worker needs to run a slide's chunks (paths and settings,
never pixels, models or open handles); a :class:`ChunkExecutor` decides where chunks run
(this process, or a Dask cluster in ``flows``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ._backend import BackendName
from ._chunks import ChunkTask
from ._classifier import PatchClassifier
from ._engine import EngineSettings, classify_stream
from ._grid import GridSpec
from ._omezarr import write_heatmap_block
from ._result import atomic_write_text
from ._slide import Slide

__all__ = ["ChunkJob", "ChunkExecutor", "run_chunk", "run_sequentially", "chunk_marker"]


@dataclass(frozen=True)
class ChunkJob:
    """What any worker needs to run a slide's chunks. Paths must be valid where the worker
    runs (shared storage); the µm/px was resolved and recorded by the client."""

    slide_id: str
    slide_path: str
    backend: BackendName
    mpp_x: float
    mpp_y: float
    grid: GridSpec
    heatmap_path: str
    done_dir: str
    engine: EngineSettings


class ChunkExecutor(Protocol):
    """Runs every task: in this process (``run_local``) or elsewhere (from ``job``).

    ``advance(n)`` reports tiles finished by executors that cannot report per batch.
    Must raise a :class:`WsiflowError` for a chunk that fails.
    """

    def __call__(
        self,
        tasks: Sequence[ChunkTask],
        job: ChunkJob,
        run_local: Callable[[ChunkTask], None],
        advance: Callable[[int], None] | None,
    ) -> None: ...


def run_sequentially(
    tasks: Sequence[ChunkTask], job: ChunkJob, run_local: Callable[[ChunkTask], None],
    advance: Callable[[int], None] | None,
) -> None:
    """The default executor: every chunk in this process, in order."""
    for task in tasks:
        run_local(task)


def chunk_marker(done_dir: Path, task: ChunkTask) -> Path:
    """The file whose presence says ``task`` is finished (its heatmap block is written)."""
    return done_dir / f"{task.name}.done"


def run_chunk(
    task: ChunkTask,
    slide: Slide,
    classifier: PatchClassifier,
    grid_spec: GridSpec,
    heatmap_path: Path,
    done_dir: Path,
    engine: EngineSettings,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Read a chunk's tiles, classify them, write its heatmap block, mark it done."""
    tile, mpp = grid_spec.tile_size_px, grid_spec.target_mpp

    def read(i: int) -> np.ndarray:
        return slide.read_region_at_mpp(task.x[i], task.y[i], tile, tile, mpp)

    probabilities = classify_stream(classifier, read, range(len(task)), engine, on_batch)
    write_heatmap_block(heatmap_path, task.row_range, task.col_range, task.rows, task.cols, probabilities)
    atomic_write_text(chunk_marker(done_dir, task), str(len(task)))
