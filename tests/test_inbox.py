"""The scanner inbox (`wsiflow serve`, its looks, its ledger, `wsiflow retry`) on a real
Prefect server (the session's, see conftest, on 127.0.0.1).

Looks run in subprocesses that talk to that server, as the served deployment's runs do;
the ledger and batches are read from the session's site directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import shared_file

pytest.importorskip("prefect")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _env(prefect_server) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": str(prefect_server["home"])}


def _api(prefect_server, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{prefect_server['url']}{path}", data=json.dumps(body or {}).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    for attempt in range(10):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            # A busy server (SQLite locked by other tests' runs) answers 503 for a moment.
            if exc.code != 503 or attempt == 9:
                raise
            time.sleep(2)


def _python(code: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def _site() -> Path:
    return Path(os.environ["WSIFLOW_HOME"])  # the session's site dir (conftest)


def _ledger(inbox_id: str) -> dict:
    path = _site() / "inboxes" / inbox_id / "ledger.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _register(env: dict, *serve_argv: str) -> str:
    """Store an inbox exactly as `wsiflow serve` does (without serving it); its ID."""
    done = _python(
        "import sys; from flows import load_config; from flows.cli import build_parser; "
        "from flows.cli._serve import register_inbox; "
        f"args = build_parser().parse_args({list(serve_argv)!r}); "
        "print(register_inbox(args, load_config(args.config))[0])",
        env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def _looks(env: dict, inbox_id: str, n: int) -> list[dict]:
    """``n`` looks at the inbox, one after the other, in one process (as `InboxLook.to_json()`)."""
    done = _python(
        "import json; from flows._inbox import inbox_tick; "
        f"print(json.dumps([inbox_tick({inbox_id!r}).to_json() for _ in range({n})]))",
        env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _retry(wsiflow_cli: list[str], env: dict, *argv: str) -> subprocess.CompletedProcess:
    """`wsiflow [--config FILE] retry ...` as a subprocess."""
    return subprocess.run([*wsiflow_cli, *argv], capture_output=True, text=True, timeout=300, env=env)


def _batches_with(slide: Path) -> list[str]:
    """The stored batches that include this slide (each is one submission)."""
    found = []
    for path in sorted((_site() / "batches").glob("b-*.json")):
        if any(s["path"] == str(slide) for s in json.loads(path.read_text(encoding="utf-8"))["slides"]):
            found.append(path.stem)
    return found


def _counts(look: dict, *keys: str) -> dict:
    return {k: look[k] for k in keys}


@pytest.mark.slow
def test_a_slide_under_analysis_is_never_submitted_twice(prefect_server, cmu_svs, tmp_path):
    inbox, env = tmp_path / "inbox", _env(prefect_server)
    inbox.mkdir()
    inbox_id = _register(env, "serve", "--inbox", str(inbox), "--out", str(tmp_path / "out"), "--stride", "112")
    slide = inbox / "scan.svs"
    shutil.copy(cmu_svs, slide)
    # Look A notes the slide, then submits it and runs its batch (a LocalCluster, the analysis).
    first = subprocess.Popen(
        [sys.executable, "-c",
         "import json; from flows._inbox import inbox_tick; "
         f"print(json.dumps([inbox_tick({inbox_id!r}).to_json() for _ in range(2)]))"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Look B starts while A's batch runs (the ledger says `submitted`), then looks again after it.
    ledger = json.dumps(str(_site() / "inboxes" / inbox_id / "ledger.json"))
    second = subprocess.Popen(
        [sys.executable, "-c", f"""
import json, time
from pathlib import Path
from flows._inbox import inbox_tick
def status():
    path = Path({ledger})
    return json.loads(path.read_text()).get({json.dumps(str(slide))}, {{}}).get("status") if path.exists() else None
deadline = time.monotonic() + 600
while status() != "submitted" and time.monotonic() < deadline:
    time.sleep(0.05)
during = inbox_tick({inbox_id!r}).to_json()
while status() == "submitted" and time.monotonic() < deadline:
    time.sleep(0.2)
print(json.dumps([during, inbox_tick({inbox_id!r}).to_json()]))
"""],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    out_a, err_a = first.communicate(timeout=900)
    out_b, err_b = second.communicate(timeout=900)
    assert first.returncode == 0, err_a[-3000:]
    assert second.returncode == 0, err_b[-3000:]
    noted, submitted = json.loads(out_a.strip().splitlines()[-1])
    during, after = json.loads(out_b.strip().splitlines()[-1])

    assert _counts(noted, "new", "submitted") == {"new": 1, "submitted": 0}
    assert _counts(submitted, "submitted", "processed", "failed") == {"submitted": 1, "processed": 1, "failed": 0}
    # The look that came while the batch ran: it knew the slide was under analysis, submitted nothing.
    assert during["busy"] and during["submitted"] == 0 and during["batch_id"] is None
    assert during["under_analysis"] == 1 and during["running_batches"] == [submitted["batch_id"]]
    assert after["submitted"] == 0 and after["skipped_processed"] == 1 and not after["busy"]
    assert _batches_with(slide) == [submitted["batch_id"]]  # one submission in all
    entry = _ledger(inbox_id)[str(slide)]
    assert entry["status"] == "processed" and entry["batch_id"] == submitted["batch_id"]

    # A look that died while its batch ran (its process gone, its lock free) left the slide
    # `submitted`: the next look submits it again (the finished result is then reused).
    ledger_path = _site() / "inboxes" / inbox_id / "ledger.json"
    data = json.loads(ledger_path.read_text(encoding="utf-8"))
    data[str(slide)].update(status="submitted", batch_id="b-000000000000", pid=999_999_999)
    ledger_path.write_text(json.dumps(data), encoding="utf-8")
    # While a look holds the inbox, that slide counts as under analysis and is left alone.
    with open(_site() / "inboxes" / inbox_id / "look.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        [waiting] = _looks(env, inbox_id, 1)
    assert waiting["busy"] and waiting["under_analysis"] == 1 and waiting["submitted"] == 0
    [again] = _looks(env, inbox_id, 1)
    assert _counts(again, "submitted", "again", "processed") == {"submitted": 1, "again": 1, "processed": 1}
    assert sorted(_batches_with(slide)) == sorted([submitted["batch_id"], again["batch_id"]])
    assert _ledger(inbox_id)[str(slide)]["status"] == "processed"


@pytest.mark.slow
def test_retry_after_a_config_fix_reruns_a_failed_slide(prefect_server, wsiflow_cli, tmp_path):
    inbox, out, env = tmp_path / "inbox", tmp_path / "out", _env(prefect_server)
    inbox.mkdir()
    config = tmp_path / "site.yaml"
    config.write_text("grid:\n  stride_px: 112\n", encoding="utf-8")
    inbox_id = _register(env, "--config", str(config), "serve", "--inbox", str(inbox), "--out", str(out),
                         "--readers", "2")
    slide = inbox / "PATIENT-SENTINEL-no-mpp.svs"
    shutil.copy(shared_file("slides/TCGA-CR-7395-crop-jp2k-no-mpp.svs"), slide)
    _, failed = _looks(env, inbox_id, 2)
    assert _counts(failed, "submitted", "failed") == {"submitted": 1, "failed": 1}
    entry = _ledger(inbox_id)[str(slide)]
    assert entry["status"] == "failed" and entry["error"]["kind"] == "missing-mpp"
    slide_id = entry["slide_id"]
    assert failed["failed_slides"] == [f"{slide_id}: missing-mpp"]
    [still] = _looks(env, inbox_id, 1)  # not retried by itself
    assert still["submitted"] == 0 and still["skipped_failed"] == 1

    # The fix: an mpp_overrides entry for the scanner's folder; retry rebuilds the settings.
    config.write_text(
        "grid:\n  stride_px: 112\n"
        f"mpp_overrides:\n  - label: inbox-scanner\n    folder: {json.dumps(str(inbox))}\n    mpp: 0.25\n",
        encoding="utf-8",
    )
    done = _retry(wsiflow_cli, env, "--config", str(config), "retry", "--inbox-id", inbox_id, "--slide-id", slide_id,
                  "--reload-config")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{slide_id}: marked for retry at the next look (failed: missing-mpp)" in done.stdout
    assert "settings rebuilt" in done.stdout
    assert "PATIENT-SENTINEL" not in done.stdout + done.stderr and str(inbox) not in done.stdout + done.stderr
    assert _ledger(inbox_id)[str(slide)]["status"] == "retry"
    stored = json.loads((_site() / "inboxes" / inbox_id / "inbox.json").read_text(encoding="utf-8"))
    assert stored["options"]["readers"] == 2 and stored["settings"]["engine"]["readers"] == 2  # serve's option kept
    assert stored["settings"]["analysis"]["grid"]["stride_px"] == 112
    assert [o["label"] for o in stored["settings"]["mpp"]["overrides"]] == ["inbox-scanner"]

    [retried] = _looks(env, inbox_id, 1)
    assert _counts(retried, "submitted", "again", "processed", "failed") == {
        "submitted": 1, "again": 1, "processed": 1, "failed": 0}
    entry = _ledger(inbox_id)[str(slide)]
    assert entry["status"] == "processed" and entry["error"] is None and entry["slide_id"] == slide_id
    from pipeline import ResultFolder

    summary = ResultFolder(out / entry["result"]).read_summary()
    assert (summary.mpp.mpp_x, summary.mpp.override) == (0.25, "mpp_overrides[inbox-scanner]")

    # Nothing more to retry: a processed slide is refused (exit 1), an unknown ID or inbox is an error (2).
    processed = _retry(wsiflow_cli, env, "retry", "--inbox-id", inbox_id, "--slide-id", slide_id)
    assert processed.returncode == 1 and f"{slide_id}: not marked: processed" in processed.stdout
    none_failed = _retry(wsiflow_cli, env, "retry", "--inbox-id", inbox_id, "--all-failed")
    assert none_failed.returncode == 0 and "no failed slides" in none_failed.stdout
    unknown = _retry(wsiflow_cli, env, "retry", "--inbox-id", inbox_id, "--slide-id", "s-0000")
    assert unknown.returncode == 2 and unknown.stderr.startswith("wsiflow: error config: no slide s-0000")
    outside = _retry(wsiflow_cli, env, "retry", "--inbox-id", "../../elsewhere", "--all-failed")
    assert outside.returncode == 2 and "is not an inbox ID" in outside.stderr
    assert "Traceback" not in unknown.stderr + outside.stderr + processed.stderr


def test_an_inbox_id_that_is_not_one_is_refused_before_any_path(tmp_path):
    from flows._inbox import check_inbox_id, inbox_tick, load_inbox, read_ledger, save_inbox
    from pipeline import ConfigError, RunSettings

    for bad in ("../../elsewhere", "i-../../../x", "i-0123456789/..", "i-0123456789\n", "I-0123456789", "", 42):
        with pytest.raises(ConfigError, match="is not an inbox ID"):
            check_inbox_id(bad)
    for call in (lambda: inbox_tick("../../elsewhere"), lambda: load_inbox("../elsewhere"),
                 lambda: read_ledger("i-aaaaaaaaaa/../../../elsewhere"),
                 lambda: save_inbox(str(tmp_path), RunSettings(out_dir=tmp_path, model="tissue-qc"), inbox_id="../../elsewhere")):
        with pytest.raises(ConfigError, match="is not an inbox ID"):
            call()
    assert not (_site().parent / "elsewhere").exists() and not (_site() / "elsewhere").exists()
    assert check_inbox_id("i-0a1b2c3d4e") == "i-0a1b2c3d4e"
    with pytest.raises(ConfigError, match="no inbox i-0a1b2c3d4e"):
        load_inbox("i-0a1b2c3d4e")


def _wait_for_run(prefect_server, run_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        [run] = _api(prefect_server, "/flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
            return run
        time.sleep(1)


def _run_logs(prefect_server, run_id: str, until: str, timeout: float = 60) -> list[str]:
    """The run's log messages (they reach the server in batches: wait for ``until``)."""
    deadline = time.monotonic() + timeout
    while True:
        logs = [entry["message"] for entry in _api(prefect_server, "/logs/filter",
                                                   {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})]
        if any(until in message for message in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(1)


@pytest.mark.slow
def test_served_looks_are_named_logged_and_fail_when_slides_fail(prefect_server, wsiflow_cli, cmu_svs, tmp_path):
    inbox = tmp_path / "PATIENT-SENTINEL-inbox"
    inbox.mkdir()
    shutil.copy(cmu_svs, inbox / "PATIENT-SENTINEL-4243.svs")
    shutil.copy(shared_file("bad/unreadable-corrupt-tile.svs"), inbox / "PATIENT-SENTINEL-broken.svs")
    # Files, not pipes: the served runs' processes write there too, and a full pipe would block them.
    stdout, stderr = tmp_path / "serve.out", tmp_path / "serve.err"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(
            [*wsiflow_cli, "serve", "--inbox", str(inbox), "--out", str(tmp_path / "out"), "--interval", "3600",
             "--stride", "112"],
            env=_env(prefect_server), stdout=out, stderr=err, text=True,
            # Started as a non-interactive shell's background job is: SIGINT ignored. Ctrl-C
            # (kill -INT) must still stop it cleanly.
            preexec_fn=_ignore_sigint,
        )
    try:
        deadline = time.monotonic() + 120
        while not stdout.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        started = stdout.read_text()
        match = re.match(r"serving inbox (i-[0-9a-f]{10}) as deployment wsiflow-inbox/\1, looking every 3600 s", started)
        assert match, started + stderr.read_text()[-3000:]
        inbox_id = match.group(1)
        deadline = time.monotonic() + 120
        deployments = []
        while not deployments and time.monotonic() < deadline:
            deployments = [d for d in _api(prefect_server, "/deployments/filter", {"limit": 50})
                           if d["name"] == inbox_id]
            time.sleep(1)
        [deployment] = deployments
        assert deployment["parameters"] == {"inbox_id": inbox_id}
        description = deployment["description"]
        assert inbox_id in description and "every 3600 s" in description and "tissue-qc" in description
        assert f"wsiflow retry --inbox-id {inbox_id}" in description

        def look(parameters: dict | None = None) -> dict:
            created = _api(prefect_server, f"/deployments/{deployment['id']}/create_flow_run",
                           {"parameters": parameters} if parameters else {})
            return _wait_for_run(prefect_server, created["id"])

        noticed, analysed = look(), look()
        refused = look({"inbox_id": "../../elsewhere"})
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    # Ctrl-C: one line, no traceback, exit 130; the schedule is paused, the ledger kept.
    printed = stderr.read_text()
    assert process.returncode == 130, printed[-3000:]
    assert "Traceback" not in printed
    assert f"serve stopped: deployment wsiflow-inbox/{inbox_id} is paused; the ledger of inbox {inbox_id} is kept" \
        in printed
    [stopped] = [d for d in _api(prefect_server, "/deployments/filter", {"limit": 50}) if d["name"] == inbox_id]
    assert stopped["paused"]
    assert len(_ledger(inbox_id)) == 2

    # Runs named by inbox and UTC start time; the look with a failed slide is not green.
    name = re.compile(rf"inbox-{inbox_id}-\d{{8}}T\d{{6}}Z")
    assert name.fullmatch(noticed["name"]) and name.fullmatch(analysed["name"]), (noticed["name"], analysed["name"])
    assert noticed["name"] != analysed["name"]
    assert noticed["state"]["type"] == "COMPLETED" and "new 2" in noticed["state"]["message"]
    assert analysed["state"]["name"] == "Partially failed" and analysed["state"]["type"] == "FAILED"
    logs = _run_logs(prefect_server, analysed["id"], until="look: ")
    [summary] = [m for m in logs if m.startswith(f"inbox {inbox_id} look: ")]
    batch = re.search(r"submitted 2 \(batch (b-[0-9a-f]{12})\)", summary)
    assert batch and "processed 1" in summary and "failed 1" in summary, summary
    [failures] = [m for m in logs if m.startswith(f"inbox {inbox_id}: failed: ")]
    assert re.search(r"s-[0-9a-f]+: corrupt", failures) and f"wsiflow retry --inbox-id {inbox_id}" in failures
    assert any(m.startswith(f"inbox {inbox_id} look: new 2,") for m in _run_logs(prefect_server, noticed["id"],
                                                                                   until="look: "))
    # An inbox ID with a path in it fails the run before any path is built.
    assert refused["name"].startswith("inbox-invalid-id-") and refused["state"]["type"] in ("FAILED", "CRASHED")
    assert not (_site().parent / "elsewhere").exists()
    refused_logs = _run_logs(prefect_server, refused["id"], until="is not an inbox ID")
    assert any("is not an inbox ID" in m for m in refused_logs)

    stored = json.dumps([deployment, noticed, analysed, refused, logs])
    assert "PATIENT-SENTINEL" not in stored and str(tmp_path) not in stored


def test_serving_the_same_folder_and_output_again_continues_the_inbox(tmp_path):
    from flows import parse_config
    from flows._inbox import load_inbox_record, update_ledger
    from flows.cli import build_parser
    from flows.cli._serve import register_inbox

    inbox = tmp_path / "inbox"
    inbox.mkdir()

    def serve(*options: str) -> tuple[str, bool]:
        args = build_parser().parse_args(["serve", "--inbox", str(inbox), *options])
        inbox_id, _, resumed = register_inbox(args, parse_config({}))
        return inbox_id, resumed

    first, resumed = serve("--out", str(tmp_path / "out"), "--stride", "112")
    assert not resumed
    with update_ledger(first) as ledger:
        ledger["a slide"] = {"fingerprint": [1, 2, 1], "status": "failed"}
    again, resumed = serve("--out", str(tmp_path / "out"), "--stride", "56")
    assert (again, resumed) == (first, True)
    record = load_inbox_record(again)
    assert record["options"] == {"out": str(tmp_path / "out"), "stride": 56}  # the new command line's
    assert record["settings"]["analysis"]["grid"]["stride_px"] == 56 and record["config"] is None
    elsewhere, resumed = serve("--out", str(tmp_path / "other"))
    assert elsewhere != first and not resumed


def test_a_look_while_another_runs_notes_slides_but_submits_nothing(tmp_path, cmu_svs):
    from flows import parse_config
    from flows._inbox import inbox_tick, read_ledger
    from flows.cli import build_parser
    from flows.cli._serve import register_inbox
    from pipeline import ConfigError

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    args = build_parser().parse_args(["serve", "--inbox", str(inbox), "--out", str(tmp_path / "out")])
    inbox_id, _, _ = register_inbox(args, parse_config({}))
    shutil.copy(cmu_svs, inbox / "scan.svs")
    with open(_site() / "inboxes" / inbox_id / "look.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        first, second = inbox_tick(inbox_id), inbox_tick(inbox_id)
    assert (first.busy, first.new, first.submitted) == (True, 1, 0)
    assert (second.busy, second.waiting, second.submitted, second.batch_id) == (True, 1, 0, None)
    assert "an earlier look is still running" in second.describe()
    assert read_ledger(inbox_id)[str(inbox / "scan.svs")]["status"] == "settling"
    # An inbox folder that went away (an unmounted share) is an error, not an empty inbox.
    shutil.rmtree(inbox)
    with pytest.raises(ConfigError, match=f"the folder of inbox {inbox_id} is missing"):
        inbox_tick(inbox_id)
