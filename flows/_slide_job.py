"""One slide's analysis in whichever process runs it (the parent or the child)."""

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
    WsiflowError,
    analyse_slide,
    identify_slide,
    site_secret,
)

from ._model_ref import ModelRef, load_model_ref, loaded_models

__all__ = ["SlideJob", "analyse_job", "identify_job", "identify_jobs", "TerminalProgress"]

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


def analyse_job(job: SlideJob, settings: RunSettings, model: ModelRef, info: ModelInfo) -> SlideOutcome:
    """Analyse one slide in this process (the model is loaded once per process)."""
    name = " ".join(part for part in (job.label, job.identity.slide_id if job.identity else "") if part)
    progress = TerminalProgress(name or "slide", job.show_progress)
    if not loaded_models():  # the first slide in this process loads it
        _log.info("loading model %s", model.ref)
        progress.stage("loading model", model.ref)
    classifier = load_model_ref(model)
    executor = None
    if settings.dask_address:
        from ._dask import dask_executor

        executor = dask_executor(settings.dask_address, model)
    return analyse_slide(
        job.path, classifier, info, settings, secret=site_secret(), identity=job.identity,
        executor=executor, progress=progress,
    )


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
