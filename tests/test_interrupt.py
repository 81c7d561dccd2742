"""Ctrl-C, as a terminal sends it (SIGINT to the whole foreground process group), stops
`wsiflow run` and `wsiflow batch` cleanly: exit 130, one line that says a rerun resumes, no
traceback, no process of the run left, and the rerun computes only the unfinished chunks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from privacy import read_audit_log

pytestmark = pytest.mark.slow  # see DEVELOPERS.md: `make check` runs the tests not marked slow

# Small chunks (about 65 for the CMU slide at this stride) so that a run is still busy
# after its first chunk is done; --chunk-cells explicitly, as the default is chosen per slide.
RUN_ARGS = ("--stride", "56", "--chunk-cells", "2", "--readers", "2", "--batch-size", "8", "--json")
RESUME_LINE = "wsiflow: interrupted -- finished chunks are kept; run the same command again to resume"
STOPPED_WITHIN_S = 20
"""From Ctrl-C to the exit of the run's last process (a hang, not a speed target: a few
seconds on 2 busy cores, most of it closing Prefect's temporary server)."""


def _group_alive(pgid: int) -> list[str]:
    """Processes of the process group ``pgid`` that are not zombies (``pid state name``)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        name_end = text.rindex(")")
        state, _ppid, group = text[name_end + 2:].split()[:3]
        if int(group) == pgid and state != "Z":
            alive.append(f"{stat.parent.name} {state} {text[text.index('(') + 1:name_end]}")
    return alive


def _interrupt(command: list[str], out: Path, env: dict[str, str], tmp_path: Path, *, twice: bool = False) -> str:
    """Start ``command`` in its own session, SIGINT its group once a chunk is done (and
    again a second later when ``twice``); check the clean stop; its stderr."""
    stdout_path, stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not any(out.rglob("*.done")):
            assert process.poll() is None, f"the run ended before a chunk was done: {stderr_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no chunk was done in time"
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be interrupted"
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        if twice:
            time.sleep(1)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=STOPPED_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOPPED_WITHIN_S} s after Ctrl-C: {stderr_path.read_text()[-3000:]}")
        # The run's last processes (the resource tracker) may outlive it by a moment.
        left = _group_alive(process.pid)
        stop = time.monotonic() + 5
        while left and time.monotonic() < stop:
            time.sleep(0.1)
            left = _group_alive(process.pid)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    err = stderr_path.read_text()
    assert process.returncode == 130, err[-3000:]
    assert RESUME_LINE in err.splitlines(), err[-3000:]
    assert "Traceback" not in err, err[-5000:]
    assert not left, f"processes of the run still alive after it exited: {left}"
    assert stdout_path.read_text() == ""  # no partial --json document
    return err


def _resumed(command: list[str], env: dict[str, str]) -> dict:
    """Run ``command`` again to the end; its one slide's --json row."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = json.loads(result.stdout)["slides"]
    assert row["status"] == "done", row
    return row


@pytest.fixture(scope="module")
def scheduler():
    """A Dask scheduler with one worker process, outside the run's process group (like a
    lab's cluster): the terminal's Ctrl-C never reaches it."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0",
    ) as cluster, distributed.Client(cluster) as client:
        yield cluster.scheduler_address, client


def _scheduler_tasks(client) -> int:
    return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))


@pytest.mark.parametrize("where", ["isolated", "in-process"])
@pytest.mark.parametrize("cluster", [False, True], ids=["local", "dask-address"])
def test_ctrl_c_stops_run_and_the_rerun_resumes(request, where, cluster, wsiflow_cli, cmu_svs, tmp_path):
    out = tmp_path / "out"
    command = [*wsiflow_cli, "run", str(cmu_svs), "--out", str(out), *RUN_ARGS]
    if where == "in-process":
        command.append("--no-isolate")
    client = None
    if cluster:
        address, client = request.getfixturevalue("scheduler")
        command += ["--dask-address", address]
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    audited = len(read_audit_log())
    err = _interrupt(command, out, env, tmp_path)
    assert cmu_svs.name not in err
    # The stopped slide is in the audit log as interrupted (neither done nor failed).
    runs = [e for e in read_audit_log()[audited:] if e["action"] == "run"]
    assert [e["outcome"] for e in runs] == ["interrupted"] and runs[0]["slide_id"], runs
    if client is not None:
        # The run's chunks were cancelled on the cluster, not left to run there.
        deadline = time.monotonic() + 30
        while _scheduler_tasks(client) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _scheduler_tasks(client) == 0
    row = _resumed(command, env)
    assert 0 < row["chunks_computed"] < row["chunks_total"], row  # finished chunks were kept


@pytest.mark.parametrize("twice", [False, True], ids=["ctrl-c", "ctrl-c-twice"])
def test_ctrl_c_stops_a_batch_and_the_rerun_resumes(twice, wsiflow_cli, cmu_svs, tmp_path):
    """The batch flow with its LocalCluster and Prefect's temporary API server (all in the
    run's process group): nothing prints a traceback, hangs or stays behind."""
    out = tmp_path / "out"
    command = [*wsiflow_cli, "batch", str(cmu_svs), "--out", str(out), *RUN_ARGS]
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # the temporary server's own database
    err = _interrupt(command, out, env, tmp_path, twice=twice)
    if not twice:
        # Prefect's and Dask's shutdown chatter stays off the terminal: the one line is all.
        lines_after = err[err.index("wsiflow: interrupted"):].strip().splitlines()
        assert lines_after == [RESUME_LINE], err[-3000:]
        row = _resumed(command, env)
        assert 0 < row["chunks_computed"] < row["chunks_total"], row
