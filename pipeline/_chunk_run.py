"""Running chunks: read a chunk's tiles, classify them, write its heatmap block, mark it done.

:class:`ChunkJob` is what any worker needs to run a slide's chunks (paths and settings,
never pixels, models or open handles); a :class:`ChunkExecutor` decides where chunks run
(this process, or a Dask cluster in ``flows``). A job sent to other processes is first
:meth:`ChunkJob.detached`: the slide's path, which may name a patient, stays in an
owner-only note in the job's marker folder, and the descriptor names only the slide ID and
its result folder (named by that ID); the worker reads the path back
(:meth:`ChunkJob.attached`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from ._backend import BackendName
from ._chunks import ChunkTask
from ._classifier import PatchClassifier
from ._engine import EngineSettings, classify_stream
from ._errors import WorkerError
from ._grid import GridSpec
from ._omezarr import write_heatmap_block
from ._result import atomic_write_text
from ._slide import Slide

__all__ = ["ChunkJob", "ChunkExecutor", "run_chunk", "run_chunks", "run_sequentially", "chunk_marker"]


_SOURCE_NOTE = "slide-source.json"
"""In a job's marker folder (``.work/chunks``, dropped with ``.work`` when the result is
sealed): the slide's path for workers of a detached job. Not a ``.done`` marker."""


@dataclass(frozen=True)
class ChunkJob:
    """What any worker needs to run a slide's chunks. Paths must be valid where the worker
    runs (shared storage); the µm/px was resolved and recorded by the client."""

    slide_id: str
    slide_path: str | None
    """None in a :meth:`detached` job: the path is in its source note."""
    backend: BackendName
    mpp_x: float
    mpp_y: float
    grid: GridSpec
    heatmap_path: str
    done_dir: str
    """The chunk markers' folder (and a detached job's source note)."""
    engine: EngineSettings

    @property
    def source_note(self) -> Path:
        return Path(self.done_dir) / _SOURCE_NOTE

    def detached(self) -> ChunkJob:
        """This job as it may travel to other machines: the slide's path is written to an
        owner-only source note in the marker folder (the workers write there anyway) and
        left out of the returned job. Call :meth:`drop_source_note` when the chunks are done."""
        if self.slide_path is None:
            return self
        note = self.source_note
        tmp = note.with_name(f".{note.name}.{os.getpid()}.tmp")
        text = json.dumps({"slide_id": self.slide_id, "slide_path": self.slide_path})
        try:
            # Owner-only from its creation: the path may name a patient.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, note)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return replace(self, slide_path=None)

    def attached(self) -> ChunkJob:
        """Where the chunks run: a :meth:`detached` job with its slide's path read back from
        the source note (a job that has its path is returned as it is)."""
        if self.slide_path is not None:
            return self
        try:
            data = json.loads(self.source_note.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise WorkerError(
                f"slide {self.slide_id}: its source note is gone from the result's work folder (the run ended, "
                "or another run replaced the result)", transient=False,
            ) from None
        except PermissionError:
            raise WorkerError(
                f"slide {self.slide_id}: a worker cannot read the slide's source note in the result's work folder",
                hint="run the Dask workers as the user that runs wsiflow (they write its result folders)",
                transient=False,
            ) from None
        except (OSError, ValueError):
            raise WorkerError(f"slide {self.slide_id}: the slide's source note cannot be read",
                              hint="check the shared storage the workers write results to") from None
        if not isinstance(data, dict) or data.get("slide_id") != self.slide_id \
                or not isinstance(data.get("slide_path"), str):
            raise WorkerError(f"slide {self.slide_id}: the source note in its result folder is for another slide",
                              hint="do not run the same result folder from two places; run it again",
                              transient=False)
        return replace(self, slide_path=data["slide_path"])

    def drop_source_note(self) -> None:
        """Remove the source note of a :meth:`detached` job (if any)."""
        self.source_note.unlink(missing_ok=True)


class ChunkExecutor(Protocol):
    """Runs every task: in this process (``run_local(tasks)``) or elsewhere (from ``job``).

    ``advance(n)`` reports tiles finished by executors that cannot report per batch.
    Must raise a :class:`WsiflowError` for a chunk that fails.
    """

    def __call__(
        self,
        tasks: Sequence[ChunkTask],
        job: ChunkJob,
        run_local: Callable[[Sequence[ChunkTask]], None],
        advance: Callable[[int], None] | None,
    ) -> None: ...


def run_sequentially(
    tasks: Sequence[ChunkTask], job: ChunkJob, run_local: Callable[[Sequence[ChunkTask]], None],
    advance: Callable[[int], None] | None,
) -> None:
    """The default executor: every chunk in this process, in order, in one tile stream."""
    run_local(tasks)


def chunk_marker(done_dir: Path, task: ChunkTask) -> Path:
    """The file whose presence says ``task`` is finished (its heatmap block is written)."""
    return done_dir / f"{task.name}.done"


def run_chunks(
    tasks: Sequence[ChunkTask],
    slide: Slide,
    classifier: PatchClassifier,
    grid_spec: GridSpec,
    heatmap_path: Path,
    done_dir: Path,
    engine: EngineSettings,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Classify the chunks' tiles in one stream; write each chunk's block and mark it done
    as soon as its last tile is classified.

    One stream, not one per chunk: the readers keep decoding the next chunk's tiles while
    the model works on this one's, so small chunks (fine-grained resume) cost little speed.
    """
    tile, mpp = grid_spec.tile_size_px, grid_spec.target_mpp
    owner = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
    ends = np.cumsum([len(task) for task in tasks])
    probabilities = np.empty((len(owner), len(classifier.class_names)), dtype=np.float32)
    written = 0

    def read(k: int) -> np.ndarray:
        t, i = owner[k]
        return slide.read_region_at_mpp(tasks[t].x[i], tasks[t].y[i], tile, tile, mpp)

    def finish_chunks(start: int, batch: np.ndarray) -> None:
        nonlocal written
        probabilities[start : start + len(batch)] = batch
        filled = start + len(batch)
        while written < len(tasks) and ends[written] <= filled:
            task = tasks[written]
            first = int(ends[written]) - len(task)
            write_heatmap_block(heatmap_path, task.row_range, task.col_range, task.rows, task.cols,
                                probabilities[first : int(ends[written])])
            atomic_write_text(chunk_marker(done_dir, task), str(len(task)))
            written += 1

    # Batches end at chunk ends, so a resumed run computes each chunk exactly as before.
    classify_stream(classifier, read, range(len(owner)), engine, on_batch, finish_chunks,
                    segment_ends=[int(e) for e in ends])


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
    """Read one chunk's tiles, classify them, write its heatmap block, mark it done."""
    run_chunks([task], slide, classifier, grid_spec, heatmap_path, done_dir, engine, on_batch)
