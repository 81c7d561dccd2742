"""Chunks on a real multi-process Dask cluster on 127.0.0.1 give the local result bit for bit."""

from __future__ import annotations

import contextlib
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
    executor = DaskChunkExecutor(client, ModelRef(str(registry.site_root), "tissue-qc@2", info.sha256))
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
    executor = DaskChunkExecutor(client, ModelRef(str(registry.site_root), "tissue-qc@2", info.sha256))
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
        executor = DaskChunkExecutor(client, ModelRef(str(registry.site_root), "tissue-qc@2", info.sha256), retries=3)
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


class _RecordingProxy:
    """A TCP relay in front of the scheduler that keeps every byte of both directions: what
    really crosses the wire between wsiflow's client and the cluster."""

    def __init__(self, upstream: str) -> None:
        import socket
        import threading

        host, port = upstream.removeprefix("tcp://").rsplit(":", 1)
        self._upstream = (host, int(port))
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self._server.getsockname()[1]}"
        self._lock = threading.Lock()
        self._chunks: list[bytes] = []
        self._sockets: list[socket.socket] = [self._server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source, sink) -> None:
        while True:
            try:
                data = source.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                for s in (source, sink):
                    with contextlib.suppress(OSError):
                        s.shutdown(2)
                return
            with self._lock:
                self._chunks.append(data)
            try:
                sink.sendall(data)
            except OSError:
                return

    def captured(self) -> bytes:
        with self._lock:
            return b"".join(self._chunks)

    def close(self) -> None:
        for s in self._sockets:
            s.close()


def test_no_patient_name_crosses_the_wire(bundled, cmu_svs, tmp_path):
    """A slide in a sentinel-named folder, itself sentinel-named, and a corrupt one likewise,
    through a real 2-process cluster: the sentinel is in none of the bytes between client and
    scheduler (a recording relay), none of the task specs the scheduler sends to workers (a
    scheduler plugin pickles each one as it is dispatched), nor the cluster's logs. The slide
    ID is in them (the capture sees the submissions); the result is complete and the source
    note is gone."""
    import shutil

    import dask
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin
    from distributed.protocol.pickle import dumps

    from flows._dask import DaskChunkExecutor
    from flows._model_ref import ModelRef
    from tests._sentinel_slide import SENTINEL

    class RunSpecs(SchedulerPlugin):
        def __init__(self, scheduler) -> None:
            self.scheduler, self.specs = scheduler, []

        def transition(self, key, start, finish, *args, **kwargs) -> None:
            if finish == "processing":
                self.specs.append(dumps(self.scheduler.tasks[key].run_spec))

    folder = tmp_path / f"{SENTINEL}-patient"
    folder.mkdir()
    good = shutil.copy(cmu_svs, folder / f"{SENTINEL}-slide.svs")
    bad = shutil.copy(shared_file("bad/unreadable-corrupt-tile.svs"), folder / f"{SENTINEL}-corrupt.svs")
    registry, model, info = bundled
    params = AnalysisParams(grid=GridSettings(stride_px=112), chunk_cells=4)
    engine = EngineSettings(batch_size=16, device="cpu")
    # Uncompressed frames, so a path would show in the bytes as it is.
    with dask.config.set({"distributed.comm.compression": None}), LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
        worker_dashboard_address=None,
    ) as cluster:
        plugin = RunSpecs(cluster.scheduler)
        cluster.scheduler.add_plugin(plugin)
        proxy = _RecordingProxy(cluster.scheduler_address)
        try:
            with Client(proxy.address) as client:
                executor = DaskChunkExecutor(client, ModelRef(str(registry.site_root), "tissue-qc@2", info.sha256))
                done = analyse_slide(good, model, info, _settings(tmp_path / "out", params, engine),
                                     secret=b"s" * 32, executor=executor)
                failed = analyse_slide(
                    bad, model, info,
                    _settings(tmp_path / "out", AnalysisParams(grid=GridSettings(min_tissue_fraction=0.0))),
                    secret=b"s" * 32, executor=executor,
                )
                logs = repr(client.get_worker_logs()) + repr(client.get_scheduler_logs())
        finally:
            proxy.close()
    assert done.status == "done", done.error
    assert done.chunks_computed == done.chunks_total > 2
    assert failed.status == "failed" and failed.error.kind == "corrupt"
    wire = proxy.captured()
    specs = b"".join(plugin.specs)
    assert done.slide_id.encode() in wire and done.slide_id.encode() in specs, "the capture missed the submissions"
    assert len(plugin.specs) >= done.chunks_total
    for name, data in (("client<->scheduler bytes", wire), ("task specs sent to workers", specs),
                       ("cluster logs", logs.encode())):
        for form in {SENTINEL, SENTINEL.lower()}:
            assert form.encode() not in data, f"the sentinel crossed the wire in the {name}"
            assert form.encode("utf-16-le") not in data, f"the sentinel crossed the wire in the {name}"
    assert not list((tmp_path / "out").rglob("slide-source.json")), "a source note outlived its slide's chunks"


def test_a_detached_job_names_no_slide_and_its_note_is_owner_only(tmp_path):
    """The descriptor a cluster gets: no slide path (pickled, as Dask sends it); the path in
    an owner-only note that the worker reads back; a note for another slide, or none, is a
    wsiflow error naming only the slide ID."""
    import pickle

    from pipeline import ChunkJob, GridSpec, WorkerError
    from tests._sentinel_slide import SENTINEL

    done_dir = tmp_path / "out" / "s-1" / "m" / "v1-x" / ".work" / "chunks"
    done_dir.mkdir(parents=True)
    slide = str(tmp_path / f"{SENTINEL}-patient" / f"{SENTINEL}.svs")
    job = ChunkJob(slide_id="s-1", slide_path=slide, backend="openslide", mpp_x=0.5, mpp_y=0.5,
                   grid=GridSpec(tile_size_px=224, target_mpp=0.5), heatmap_path=str(done_dir.parents[1] / "h"),
                   done_dir=str(done_dir), engine=EngineSettings())
    remote = job.detached()
    assert remote.slide_path is None and SENTINEL.encode() not in pickle.dumps(remote)
    assert SENTINEL.encode() in pickle.dumps(job)  # the check above can see a path
    assert job.source_note.stat().st_mode & 0o777 == 0o600
    assert remote.attached() == job and job.attached() is job
    from dataclasses import replace

    with pytest.raises(WorkerError, match="for another slide") as other:
        replace(remote, slide_id="s-2").attached()
    job.drop_source_note()
    with pytest.raises(WorkerError, match="source note is gone") as gone:
        remote.attached()
    for error in (other.value, gone.value):
        assert SENTINEL not in error.one_line() and str(tmp_path) not in error.one_line()
    assert not any(p.name.endswith(".tmp") for p in done_dir.iterdir())


def test_what_a_chunk_raises_crosses_back_without_its_text(bundled, cmu_svs, tmp_path):
    """An unexpected exception in a chunk (here: its heatmap is not there, so zarr raises
    with the path) is raised again bare: its built-in type (retries still see an OSError as
    one), no text and no chained original, in the form Dask pickles (tblib, with causes)."""
    import pickle
    import shutil

    import tblib.pickling_support

    from flows._dask import chunk_on_worker
    from flows._model_ref import ModelRef
    from pipeline import ChunkJob, ChunkTask, GridSpec, WsiflowError
    from tests._sentinel_slide import SENTINEL

    registry, _, info = bundled
    slide = shutil.copy(cmu_svs, tmp_path / f"{SENTINEL}.svs")
    work = tmp_path / f"{SENTINEL}-result" / ".work" / "chunks"
    work.mkdir(parents=True)
    job = ChunkJob(slide_id="s-1", slide_path=str(slide), backend="auto", mpp_x=0.499, mpp_y=0.499,
                   grid=GridSpec(tile_size_px=224, target_mpp=1.0), heatmap_path=str(work.parent / "missing.zarr"),
                   done_dir=str(work), engine=EngineSettings(batch_size=2, device="cpu"))
    task = ChunkTask(block=(0, 0), row_range=(0, 1), col_range=(0, 1), rows=(0,), cols=(0,), x=(0.0,), y=(0.0,))
    with pytest.raises(Exception) as raised:  # noqa: PT011 - any type: what matters is its text
        chunk_on_worker(task, job.detached(), ModelRef(str(registry.site_root), "tissue-qc@2", info.sha256))
    error = raised.value
    assert not isinstance(error, WsiflowError) and type(error).__module__ == "builtins"
    assert error.__context__ is None and error.__cause__ is None
    tblib.pickling_support.install(error)
    data = pickle.dumps(error) + str(error).encode()
    assert SENTINEL.encode() not in data and str(tmp_path).encode() not in data
