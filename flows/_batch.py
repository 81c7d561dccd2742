"""The batch flow: Prefect orchestrates slides, Dask runs their chunks.

Nothing that names a slide reaches Prefect: the caller stores the batch (the run settings
and each slide's path and identity, hashed once) in the site directory under a random
batch ID, and the flow's only parameter is that ID. Task runs are named by pseudonymous
slide IDs; a failed slide is a Failed task run whose message gives the error's kind,
message and remedy.

The flow ends with two artifacts (never a path or file name): ``wsiflow-batch``, a row per
slide (status, error kind, message and remedy, wall time, tiles, the inference's tiles/s,
µm/px source, result folder relative to the output folder), and ``wsiflow-batch-totals``
(slides done/reused/failed, the batch's wall time, slides/h, tiles/s and tissue mm²/h).
Its final state is "Partially failed" or Failed when slides failed, Cancelled when Ctrl-C
stopped it (see ``_runs.interruptible``: unstarted slides are not begun, the ones under
way stop within seconds, finished chunks are kept).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline import (
    ResultFolder,
    RunSettings,
    SlideIdentity,
    WorkerError,
    WsiflowError,
    apply_offline_env,
    site_dir,
)

from ._dask import SlideInterrupted
from ._isolate import quiet_children
from ._looks import look_state
from ._model_ref import resolve_model
from ._runs import Interrupt, SlideRunner, interruptible
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


class SlideAnalysisFailed(RuntimeError):
    """Raised inside the slide task so that Prefect shows it Failed, with the error's kind,
    message and remedy (never a path) as the state message; carries the slide's row."""

    def __init__(self, row: dict[str, Any]) -> None:
        error = row["error"]
        text = f"{error['kind']}: {error['message']}" + (f" -- {error['hint']}" if error["hint"] else "")
        super().__init__(" ".join(text.split()))
        self.row = row


_INTERRUPTED = "interrupted (Ctrl-C); finished chunks are kept, running the same command again resumes"

# Ctrl-C handling of the process that runs the batch through run_batch; None for the
# inbox's subflows (their process handles its own signals).
_INTERRUPT: Interrupt | None = None


def _stopping() -> bool:
    return _INTERRUPT is not None and _INTERRUPT.requested.is_set()


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry lost workers and I/O hiccups; never deterministic bad input, nor after Ctrl-C."""
    return not _stopping() and isinstance(state.result(raise_on_failure=False), _TransientSlideFailure)


# The flow process's runners, shared by its task threads (one slide each at a time).
_RUNNERS: queue.Queue[SlideRunner] = queue.Queue()


def _analyse_one(batch_id: str, index: int, slide: str) -> Any:
    """One slide's row; a Cancelled state after Ctrl-C (the slide is neither done nor failed)."""
    from prefect.states import Cancelled

    if _stopping():
        return Cancelled(message=_INTERRUPTED)
    settings, jobs = load_batch(batch_id)
    runner = _RUNNERS.get()
    started = time.monotonic()
    try:
        if _stopping():  # Ctrl-C came while this task waited for a runner
            return Cancelled(message=_INTERRUPTED)
        outcome = runner.run(jobs[index], via=f"batch:{batch_id}")
    except SlideInterrupted:
        return Cancelled(message=_INTERRUPTED)
    finally:
        _RUNNERS.put(runner)
    if isinstance(outcome.error, WorkerError) and outcome.error.transient:
        raise _TransientSlideFailure(outcome.error.message)
    row = outcome.to_json()
    row["result_dir"] = os.path.relpath(row["result_dir"], settings.out_dir) if row["result_dir"] else None
    row["index"] = index
    row["duration_s"] = round(time.monotonic() - started, 2)
    if row["status"] == "failed":
        raise SlideAnalysisFailed(row)
    return row


def _local_cluster_workers() -> int:
    """One worker process per 4 cores (each runs reader threads and torch threads)."""
    return max(1, (os.cpu_count() or 1) // 4)


def _failed_row(index: int, slide_id: str | None, model: str, message: str) -> dict[str, Any]:
    return {"index": index, "slide_id": slide_id, "status": "failed", "result_dir": None, "model": model,
            "tiles": None, "tiles_per_s": None, "chunks_computed": 0, "chunks_total": 0, "mpp": None,
            "error": {"kind": WorkerError.kind, "message": message, "hint": WorkerError.hint},
            "duration_s": None}


def _table_row(name: str, row: dict[str, Any]) -> dict[str, Any]:
    """A slide's row of the ``wsiflow-batch`` artifact (no path: the slide ID, a relative folder)."""
    error = row.get("error") or {}
    return {
        "slide": row["slide_id"] or name, "status": row["status"],
        "kind": error.get("kind"), "message": error.get("message"), "remedy": error.get("hint"),
        "duration_s": row.get("duration_s"), "tiles": row.get("tiles"), "tiles/s": row.get("tiles_per_s"),
        "mpp": (row.get("mpp") or {}).get("source"), "result": row.get("result_dir"),
    }


def _computed(out_dir: Path, row: dict[str, Any]) -> tuple[int, float]:
    """Tiles this batch computed for a done slide (fewer than its tiles when it resumed)
    and its tissue area in mm², from the result's summary."""
    try:
        summary = ResultFolder(out_dir / row["result_dir"]).read_summary().data
    except WsiflowError:
        return 0, 0.0
    timings, tissue = summary.get("timings") or {}, summary.get("tissue") or {}
    return int(timings.get("tiles_computed") or 0), float(tissue.get("area_mm2") or 0.0)


def _totals(rows: list[dict[str, Any]], slides: int, wall_s: float, out_dir: Path) -> dict[str, Any]:
    """The ``wsiflow-batch-totals`` artifact's one row. Rates are per hour (second) of the
    batch's wall time and count what this batch computed: reused results cost no time."""
    counts = {status: sum(r["status"] == status for r in rows) for status in ("done", "reused", "failed")}
    figures = [_computed(out_dir, r) for r in rows if r["status"] == "done"]
    tiles, tissue = sum(f[0] for f in figures), sum(f[1] for f in figures)
    hours = wall_s / 3600

    def per(amount: float, unit: float, digits: int) -> float | None:
        return round(amount / unit, digits) if unit > 0 else None

    return {
        "slides": slides, **counts, "interrupted": slides - len(rows), "wall_s": round(wall_s, 1),
        "slides/h": per(counts["done"], hours, 1), "tiles": tiles, "tiles/s": per(tiles, wall_s, 2),
        "tissue mm²": round(tissue, 2), "tissue mm²/h": per(tissue, hours, 1),
    }


def _totals_text(totals: dict[str, Any]) -> str:
    interrupted = f", {totals['interrupted']} interrupted" if totals["interrupted"] else ""
    return (f"{totals['slides']} slides: {totals['done']} done, {totals['reused']} reused, {totals['failed']} "
            f"failed{interrupted}; {totals['tiles']} tiles computed in {totals['wall_s']} s")


def _build_flow() -> Any:
    from prefect import flow, get_run_logger, task
    from prefect.artifacts import create_table_artifact
    from prefect.cache_policies import NO_CACHE
    from prefect.exceptions import CancelledRun
    from prefect.states import Cancelled
    from prefect.task_runners import ThreadPoolTaskRunner

    analyse_task = task(
        name="analyse-slide",
        task_run_name="slide-{slide}",
        retries=2,
        retry_delay_seconds=[10, 60],
        retry_condition_fn=_retry_transient,
        cache_policy=NO_CACHE,
        log_prints=False,
    )(_analyse_one)

    # As many task threads as slides in flight: the other slides wait before their task run
    # begins, and after Ctrl-C they are dropped without one.
    task_runner: Any = ThreadPoolTaskRunner(max_workers=_SLIDES_IN_FLIGHT)

    @flow(name="wsiflow-batch", flow_run_name="batch-{batch_id}", log_prints=False, validate_parameters=True,
          task_runner=task_runner)
    def batch_flow(batch_id: str) -> Any:
        started = time.monotonic()
        settings, jobs = load_batch(batch_id)
        out_dir = settings.out_dir
        names = [job.identity.slide_id if job.identity else f"input-{i + 1}" for i, job in enumerate(jobs)]
        model, info, _ = resolve_model(settings.model, settings.models_dir)
        cluster = None
        rows: list[dict[str, Any]] = []
        try:
            if settings.dask_address is None:
                from distributed import LocalCluster

                # Its worker processes ignore the terminal's Ctrl-C. Its HTTP endpoints (no
                # dashboard) on a free local port: the default tries 8787 and warns when taken.
                with quiet_children():
                    cluster = LocalCluster(
                        n_workers=_local_cluster_workers(), threads_per_worker=1, processes=True,
                        host="127.0.0.1", dashboard_address="127.0.0.1:0",
                    )
                settings = replace(settings, dask_address=cluster.scheduler_address)
            for _ in range(min(_SLIDES_IN_FLIGHT, len(jobs))):
                runner = SlideRunner(settings, model, info)
                _RUNNERS.put(runner)
                if _INTERRUPT is not None:
                    _INTERRUPT.on_stop(runner.stop)
            # Thread-pool futures: their wrapped concurrent future can be cancelled.
            futures: list[Any] = [analyse_task.submit(batch_id, i, name) for i, name in enumerate(names)]

            def drop_unstarted(hard: bool) -> None:
                """Ctrl-C: slides not begun are never begun (no task run is made for them)."""
                for future in futures:
                    future.wrapped_future.cancel()

            if _INTERRUPT is not None:
                _INTERRUPT.on_stop(drop_unstarted)
            for i, future in enumerate(futures):
                if future.wrapped_future.cancelled():
                    continue
                try:
                    rows.append(future.result())
                except SlideAnalysisFailed as exc:
                    rows.append(exc.row)
                except _TransientSlideFailure as exc:
                    identity = jobs[i].identity
                    rows.append(_failed_row(i, identity.slide_id if identity else None, info.ref, str(exc)))
                except CancelledRun:
                    pass  # Ctrl-C: the slide is neither done nor failed
        finally:
            while not _RUNNERS.empty():
                _RUNNERS.get().close()
            if cluster is not None:
                cluster.close()
        wall_s = time.monotonic() - started
        by_index = {r["index"]: r for r in rows}
        table = [_table_row(name, by_index.get(i) or {"slide_id": None, "status": "interrupted"})
                 for i, name in enumerate(names)]
        totals = _totals(rows, len(jobs), wall_s, out_dir)
        text = _totals_text(totals)
        create_table_artifact(key="wsiflow-batch", table=table, description=f"wsiflow batch {batch_id}: {text}")
        create_table_artifact(key="wsiflow-batch-totals", table=[totals], description=f"wsiflow batch {batch_id}")
        failed = totals["failed"]
        if _stopping() or totals["interrupted"]:
            # INFO: the terminal shows the CLI's one line; the UI shows this and the state.
            get_run_logger().info("%s; %s", text, _INTERRUPTED)
            return Cancelled(message=f"{text}; {_INTERRUPTED}", data=rows)
        if failed:
            get_run_logger().warning("%s", text)
        else:
            get_run_logger().info("%s", text)
        return look_state(failed, len(rows), text, rows)

    return batch_flow


batch_flow = _build_flow()


def _start_prefect_api() -> None:
    """Start Prefect's temporary API server now when the flow would use one (no
    PREFECT_API_URL): from a thread with Ctrl-C blocked, so that the server ignores the
    terminal's Ctrl-C and records the flow's end; this thread stays interruptible while it
    starts (20-60 s on 2 cores)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    errors: list[Exception] = []

    def start() -> None:
        try:
            SubprocessASGIServer().start()
        except Exception as exc:  # raised again in the thread that waits for it
            errors.append(exc)

    with quiet_children():
        starter = threading.Thread(target=start, name="wsiflow-prefect-api", daemon=True)
        starter.start()
    starter.join()
    if errors:
        raise errors[0]


def run_batch(settings: RunSettings, jobs: list[SlideJob]) -> tuple[str, list[dict[str, Any]], str]:
    """Store the batch, run the flow (embedded Prefect API unless PREFECT_API_URL is set).

    Returns the batch ID, one row per slide (in input order; ``result_dir`` relative to
    ``settings.out_dir``; ``duration_s`` its wall time) and the final state's name. Ctrl-C
    stops the batch within seconds (the flow ends Cancelled) and raises KeyboardInterrupt;
    finished chunks are kept. Call from the main thread for that.
    """
    global _INTERRUPT
    batch_id = save_batch(settings, jobs)
    with interruptible() as interrupt:
        _start_prefect_api()
        # From here the main thread waits for task threads, which stop by themselves.
        interrupt.cooperative = True
        _INTERRUPT = interrupt
        try:
            state = batch_flow(batch_id, return_state=True)
        finally:
            _INTERRUPT = None
        if interrupt.requested.is_set():
            raise KeyboardInterrupt
    rows = state.result(raise_on_failure=False)
    if isinstance(rows, BaseException):
        raise rows
    return batch_id, sorted(rows, key=lambda r: r["index"]), state.name
