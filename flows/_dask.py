"""Run a slide's chunks on a Dask cluster (an existing scheduler or a LocalCluster).

Only descriptors travel through the scheduler: the chunk task (grid cells and level-0
coordinates), the slide job and a model reference (registry, name@version, sha256). The
job is detached first (``pipeline.ChunkJob.detached``): it names the slide by its
pseudonymous ID and its result folder (named by that ID), never by its path; each worker
reads the path from an owner-only note in the result's work folder, which it writes to
anyway. Nothing a worker raises crosses back with text beyond its type and errno (an
``OSError``'s file name stays on the worker). Each worker process loads the model once,
verified against the sha256, and keeps it (cached by digest); it opens slides itself and
reads its chunk's tiles where the model runs, so no pixels cross the network. The workers
there when a process first connects load the model before any slide starts, so a slide's
tiles/s measures its inference, not the workers' start-up.

A ``tls://`` scheduler is reached with the certificates in the run settings
(:func:`dask_security`: mutual TLS, encryption required); without them, with Dask's own
TLS config. A refused certificate is one wsiflow error, not Dask's traceback.

Ctrl-C: :func:`stop_dask_chunks` makes every chunk wait in this process end at once with
:class:`SlideInterrupted`, and the slide's queued chunks are cancelled; chunks finished
before keep their done-markers, so a rerun resumes.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline import (
    ChunkJob,
    ChunkTask,
    ConfigError,
    RunSettings,
    Slide,
    WorkerError,
    WsiflowError,
    run_chunk,
)

from ._model_ref import ModelRef, load_model_ref, loaded_models

__all__ = [
    "DaskChunkExecutor",
    "SlideInterrupted",
    "chunk_on_worker",
    "worker_cache_sizes",
    "dask_executor",
    "dask_security",
    "close_dask_clients",
    "stop_dask_chunks",
    "reset_dask_stop",
]

_log = logging.getLogger(__name__)

# Per worker process: slides by (path, backend, mpp).
_SLIDES: dict[tuple[str | None, str, float, float, str | None], Slide] = {}
_MAX_OPEN_SLIDES = 8

# Per process: set by Ctrl-C (from the main thread's signal handler, so only an Event).
_STOP = threading.Event()
_POLL_S = 0.2
"""How often a chunk wait looks at :data:`_STOP` while no chunk finishes."""


class SlideInterrupted(Exception):
    """The run was interrupted (Ctrl-C) while this slide was being analysed: it is neither
    done nor failed, and its finished chunks are kept for a rerun. Not a ``WsiflowError``:
    nothing is wrong with the slide, and the analysis lets it through untouched."""

    def __init__(self) -> None:
        super().__init__("interrupted; finished chunks are kept, a rerun resumes")


def stop_dask_chunks() -> None:
    """Ctrl-C: chunk waits in this process raise :class:`SlideInterrupted` (within
    ``_POLL_S``) and cancel their slide's remaining chunks. Safe in a signal handler."""
    _STOP.set()


def reset_dask_stop() -> None:
    """After an interrupted run has ended, let later runs in this process wait again."""
    _STOP.clear()


def _slide_key(job: ChunkJob) -> tuple[str | None, str, float, float, str | None]:
    return job.slide_path, job.backend, job.mpp_x, job.mpp_y, job.reader


def _worker_slide(job: ChunkJob) -> Slide:
    """The job's slide, opened once per worker process (``job`` is attached: it has its path)."""
    key = _slide_key(job)
    slide = _SLIDES.get(key)
    if slide is None:
        if len(_SLIDES) >= _MAX_OPEN_SLIDES:
            _SLIDES.pop(next(iter(_SLIDES))).close()
        # The mpp (and reader) were resolved and recorded by the client; the worker uses them.
        slide = job.open_slide()
        _SLIDES[key] = slide
    return slide


def _bare(exc: Exception) -> Exception:
    """``exc`` without its text, for the trip back through the scheduler: its nearest
    built-in type survives (so the client knows what is worth a retry), a file name does not."""
    if isinstance(exc, OSError) and exc.errno is not None:
        # OSError(errno, text) is the errno's subclass again (FileNotFoundError, ...).
        return OSError(exc.errno, exc.strerror or type(exc).__name__)
    builtin = next(c for c in type(exc).__mro__ if c.__module__ == "builtins")
    try:
        return builtin(f"{type(exc).__name__} in a chunk")
    except TypeError:  # a built-in with more constructor arguments (UnicodeDecodeError, ...)
        return RuntimeError(f"{type(exc).__name__} in a chunk")


def chunk_on_worker(task: ChunkTask, job: ChunkJob, model: ModelRef) -> tuple[str, int, WsiflowError | None]:
    """Run one chunk where this function runs (``job`` may be detached). Bad input is
    returned, not raised, so Dask does not retry it; anything else (I/O hiccups, lost
    workers) raises, without its text, and is retried."""
    failure: Exception | None = None
    attached = job
    try:
        attached = job.attached()
        run_chunk(task, _worker_slide(attached), load_model_ref(model), attached.grid,
                  Path(attached.heatmap_path), Path(attached.done_dir), attached.engine, reader=attached.reader)
    except WsiflowError as exc:
        if attached.slide_path is not None:
            _SLIDES.pop(_slide_key(attached), None)
        return task.name, 0, exc
    except Exception as exc:  # re-raised below, bare: Dask retries it and reports its type
        _log.debug("slide %s: chunk %s raised", job.slide_id, task.name, exc_info=True)
        failure = _bare(exc)
    if failure is not None:
        # Raised outside the except block, so the original (and its text) is not its context:
        # Dask pickles an exception's chain with it.
        raise failure
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
        if not tasks:
            return
        resources = {"GPU": 1} if self._gpu_workers() else None
        try:
            remote = job.detached()  # the slide's path stays on the shared storage, off the wire
        except OSError as exc:
            raise WorkerError(f"slide {job.slide_id}: its source note cannot be written to the result's work folder "
                              f"({exc.strerror or type(exc).__name__})", hint="check the output folder") from None
        try:
            futures = [
                self.client.submit(
                    chunk_on_worker, task, remote, self.model,
                    key=f"wsiflow-chunk-{job.slide_id}-{task.name}", pure=False,
                    retries=self.retries, resources=resources,
                )
                for task in tasks
            ]
            try:
                failure = self._wait(futures, advance)
            except BaseException:
                # Ctrl-C (here, or SlideInterrupted from another thread's stop): the cluster
                # must not go on with this slide; finished chunks keep their markers.
                self.client.cancel(futures)
                raise
        finally:
            # The note lives only while this slide's chunks do (a rerun writes it again).
            job.drop_source_note()
        if failure is not None:
            # Fail fast: chunks already finished keep their markers, so a rerun resumes.
            self.client.cancel(futures)
            raise failure

    def _wait(self, futures: list[Any], advance: Callable[[int], None] | None) -> WsiflowError | None:
        """Wait for the chunks, reporting tiles as each finishes; the first failure, if any.

        Polls instead of blocking in ``as_completed`` so that :func:`stop_dask_chunks` (and
        a Ctrl-C in this thread) ends the wait within ``_POLL_S``."""
        from concurrent.futures import CancelledError

        from distributed.scheduler import KilledWorker

        # Failures worth a retry and, once retries are spent, a WorkerError.
        transient = (KilledWorker, CancelledError, OSError, RuntimeError, TimeoutError, MemoryError)
        pending = list(futures)
        while pending:
            if _STOP.is_set():
                raise SlideInterrupted()
            finished: list[Any] = []
            waiting: list[Any] = []
            for future in pending:
                (finished if future.done() else waiting).append(future)
            pending = waiting
            if not finished:
                _STOP.wait(_POLL_S)
                continue
            for future in finished:
                try:
                    _, tiles, error = future.result()
                except KilledWorker:
                    # Worker processes died running this chunk (a crash in a native decoder, the
                    # OOM killer): the slide is likely poison, so do not feed it more workers.
                    return WorkerError(
                        "a worker process died while running a chunk of this slide (a crash in the slide "
                        "library or out of memory); the rest of the slide was not sent to the cluster",
                        transient=False,
                    )
                except transient as exc:
                    if _STOP.is_set():
                        raise SlideInterrupted() from None
                    return WorkerError(
                        f"a chunk failed {self.retries + 1} times on the cluster ({type(exc).__name__})"
                    )
                if error is not None:
                    return error
                if advance is not None:
                    advance(tiles)
        return None


# Per process: one client per scheduler address (and certificates), shared by the slides this process runs.
_CLIENTS: dict[tuple[str, tuple[str, ...]], Any] = {}
_WARMED: set[tuple[tuple[str, tuple[str, ...]], str]] = set()
_CONNECT_TIMEOUT = "60s"


def _tls_files(settings: RunSettings) -> tuple[str, ...]:
    files = (settings.dask_tls_ca_file, settings.dask_tls_client_cert, settings.dask_tls_client_key)
    return tuple(os.fspath(f) if f is not None else "" for f in files)


def dask_security(settings: RunSettings) -> Any:
    """The ``distributed.security.Security`` of the run's scheduler: its certificates with a
    ``tls://`` address (encryption required), else None (Dask's own config)."""
    address = settings.dask_address or ""
    ca, cert, key = _tls_files(settings)
    if not address.startswith("tls://") or not (ca and cert):
        return None
    from distributed.security import Security

    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key or None, require_encryption=True)


def _connect(address: str, security: Any) -> Any:
    """A client of the scheduler; a refused certificate or a scheduler that is not there is
    one error line, not Dask's traceback."""
    from distributed import Client

    try:
        return Client(address, security=security, timeout=_CONNECT_TIMEOUT)
    except FileNotFoundError:
        raise ConfigError("a Dask TLS certificate file (dask.tls_*) does not exist",
                          hint="fix dask.tls_ca_file, dask.tls_client_cert and dask.tls_client_key") from None
    except ssl.SSLError as exc:
        raise ConfigError(f"the Dask TLS certificates (dask.tls_*) cannot be used ({exc.reason or 'SSL error'})",
                          hint="give PEM files: the authority's certificate, the client certificate it signed and "
                               "that certificate's key") from None
    except TypeError:
        # Dask's words for a tls:// address without any TLS context.
        raise ConfigError(f"the Dask scheduler {address} needs TLS, but no certificates are configured",
                          hint="set dask.tls_ca_file and dask.tls_client_cert (and dask.tls_client_key) in the "
                               "config") from None
    except (OSError, TimeoutError) as exc:
        raise WorkerError(
            f"cannot connect to the Dask scheduler at {address} ({type(exc).__name__})",
            hint="check that the scheduler runs and, with tls://, that it accepts this client's certificate "
                 "(signed by the authority in dask.tls_ca_file)",
        ) from None


def dask_executor(settings: RunSettings, model: ModelRef) -> DaskChunkExecutor:
    """An executor sending chunks to the scheduler of ``settings`` (client made once per
    process), with its TLS certificates when the address is ``tls://``."""
    if settings.dask_address is None:
        raise ConfigError("no Dask scheduler address in the run settings", hint="set dask.address")
    address, security, files = settings.dask_address, dask_security(settings), _tls_files(settings)
    key = (address, files)
    client = _CLIENTS.get(key)
    if client is None:
        client = _CLIENTS[key] = _connect(address, security)
    if (key, model.sha256) not in _WARMED:
        _warm_workers(client, model)
        _WARMED.add((key, model.sha256))
    return DaskChunkExecutor(client, model)


def _load_on_worker(model: ModelRef) -> None:
    load_model_ref(model).module  # noqa: B018 - built now, before any slide's clock starts


def _warm_workers(client: Any, model: ModelRef) -> None:
    """Load the model on each worker there now (torch import, weights read and verified),
    before a slide's clock starts. A worker that cannot load it is left to the chunks,
    which report why; workers that join later load it with their first chunk."""
    from distributed import wait

    # Ahead of queued chunks (another slide's), so this slide does not wait for them.
    futures = [
        client.submit(_load_on_worker, model, workers=[address], allow_other_workers=False, pure=False,
                      priority=100)
        for address in client.nthreads()
    ]
    wait(futures)


def close_dask_clients() -> None:
    """Close the clients :func:`dask_executor` made in this process."""
    for client in list(_CLIENTS.values()):
        client.close()
    _CLIENTS.clear()
    _WARMED.clear()
