"""The batch flow: Prefect orchestrates slides, Dask runs their chunks.

Nothing that names a slide reaches Prefect: the CLI stores the batch (slide paths and
settings) in the site directory under a random batch ID, and the flow's only parameter
is that ID. Task runs are named by pseudonymous slide IDs. The flow ends with a table
artifact of every slide's status, tiles, tiles/s, error kind and result folder (relative
to the output folder), and its final state is "Partially failed" when some slides failed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import (
    AnalysisParams,
    WsiflowError,
    EngineSettings,
    ModelInfo,
    MppPolicy,
    TissueParams,
    WorkerError,
    analyse_slide,
    apply_offline_env,
    content_digest,
    open_backend,
    site_dir,
    site_secret,
    slide_id,
)

from ._cli_common import audit_run

__all__ = ["BatchSpec", "save_batch", "load_batch", "batch_flow", "run_batch"]

_log = logging.getLogger(__name__)

apply_offline_env()
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


@dataclass(frozen=True)
class BatchSpec:
    """A batch as the lab asked for it. Stored in the site directory, never sent to Prefect."""

    slides: tuple[str, ...]
    out: str
    model: str = "tissue-qc"
    models_dir: str | None = None
    stride_px: int | None = None
    min_tissue_fraction: float = 0.25
    edge: str = "pad"
    chunk_cells: int = 64
    overview_class: str | None = None
    backend: str = "auto"
    mpp: tuple[float, float] | None = None
    mpp_overrides: tuple[dict[str, Any], ...] = ()
    tissue: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    readers: int = 2
    device: str = "auto"
    dask_address: str | None = None
    force: bool = False


def _batches_dir() -> Path:
    directory = site_dir() / "batches"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def save_batch(spec: BatchSpec) -> str:
    batch_id = f"b-{secrets.token_hex(6)}"
    path = _batches_dir() / f"{batch_id}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(asdict(spec), fh)
    return batch_id


def load_batch(batch_id: str) -> BatchSpec:
    data = json.loads((_batches_dir() / f"{batch_id}.json").read_text(encoding="utf-8"))
    data["slides"] = tuple(data["slides"])
    data["mpp"] = tuple(data["mpp"]) if data.get("mpp") else None
    data["mpp_overrides"] = tuple(data.get("mpp_overrides") or ())
    return BatchSpec(**data)


class _TransientSlideFailure(RuntimeError):
    """Raised inside the slide task so that Prefect retries it (lost workers, I/O)."""


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry lost workers and I/O hiccups; never deterministic bad input."""
    return isinstance(state.result(raise_on_failure=False), _TransientSlideFailure)


_MODELS: dict[str, Any] = {}
_CLIENTS: dict[str, Any] = {}


def _model(spec: BatchSpec) -> Any:
    from models import Registry

    registry = Registry(site_root=Path(spec.models_dir)) if spec.models_dir else Registry()
    key = f"{registry.site_root}:{spec.model}"
    if key not in _MODELS:
        _MODELS[key] = (registry, registry.load(spec.model))
    return _MODELS[key]


def _executor(spec: BatchSpec, address: str | None) -> Any:
    if address is None:
        return None
    from distributed import Client

    from ._dask import DaskChunkExecutor, ModelRef

    registry, model = _model(spec)
    client = _CLIENTS.get(address)
    if client is None:
        client = _CLIENTS[address] = Client(address, timeout="60s")
    m = model.manifest
    return DaskChunkExecutor(client, ModelRef(str(registry.site_root.resolve()), m.ref, m.weights_sha256))


def _mpp_policy(spec: BatchSpec) -> MppPolicy:
    from ._config import parse_config

    overrides = parse_config({"mpp_overrides": list(spec.mpp_overrides)}).mpp_overrides
    return MppPolicy(cli_mpp=spec.mpp, overrides=overrides)


def _analyse_one(batch_id: str, index: int, slide: str, address: str | None) -> dict[str, Any]:
    spec = load_batch(batch_id)
    registry, model = _model(spec)
    m = model.manifest
    info = ModelInfo(m.name, m.version, m.weights_sha256, tuple(c.color for c in m.classes))
    params = AnalysisParams(
        stride_px=spec.stride_px, min_tissue_fraction=spec.min_tissue_fraction, edge=spec.edge,  # type: ignore[arg-type]
        tissue=TissueParams(**spec.tissue), chunk_cells=spec.chunk_cells, overview_class=spec.overview_class,
    )
    outcome = analyse_slide(
        spec.slides[index], model, info,
        out_dir=Path(spec.out), secret=site_secret(),
        params=params,
        engine=EngineSettings(batch_size=spec.batch_size, readers=spec.readers, device=spec.device),  # type: ignore[arg-type]
        mpp_policy=_mpp_policy(spec), backend=spec.backend, force=spec.force,  # type: ignore[arg-type]
        executor=_executor(spec, address),
    )
    audit_run(outcome, info, params, via=f"batch:{batch_id}", mpp=spec.mpp, backend=spec.backend)
    if isinstance(outcome.error, WorkerError):
        raise _TransientSlideFailure(outcome.error.message)
    row = outcome.to_json()
    row["slide_id"] = row["slide_id"] or slide
    row["result"] = str(Path(row["result_dir"]).relative_to(spec.out)) if row["result_dir"] else None
    row.pop("result_dir")
    row["index"] = index
    return row


def _pseudonym(path: str, secret: bytes) -> str | None:
    try:
        open_backend(path).close()
        return slide_id(content_digest(path), secret)
    except WsiflowError:
        return None


def _local_cluster_workers() -> int:
    """One worker process per 4 cores (each runs reader threads and torch threads)."""
    return max(1, (os.cpu_count() or 1) // 4)


def _build_flow() -> Any:
    from prefect import flow, task
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.states import Completed, Failed

    analyse_task = task(
        _analyse_one,
        name="analyse-slide",
        task_run_name="slide-{slide}",
        retries=2,
        retry_delay_seconds=[10, 60],
        retry_condition_fn=_retry_transient,
        cache_policy=None,
        log_prints=False,
    )

    @flow(name="wsiflow-batch", flow_run_name="batch-{batch_id}", log_prints=False, validate_parameters=True)
    def batch_flow(batch_id: str) -> Any:
        spec = load_batch(batch_id)
        secret = site_secret()
        names = [_pseudonym(path, secret) or f"input-{i + 1}" for i, path in enumerate(spec.slides)]
        cluster = None
        address = spec.dask_address
        if address is None:
            from distributed import LocalCluster

            cluster = LocalCluster(
                n_workers=_local_cluster_workers(), threads_per_worker=1, processes=True,
                host="127.0.0.1", dashboard_address=None,
            )
            address = cluster.scheduler_address
        try:
            futures = [analyse_task.submit(batch_id, i, name, address) for i, name in enumerate(names)]
            rows = []
            for i, future in enumerate(futures):
                try:
                    rows.append(future.result())
                except _TransientSlideFailure as exc:
                    rows.append({"index": i, "slide_id": names[i], "status": "failed", "tiles": None,
                                 "tiles_per_s": None, "result": None,
                                 "error": {"kind": "worker", "message": str(exc), "hint": ""}})
        finally:
            for client in list(_CLIENTS.values()):
                client.close()
            _CLIENTS.clear()
            if cluster is not None:
                cluster.close()
        table = [
            {"slide": r["slide_id"], "status": r["status"], "tiles": r["tiles"], "tiles/s": r.get("tiles_per_s"),
             "error": (r["error"] or {}).get("kind"), "result": r["result"]}
            for r in rows
        ]
        failed = sum(r["status"] == "failed" for r in rows)
        totals = (f"{len(rows)} slides: {sum(r['status'] == 'done' for r in rows)} done, "
                  f"{sum(r['status'] == 'reused' for r in rows)} reused, {failed} failed; "
                  f"{sum(r['tiles'] or 0 for r in rows)} tiles")
        create_table_artifact(key="wsiflow-batch", table=table, description=f"wsiflow batch {batch_id}: {totals}")
        create_markdown_artifact(key="wsiflow-batch-totals", markdown=f"**{totals}**", description="run totals")
        if failed == len(rows) and rows:
            return Failed(message=totals, data=rows)
        if failed:
            return Failed(name="Partially failed", message=totals, data=rows)
        return Completed(message=totals, data=rows)

    return batch_flow


batch_flow = _build_flow()


def run_batch(spec: BatchSpec) -> tuple[str, list[dict[str, Any]], str]:
    """Store the batch, run the flow (embedded Prefect API unless PREFECT_API_URL is set).

    Returns the batch ID, one row per slide (in input order) and the final state's name.
    """
    batch_id = save_batch(spec)
    state = batch_flow(batch_id, return_state=True)
    rows = state.result(raise_on_failure=False)
    if isinstance(rows, BaseException):
        raise rows
    return batch_id, sorted(rows, key=lambda r: r["index"]), state.name
