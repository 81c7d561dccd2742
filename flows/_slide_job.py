"""One slide's analysis in whichever process runs it (the parent or the child).

:func:`analyse_job` is where one slide's failure is contained: whatever it raises (out of
memory, a bug, a library's own exception), the slide fails with a ``worker`` error that
says what to do, and the run goes on with the next slide. Only Ctrl-C passes through.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from tqdm import tqdm

from pipeline import (
    ModelInfo,
    RunSettings,
    SlideIdentity,
    SlideOutcome,
    WorkerError,
    WsiflowError,
    analyse_slide,
    identify_slide,
    site_secret,
)

from ._dask import SlideInterrupted
from ._model_ref import ModelRef, load_model_ref, loaded_models

__all__ = ["SlideJob", "analyse_job", "contained_error", "failed_job", "identify_job", "identify_jobs",
           "prepare_job", "TerminalProgress"]

_log = logging.getLogger(__name__)


class TerminalProgress:
    """A :class:`pipeline.Progress` for a terminal: one line per stage, then a tqdm bar
    named by the slide's label and pseudonymous ID (both on stderr; nothing when disabled).

    The bar shows only on a terminal; stage lines also go to a redirected stderr, where they
    say what a long silence is doing.
    """

    def __init__(self, name: str, enabled: bool, stream: TextIO | None = None) -> None:
        self._name = name
        self._enabled = enabled
        self._stream = stream or sys.stderr

    def stage(self, name: str, detail: str = "") -> None:
        # With -v the pipeline logs each stage itself; one line per stage is enough.
        if self._enabled and not logging.getLogger("pipeline").isEnabledFor(logging.INFO):
            self._stream.write(f"{self._name}: {name}{f' ({detail})' if detail else ''}\n")
            self._stream.flush()

    def tiles(self, total: int, done: int) -> Callable[[int], None]:
        bar = tqdm(total=total, initial=done, unit="tile", desc=self._name, disable=None if self._enabled else True,
                   dynamic_ncols=True, leave=False, file=self._stream)

        def advance(n: int) -> None:
            bar.update(n)
            if bar.n >= bar.total:
                bar.close()

        return advance


@dataclass(frozen=True)
class SlideJob:
    """One slide to analyse: where it is, its identity (hashed once), how to show progress."""

    path: str
    identity: SlideIdentity | None
    label: str = ""
    show_progress: bool = False


def _progress(job: SlideJob) -> TerminalProgress:
    name = " ".join(part for part in (job.label, job.identity.slide_id if job.identity else "") if part)
    return TerminalProgress(name or "slide", job.show_progress)


def prepare_job(job: SlideJob, model: ModelRef) -> None:
    """Load and verify the model in this process (once), before the slide's time limit starts
    counting; its module is built when a slide first computes tiles (never for a reused result)."""
    if not loaded_models():  # the first slide in this process loads it
        _log.info("loading model %s", model.ref)
        _progress(job).stage("loading model", model.ref)
    load_model_ref(model)


def failed_job(job: SlideJob, info: ModelInfo, error: WsiflowError) -> SlideOutcome:
    """The outcome of a slide that failed outside :func:`pipeline.analyse_slide`'s own checks."""
    slide_id = job.identity.slide_id if job.identity else None
    _log.info("slide %s failed: %s", slide_id, error.kind)
    return SlideOutcome(slide_id, "failed", None, None, model=info.ref, error=error)


_OUT_OF_MEMORY_TEXT = ("can't allocate memory", "out of memory", "cannot allocate memory")


def _out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or torch's allocators' errors (a RuntimeError on the CPU, OutOfMemoryError on CUDA)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _OUT_OF_MEMORY_TEXT)


def contained_error(exc: Exception) -> WorkerError:
    """The ``worker`` error a slide fails with when its analysis raised ``exc`` (not a wsiflow
    error). Only the exception's type is named: its text may hold a path."""
    if _out_of_memory(exc):
        return WorkerError(
            f"the analysis of this slide ran out of memory ({type(exc).__name__}); the other slides are not affected",
            hint="lower --batch-size and --readers, or run it on a machine with more memory; if the slide claims an "
                 "absurd size, check it with `wsiflow inspect`. Finished chunks are kept for a rerun",
            transient=False,
        )
    return WorkerError(
        f"the analysis of this slide stopped on an unexpected {type(exc).__name__}; the other slides are not "
        "affected",
        hint="run it again with --debug to see the traceback and report it with the slide's ID; check the slide "
             "with `wsiflow inspect`. Finished chunks are kept for a rerun",
        transient=False,
    )


def analyse_job(job: SlideJob, settings: RunSettings, model: ModelRef, info: ModelInfo,
                on_model_built: Callable[[], None] | None = None) -> SlideOutcome:
    """Analyse one slide in this process (the model is loaded once per process). Never
    raises but for Ctrl-C (``KeyboardInterrupt``, :class:`SlideInterrupted`): any failure
    is the slide's outcome (see the module's docstring)."""
    try:
        prepare_job(job, model)
        executor = None
        if settings.dask_address:
            from ._dask import dask_executor

            executor = dask_executor(settings, model)
        return analyse_slide(
            job.path, load_model_ref(model), info, settings, secret=site_secret(), identity=job.identity,
            executor=executor, progress=_progress(job), on_model_built=on_model_built,
        )
    except SlideInterrupted:
        raise
    except WsiflowError as exc:  # the model or the cluster, rather than the slide
        return failed_job(job, info, exc)
    except Exception as exc:  # the containment boundary: one slide's failure never ends the run
        _log.debug("slide %s: the analysis raised", job.identity.slide_id if job.identity else None, exc_info=True)
        return failed_job(job, info, contained_error(exc))


def identify_job(path: str, secret: bytes, label: str = "", show_progress: bool = False) -> SlideJob:
    """A job for one slide, hashed once here (identity None when unreadable: the analysis
    then reports why, with the error kind)."""
    try:
        identity: SlideIdentity | None = identify_slide(path, secret)
    except WsiflowError:
        identity = None
    return SlideJob(path, identity, label, show_progress)


def identify_jobs(paths: list[str], secret: bytes) -> list[SlideJob]:
    """:func:`identify_job` for each path, labelled ``[i/n]``."""
    return [identify_job(path, secret, f"[{i + 1}/{len(paths)}]") for i, path in enumerate(paths)]
