"""Each slide analysed in a child process, so that a native crash costs one slide.

A damaged slide can crash the native libraries that decode it (OpenSlide, libtiff,
libjpeg, OpenJPEG) with a signal no Python code can catch. In a child process that costs
one slide: it is reported as a ``worker`` error and the run goes on with the next slide,
and the chunks the child finished are kept for a rerun. The child is reused across slides
(the model is loaded once) and replaced after a crash.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from pipeline import ModelInfo, RunSettings, SlideOutcome, WorkerError, apply_offline_env

from ._model_ref import ModelRef
from ._slide_job import SlideJob, analyse_job

__all__ = ["IsolatedSlideRunner"]

_log = logging.getLogger(__name__)


def _child_start() -> None:
    apply_offline_env()


class IsolatedSlideRunner:
    """Runs :func:`analyse_job` in one reusable child process; a crash fails one slide."""

    def __init__(self, settings: RunSettings, model: ModelRef, info: ModelInfo) -> None:
        self._settings = settings
        self._model = model
        self._info = info
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the parent may hold threads (tqdm, torch) that fork would copy mid-lock.
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_start
            )
        return self._pool

    def run(self, job: SlideJob) -> SlideOutcome:
        future = self._executor().submit(analyse_job, job, self._settings, self._model, self._info)
        try:
            return future.result()
        except BrokenProcessPool:
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

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
