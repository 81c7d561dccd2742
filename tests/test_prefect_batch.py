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
    assert done["model"] == "tissue-qc@1" and done["mpp"]["source"] == "metadata" and done["tiles"] > 0
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
    table = next(a for a in artifacts if a["key"] == "wsiflow-batch")
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert [r["status"] for r in rows] == ["done", "failed"] and rows[1]["error"] == "corrupt"

    # Nothing the server stored names the slide: not the run, tasks, artifacts, logs or database.
    logs = _api(prefect_server, "/logs/filter", {"limit": 200})
    stored = json.dumps([flow_runs, task_runs, artifacts, logs])
    assert "PATIENT-SENTINEL" not in stored and corrupt.name not in stored
    for path in prefect_server["home"].rglob("*"):
        if path.is_file() and path.name != "server.log":
            assert b"PATIENT-SENTINEL" not in path.read_bytes(), path.name


def _python(code: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def test_inbox_processes_a_dropped_slide_once(prefect_server, cmu_svs, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    env = {**os.environ, "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": str(prefect_server["home"])}
    # The settings `wsiflow serve` stores: the config (with a folder mpp override) and its options.
    config = {"mpp_overrides": [{"label": "inbox-scanner", "folder": str(inbox), "mpp": 0.25}]}
    serve_args = ["serve", "--inbox", str(inbox), "--out", str(tmp_path / "out"), "--stride", "112", "--readers", "2"]
    created = _python(
        "from flows import parse_config; from flows._inbox import save_inbox; from flows.cli import build_parser; "
        "from flows.cli._options import build_run_settings; "
        f"settings = build_run_settings(parse_config({config!r}), build_parser().parse_args({serve_args!r})); "
        f"print(save_inbox({str(inbox)!r}, settings))",
        env,
    )
    assert created.returncode == 0, created.stderr[-2000:]
    inbox_id = created.stdout.strip()
    shutil.copy(cmu_svs, inbox / "new-scan.svs")
    shutil.copy(shared_file("bad/unreadable-corrupt-tile.svs"), inbox / "broken.svs")
    shutil.copy(shared_file("slides/TCGA-CR-7395-crop-jp2k-no-mpp.svs"), inbox / "no-mpp.svs")
    ticks = _python(
        "import json; from flows._inbox import inbox_tick, read_ledger; "
        f"print(json.dumps([inbox_tick({inbox_id!r}) for _ in range(3)])); "
        f"print(json.dumps(read_ledger({inbox_id!r})))",
        env,
    )
    assert ticks.returncode == 0, ticks.stderr[-3000:]
    counts_line, ledger_line = ticks.stdout.strip().splitlines()[-2:]
    counts = json.loads(counts_line)
    assert counts[0] == {"ready": 0, "processed": 0, "failed": 0}  # first look: still settling
    assert counts[1] == {"ready": 3, "processed": 2, "failed": 1}
    assert counts[2] == {"ready": 0, "processed": 0, "failed": 0}  # neither redone nor retried
    ledger = json.loads(ledger_line)
    good, bad = ledger[str(inbox / "new-scan.svs")], ledger[str(inbox / "broken.svs")]
    assert good["status"] == "processed" and good["slide_id"].startswith("s-")
    assert bad["status"] == "failed" and bad["error"]["kind"] == "corrupt"
    assert bad["result"] is None
    assert (tmp_path / "out" / good["result"] / "result.json").exists()  # relative to the output folder
    # serve honours the config's mpp_overrides: the slide without µm/px used the inbox's entry,
    # the one with valid metadata kept its own.
    from pipeline import ResultFolder

    overridden = ResultFolder(tmp_path / "out" / ledger[str(inbox / "no-mpp.svs")]["result"]).read_summary()
    assert (overridden.mpp.mpp_x, overridden.mpp.override) == (0.25, "mpp_overrides[inbox-scanner]")
    kept = ResultFolder(tmp_path / "out" / good["result"]).read_summary()
    assert kept.mpp.source == "metadata" and kept.mpp.declined == "mpp_overrides[inbox-scanner]"


def test_serve_creates_a_scheduled_deployment(prefect_server, wsiflow_cli, tmp_path):
    inbox = tmp_path / "PATIENT-SENTINEL-inbox"
    inbox.mkdir()
    env = {**os.environ, "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": str(prefect_server["home"])}
    process = subprocess.Popen(
        [*wsiflow_cli, "serve", "--inbox", str(inbox), "--out", str(tmp_path / "out"), "--interval", "3600"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 180
        deployments = []
        while time.monotonic() < deadline and not deployments:
            deployments = [d for d in _api(prefect_server, "/deployments/filter", {"limit": 20}) if d["name"].startswith("i-")]
            time.sleep(2)
        assert deployments, "no inbox deployment appeared on the server"
        deployment = deployments[0]
        assert deployment["parameters"] == {"inbox_id": deployment["name"]}
        assert "PATIENT-SENTINEL" not in json.dumps(deployment)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
