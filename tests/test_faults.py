"""Faults: damaged slides in a batch, a native crash on a Dask worker, a full output disk.

(Kill + resume, concurrent submissions and tampered models are covered in
test_run_results.py and test_model_registry.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
import zarr

from models import Registry
from pipeline import (
    LATEST_LINK,
    RESULT_MANIFEST,
    AnalysisParams,
    EngineSettings,
    GridSettings,
    ModelInfo,
    RunSettings,
    analyse_slide,
)
from tests.conftest import shared_file

try:
    from distributed import WorkerPlugin
except ImportError:  # the Dask test skips itself
    WorkerPlugin = object  # type: ignore[assignment,misc]

pytestmark = pytest.mark.slow  # see DEVELOPERS.md: `make check` runs the tests not marked slow

EXIT_FAILED = 1


def _run(cli: list[str], *args: object, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _manifests(out: Path) -> dict[str, Path]:
    """slide id -> result.json for every result folder marked complete under ``out``
    (``out/<slide id>/<model>/v<version>-<digest>/result.json``; ``latest`` links skipped)."""
    return {p.parents[2].name: p for p in out.rglob(RESULT_MANIFEST)
            if ".work" not in p.parts and LATEST_LINK not in p.relative_to(out).parts}


def _settings(out: Path, analysis: AnalysisParams, engine: EngineSettings) -> RunSettings:
    return RunSettings(out_dir=out, model="tissue-qc", analysis=analysis, engine=engine)


def _rows(stdout: str) -> list[dict]:
    """The slide rows of `run --json`'s one document."""
    report = json.loads(stdout)
    assert report["command"] == "run"
    return report["slides"]


def _assert_complete(result_dir: Path) -> None:
    manifest = json.loads((result_dir / RESULT_MANIFEST).read_text())
    assert manifest["complete"] is True
    for name in manifest["files"]:
        assert (result_dir / name).exists(), name
    assert not (result_dir / ".work").exists()
    summary = json.loads((result_dir / "summary.json").read_text())
    assert pq.read_table(result_dir / "tiles.parquet").num_rows == summary["tiles"]


def _heatmap(result_dir: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(result_dir / "heatmap.ome.zarr" / "0"), mode="r")[...])


def _assert_same_outputs(result_dir: Path, reference_dir: Path) -> None:
    """Heatmap levels, tissue mask and tile table identical to the reference run's."""
    for image in ("heatmap.ome.zarr", "tissue.ome.zarr"):
        levels = sorted(p.name for p in (reference_dir / image).iterdir() if p.name.isdigit())
        assert levels == sorted(p.name for p in (result_dir / image).iterdir() if p.name.isdigit()), image
        for level in levels:
            np.testing.assert_array_equal(
                np.asarray(zarr.open_array(str(result_dir / image / level), mode="r")[...]),
                np.asarray(zarr.open_array(str(reference_dir / image / level), mode="r")[...]),
            )
    assert pq.read_table(result_dir / "tiles.parquet").equals(pq.read_table(reference_dir / "tiles.parquet"))
    assert json.loads((result_dir / "results.geojson").read_text()) == json.loads(
        (reference_dir / "results.geojson").read_text())


# --- 1. damaged slides in one batch ---------------------------------------------------------


def _damaged_copies(source: Path, folder: Path) -> dict[str, str]:
    """Copies of ``source``: truncated at several offsets, with bytes flipped inside level-0
    JPEG tiles, and one intact. File name -> what was done."""
    data = source.read_bytes()
    with tifffile.TiffFile(source) as tif:
        page = tif.pages[0]
        first_ifd = page.offset  # type: ignore[union-attr]
        tiles = [(int(o), int(n)) for o, n in zip(page.dataoffsets, page.databytecounts) if n]  # type: ignore[union-attr]
    cases: dict[str, bytes] = {
        "intact.svs": data,
        "trunc-header.svs": data[:8],
        "trunc-ifd.svs": data[: first_ifd + 100],
        "trunc-30pct.svs": data[: int(len(data) * 0.3)],
        "trunc-70pct.svs": data[: int(len(data) * 0.7)],
        "trunc-end.svs": data[:-1],
    }
    # Tiles over tissue (the middle of the tile list), flipped well past the JPEG header.
    middle = tiles[len(tiles) // 3 : 2 * len(tiles) // 3]
    xor = bytearray(data)
    for offset, count in middle[::3]:
        for k in range(count // 2, count - 8, max(1, count // 7)):
            xor[offset + k] ^= 0x5A
    cases["flip-xor.svs"] = bytes(xor)
    marker = bytearray(data)
    for offset, count in middle[::4]:
        at = offset + count // 2
        marker[at : at + 2] = b"\xff\xd9"  # an EOI marker in the middle of the entropy-coded data
    cases["flip-marker.svs"] = bytes(marker)
    folder.mkdir(parents=True)
    for name, content in cases.items():
        (folder / name).write_bytes(content)
    return {name: name.split(".")[0] for name in cases}


def test_damaged_slides_in_a_batch_fail_one_by_one(wsiflow_cli, cmu_svs, tmp_path):
    folder, out = tmp_path / "inbox", tmp_path / "out"
    names = sorted(_damaged_copies(cmu_svs, folder))
    result = _run(wsiflow_cli, "run", folder, "--out", out, "--readers", "2", "--json")
    assert result.returncode == EXIT_FAILED, result.stderr  # partial failure
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["command"] == "run" and report["state"] == "Partially failed"
    rows = report["slides"]
    assert [r["input_index"] for r in rows] == list(range(len(names)))
    by_name = {names[r["input_index"]]: r for r in rows}  # expand_slide_arguments sorts a folder's files

    assert by_name["intact.svs"]["status"] == "done", by_name["intact.svs"]["error"]
    failed_ids = set()
    for name, row in by_name.items():
        if row["status"] == "failed":
            error = row["error"]
            assert error["kind"] in ("corrupt", "unsupported"), (name, error)
            assert "\n" not in error["message"] and name not in error["message"]
            assert row["result_dir"] is None
            if row["slide_id"]:
                failed_ids.add(row["slide_id"])
        else:
            # The decoder tolerated the damage: then the result must be complete and valid.
            assert row["status"] == "done", (name, row)
            _assert_complete(Path(row["result_dir"]))
    # Aperio writes level 0's tiles before its IFD: cut before the IFD, nothing is left to read.
    # (Cut at 70 % only the thumbnail/label/macro pages are lost; level 0 may still complete.)
    for name in ("trunc-header.svs", "trunc-ifd.svs", "trunc-30pct.svs"):
        assert by_name[name]["status"] == "failed", name
    for name in ("trunc-header.svs", "trunc-30pct.svs"):
        assert by_name[name]["error"]["message"].endswith("(it is truncated)"), by_name[name]["error"]

    # One clear line per failed slide on stderr, naming no file.
    error_lines = [line for line in result.stderr.splitlines() if " failed: " in line]
    assert len(error_lines) == len([r for r in rows if r["status"] == "failed"])
    for line in error_lines:
        assert any(f"failed: {kind}: " in line for kind in ("corrupt", "unsupported")), line
        assert not any(name in line for name in names), line
    # No failed slide has a result marked complete; every complete one is a done slide.
    complete = _manifests(out)
    assert not failed_ids & set(complete)
    assert set(complete) == {r["slide_id"] for r in rows if r["status"] == "done"}
    assert report["counts"] == {s: sum(r["status"] == s for r in rows) for s in ("done", "reused", "failed")}


# --- 2. a native crash on a Dask worker ------------------------------------------------------

_CRASH_MARKER = "segv-on-read"


class _SegfaultOnMarkedSlide(WorkerPlugin):
    """A WorkerPlugin: reading any region of a slide under a folder named ``_CRASH_MARKER``
    dereferences NULL in native code (a real SIGSEGV that kills the worker process). Both
    read paths are wrapped: tiles come through ``read_region_at_mpp`` (the direct JPEG
    reader never calls ``read_region``)."""

    name = "wsiflow-test-segfault"

    def setup(self, worker: object) -> None:
        from pipeline import _slide

        for method in ("read_region", "read_region_at_mpp"):
            original = getattr(_slide.Slide, method)
            if getattr(original, "_wrapped_for_segfault", False):
                continue
            setattr(_slide.Slide, method, _crashing(original))


def _crashing(original):  # noqa: ANN001, ANN202
    def read(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        path = getattr(self.backend, "_path", None) or getattr(self.backend, "path", "")
        if _CRASH_MARKER in os.fspath(path):
            import ctypes

            ctypes.string_at(0)  # SIGSEGV inside libc, as a crashing decoder would
        return original(self, *args, **kwargs)

    read._wrapped_for_segfault = True  # type: ignore[attr-defined]
    return read


@pytest.fixture(scope="module")
def bundled():
    registry = Registry()
    model = registry.load("tissue-qc")
    m = model.manifest
    return registry, model, ModelInfo(m.name, m.version, m.weights_sha256, tuple(c.color for c in m.classes))


def test_a_segfault_on_a_worker_fails_only_that_slide(bundled, cmu_svs, tmp_path):
    pytest.importorskip("distributed")
    import dask
    from distributed import Client, LocalCluster

    from flows._dask import DaskChunkExecutor
    from flows._model_ref import ModelRef

    registry, model, info = bundled
    params = AnalysisParams(grid=GridSettings(stride_px=112), chunk_cells=3)
    engine = EngineSettings(batch_size=16, device="cpu")
    # The crashing slide: other bytes than the good one (so another slide id), same pixels.
    crashing = tmp_path / _CRASH_MARKER / "slide.svs"
    crashing.parent.mkdir()
    crashing.write_bytes(cmu_svs.read_bytes() + b"\0" * 16)
    good = tmp_path / "good" / "slide.svs"
    good.parent.mkdir()
    shutil.copyfile(cmu_svs, good)

    local = analyse_slide(good, model, info, _settings(tmp_path / "local", params, engine), secret=b"f" * 32)
    assert local.status == "done"

    plugin = _SegfaultOnMarkedSlide()
    # A chunk whose worker died twice is poison (default 3; fewer restarts keep the test short).
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
        worker_dashboard_address=None,
    ) as cluster, Client(cluster) as client:
        client.register_plugin(plugin)
        executor = DaskChunkExecutor(client, ModelRef(str(registry.site_root), "tissue-qc@2", info.sha256), retries=0)

        def analyse(path: Path):
            return analyse_slide(path, model, info, _settings(tmp_path / "dask", params, engine), secret=b"f" * 32,
                                 executor=executor)

        crashed = analyse(crashing)
        assert crashed.status == "failed"
        assert crashed.error is not None and crashed.error.kind == "worker", crashed.error
        assert "died" in crashed.error.message
        assert crashed.slide_id and (tmp_path / "dask" / crashed.slide_id / "tissue-qc").is_dir()
        assert not list((tmp_path / "dask" / crashed.slide_id / "tissue-qc").glob(f"*/{RESULT_MANIFEST}"))

        # The client, the scheduler and the (restarted) workers survive. Chunks cancelled while
        # already running may still crash a worker: let them, and the restarts, settle first.
        # On a loaded 2-core machine a nanny restart can take tens of seconds.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if not any(client.processing().values()) and len(client.scheduler_info()["workers"]) == 2:
                break
            time.sleep(0.2)
        client.wait_for_workers(1, timeout=120)
        fine = analyse(good)
        assert fine.status == "done", fine.error
        _assert_complete(fine.result_dir)
        np.testing.assert_array_equal(_heatmap(fine.result_dir), _heatmap(local.result_dir))
        assert pq.read_table(fine.result_dir / "tiles.parquet").equals(pq.read_table(local.result_dir / "tiles.parquet"))
        # The cluster survived (the good slide ran on it); nannies restart the crashed workers.
        assert client.scheduler_info()["workers"]


# --- 3. the output disk fills up ---------------------------------------------------------------


@pytest.fixture(scope="module")
def disk_reference(bundled, cmu_svs_module, tmp_path_factory) -> Path:
    """The result of the full-disk test's options on a normal disk (same site secret as the CLI)."""
    from pipeline import site_secret

    _, model, info = bundled
    settings = _settings(tmp_path_factory.mktemp("reference"),
                         AnalysisParams(grid=GridSettings(stride_px=112), chunk_cells=2),
                         EngineSettings(batch_size=64, readers=2))
    outcome = analyse_slide(cmu_svs_module, model, info, settings, secret=site_secret())
    assert outcome.status == "done", outcome.error
    return outcome.result_dir  # type: ignore[return-value]


@pytest.fixture(scope="module")
def cmu_svs_module() -> Path:
    return shared_file("slides/CMU-1-Small-Region.svs")


def _mount_tmpfs(mountpoint: Path, size: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")


# 22 chunks of 2x2 cells; on tmpfs each Zarr chunk and each .done marker takes a 4 KiB page.
# 96 KiB fills up after a few chunks; 448 KiB holds every chunk and the small outputs but not
# overview.png (~800 KB), so the disk fills up while finalising.
@pytest.mark.parametrize("size", ["96k", "448k"], ids=["during-chunks", "while-finalising"])
def test_a_full_disk_fails_cleanly_then_the_rerun_completes_identically(
    wsiflow_cli, cmu_svs, tmp_path, disk_reference, size
):
    disk = tmp_path / "small-disk"
    _mount_tmpfs(disk, size)
    try:
        _full_disk_then_rerun(wsiflow_cli, cmu_svs, disk, disk_reference, size)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _full_disk_then_rerun(wsiflow_cli: list[str], cmu_svs: Path, disk: Path, ref_dir: Path, size: str) -> None:
    options = ("--stride", "112", "--chunk-cells", "2", "--readers", "2", "--json")
    chunks_total = len(list((ref_dir / "heatmap.ome.zarr" / "0" / "c").rglob("*")))  # upper bound
    full = _run(wsiflow_cli, "run", cmu_svs, "--out", disk, *options)
    assert full.returncode == EXIT_FAILED, full.stderr
    assert "Traceback" not in full.stderr
    (row,) = _rows(full.stdout)
    assert row["status"] == "failed" and row["error"]["kind"] == "output", row
    assert "No space left" in row["error"]["message"]
    lines = [line for line in full.stderr.splitlines() if " failed: " in line]
    assert len(lines) == 1 and "failed: output: " in lines[0], full.stderr
    # The same options as the reference: the same result folder name (it is not complete, so
    # there is no `latest` yet).
    model_dir = disk / ref_dir.parent.parent.name / "tissue-qc"
    result_dir = model_dir / ref_dir.name
    assert result_dir.is_dir() and not (model_dir / LATEST_LINK).exists()
    assert not (result_dir / RESULT_MANIFEST).exists()
    assert not list(result_dir.rglob("*.tmp"))  # no half-written temp files left holding space
    done = list((result_dir / ".work" / "chunks").glob("*.done"))
    assert done, "the disk must fill up after some chunks were finished"
    if size == "96k":
        assert len(done) < 20, "the disk must fill up mid-chunks"
    # Every chunk marked done has its heatmap block written in full (the marker comes last).
    heatmap = _heatmap(result_dir)
    reference_heatmap = _heatmap(ref_dir)
    for marker in done:
        br, bc = map(int, marker.stem.split("_"))
        block = np.s_[:, br * 2 : br * 2 + 2, bc * 2 : bc * 2 + 2]
        np.testing.assert_array_equal(heatmap[block], reference_heatmap[block])

    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    rerun = _run(wsiflow_cli, "run", cmu_svs, "--out", disk, *options)
    assert rerun.returncode == 0, rerun.stderr
    (again,) = _rows(rerun.stdout)
    assert again["status"] == "done" and Path(again["result_dir"]) == result_dir
    assert again["chunks_computed"] == again["chunks_total"] - len(done)  # finished chunks were kept
    assert again["chunks_total"] <= chunks_total
    if size == "448k":
        assert again["chunks_computed"] == 0  # it failed while finalising: nothing to recompute
    _assert_complete(result_dir)
    _assert_same_outputs(result_dir, ref_dir)
