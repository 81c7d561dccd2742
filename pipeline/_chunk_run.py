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
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from ._backend import BackendName
from ._chunks import ChunkTask
from ._classifier import PatchClassifier
from ._engine import EngineSettings, EngineStats, classify_stream
from ._errors import WorkerError
from ._grid import GridSpec
from ._mpp import MppPolicy
from ._omezarr import write_heatmap_block
from ._result import atomic_write_text
from ._slide import Slide, open_slide

__all__ = ["ChunkJob", "ChunkExecutor", "run_chunk", "run_chunks", "run_sequentially", "chunk_marker", "check_reader"]


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
    reader: str | None = None
    """The client's :attr:`Slide.reader` (part of the run key: pixels differ slightly between
    readers). A worker opens the slide with the same reader (:meth:`open_slide`) and refuses
    the chunk when it cannot; None: not checked (jobs made before the field existed)."""

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

    def open_slide(self) -> Slide:
        """The job's slide where its chunks run (an :meth:`attached` job): its backend, the
        µm/px the client resolved, and the client's reader (the direct JPEG reader only when
        :attr:`reader` names one). :class:`WorkerError` when this worker reads it otherwise."""
        if self.slide_path is None:
            raise WorkerError(f"slide {self.slide_id}: the chunk job names no slide", transient=False)
        return _open_as_run(self.slide_path, self.backend, self.mpp_x, self.mpp_y, self.reader, self.slide_id)

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


def _open_as_run(path: str, backend: BackendName, mpp_x: float, mpp_y: float, reader: str | None,
                 slide_id: str | None = None) -> Slide:
    """``path`` opened as the run opened it: its backend, the µm/px it resolved, and its
    reader (the direct JPEG reader unless ``reader`` names the backend alone; None: as
    :func:`open_slide` does by default), checked (:func:`check_reader`)."""
    slide = open_slide(path, backend=backend, mpp_policy=MppPolicy.fixed(mpp_x, mpp_y),
                       direct_reader=reader is None or "+" in reader)
    try:
        check_reader(slide, reader, slide_id)
    except BaseException:
        slide.close()
        raise
    return slide


def check_reader(slide: Slide, reader: str | None, slide_id: str | None = None) -> None:
    """:class:`WorkerError` (not transient) when ``slide`` is read by another reader than the
    run's key names (``reader``; None: any): its tiles would not be the client's pixels."""
    if reader is not None and slide.reader != reader:
        raise WorkerError(
            f"{f'slide {slide_id}: ' if slide_id else ''}this worker reads the slide with {slide.reader}, "
            f"the run with {reader}",
            hint="install the same wsiflow version (and slide libraries) on the workers as on the client",
            transient=False,
        )


_ReaderSpec = tuple[str, BackendName, float, float, str]
"""What a reader process needs to open a slide as the run does: path, backend, µm/px, reader."""
_PROCESS_SLIDE: tuple[_ReaderSpec, Slide] | None = None
"""In a reader process: the slide it has open (the last one asked for)."""
_POOL_LOCK = threading.Lock()
_POOL: tuple[int, ProcessPoolExecutor] | None = None
"""In the main process: the reader processes, kept for later slides and chunks (started once)."""


def _read_in_process(spec: _ReaderSpec, x: float, y: float, tile: int, mpp: float) -> np.ndarray:
    """In a reader process: one tile of the slide ``spec`` names (opened once per slide)."""
    global _PROCESS_SLIDE
    if _PROCESS_SLIDE is None or _PROCESS_SLIDE[0] != spec:
        if _PROCESS_SLIDE is not None:
            _PROCESS_SLIDE[1].close()
            _PROCESS_SLIDE = None
        _PROCESS_SLIDE = (spec, _open_as_run(*spec))
    return _PROCESS_SLIDE[1].read_region_at_mpp(x, y, tile, tile, mpp)


def _reader_pool(processes: int) -> ProcessPoolExecutor:
    """``processes`` reader processes (spawned: this process has torch's threads running)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL[0] == processes and not getattr(_POOL[1], "_broken", False):
            return _POOL[1]
        if _POOL is not None:
            _POOL[1].shutdown(wait=False, cancel_futures=True)
        pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
        _POOL = (processes, pool)
        return pool


def _tile_reader(slide: Slide, engine: EngineSettings, tile: int, mpp: float) -> Callable[[float, float], np.ndarray]:
    """Reads one tile at (x, y): in this process, or in the engine's reader processes when it
    asks for them and the slide is a file they can open again."""
    path = getattr(slide.backend, "path", None)
    if engine.reader_processes < 1 or path is None:
        return lambda x, y: slide.read_region_at_mpp(x, y, tile, tile, mpp)
    spec: _ReaderSpec = (os.fspath(path), slide.info.backend, slide.mpp.mpp_x, slide.mpp.mpp_y, slide.reader)
    pool = _reader_pool(engine.reader_processes)
    return lambda x, y: pool.submit(_read_in_process, spec, x, y, tile, mpp).result()


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
    *,
    reader: str | None = None,
    stats: EngineStats | None = None,
) -> None:
    """Classify the chunks' tiles in one stream; write each chunk's block and mark it done
    as soon as its last tile is classified. ``reader``: the run key's reader, checked
    against ``slide`` (:func:`check_reader`); ``stats`` receives the engine's timings.

    One stream, not one per chunk: the readers keep decoding the next chunk's tiles while
    the model works on this one's, so small chunks (fine-grained resume) cost little speed.
    """
    check_reader(slide, reader)
    tile, mpp = grid_spec.tile_size_px, grid_spec.target_mpp
    owner = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
    ends = np.cumsum([len(task) for task in tasks])
    probabilities = np.empty((len(owner), len(classifier.class_names)), dtype=np.float32)
    written = 0
    read_at = _tile_reader(slide, engine, tile, mpp)
    if engine.reader_processes > engine.readers:  # a thread waits on each process
        engine = replace(engine, readers=engine.reader_processes)

    def read(k: int) -> np.ndarray:
        t, i = owner[k]
        return read_at(tasks[t].x[i], tasks[t].y[i])

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
                    segment_ends=[int(e) for e in ends], stats=stats)


def run_chunk(
    task: ChunkTask,
    slide: Slide,
    classifier: PatchClassifier,
    grid_spec: GridSpec,
    heatmap_path: Path,
    done_dir: Path,
    engine: EngineSettings,
    on_batch: Callable[[int], None] | None = None,
    *,
    reader: str | None = None,
) -> None:
    """Read one chunk's tiles, classify them, write its heatmap block, mark it done."""
    run_chunks([task], slide, classifier, grid_spec, heatmap_path, done_dir, engine, on_batch, reader=reader)
