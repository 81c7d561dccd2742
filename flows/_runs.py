"""Running slides with one :class:`pipeline.RunSettings`: the same path for run, batch and serve.

A :class:`SlideRunner` analyses slides in this process or, when ``settings.isolate``, in a
reusable child process (see ``_isolate``); either way chunks go to the Dask scheduler in
``settings.dask_address`` when one is set. Each outcome is recorded in the audit log,
with the µm/px used and whether it was an override.

Ctrl-C (:func:`interruptible`): the first stops the run within seconds -- the child
process is ended, chunk waits return, queued chunks are cancelled; chunks already finished
keep their done-markers, so running the same command again resumes. A second Ctrl-C ends
children with SIGKILL and interrupts the main thread wherever it is.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from pipeline import ModelInfo, RunSettings, SlideOutcome
from privacy import audit_event

from ._dask import SlideInterrupted, close_dask_clients, reset_dask_stop, stop_dask_chunks
from ._isolate import IsolatedSlideRunner
from ._model_ref import ModelRef
from ._slide_job import SlideJob, analyse_job

__all__ = ["SlideRunner", "audit_interrupted", "audit_outcome", "Interrupt", "interruptible"]


def audit_outcome(outcome: SlideOutcome, info: ModelInfo, settings: RunSettings, via: str) -> None:
    """Record one slide's run in the site's audit log (pseudonymous ID, digests, settings)."""
    params = {
        "via": via,
        "analysis": settings.analysis.to_json(),
        "backend": settings.backend,
        "mpp": outcome.mpp.to_json() if outcome.mpp else None,
        "mpp_override": outcome.mpp.override if outcome.mpp and outcome.mpp.is_override else None,
        "force": settings.force,
    }
    audit_event(
        "run", slide_id=outcome.slide_id, model_digest=info.sha256, params=params,
        outcome=outcome.status if outcome.error is None else f"failed:{outcome.error.kind}",
    )
    if outcome.mpp is not None and outcome.mpp.is_override:
        # A scale not taken from the slide is a decision someone must be able to find later.
        audit_event("mpp-override", slide_id=outcome.slide_id, model_digest=info.sha256,
                    params=outcome.mpp.to_json(), outcome=str(outcome.mpp.override))


def audit_interrupted(job: SlideJob, info: ModelInfo, settings: RunSettings, via: str) -> None:
    """Record that Ctrl-C stopped one slide's run (so the log shows every run that started)."""
    audit_event("run", slide_id=job.identity.slide_id if job.identity else None, model_digest=info.sha256,
                params={"via": via, "analysis": settings.analysis.to_json(), "backend": settings.backend,
                        "force": settings.force},
                outcome="interrupted")


class SlideRunner:
    """Analyses slides one by one with fixed settings and model, isolated or not."""

    def __init__(self, settings: RunSettings, model: ModelRef, info: ModelInfo) -> None:
        self.settings = settings
        self.model = model
        self.info = info
        self._isolated = IsolatedSlideRunner(settings, model, info) if settings.isolate else None

    def run(self, job: SlideJob, via: str) -> SlideOutcome:
        """The slide's outcome (audited); ``SlideInterrupted`` after :meth:`stop`, audited
        as ``interrupted`` (the slide is neither done nor failed: a rerun resumes it)."""
        try:
            if self._isolated is not None:
                outcome = self._isolated.run(job)
            else:
                outcome = analyse_job(job, self.settings, self.model, self.info)
        except (SlideInterrupted, KeyboardInterrupt):
            audit_interrupted(job, self.info, self.settings, via)
            raise
        audit_outcome(outcome, self.info, self.settings, via)
        return outcome

    def stop(self, hard: bool) -> None:
        """Ctrl-C: end the slide under way (child process ended, chunk waits return).
        Safe in a signal handler: it sends signals and sets events, nothing more."""
        if self._isolated is not None:
            self._isolated.stop(hard)
        else:
            stop_dask_chunks()

    def close(self) -> None:
        if self._isolated is not None:
            self._isolated.close()
        else:
            close_dask_clients()


class Interrupt:
    """What Ctrl-C does during one run (see :func:`interruptible`).

    ``cooperative`` says whether the main thread notices :attr:`requested` by itself (the
    batch flow, whose slides run in task threads); otherwise the first Ctrl-C also raises
    ``KeyboardInterrupt`` in the main thread, after the registered stops ran.
    """

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.cooperative = False
        self._stops: list[Callable[[bool], None]] = []
        self._count = 0

    def on_stop(self, stop: Callable[[bool], None]) -> None:
        """Call ``stop(hard)`` on Ctrl-C (at once if it came already). ``stop`` runs in a
        signal handler: it may send signals and set events, not wait or take locks."""
        self._stops.append(stop)
        if self.requested.is_set():
            stop(False)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The SIGINT handler (the main thread runs it)."""
        self._count += 1
        hard = self._count > 1
        self.requested.set()
        for stop in list(self._stops):
            stop(hard)
        if hard or not self.cooperative:
            raise KeyboardInterrupt


@contextmanager
def interruptible() -> Iterator[Interrupt]:
    """Ctrl-C during a run stops it cleanly (see the module's docstring).

    Install in the main thread around the whole run, and register each runner's
    :meth:`SlideRunner.stop` with :meth:`Interrupt.on_stop`. Elsewhere (a thread) signals
    are not this code's to handle and the Interrupt returned never fires.
    """
    interrupt = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return
    previous = signal.signal(signal.SIGINT, interrupt.handle)
    quiet = _QuietAfterInterrupt(interrupt)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield interrupt
    finally:
        signal.signal(signal.SIGINT, previous)
        for handler in handlers:
            handler.removeFilter(quiet)
        reset_dask_stop()


class _QuietAfterInterrupt(logging.Filter):
    """After Ctrl-C the terminal shows wsiflow's one line, not the libraries' shutdown
    chatter (Prefect's cancelled task runs, Dask's closing workers). Prefect's server still
    gets its logs: this filters the console handlers only."""

    _LIBRARIES = ("prefect", "distributed", "httpx", "asyncio", "tornado")

    def __init__(self, interrupt: Interrupt) -> None:
        super().__init__()
        self._interrupt = interrupt

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self._interrupt.requested.is_set() and record.name.split(".")[0] in self._LIBRARIES)
