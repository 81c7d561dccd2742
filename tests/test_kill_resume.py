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
import pyarrow.parquet as pq
import zarr

RUN_ARGS = ("--stride", "112", "--chunk-cells", "2", "--readers", "2", "--batch-size", "8", "--json")


def _start(cli: list[str], slide: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([*cli, "run", str(slide), "--out", str(out), *RUN_ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _heatmap(result_dir: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(result_dir / "heatmap.ome.zarr" / "0"), mode="r")[...])


def test_a_killed_run_resumes_identically_and_redoes_only_unfinished_chunks(wsiflow_cli, cmu_svs, tmp_path):
    reference = subprocess.run([*wsiflow_cli, "run", str(cmu_svs), "--out", str(tmp_path / "ref"), *RUN_ARGS],
                               capture_output=True, text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-2000:]
    [ref] = json.loads(reference.stdout)

    out = tmp_path / "killed"
    result_dir = out / ref["slide_id"] / "tissue-qc"
    process = _start(wsiflow_cli, cmu_svs, out)
    deadline = time.monotonic() + 600
    while len(list((result_dir / ".work" / "chunks").glob("*.done"))) < 3:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no chunk finished in time"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the whole run, readers and all, with no chance to clean up
    process.wait(timeout=60)
    finished = len(list((result_dir / ".work" / "chunks").glob("*.done")))
    assert not (result_dir / "result.json").exists(), "a killed run must not look complete"
    assert 3 <= finished < ref["chunks_total"], (finished, ref["chunks_total"])

    resumed = subprocess.run([*wsiflow_cli, "run", str(cmu_svs), "--out", str(out), *RUN_ARGS],
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    [row] = json.loads(resumed.stdout)
    assert row["status"] == "done"
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
        rows += json.loads(stdout)
    assert sorted(r["status"] for r in rows) == ["done", "reused"]
    assert rows[0]["result_dir"] == rows[1]["result_dir"]
