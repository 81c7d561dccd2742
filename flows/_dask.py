"""Run a slide's chunks on a Dask cluster (an existing scheduler or a LocalCluster).

Only descriptors travel through the scheduler: the chunk task (grid cells and level-0
coordinates), the slide job (paths, mpp, settings) and a model reference (registry,
name@version, sha256). Each worker process loads the model once, verified against the
sha256, and keeps it (cached by digest); it opens slides itself and reads its chunk's tiles
where the model runs, so no pixels cross the network.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline import (
    ChunkJob,
    ChunkTask,
    MppPolicy,
    Slide,
    WorkerError,
    WsiflowError,
    open_slide,
    run_chunk,
)

from ._model_ref import ModelRef, load_model_ref, loaded_models

__all__ = ["DaskChunkExecutor", "chunk_on_worker", "worker_cache_sizes", "dask_executor", "close_dask_clients"]

_log = logging.getLogger(__name__)

# Per worker process: slides by (path, backend, mpp).
_SLIDES: dict[tuple[str, str, float, float], Slide] = {}
_MAX_OPEN_SLIDES = 8


def _worker_slide(job: ChunkJob) -> Slide:
    key = (job.slide_path, job.backend, job.mpp_x, job.mpp_y)
    slide = _SLIDES.get(key)
    if slide is None:
        if len(_SLIDES) >= _MAX_OPEN_SLIDES:
            _SLIDES.pop(next(iter(_SLIDES))).close()
        # The mpp was resolved (and recorded) by the client; the worker just uses it.
        slide = open_slide(job.slide_path, backend=job.backend, mpp_policy=MppPolicy.fixed(job.mpp_x, job.mpp_y))
        _SLIDES[key] = slide
    return slide


def chunk_on_worker(task: ChunkTask, job: ChunkJob, model: ModelRef) -> tuple[str, int, WsiflowError | None]:
    """Run one chunk where this function runs. Bad input is returned, not raised, so Dask
    does not retry it; anything else (I/O hiccups, lost workers) raises and is retried."""
    try:
        run_chunk(task, _worker_slide(job), load_model_ref(model), job.grid, Path(job.heatmap_path),
                  Path(job.done_dir), job.engine)
    except WsiflowError as exc:
        _SLIDES.pop((job.slide_path, job.backend, job.mpp_x, job.mpp_y), None)
        return task.name, 0, exc
    return task.name, len(task), None


def worker_cache_sizes() -> dict[str, Any]:
    """For checks on a worker: how many models and slides this process holds, and its pid."""
    return {"models": loaded_models(), "slides": len(_SLIDES), "pid": os.getpid()}


class DaskChunkExecutor:
    """A ``pipeline.ChunkExecutor`` that submits chunks to a ``distributed.Client``."""

    def __init__(self, client: Any, model: ModelRef, retries: int = 2) -> None:
        self.client = client
        self.model = model
        self.retries = retries

    def _gpu_workers(self) -> bool:
        workers = self.client.scheduler_info().get("workers", {})
        return any("GPU" in (w.get("resources") or {}) for w in workers.values())

    def __call__(
        self,
        tasks: Sequence[ChunkTask],
        job: ChunkJob,
        run_local: Callable[[Sequence[ChunkTask]], None],
        advance: Callable[[int], None] | None,
    ) -> None:
        from concurrent.futures import CancelledError

        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        # Failures worth a retry and, once retries are spent, a WorkerError.
        transient = (KilledWorker, CancelledError, OSError, RuntimeError, TimeoutError, MemoryError)
        if not tasks:
            return
        resources = {"GPU": 1} if self._gpu_workers() else None
        futures = [
            self.client.submit(
                chunk_on_worker, task, job, self.model,
                key=f"wsiflow-chunk-{job.slide_id}-{task.name}", pure=False,
                retries=self.retries, resources=resources,
            )
            for task in tasks
        ]
        failure: WsiflowError | None = None
        pending = as_completed(futures)
        for future in pending:
            try:
                _, tiles, error = future.result()
            except KilledWorker:
                # Worker processes died running this chunk (a crash in a native decoder, the
                # OOM killer): the slide is likely poison, so do not feed it more workers.
                failure = WorkerError(
                    "a worker process died while running a chunk of this slide (a crash in the slide "
                    "library or out of memory); the rest of the slide was not sent to the cluster",
                    transient=False,
                )
            except transient as exc:
                failure = WorkerError(
                    f"a chunk failed {self.retries + 1} times on the cluster ({type(exc).__name__})"
                )
            else:
                if error is None:
                    if advance is not None:
                        advance(tiles)
                    continue
                failure = error
            break
        if failure is not None:
            # Fail fast: chunks already finished keep their markers, so a rerun resumes.
            for future in futures:
                future.cancel()
            raise failure


# Per process: one client per scheduler address, shared by the slides this process runs.
_CLIENTS: dict[str, Any] = {}


def dask_executor(address: str, model: ModelRef) -> DaskChunkExecutor:
    """An executor sending chunks to the scheduler at ``address`` (client made once)."""
    from distributed import Client

    client = _CLIENTS.get(address)
    if client is None:
        client = _CLIENTS[address] = Client(address, timeout="60s")
    return DaskChunkExecutor(client, model)


def close_dask_clients() -> None:
    """Close the clients :func:`dask_executor` made in this process."""
    for client in list(_CLIENTS.values()):
        client.close()
    _CLIENTS.clear()
