"""Each slide of a local ``wsiflow run`` is analysed in a child process.

A damaged slide can crash the native libraries that decode it (OpenSlide, libtiff,
libjpeg, OpenJPEG) with a signal no Python code can catch. In a child process that costs
one slide: the run reports it as a ``worker`` error and goes on with the next slide, and
the chunks the child finished are kept for a rerun. The child is reused across slides (the
model is loaded once) and replaced after a crash.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline import (
    AnalysisParams,
    EngineSettings,
    ModelInfo,
    MppPolicy,
    SlideOutcome,
    WorkerError,
    WsiflowError,
    analyse_slide,
    apply_offline_env,
    content_digest,
    slide_id,
)

from ._dask import ModelRef, load_model_ref

__all__ = ["SlideRequest", "IsolatedSlideRunner", "progress_bar_factory"]

_log = logging.getLogger(__name__)


def progress_bar_factory(label: str, enabled: bool) -> Callable[[int, int], Callable[[int], None]]:
    """``progress(total, done)`` for :func:`pipeline.analyse_slide`: a tqdm bar on stderr."""

    def start(total: int, done: int) -> Callable[[int], None]:
        bar = tqdm(total=total, initial=done, unit="tile", desc=label, disable=None if enabled else True,
                   dynamic_ncols=True, leave=False, file=sys.stderr)

        def advance(n: int) -> None:
            bar.update(n)
            if bar.n >= bar.total:
                bar.close()

        return advance

    return start


@dataclass(frozen=True)
class SlideRequest:
    """Everything one slide's analysis needs except the model (small and picklable)."""

    slide: str
    label: str
    show_progress: bool
    out_dir: Path
    secret: bytes
    params: AnalysisParams
    engine: EngineSettings
    mpp_policy: MppPolicy
    backend: str
    force: bool


def analyse_request(request: SlideRequest, model_ref: ModelRef, info: ModelInfo) -> SlideOutcome:
    """Analyse one slide with the model ``model_ref`` (loaded once per process)."""
    return analyse_slide(
        request.slide, load_model_ref(model_ref), info, out_dir=request.out_dir, secret=request.secret,
        params=request.params, engine=request.engine, mpp_policy=request.mpp_policy,
        backend=request.backend, force=request.force,  # type: ignore[arg-type]
        progress=progress_bar_factory(request.label, request.show_progress),
    )


def _child_start() -> None:
    apply_offline_env()


class IsolatedSlideRunner:
    """Runs :func:`analyse_request` in one reusable child process; a crash fails one slide."""

    def __init__(self, model_ref: ModelRef, info: ModelInfo) -> None:
        self._model_ref = model_ref
        self._info = info
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the parent may hold threads (tqdm, torch) that fork would copy mid-lock.
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_start
            )
        return self._pool

    def run(self, request: SlideRequest) -> SlideOutcome:
        future = self._executor().submit(analyse_request, request, self._model_ref, self._info)
        try:
            return future.result()
        except BrokenProcessPool:
            self.close()
            _log.warning("the process analysing a slide died; continuing with the next slide")
            return SlideOutcome(
                _pseudonym(request.slide, request.secret), "failed", None, None,
                error=WorkerError(
                    "the process analysing this slide died (a crash in the slide-decoding library, "
                    "or out of memory); the other slides are not affected",
                    hint="run `wsiflow inspect` on it; if it repeats, copy the file again or rescan it. "
                         "Finished chunks are kept for a rerun",
                ),
            )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _pseudonym(path: str, secret: bytes) -> str | None:
    try:
        return slide_id(content_digest(path), secret)
    except (OSError, WsiflowError):
        return None
