"""The batch flow on a real Prefect server (the session's, see conftest, on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import shared_file

pytest.importorskip("prefect")
pytestmark = pytest.mark.slow  # see DEVELOPERS.md: `make check` runs the tests not marked slow


def _api(prefect_server, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{prefect_server['url']}{path}", data=json.dumps(body or {}).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _read_artifacts(prefect_server, flow_run_id: str) -> dict[str, list[dict]]:
    """The flow run's table artifacts by key, read back through the Prefect client."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with SyncPrefectClient(prefect_server["url"]) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: json.loads(a.data) if isinstance(a.data, str) else a.data for a in artifacts}


def _check_artifacts(prefect_server, flow_run_id: str, report: dict, out: Path) -> None:
    """The per-slide table and the totals say what the --json report says, without a path."""
    from pipeline import ResultFolder

    artifacts = _read_artifacts(prefect_server, flow_run_id)
    assert set(artifacts) == {"wsiflow-batch", "wsiflow-batch-totals"}
    done, failed = report["slides"]
    table = artifacts["wsiflow-batch"]
    assert [list(row) for row in table] == [
        ["slide", "status", "kind", "message", "remedy", "duration_s", "tiles", "tiles/s", "mpp", "result"]] * 2
    good, bad = table
    assert good == {
        "slide": done["slide_id"], "status": "done", "kind": None, "message": None, "remedy": None,
        "duration_s": done["duration_s"], "tiles": done["tiles"], "tiles/s": done["tiles_per_s"],
        "mpp": "metadata", "result": str(Path(done["result_dir"]).relative_to(out)),
    }
    assert good["duration_s"] > 0 and good["tiles/s"] > 0
    # The failed slide says why and what to do, as the terminal does.
    assert bad == {
        "slide": failed["slide_id"], "status": "failed", "kind": "corrupt",
        "message": failed["error"]["message"], "remedy": failed["error"]["hint"],
        "duration_s": failed["duration_s"], "tiles": None, "tiles/s": None,
        "mpp": (failed["mpp"] or {}).get("source"), "result": None,
    }
    assert bad["message"] and bad["remedy"]

    [totals] = artifacts["wsiflow-batch-totals"]
    tissue = ResultFolder(Path(done["result_dir"])).read_summary().data["tissue"]["area_mm2"]
    hours = totals["wall_s"] / 3600
    assert totals["wall_s"] >= done["duration_s"]
    assert {k: totals[k] for k in ("slides", "done", "reused", "failed", "interrupted", "tiles")} == {
        "slides": 2, "done": 1, "reused": 0, "failed": 1, "interrupted": 0, "tiles": done["tiles"]}
    assert totals["slides/h"] == pytest.approx(1 / hours, rel=0.01)
    assert totals["tiles/s"] == pytest.approx(done["tiles"] / totals["wall_s"], rel=0.01)
    assert totals["tissue mm²"] == pytest.approx(tissue, abs=0.01) and tissue > 0
    assert totals["tissue mm²/h"] == pytest.approx(tissue / hours, rel=0.01)
    stored = json.dumps(artifacts, ensure_ascii=False)
    assert str(out) not in stored and "PATIENT-SENTINEL" not in stored and ".svs" not in stored


def test_batch_flow_on_the_server(prefect_server, wsiflow_cli, cmu_svs, tmp_path):
    corrupt = shared_file("bad/unreadable-corrupt-tile.svs")
    inbox = tmp_path / "PATIENT-SENTINEL-4242"
    inbox.mkdir()
    named = inbox / "PATIENT-SENTINEL-4242.svs"
    shutil.copy(cmu_svs, named)
    env = {**os.environ, "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": str(prefect_server["home"])}
    result = subprocess.run(
        [*wsiflow_cli, "batch", str(named), str(corrupt), "--out", str(tmp_path / "out"), "--stride", "112",
         "--chunk-cells", "4", "--json"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    report = json.loads(result.stdout)
    # The one document shape of `run --json` and `batch --json`.
    assert report["command"] == "batch" and report["batch_id"]
    assert report["state"] == "Partially failed"
    assert report["counts"] == {"done": 1, "reused": 0, "failed": 1}
    assert [r["input_index"] for r in report["slides"]] == [0, 1]
    statuses = [(r["status"], (r["error"] or {}).get("kind")) for r in report["slides"]]
    assert statuses == [("done", None), ("failed", "corrupt")]
    done = report["slides"][0]
    assert done["model"] == "tissue-qc@2" and done["mpp"]["source"] == "metadata" and done["tiles"] > 0
    result_dir = Path(done["result_dir"])  # absolute, as in `run --json`
    assert result_dir.is_absolute() and result_dir.is_relative_to(tmp_path / "out")
    assert (result_dir / "result.json").exists()
    assert report["slides"][1]["result_dir"] is None

    # The server is shared by the session: look only at this batch's run.
    flow_runs = [r for r in _api(prefect_server, "/flow_runs/filter", {"limit": 200})
                 if r["name"] == f"batch-{report['batch_id']}"]
    assert len(flow_runs) == 1
    run = flow_runs[0]
    assert run["name"] == f"batch-{report['batch_id']}"
    assert run["parameters"] == {"batch_id": report["batch_id"]}
    assert run["state"]["name"] == "Partially failed" and run["state"]["type"] == "FAILED"
    deadline = time.monotonic() + 60  # task runs arrive as events, recorded asynchronously
    while True:
        task_runs = [t for t in _api(prefect_server, "/task_runs/filter", {"limit": 200})
                     if t["flow_run_id"] == run["id"]]
        if len(task_runs) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    names = sorted(t["name"] for t in task_runs)
    assert names == sorted(f"slide-{r['slide_id']}" for r in report["slides"])
    # A failed slide is a Failed task run that says why (kind, message, remedy), not a green one.
    states = {}
    while time.monotonic() < deadline + 60:
        states = {t["name"]: t["state"] for t in _api(prefect_server, "/task_runs/filter", {"limit": 200})
                  if t["flow_run_id"] == run["id"]}
        if all(s and s["type"] in ("COMPLETED", "FAILED") for s in states.values()):
            break
        time.sleep(1)
    good, bad = (f"slide-{r['slide_id']}" for r in report["slides"])
    assert states[good]["type"] == "COMPLETED"
    assert states[bad]["type"] == "FAILED" and "corrupt:" in states[bad]["message"]
    artifacts = [a for a in _api(prefect_server, "/artifacts/filter", {"limit": 200})
                 if a.get("flow_run_id") == run["id"]]
    _check_artifacts(prefect_server, run["id"], report, tmp_path / "out")

    # Nothing the server stored names the slide: not the run, tasks, artifacts, logs or database.
    logs = _api(prefect_server, "/logs/filter", {"limit": 200})
    stored = json.dumps([flow_runs, task_runs, artifacts, logs])
    assert "PATIENT-SENTINEL" not in stored and corrupt.name not in stored
    for path in prefect_server["home"].rglob("*"):
        if path.is_file() and path.name != "server.log":
            assert b"PATIENT-SENTINEL" not in path.read_bytes(), path.name


def _python(code: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
