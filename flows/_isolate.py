"""Each slide analysed in a child process, so that a native crash costs one slide.

A damaged slide can crash the native libraries that decode it (OpenSlide, libtiff,
libjpeg, OpenJPEG) with a signal no Python code can catch. In a child process that costs
one slide: it is reported as a ``worker`` error and the run goes on with the next slide,
and the chunks the child finished are kept for a rerun. The child is reused across slides
(the model is loaded once) and replaced after a crash.

Time limit: the child notes when a slide's analysis starts (after the model is loaded) in a
shared value; a slide that runs past ``engine.slide_time_limit_s`` fails with a ``worker``
error. The child checks it between steps and batches of tiles itself; one stuck in a long
native call is stopped by the parent :data:`_LIMIT_GRACE_S` later (SIGTERM, then SIGKILL),
and the next slide gets a fresh child. Finished chunks are kept either way.

Ctrl-C: a terminal sends SIGINT to every process in its foreground group, children
included. The child is started with SIGINT blocked (:func:`quiet_children`), so it never
prints a traceback of its own; the run's Ctrl-C handler stops it instead (:meth:`stop`):
SIGTERM makes the child abandon the slide under way (locks released, its queued Dask
chunks cancelled, the progress bar cleared) and wait to be shut down; a second Ctrl-C
kills it.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from multiprocessing import resource_tracker
from types import FrameType
from typing import Any

from tqdm import tqdm

from pipeline import ModelInfo, RunSettings, SlideOutcome, WorkerError, WsiflowError, apply_offline_env

from ._dask import SlideInterrupted
from ._logs import configure_child_logging
from ._model_ref import ModelRef
from ._slide_job import SlideJob, analyse_job, contained_error, failed_job, prepare_job

__all__ = ["IsolatedSlideRunner", "quiet_children"]

_log = logging.getLogger(__name__)

_STOP_GRACE_S = 3.0
"""After Ctrl-C, how long a child may take to abandon its slide before it is killed."""
_LIMIT_GRACE_S = 5.0
"""Past a slide's time limit, how long the child has to stop it by itself before the parent does."""
_POLL_S = 0.25
"""How often the parent looks at the clock of the slide under way."""


@contextmanager
def quiet_children() -> Iterator[None]:
    """Processes started in this thread meanwhile (and threads, which start more) do not
    get the terminal's Ctrl-C: SIGINT is blocked here, and they inherit the mask (a Python
    process keeps it). The run's own handler stops them; a pending Ctrl-C arrives on exit.
    """
    # The resource tracker, when first started, unblocks SIGINT in the thread starting it:
    # start it now, before blocking, not in the middle of the first spawn.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# In the child: whether a slide is under way, whether the parent asked it to stop, and the
# value shared with the parent: time.monotonic() when the slide under way started, else 0.
_IN_SLIDE = False
_STOP_ASKED = False
_STARTED: Any = None


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """In the child: the parent's :meth:`IsolatedSlideRunner.stop`. Abandon the slide under
    way; an idle child just waits for the parent to shut it down (exiting here would only
    skip the clean-up that a normal exit does)."""
    global _STOP_ASKED
    _STOP_ASKED = True
    if _IN_SLIDE:
        raise KeyboardInterrupt


def _child_start(started: Any) -> None:
    global _STARTED
    _STARTED = started
    apply_offline_env()
    configure_child_logging()
    signal.signal(signal.SIGTERM, _on_sigterm)
    # tqdm's default lock is a multiprocessing one: a semaphore that a killed child would
    # leave to the resource tracker, which then warns at exit. Bars here need a thread lock.
    tqdm.set_lock(threading.RLock())


def _restart_slide_clock() -> None:
    """In the child: the model was just built; building it does not count against the limit."""
    _STARTED.value = time.monotonic()


def _analyse_in_child(job: SlideJob, settings: RunSettings, model: ModelRef, info: ModelInfo) -> SlideOutcome:
    global _IN_SLIDE
    _IN_SLIDE = True  # first, then look: a stop between the two is not missed
    try:
        if _STOP_ASKED:
            raise KeyboardInterrupt
        try:
            prepare_job(job, model)  # loading the model does not count against the slide's time limit
        except Exception as exc:  # the containment boundary, as in analyse_job
            _log.debug("loading the model failed", exc_info=True)
            return failed_job(job, info, exc if isinstance(exc, WsiflowError) else contained_error(exc))
        _STARTED.value = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
        return analyse_job(job, settings, model, info, on_model_built=_restart_slide_clock)
    finally:
        if _STARTED is not None:
            _STARTED.value = 0.0
        _IN_SLIDE = False


class IsolatedSlideRunner:
    """Runs :func:`analyse_job` in one reusable child process; a crash fails one slide."""

    def __init__(self, settings: RunSettings, model: ModelRef, info: ModelInfo) -> None:
        self._settings = settings
        self._model = model
        self._info = info
        self._pool: ProcessPoolExecutor | None = None
        self._stopped = False
        context = multiprocessing.get_context("spawn")
        # Lock-free: a child killed while holding a lock would leave the parent waiting on it.
        self._started: Any = context.RawValue("d", 0.0)  # a ctypes double in shared memory

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the parent may hold threads (tqdm, torch) that fork would copy mid-lock.
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_start,
                initargs=(self._started,),
            )
        return self._pool

    def _past_limit(self) -> bool:
        """Whether the slide under way ran past its time limit plus the child's grace."""
        limit = self._settings.engine.slide_time_limit_s
        started = self._started.value
        return limit is not None and started > 0 and time.monotonic() - started > limit + _LIMIT_GRACE_S

    def _result(self, future: Future[SlideOutcome]) -> SlideOutcome | None:
        """The child's outcome; None when the parent had to stop a slide past its time limit."""
        while not wait([future], timeout=_POLL_S).done:
            if self._past_limit() and not self._stopped:
                self._end_child()
                return None
        return future.result()

    def run(self, job: SlideJob) -> SlideOutcome:
        """The slide's outcome; :class:`SlideInterrupted` once :meth:`stop` was called."""
        if self._stopped:
            raise SlideInterrupted()
        self._started.value = 0.0
        with quiet_children():  # the child is spawned by the first submit
            future = self._executor().submit(_analyse_in_child, job, self._settings, self._model, self._info)
        try:
            outcome = self._result(future)
            if outcome is None:
                limit = self._settings.engine.slide_time_limit_s
                _log.info("slide %s: past its time limit; its process was stopped",
                          job.identity.slide_id if job.identity else None)
                return failed_job(job, self._info, WorkerError(
                    f"the slide's analysis ran past the time limit of {limit:g} s and its process was stopped",
                    hint="raise --slide-time-limit (engine.slide_time_limit_s) if the slide is just large, or check "
                         "it with `wsiflow inspect`; finished chunks are kept, so a rerun resumes",
                    transient=False,
                ))
            return outcome
        except BrokenProcessPool:
            if self._stopped:
                raise SlideInterrupted() from None
            self.close()
            _log.warning("the process analysing a slide died; continuing with the next slide")
            return SlideOutcome(
                job.identity.slide_id if job.identity else None, "failed", None, None, model=self._info.ref,
                error=WorkerError(
                    "the process analysing this slide died (a crash in the slide-decoding library, "
                    "or out of memory); the other slides are not affected",
                    hint="run `wsiflow inspect` on it; if it repeats, copy the file again or rescan it. "
                         "Finished chunks are kept for a rerun",
                    transient=False,
                ),
            )
        except KeyboardInterrupt:
            if self._stopped:  # the child abandoned the slide (or this thread was interrupted) after stop()
                raise SlideInterrupted() from None
            # Ctrl-C without wsiflow's handler (a caller's own loop): stop the child too, or
            # close() would wait for the whole slide.
            self.stop(hard=False)
            raise
        except SlideInterrupted:
            raise
        except Exception as exc:  # the outcome could not come back (e.g. it did not pickle): one slide
            if self._stopped:
                raise SlideInterrupted() from None
            _log.debug("the outcome of a slide did not come back from its process", exc_info=True)
            self.close()
            return failed_job(job, self._info, contained_error(exc))

    def stop(self, hard: bool) -> None:
        """Ctrl-C: the child abandons its slide now (SIGTERM; SIGKILL when ``hard``). Its
        finished chunks are kept; :meth:`run` raises :class:`SlideInterrupted` from now on.
        Safe in a signal handler (it only sends signals)."""
        self._stopped = True
        pool = self._pool
        # The executor has no public way to end a busy child before Python 3.14.
        processes = getattr(pool, "_processes", None) or {}
        for process in list(processes.values()):
            if hard:
                process.kill()
            else:
                process.terminate()

    def _end_child(self) -> None:
        """Past the time limit: the child abandons its slide (SIGTERM, as for Ctrl-C: its
        queued Dask chunks are cancelled, its lock released), is killed when still busy after
        ``_STOP_GRACE_S``, and the next slide gets a new one."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())
        for process in processes:
            process.terminate()
        self._shut(pool, processes)

    @staticmethod
    def _shut(pool: ProcessPoolExecutor, processes: list[Any]) -> None:
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(_STOP_GRACE_S)
            if process.is_alive():
                process.kill()

    def close(self) -> None:
        """Shut the child down; after :meth:`stop`, one still busy after ``_STOP_GRACE_S``
        (in a long native call, where SIGTERM waits) is killed."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        if self._stopped:
            self._shut(pool, list((getattr(pool, "_processes", None) or {}).values()))
            return
        pool.shutdown(wait=True, cancel_futures=True)
