"""Chunks on a real multi-process Dask cluster on 127.0.0.1 give the local result bit for bit."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import zarr

from models import Registry
from pipeline import AnalysisParams, EngineSettings, GridSettings, ModelInfo, RunSettings, analyse_slide
from tests.conftest import shared_file

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow  # see DEVELOPERS.md: `make check` runs the tests not marked slow


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
        worker_dashboard_address=None,
    ) as local, Client(local) as client:
        yield local, client


@pytest.fixture(scope="module")
def bundled():
    registry = Registry()
    model = registry.load("tissue-qc")
    m = model.manifest
    return registry, model, ModelInfo(m.name, m.version, m.weights_sha256, tuple(c.color for c in m.classes))


def _settings(out, analysis=AnalysisParams(), engine=EngineSettings()):
    return RunSettings(out_dir=out, model="tissue-qc", analysis=analysis, engine=engine)


def _heatmap(outcome):
    return np.asarray(zarr.open_array(str(outcome.result_dir / "heatmap.ome.zarr" / "0"), mode="r")[...])


def test_dask_result_is_bit_identical_and_models_stay_on_workers(cluster, bundled, cmu_svs, tmp_path):
    from flows._dask import DaskChunkExecutor, worker_cache_sizes
    from flows._model_ref import ModelRef

    _, client = cluster
    registry, model, info = bundled
    params = AnalysisParams(grid=GridSettings(stride_px=112), chunk_cells=3)
    engine = EngineSettings(batch_size=16, device="cpu")
    local = analyse_slide(cmu_svs, model, info, _settings(tmp_path / "local", params, engine), secret=b"d" * 32)
    executor = DaskChunkExecutor(client, ModelRef(str(registry.site_root), "tissue-qc@1", info.sha256))
    remote = analyse_slide(
        cmu_svs, model, info, _settings(tmp_path / "dask", params, engine), secret=b"d" * 32, executor=executor
    )
    assert remote.status == "done", remote.error
    assert remote.chunks_total > 2 and remote.chunks_computed == remote.chunks_total
    np.testing.assert_array_equal(_heatmap(remote), _heatmap(local))
    sizes = client.run(worker_cache_sizes)
    assert len(sizes) == 2
    assert all(s["models"] <= 1 for s in sizes.values())
    assert sum(s["models"] for s in sizes.values()) >= 1  # the model was loaded on the workers...
    assert sum(s["slides"] for s in sizes.values()) >= 1  # ...and the slide opened there


def test_corrupt_slide_fails_cleanly_on_the_cluster(cluster, bundled, tmp_path):
    from flows._dask import DaskChunkExecutor
    from flows._model_ref import ModelRef

    _, client = cluster
    registry, model, info = bundled
    executor = DaskChunkExecutor(client, ModelRef(str(registry.site_root), "tissue-qc@1", info.sha256))
    outcome = analyse_slide(
        shared_file("bad/unreadable-corrupt-tile.svs"), model, info,
        _settings(tmp_path, AnalysisParams(grid=GridSettings(min_tissue_fraction=0.0))), secret=b"d" * 32,
        executor=executor,
    )
    assert outcome.status == "failed" and outcome.error.kind == "corrupt"


def test_cli_run_with_dask_address(cluster, wsiflow_cli, cmu_svs, tmp_path):
    local_cluster, _ = cluster
    result = subprocess.run(
        [*wsiflow_cli, "run", str(cmu_svs), "--out", str(tmp_path), "--stride", "112", "--chunk-cells", "4",
         "--dask-address", local_cluster.scheduler_address, "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["command"] == "run" and report["state"] == "Completed"
    (row,) = report["slides"]
    assert row["status"] == "done" and row["tiles"] > 0


def test_a_worker_killed_mid_slide_still_gives_the_complete_identical_result(bundled, cmu_svs, tmp_path):
    """Kill a worker process while chunks run: Dask reschedules, the result is identical."""
    import os
    import signal
    import threading

    from distributed import Client, LocalCluster

    from flows._dask import DaskChunkExecutor
    from flows._model_ref import ModelRef

    registry, model, info = bundled
    params = AnalysisParams(grid=GridSettings(stride_px=56), chunk_cells=2)  # many small chunks
    engine = EngineSettings(batch_size=8, device="cpu")
    local = analyse_slide(cmu_svs, model, info, _settings(tmp_path / "local", params, engine), secret=b"k" * 32)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        executor = DaskChunkExecutor(client, ModelRef(str(registry.site_root), "tissue-qc@1", info.sha256), retries=3)
        killed = []

        def killer():
            # Wait until chunks are being finished, then kill one worker process outright.
            work = tmp_path / "dask"
            for _ in range(600):
                if list(work.rglob("*.done")):
                    break
                threading.Event().wait(0.1)
            victim = next(iter(client.scheduler_info()["workers"]))
            pid = client.run(os.getpid, workers=[victim])[victim]
            os.kill(pid, signal.SIGKILL)  # the nanny restarts it; its chunks are rescheduled
            killed.append(victim)

        thread = threading.Thread(target=killer)
        thread.start()
        remote = analyse_slide(
            cmu_svs, model, info, _settings(tmp_path / "dask", params, engine), secret=b"k" * 32,
            executor=executor,
        )
        thread.join()
    assert killed, "the killer never ran"
    assert remote.status == "done", remote.error
    np.testing.assert_array_equal(_heatmap(remote), _heatmap(local))
