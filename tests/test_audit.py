"""The audit log: every line chained; editing, removing, reordering or truncating is detected."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest

from pipeline._errors import ConfigError
from privacy import audit_event, audit_log_path, read_audit_log, verify_audit_log


def _fill(site: Path, n: int = 5) -> list[str]:
    return [
        audit_event("run", slide_id=f"s-{i:020d}", model_digest="ab" * 32, params={"i": i}, directory=site).mac
        for i in range(n)
    ]


def _lines(site: Path) -> list[str]:
    return audit_log_path(site).read_text(encoding="utf-8").splitlines()


def _write(site: Path, lines: list[str]) -> None:
    audit_log_path(site).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_events_chain_and_verify(tmp_path):
    _fill(tmp_path)
    result = verify_audit_log(tmp_path)
    assert result.ok and result.lines == 5
    events = read_audit_log(tmp_path)
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert all(e["prev"] == p["mac"] for p, e in zip(events, events[1:]))
    first = events[0]
    assert set(first) == {"seq", "time", "actor", "action", "slide_id", "model_digest", "params_digest",
                          "outcome", "prev", "mac"}
    assert first["actor"] and first["params_digest"] and len(first["params_digest"]) == 64
    assert oct(audit_log_path(tmp_path).stat().st_mode & 0o777) == "0o600"


def test_unknown_action_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown audit action"):
        audit_event("delete-everything", directory=tmp_path)


def _edit(lines: list[str]) -> list[str]:
    record = json.loads(lines[2])
    record["outcome"] = "failed:corrupt"
    return [*lines[:2], json.dumps(record, separators=(",", ":")), *lines[3:]]


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_edit, "line 3 (seq 3): content does not match"),
        (lambda lines: lines[:2] + lines[3:], "line 3: sequence 4 where 3 was expected"),
        (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], "line 2: sequence 3 where 2 was expected"),
        (lambda lines: lines[:-1], "the head records 5"),
        (lambda lines: lines[:1] + ["{not json"] + lines[2:], "line 2: not a valid audit record"),
    ],
    ids=["edited", "removed", "reordered", "truncated", "garbled"],
)
def test_tampering_is_detected(tmp_path, tamper, expected):
    _fill(tmp_path)
    _write(tmp_path, tamper(_lines(tmp_path)))
    result = verify_audit_log(tmp_path)
    assert not result.ok
    assert any(expected in problem for problem in result.problems), result.problems


def test_a_forged_chain_without_the_site_secret_fails(tmp_path):
    """Recomputing hashes is not enough: the chain is keyed by the site secret."""
    import hashlib

    _fill(tmp_path, 2)
    lines = [json.loads(line) for line in _lines(tmp_path)]
    lines[1]["outcome"] = "ok-forged"
    lines[1]["mac"] = hashlib.sha256(json.dumps(lines[1]).encode()).hexdigest()
    _write(tmp_path, [json.dumps(r) for r in lines])
    assert not verify_audit_log(tmp_path).ok


def test_events_after_a_damaged_head_still_chain(tmp_path):
    _fill(tmp_path, 2)
    (tmp_path / "audit.jsonl.head").unlink()
    audit_event("view", directory=tmp_path)
    assert verify_audit_log(tmp_path).ok


def _append_many(site: str, n: int) -> None:
    for i in range(n):
        audit_event("view", slide_id=f"s-{os.getpid()}-{i}", directory=Path(site))


@pytest.mark.slow
def test_concurrent_processes_keep_one_chain(tmp_path):
    audit_event("run", directory=tmp_path)  # create the secret before the race
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), 15)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    result = verify_audit_log(tmp_path)
    assert result.ok, result.problems
    assert result.lines == 46


@pytest.mark.slow
def test_cli_verify_and_show(wsiflow_cli, tmp_path):
    env = {**os.environ, "WSIFLOW_HOME": str(tmp_path)}
    _fill(tmp_path, 3)
    ok = subprocess.run([*wsiflow_cli, "audit", "verify"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "3 event(s), chain intact" in ok.stdout
    shown = subprocess.run([*wsiflow_cli, "audit", "show", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert [e["seq"] for e in json.loads(shown.stdout)] == [1, 2, 3]
    _write(tmp_path, _lines(tmp_path)[:1] + _lines(tmp_path)[2:])
    bad = subprocess.run([*wsiflow_cli, "audit", "verify"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1
    assert "BROKEN" in bad.stdout and "line 2" in bad.stdout


def test_an_unwritable_log_is_an_output_error(tmp_path):
    from pipeline import OutputError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="writing the audit log failed"):
        audit_event("run", directory=blocker / "site")


def test_a_garbled_line_is_named_by_its_number(tmp_path):
    from privacy import AuditLogError

    _fill(tmp_path, 3)
    lines = _lines(tmp_path)
    _write(tmp_path, [lines[0], lines[1][:40], lines[2]])
    with pytest.raises(AuditLogError, match="line 2 of the audit log is not an audit record") as raised:
        read_audit_log(tmp_path)
    assert "audit verify" in raised.value.one_line()
    _write(tmp_path, [lines[0], json.dumps({"seq": 2}), lines[2]])  # JSON, but not a record
    with pytest.raises(AuditLogError, match="line 2 "):
        read_audit_log(tmp_path)
    audit_log_path(tmp_path).write_bytes(b"\xff\xfe garbage\n")
    with pytest.raises(AuditLogError, match="not UTF-8"):
        read_audit_log(tmp_path)
    assert not verify_audit_log(tmp_path).ok  # verify reads it anyway, and reports


def test_appending_after_a_garbled_last_line_without_a_head_is_refused(tmp_path):
    from privacy import AuditLogError

    _fill(tmp_path, 2)
    lines = _lines(tmp_path)
    _write(tmp_path, [lines[0], lines[1][:30]])
    audit_log_path(tmp_path).with_name("audit.jsonl.head").unlink()
    with pytest.raises(AuditLogError, match="line 2 "):
        audit_event("view", directory=tmp_path)
    assert len(_lines(tmp_path)) == 2  # nothing appended to a chain it cannot continue
