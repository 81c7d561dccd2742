"""Hard stops: a `wsiflow run` process SIGKILLed mid-slide resumes to the identical result,
and duplicate submissions from separate processes compute once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import pyarrow.parquet as pq
import zarr

pytestmark = pytest.mark.slow  # see DEVELOPERS.md: `make check` runs the tests not marked slow


RUN_ARGS = ("--stride", "112", "--chunk-cells", "2", "--readers", "2", "--batch-size", "8", "--json")


def _start(cli: list[str], slide: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([*cli, "run", str(slide), "--out", str(out), *RUN_ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _rows(stdout: str) -> list[dict]:
    """The slide rows of `run --json`'s one document."""
    report = json.loads(stdout)
    assert report["command"] == "run"
    return report["slides"]


def _unfinished(out: Path, slide_id: str) -> Path | None:
    """The one result folder of a run that has not finished (no `latest` yet), once it exists."""
    folders = list((out / slide_id / "tissue-qc").glob("v*"))
    assert len(folders) <= 1, folders
    return folders[0] if folders else None


def _finished_chunks(result_dir: Path | None) -> int:
    return len(list((result_dir / ".work" / "chunks").glob("*.done"))) if result_dir else 0


def _heatmap(result_dir: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(result_dir / "heatmap.ome.zarr" / "0"), mode="r")[...])


def test_a_killed_run_resumes_identically_and_redoes_only_unfinished_chunks(wsiflow_cli, cmu_svs, tmp_path):
    reference = subprocess.run([*wsiflow_cli, "run", str(cmu_svs), "--out", str(tmp_path / "ref"), *RUN_ARGS],
                               capture_output=True, text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-2000:]
    [ref] = _rows(reference.stdout)

    out = tmp_path / "killed"
    process = _start(wsiflow_cli, cmu_svs, out)
    deadline = time.monotonic() + 600
    while _finished_chunks(_unfinished(out, ref["slide_id"])) < 3:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no chunk finished in time"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the whole run, readers and all, with no chance to clean up
    process.wait(timeout=60)
    result_dir = _unfinished(out, ref["slide_id"])
    assert result_dir is not None and result_dir.name == Path(ref["result_dir"]).name
    finished = _finished_chunks(result_dir)
    assert not (result_dir / "result.json").exists(), "a killed run must not look complete"
    assert not (out / ref["slide_id"] / "tissue-qc" / "latest").exists(), "nor point `latest` at it"
    assert 3 <= finished < ref["chunks_total"], (finished, ref["chunks_total"])

    resumed = subprocess.run([*wsiflow_cli, "run", str(cmu_svs), "--out", str(out), *RUN_ARGS],
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    [row] = _rows(resumed.stdout)
    assert row["status"] == "done" and Path(row["result_dir"]) == result_dir
    assert row["chunks_computed"] == ref["chunks_total"] - finished  # only the unfinished ones
    np.testing.assert_array_equal(_heatmap(result_dir), _heatmap(Path(ref["result_dir"])))
    assert pq.read_table(result_dir / "tiles.parquet").equals(pq.read_table(Path(ref["result_dir"]) / "tiles.parquet"))


def test_duplicate_submissions_from_two_processes_compute_once(wsiflow_cli, cmu_svs, tmp_path):
    out = tmp_path / "out"
    first, second = _start(wsiflow_cli, cmu_svs, out), _start(wsiflow_cli, cmu_svs, out)
    rows = []
    for process in (first, second):
        stdout, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-2000:]
        rows += _rows(stdout)
    assert sorted(r["status"] for r in rows) == ["done", "reused"]
    assert rows[0]["result_dir"] == rows[1]["result_dir"]
