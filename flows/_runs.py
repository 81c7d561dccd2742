"""Running slides with one :class:`pipeline.RunSettings`: the same path for run, batch and serve.

A :class:`SlideRunner` analyses slides in this process or, when ``settings.isolate``, in a
reusable child process (see ``_isolate``); either way chunks go to the Dask scheduler in
``settings.dask_address`` when one is set. Each outcome is recorded in the audit log,
with the µm/px used and whether it was an override.
"""

from __future__ import annotations

from pipeline import ModelInfo, RunSettings, SlideOutcome
from privacy import audit_event

from ._isolate import IsolatedSlideRunner
from ._model_ref import ModelRef
from ._slide_job import SlideJob, analyse_job

__all__ = ["SlideRunner", "audit_outcome"]


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


class SlideRunner:
    """Analyses slides one by one with fixed settings and model, isolated or not."""

    def __init__(self, settings: RunSettings, model: ModelRef, info: ModelInfo) -> None:
        self.settings = settings
        self.model = model
        self.info = info
        self._isolated = IsolatedSlideRunner(settings, model, info) if settings.isolate else None

    def run(self, job: SlideJob, via: str) -> SlideOutcome:
        if self._isolated is not None:
            outcome = self._isolated.run(job)
        else:
            outcome = analyse_job(job, self.settings, self.model, self.info)
        audit_outcome(outcome, self.info, self.settings, via)
        return outcome

    def close(self) -> None:
        if self._isolated is not None:
            self._isolated.close()
        else:
            from ._dask import close_dask_clients

            close_dask_clients()
