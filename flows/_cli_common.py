"""Helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline import AnalysisParams, ModelInfo, SlideOutcome, audit_event

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "mpp_arg", "audit_run"]

EXIT_OK = 0
EXIT_FAILED = 1
"""At least one slide/model/image failed; the rest were processed."""
EXIT_USAGE = 2
"""Bad arguments or config; nothing was processed."""


def mpp_arg(text: str) -> tuple[float, float]:
    """``0.25`` or ``0.25,0.26`` (x,y) µm/px."""
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of µm/px, e.g. 0.25") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise argparse.ArgumentTypeError(f"{text!r}: give X or X,Y in µm/px")


def audit_run(outcome: SlideOutcome, info: ModelInfo, params: AnalysisParams, **extra: Any) -> None:
    """Record one slide's run in the site's audit log (pseudonymous ID and digests only)."""
    audit_event(
        "run", slide_id=outcome.slide_id, model_digest=info.sha256,
        params={"analysis": params.to_json(), **{k: str(v) for k, v in extra.items()}},
        outcome=outcome.status if outcome.error is None else f"failed:{outcome.error.kind}",
    )
