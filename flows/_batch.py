"""The batch flow: Prefect orchestrates slides, Dask runs their chunks.

Nothing that names a slide reaches Prefect: the caller stores the batch (the run settings
and each slide's path and identity, hashed once) in the site directory under a random
batch ID, and the flow's only parameter is that ID. Task runs are named by pseudonymous
slide IDs. The flow ends with a table artifact of every slide's status, tiles, tiles/s,
error kind and result folder (relative to the output folder), and its final state is
"Partially failed" when some slides failed.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline import (
    RunSettings,
    SlideIdentity,
    WorkerError,
    apply_offline_env,
    site_dir,
)

from ._model_ref import resolve_model
from ._runs import SlideRunner
from ._slide_job import SlideJob

__all__ = ["save_batch", "load_batch", "batch_flow", "run_batch"]

_log = logging.getLogger(__name__)

apply_offline_env()
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

_SLIDES_IN_FLIGHT = 2
"""Slides analysed at once (their chunks run on the cluster; this bounds memory here)."""


def _batches_dir() -> Path:
    directory = site_dir() / "batches"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def save_batch(settings: RunSettings, jobs: list[SlideJob]) -> str:
    """Store a batch privately in the site directory; its random ID."""
    batch_id = f"b-{secrets.token_hex(6)}"
    data = {
        "settings": settings.to_json(),
        "slides": [
            {"path": os.path.abspath(job.path),
             "identity": [job.identity.digest, job.identity.slide_id] if job.identity else None}
            for job in jobs
        ],
    }
    fd = os.open(_batches_dir() / f"{batch_id}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    return batch_id


def load_batch(batch_id: str) -> tuple[RunSettings, list[SlideJob]]:
    data = json.loads((_batches_dir() / f"{batch_id}.json").read_text(encoding="utf-8"))
    jobs = [
        SlideJob(s["path"], SlideIdentity(*s["identity"]) if s["identity"] else None)
        for s in data["slides"]
    ]
    return RunSettings.from_json(data["settings"]), jobs


class _TransientSlideFailure(RuntimeError):
    """Raised inside the slide task so that Prefect retries it (lost workers, I/O)."""


class _SlideFailed(RuntimeError):
    """Raised inside the slide task so that Prefect shows it Failed, with the error's kind,
    message and remedy (never a path) as the state message; carries the slide's row."""

    def __init__(self, row: dict[str, Any]) -> None:
        error = row["error"]
        text = f"{error['kind']}: {error['message']}" + (f" -- {error['hint']}" if error["hint"] else "")
        super().__init__(" ".join(text.split()))
        self.row = row


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry lost workers and I/O hiccups; never deterministic bad input."""
    return isinstance(state.result(raise_on_failure=False), _TransientSlideFailure)


# The flow process's runners, shared by its task threads (one slide each at a time).
_RUNNERS: queue.Queue[SlideRunner] = queue.Queue()


def _analyse_one(batch_id: str, index: int, slide: str) -> dict[str, Any]:
    settings, jobs = load_batch(batch_id)
    runner = _RUNNERS.get()
    try:
        outcome = runner.run(jobs[index], via=f"batch:{batch_id}")
    finally:
        _RUNNERS.put(runner)
    if isinstance(outcome.error, WorkerError) and outcome.error.transient:
        raise _TransientSlideFailure(outcome.error.message)
    row = outcome.to_json()
    row["result_dir"] = os.path.relpath(row["result_dir"], settings.out_dir) if row["result_dir"] else None
    row["index"] = index
    if row["status"] == "failed":
        raise _SlideFailed(row)
    return row


def _local_cluster_workers() -> int:
    """One worker process per 4 cores (each runs reader threads and torch threads)."""
    return max(1, (os.cpu_count() or 1) // 4)


def _failed_row(index: int, slide_id: str | None, model: str, message: str) -> dict[str, Any]:
    return {"index": index, "slide_id": slide_id, "status": "failed", "result_dir": None, "model": model,
            "tiles": None, "tiles_per_s": None, "chunks_computed": 0, "chunks_total": 0, "mpp": None,
            "error": {"kind": WorkerError.kind, "message": message, "hint": WorkerError.hint}}


def _build_flow() -> Any:
    from prefect import flow, get_run_logger, task
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Completed, Failed

    analyse_task = task(
        name="analyse-slide",
        task_run_name="slide-{slide}",
        retries=2,
        retry_delay_seconds=[10, 60],
        retry_condition_fn=_retry_transient,
        cache_policy=NO_CACHE,
        log_prints=False,
    )(_analyse_one)

    @flow(name="wsiflow-batch", flow_run_name="batch-{batch_id}", log_prints=False, validate_parameters=True)
    def batch_flow(batch_id: str) -> Any:
        settings, jobs = load_batch(batch_id)
        names = [job.identity.slide_id if job.identity else f"input-{i + 1}" for i, job in enumerate(jobs)]
        model, info, _ = resolve_model(settings.model, settings.models_dir)
        cluster = None
        if settings.dask_address is None:
            from distributed import LocalCluster

            cluster = LocalCluster(
                n_workers=_local_cluster_workers(), threads_per_worker=1, processes=True,
                host="127.0.0.1", dashboard_address=None,
            )
            settings = replace(settings, dask_address=cluster.scheduler_address)
        runners = [SlideRunner(settings, model, info) for _ in range(min(_SLIDES_IN_FLIGHT, len(jobs)))]
        for runner in runners:
            _RUNNERS.put(runner)
        try:
            futures = [analyse_task.submit(batch_id, i, name) for i, name in enumerate(names)]
            rows = []
            for i, future in enumerate(futures):
                try:
                    rows.append(future.result())
                except _SlideFailed as exc:
                    rows.append(exc.row)
                except _TransientSlideFailure as exc:
                    identity = jobs[i].identity
                    rows.append(_failed_row(i, identity.slide_id if identity else None, info.ref, str(exc)))
        finally:
            while not _RUNNERS.empty():
                _RUNNERS.get().close()
            if cluster is not None:
                cluster.close()
        table = [
            {"slide": r["slide_id"] or names[r["index"]], "status": r["status"], "tiles": r["tiles"],
             "tiles/s": r.get("tiles_per_s"),
             "mpp": (r.get("mpp") or {}).get("source"), "error": (r["error"] or {}).get("kind"),
             "result": r["result_dir"]}
            for r in rows
        ]
        failed = sum(r["status"] == "failed" for r in rows)
        totals = (f"{len(rows)} slides: {sum(r['status'] == 'done' for r in rows)} done, "
                  f"{sum(r['status'] == 'reused' for r in rows)} reused, {failed} failed; "
                  f"{sum(r['tiles'] or 0 for r in rows)} tiles")
        create_table_artifact(key="wsiflow-batch", table=table, description=f"wsiflow batch {batch_id}: {totals}")
        create_markdown_artifact(key="wsiflow-batch-totals", markdown=f"**{totals}**", description="run totals")
        if failed:
            get_run_logger().warning("%s", totals)
        if failed == len(rows) and rows:
            return Failed(message=totals, data=rows)
        if failed:
            return Failed(name="Partially failed", message=totals, data=rows)
        return Completed(message=totals, data=rows)

    return batch_flow


batch_flow = _build_flow()


def run_batch(settings: RunSettings, jobs: list[SlideJob]) -> tuple[str, list[dict[str, Any]], str]:
    """Store the batch, run the flow (embedded Prefect API unless PREFECT_API_URL is set).

    Returns the batch ID, one row per slide (in input order; ``result_dir`` relative to
    ``settings.out_dir``) and the final state's name.
    """
    batch_id = save_batch(settings, jobs)
    state = batch_flow(batch_id, return_state=True)
    rows = state.result(raise_on_failure=False)
    if isinstance(rows, BaseException):
        raise rows
    return batch_id, sorted(rows, key=lambda r: r["index"]), state.name
