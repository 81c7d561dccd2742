"""One slide's analysis in whichever process runs it (the parent or the child)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

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

from ._model_ref import ModelRef, load_model_ref

__all__ = ["SlideJob", "analyse_job", "identify_job", "identify_jobs", "progress_bar_factory"]


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
class SlideJob:
    """One slide to analyse: where it is, its identity (hashed once), how to show progress."""

    path: str
    identity: SlideIdentity | None
    label: str = ""
    show_progress: bool = False


def analyse_job(job: SlideJob, settings: RunSettings, model: ModelRef, info: ModelInfo) -> SlideOutcome:
    """Analyse one slide in this process (the model is loaded once per process)."""
    executor = None
    if settings.dask_address:
        from ._dask import dask_executor

        executor = dask_executor(settings.dask_address, model)
    return analyse_slide(
        job.path, load_model_ref(model), info, settings, secret=site_secret(), identity=job.identity,
        executor=executor, progress=progress_bar_factory(job.label, job.show_progress),
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
