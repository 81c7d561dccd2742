"""What an operator sees in the terminal: stage lines, a bar named by slide ID, quiet
logs by default, progress logs with -v (issue 12, item 6). Real CLI subprocesses."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

STAGES = ("loading model", "opening", "building model", "finding tissue", "classifying", "writing results")
SID_LINE = re.compile(r"^\[1/1\] s-[0-9a-f]{20}: (.+)$")


def _run(cli: list[str], *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def _stage_lines(stderr: str) -> list[str]:
    return [m.group(1) for line in stderr.splitlines() if (m := SID_LINE.match(line))]


@pytest.mark.slow
def test_run_prints_each_stage_named_by_slide_id_and_no_logs(wsiflow_cli, cmu_svs, tmp_path):
    done = _run(wsiflow_cli, "run", str(cmu_svs), "--out", str(tmp_path), "--stride", "112")
    assert done.returncode == 0, done.stderr
    stages = _stage_lines(done.stderr)
    # Every stage, in order, each on its own line before the result line.
    assert [next(s for s in stages if s.startswith(name)) for name in STAGES] == [
        s for s in stages if s.startswith(STAGES)]
    assert stages[4].startswith("classifying (65 tiles in ")
    assert not [line for line in done.stderr.splitlines() if line.startswith(("INFO", "DEBUG"))]
    assert cmu_svs.name not in done.stderr + done.stdout

    again = _run(wsiflow_cli, "run", str(cmu_svs), "--out", str(tmp_path), "--stride", "112")
    assert "reused (a complete result with the same parameters exists)" in _stage_lines(again.stderr)
    assert "classifying" not in again.stderr


@pytest.mark.slow
def test_run_verbose_logs_progress_in_the_child_process(wsiflow_cli, cmu_svs, tmp_path):
    """-v shows the analysis's progress logs even from the isolated child process, once
    per stage (no duplicate stage lines) and by tenths of the slide."""
    done = _run(wsiflow_cli, "-v", "run", str(cmu_svs), "--out", str(tmp_path), "--stride", "112")
    assert done.returncode == 0, done.stderr
    logs = [line for line in done.stderr.splitlines() if line.startswith("INFO pipeline")]
    assert any(line.endswith(": finding tissue") for line in logs), done.stderr
    assert any("65/65 tiles (100 %)" in line for line in logs), done.stderr
    assert not _stage_lines(done.stderr)  # the logs replace the stage lines
    assert cmu_svs.name not in done.stderr


@pytest.mark.slow
def test_batch_is_quiet_without_v(prefect_server, wsiflow_cli, cmu_svs, tmp_path):
    """No Prefect or Dask INFO lines (there were ~35) and no traceback on a normal batch."""
    env = {"PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": str(prefect_server["home"])}
    done = _run(wsiflow_cli, "batch", str(cmu_svs), "--out", str(tmp_path), "--stride", "112", env=env)
    assert done.returncode == 0, done.stderr
    noisy = [line for line in done.stderr.splitlines()
             if re.match(r"^(INFO|DEBUG)\b|.*\| INFO|.*distributed\.", line) or "Traceback" in line]
    assert not noisy, done.stderr
