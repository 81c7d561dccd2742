"""The audit log: every line chained, the head and the anchor authenticated; editing,
removing, reordering or cutting lines, deleting the log or its head, foreign files and
malformed lines are detected, and nothing is appended to a log in that state."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline._errors import ConfigError
from privacy import AuditLogError, audit_event, audit_log_path, read_audit_log, verify_audit_log

# rotate_audit_log and check_audit_log are imported inside the tests that use them, so the
# other tests still run (and fail) against a wsiflow that lacks them.


def _fill(site: Path, n: int = 5) -> list[str]:
    return [
        audit_event("run", slide_id=f"s-{i:020d}", model_digest="ab" * 32, params={"i": i}, directory=site).mac
        for i in range(n)
    ]


def _lines(site: Path) -> list[bytes]:
    return audit_log_path(site).read_bytes().splitlines()


def _write(site: Path, lines: list[bytes]) -> None:
    audit_log_path(site).write_bytes(b"".join(line + b"\n" for line in lines))


def _head(site: Path) -> Path:
    return site / "audit.jsonl.head"


def _anchor(site: Path) -> Path:
    return site / "audit.anchor"


def _state(site: Path) -> dict[str, bytes | None]:
    """The bytes of every audit file, to prove a refused append changed nothing."""
    return {p.name: p.read_bytes() if p.exists() else None for p in (audit_log_path(site), _head(site), _anchor(site))}


def _refused(site: Path, expected: str) -> None:
    """Appending raises AuditLogError naming the problem, and writes nothing."""
    before = _state(site)
    with pytest.raises(AuditLogError, match=expected) as raised:
        audit_event("view", slide_id="s-after", directory=site)
    assert "wsiflow audit rotate" in raised.value.one_line()
    assert _state(site) == before


def _broken(site: Path, expected: str) -> None:
    result = verify_audit_log(site)
    assert not result.ok
    assert any(expected in problem for problem in result.problems), result.problems


def test_events_chain_and_verify(tmp_path):
    _fill(tmp_path)
    result = verify_audit_log(tmp_path)
    assert result.ok and result.lines == 5 and result.last_seq == 5 and result.verified_to == 5
    events = read_audit_log(tmp_path)
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert all(e["prev"] == p["mac"] for p, e in zip(events, events[1:]))
    assert events[0]["prev"] != "0" * 64  # the first line is bound to the log's ID
    first = events[0]
    assert list(first) == ["seq", "time", "actor", "action", "slide_id", "model_digest", "params_digest",
                           "outcome", "prev", "mac"]
    assert first["actor"] and first["params_digest"] and len(first["params_digest"]) == 64
    head = json.loads(_head(tmp_path).read_text())
    anchor = json.loads(_anchor(tmp_path).read_text())
    assert head["log_id"] == anchor["log_id"] == result.log_id and head["seq"] == 5 and len(head["auth"]) == 64
    for path in (audit_log_path(tmp_path), _head(tmp_path), _anchor(tmp_path), tmp_path / "audit.lock"):
        assert oct(path.stat().st_mode & 0o777) == "0o600", path.name


def test_unknown_action_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown audit action"):
        audit_event("delete-everything", directory=tmp_path)


def _edit(lines: list[bytes]) -> list[bytes]:
    record = json.loads(lines[2])
    record["outcome"] = "failed:corrupt"
    return [*lines[:2], json.dumps(record, separators=(",", ":")).encode(), *lines[3:]]


def _duplicate_key(lines: list[bytes]) -> list[bytes]:
    # json.loads keeps the last value, so the mac still checks out; a reader taking the first
    # value sees another slide.
    line = lines[2].replace(b'"slide_id":', b'"slide_id":"s-someone-else","slide_id":', 1)
    return [*lines[:2], line, *lines[3:]]


def _unknown_key(lines: list[bytes]) -> list[bytes]:
    return [*lines[:2], b'{"note":"slide of patient X",' + lines[2][1:], *lines[3:]]


def _re_encoded(lines: list[bytes]) -> list[bytes]:
    return [*lines[:2], json.dumps(json.loads(lines[2]), indent=1).replace("\n", "").encode(), *lines[3:]]


def _not_utf8(lines: list[bytes]) -> list[bytes]:
    return [*lines[:2], lines[2].replace(b'"actor":"', b'"actor":"\xff\xfe', 1), *lines[3:]]


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_edit, "line 3 (seq 3): content does not match"),
        (lambda lines: lines[:2] + lines[3:], "line 3: sequence 4 where 3 was expected"),
        (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], "line 2: sequence 3 where 2 was expected"),
        (lambda lines: lines[:-1], "the log ends at sequence 4 but its head records 5"),
        (lambda lines: lines[:1] + [b"{not json"] + lines[2:], "line 2: not a valid audit record (not JSON)"),
        (_duplicate_key, "line 3: not a valid audit record (duplicated key 'slide_id')"),
        (_unknown_key, "line 3: not a valid audit record (unknown key 'note')"),
        (_re_encoded, "line 3: not a valid audit record (not in the form wsiflow writes"),
        (_not_utf8, "line 3: not UTF-8 text"),
        (lambda lines: lines[:2] + [b""] + lines[2:], "line 3: empty line"),
    ],
    ids=["edited", "removed", "reordered", "truncated", "garbled", "duplicated-key", "unknown-key", "re-encoded",
         "not-utf8", "empty-line"],
)
def test_tampering_is_detected(tmp_path, tamper, expected):
    _fill(tmp_path)
    _write(tmp_path, tamper(_lines(tmp_path)))
    _broken(tmp_path, expected)


@pytest.mark.parametrize("tamper", [_duplicate_key, _unknown_key, _not_utf8], ids=["duplicated", "unknown", "utf8"])
def test_show_refuses_malformed_lines(tmp_path, tamper):
    _fill(tmp_path)
    _write(tmp_path, tamper(_lines(tmp_path)))
    with pytest.raises(AuditLogError, match="line 3 "):
        read_audit_log(tmp_path)


def test_a_forged_chain_without_the_site_secret_fails(tmp_path):
    """Recomputing hashes is not enough: the chain is keyed by the site secret."""
    _fill(tmp_path, 2)
    lines = [json.loads(line) for line in _lines(tmp_path)]
    lines[1]["outcome"] = "ok-forged"
    lines[1]["mac"] = hashlib.sha256(json.dumps(lines[1]).encode()).hexdigest()
    _write(tmp_path, [json.dumps(r, separators=(",", ":")).encode() for r in lines])
    _broken(tmp_path, "line 2 (seq 2): content does not match its mac")


def _old_style_head(site: Path, lines: list[bytes]) -> None:
    last = json.loads(lines[-1])
    _head(site).write_text(json.dumps({"seq": last["seq"], "mac": last["mac"]}))


def _head_with_guessed_auth(site: Path, lines: list[bytes]) -> None:
    head = json.loads(_head(site).read_text())
    last = json.loads(lines[-1])
    head.update(seq=last["seq"], mac=last["mac"])
    head["auth"] = hashlib.sha256(json.dumps([head["log_id"], head["seq"], head["mac"]]).encode()).hexdigest()
    _head(site).write_text(json.dumps(head))


def _head_with_kept_auth(site: Path, lines: list[bytes]) -> None:
    head = json.loads(_head(site).read_text())
    last = json.loads(lines[-1])
    head.update(seq=last["seq"], mac=last["mac"])  # the old auth no longer covers these
    _head(site).write_text(json.dumps(head))


@pytest.mark.parametrize(
    "rewrite_head", [_old_style_head, _head_with_guessed_auth, _head_with_kept_auth],
    ids=["unauthenticated-head", "guessed-auth", "kept-auth"],
)
@pytest.mark.parametrize("cut", [1, 3])
def test_cutting_lines_and_rewriting_the_head_without_the_secret_is_detected(tmp_path, cut, rewrite_head):
    _fill(tmp_path)
    kept = _lines(tmp_path)[:-cut]
    _write(tmp_path, kept)
    rewrite_head(tmp_path, kept)
    _broken(tmp_path, "head")
    _refused(tmp_path, "head")


def test_deleting_the_head_is_detected_and_never_re_anchored(tmp_path):
    _fill(tmp_path)
    _write(tmp_path, _lines(tmp_path)[:-2])  # cut the end, then remove the head that would tell
    _head(tmp_path).unlink()
    _refused(tmp_path, "the audit head is missing")  # before: the next event re-anchored the chain
    _broken(tmp_path, "the head is missing")


@pytest.mark.parametrize(
    ("remove", "expected"),
    [
        (lambda site: audit_log_path(site).unlink(), "the audit log is missing"),
        (lambda site: audit_log_path(site).write_bytes(b""), "the audit log is empty"),
        (lambda site: (audit_log_path(site).unlink(), _head(site).unlink()), "the audit log is missing"),
        (lambda site: (audit_log_path(site).write_bytes(b""), _head(site).unlink()), "the audit log is empty"),
    ],
    ids=["log", "log-emptied", "log-and-head", "log-emptied-and-head"],
)
def test_deleting_the_log_is_detected(tmp_path, remove, expected):
    """Without the log (and its head), the anchor still says the site had one."""
    _fill(tmp_path)
    remove(tmp_path)
    _broken(tmp_path, expected)
    _refused(tmp_path, "it was deleted or emptied")
    log_id = json.loads(_anchor(tmp_path).read_text())["log_id"]
    _broken(tmp_path, f"this site has kept log {log_id[:12]}")


def test_deleting_the_anchor_is_detected(tmp_path):
    _fill(tmp_path)
    _anchor(tmp_path).unlink()
    _broken(tmp_path, "the audit anchor is missing")
    _refused(tmp_path, "the audit anchor is missing")


def test_a_head_or_anchor_from_another_site_is_refused(tmp_path):
    site, other = tmp_path / "site", tmp_path / "other"
    _fill(site, 5)
    _fill(other, 5)
    shutil.copyfile(_head(other), _head(site))
    _refused(site, "the audit head does not match this site's secret")
    _broken(site, "the audit head does not match this site's secret")
    shutil.copyfile(_anchor(other), _anchor(site))
    _broken(site, "the audit anchor does not match this site's secret")
    _refused(site, "the audit anchor does not match this site's secret")


def test_a_damaged_head_or_anchor_is_named(tmp_path):
    _fill(tmp_path, 2)
    _head(tmp_path).write_bytes(b'{"log_id":"x","log_id":"y","seq":2,"mac":"m","auth":"a"}')
    _broken(tmp_path, "the audit head is not valid JSON")
    _anchor(tmp_path).write_bytes(b"\xff\xfe\x00")
    _broken(tmp_path, "the audit anchor is not valid JSON")


def test_a_cut_off_last_line_is_refused(tmp_path):
    _fill(tmp_path, 3)
    audit_log_path(tmp_path).write_bytes(audit_log_path(tmp_path).read_bytes()[:-40])
    _broken(tmp_path, "line 3: not ended by a newline")
    _refused(tmp_path, "line 3 of the audit log is not ended by a newline")


def test_a_crash_between_the_line_and_its_head_is_not_damage(tmp_path):
    """The head is rewritten right after each line: a crash in between leaves one
    authenticated line past the head, which is a consistent log, not a cut one."""
    _fill(tmp_path, 3)
    head = _head(tmp_path).read_bytes()
    audit_event("view", directory=tmp_path)
    _head(tmp_path).write_bytes(head)
    assert verify_audit_log(tmp_path).ok
    audit_event("view", directory=tmp_path)
    result = verify_audit_log(tmp_path)
    assert result.ok and result.lines == 5
    # The same at a log's first line, before its first head was written.
    first = tmp_path / "first"
    audit_event("view", directory=first)
    _head(first).unlink()
    assert verify_audit_log(first).ok
    audit_event("view", directory=first)
    assert verify_audit_log(first).ok and verify_audit_log(first).lines == 2


def test_a_failed_write_leaves_no_half_line(tmp_path):
    """A write cut short (here by a file-size limit, as by a full disk) is taken back, so the
    log can go on."""
    _fill(tmp_path, 2)
    size = audit_log_path(tmp_path).stat().st_size
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from privacy import audit_event\n"
        "from pipeline import OutputError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size + 50}, {size + 50}))\n"
        "try:\n"
        f"    audit_event('view', directory=Path({str(tmp_path)!r}))\n"
        "except OutputError as exc:\n"
        "    print(exc.one_line())\n"
        "    sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "writing the audit log failed" in done.stdout
    assert audit_log_path(tmp_path).stat().st_size == size
    assert verify_audit_log(tmp_path).ok
    audit_event("view", directory=tmp_path)
    assert verify_audit_log(tmp_path).lines == 3


def test_a_site_without_a_log_verifies_as_having_none(tmp_path):
    result = verify_audit_log(tmp_path / "fresh")
    assert result.ok and result.lines == 0 and result.log_id is None
    assert not (tmp_path / "fresh").exists()  # verifying writes nothing


def test_check_before_an_audited_action(tmp_path):
    from privacy import check_audit_log

    check_audit_log(tmp_path)  # a fresh site: the first event starts its log
    _fill(tmp_path, 3)
    check_audit_log(tmp_path)
    _write(tmp_path, _lines(tmp_path)[:-1])
    before = _state(tmp_path)
    with pytest.raises(AuditLogError, match="head records 3"):
        check_audit_log(tmp_path)
    assert _state(tmp_path) == before


def _legacy_log(site: Path, n: int) -> None:
    """A log as wsiflow wrote it before heads were authenticated: zero genesis, a plain head, no anchor."""
    from pipeline import site_secret
    from privacy._audit_chain import line_mac, line_text

    prev, lines = "0" * 64, []
    for seq in range(1, n + 1):
        body = {"seq": seq, "time": "2026-01-01T00:00:00.000+00:00", "actor": "lab", "action": "view",
                "slide_id": None, "model_digest": None, "params_digest": None, "outcome": "ok", "prev": prev}
        prev = line_mac(body, site_secret(site))
        lines.append(line_text({**body, "mac": prev}).encode())
    _write(site, lines)
    _head(site).write_text(json.dumps({"seq": n, "mac": prev}))


def test_rotate_keeps_the_damaged_log_and_starts_an_audited_one(tmp_path):
    from privacy import rotate_audit_log

    _fill(tmp_path, 5)
    old_id = verify_audit_log(tmp_path).log_id
    _write(tmp_path, _lines(tmp_path)[:-2])
    _head(tmp_path).unlink()
    damaged = audit_log_path(tmp_path).read_bytes()
    _refused(tmp_path, "head is missing")

    rotation = rotate_audit_log("head lost in incident 14", tmp_path)
    assert rotation.previous_state == "broken:1" and rotation.previous.verified_to == 3
    assert rotation.kept_as == (next(tmp_path.glob("audit-*.jsonl")).name,)
    assert (tmp_path / rotation.kept_as[0]).read_bytes() == damaged  # kept as evidence, byte for byte
    assert rotation.log_id != old_id
    [first] = read_audit_log(tmp_path)
    assert first["action"] == "audit-rotate" and first["seq"] == 1 and first == rotation.record.to_json()
    assert first["outcome"] == (f"rotated;previous={old_id};events=3;last_seq=3;verified_to=3;state=broken:1;"
                                "reason=head lost in incident 14")
    assert verify_audit_log(tmp_path).ok
    audit_event("view", directory=tmp_path)
    result = verify_audit_log(tmp_path)
    assert result.ok and result.lines == 2 and result.log_id == rotation.log_id

    again = rotate_audit_log("yearly archive", tmp_path)  # a healthy log rotates too, under another name
    assert again.previous_state == "ok" and len(again.kept_as) == 2 and not set(again.kept_as) & set(rotation.kept_as)
    assert verify_audit_log(tmp_path).ok


def test_putting_a_rotated_log_back_is_detected(tmp_path):
    """The archived log and head are authentic, but the anchor names the new log."""
    from privacy import rotate_audit_log

    _fill(tmp_path, 4)
    rotation = rotate_audit_log("archive", tmp_path)
    audit_event("view", directory=tmp_path)
    log_name, head_name = rotation.kept_as
    shutil.copyfile(tmp_path / log_name, audit_log_path(tmp_path))
    shutil.copyfile(tmp_path / head_name, _head(tmp_path))
    _broken(tmp_path, "the head belongs to another log")
    _refused(tmp_path, "the audit head belongs to another log")
    _head(tmp_path).unlink()  # without the old head, the lines themselves do not start this log
    _broken(tmp_path, "line 1 (seq 1): does not follow the line before it (it does not start this site's log)")


def test_a_log_from_before_authenticated_heads_needs_a_rotation(tmp_path):
    from privacy import rotate_audit_log

    _legacy_log(tmp_path, 3)
    _broken(tmp_path, "written by an earlier wsiflow")
    before = _state(tmp_path)
    with pytest.raises(AuditLogError, match="earlier wsiflow") as raised:
        audit_event("view", directory=tmp_path)
    assert "wsiflow audit rotate" in raised.value.one_line() and _state(tmp_path) == before
    rotation = rotate_audit_log("upgrade", tmp_path)
    assert rotation.previous.lines == 3 and rotation.previous.verified_to == 3  # its chain itself is intact
    assert verify_audit_log(tmp_path).ok


@pytest.mark.parametrize("reason", ["", "   ", "moved /data/patients/smith", "a\\b", "x" * 201, "bell\x07"])
def test_a_rotation_needs_a_plain_reason(tmp_path, reason):
    from privacy import rotate_audit_log

    _fill(tmp_path, 2)
    before = _state(tmp_path)
    with pytest.raises(ConfigError, match="reason"):
        rotate_audit_log(reason, tmp_path)
    assert _state(tmp_path) == before and not list(tmp_path.glob("audit-*"))


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


def _cli(wsiflow_cli: list[str], env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*wsiflow_cli, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_cli_verify_show_and_rotate(wsiflow_cli, tmp_path):
    env = {**os.environ, "WSIFLOW_HOME": str(tmp_path)}
    none = _cli(wsiflow_cli, env, "audit", "verify")
    assert none.returncode == 0 and "no audit log yet" in none.stdout
    _fill(tmp_path, 3)
    ok = _cli(wsiflow_cli, env, "audit", "verify")
    assert ok.returncode == 0, ok.stderr
    assert "3 event(s), chain intact, head and anchor match" in ok.stdout
    shown = _cli(wsiflow_cli, env, "audit", "show", "--json")
    assert [e["seq"] for e in json.loads(shown.stdout)] == [1, 2, 3]
    _write(tmp_path, _lines(tmp_path)[:1] + _lines(tmp_path)[2:])
    bad = _cli(wsiflow_cli, env, "audit", "verify")
    assert bad.returncode == 1
    assert "BROKEN" in bad.stdout and "line 2" in bad.stdout

    audit_log_path(tmp_path).write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff binary\n")  # not text at all
    binary = _cli(wsiflow_cli, env, "audit", "verify", "--json")
    report = json.loads(binary.stdout)
    assert binary.returncode == 1 and "Traceback" not in binary.stderr
    assert "line 1: not UTF-8 text (damaged)" in report["problems"]
    shown = _cli(wsiflow_cli, env, "audit", "show")
    assert shown.returncode == 1 and shown.stderr.count("\n") == 1
    assert shown.stderr.startswith("wsiflow: error audit-damaged: line 1 of the audit log is not UTF-8 text")

    refused = _cli(wsiflow_cli, env, "audit", "rotate", "--reason", "see /home/lab/notes")
    assert refused.returncode == 2 and "config" in refused.stderr and "/home/lab" not in refused.stderr
    rotated = _cli(wsiflow_cli, env, "audit", "rotate", "--reason", "binary junk found during audit")
    assert rotated.returncode == 0, rotated.stderr
    assert "audit log rotated" in rotated.stdout and "kept as audit-" in rotated.stdout
    assert _cli(wsiflow_cli, env, "audit", "verify").returncode == 0
    shown = _cli(wsiflow_cli, env, "audit", "show")
    assert "audit-rotate" in shown.stdout and "reason=binary junk found during audit" in shown.stdout


@pytest.mark.slow
def test_an_audited_command_on_a_damaged_log_reports_one_line(wsiflow_cli, tmp_path):
    env = {**os.environ, "WSIFLOW_HOME": str(tmp_path / "site")}
    _fill(tmp_path / "site", 3)
    _head(tmp_path / "site").unlink()
    _write(tmp_path / "site", _lines(tmp_path / "site")[:-1])
    before = _state(tmp_path / "site")
    not_a_slide = tmp_path / "notes.txt"
    not_a_slide.write_text("not a slide")
    done = _cli(wsiflow_cli, env, "deid", str(not_a_slide), str(tmp_path / "out.svs"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "wsiflow: error audit-damaged: the audit head is missing" in done.stderr
    assert _state(tmp_path / "site") == before


@pytest.mark.slow
def test_audited_commands_do_nothing_on_a_damaged_log(wsiflow_cli, cmu_svs, tmp_path):
    """Fail closed: `run` and `models verify` check the log before they act, so no result
    folder appears and no model is touched; `audit verify` (not an action) still runs."""
    env = {**os.environ, "WSIFLOW_HOME": str(tmp_path / "site")}
    _fill(tmp_path / "site", 3)
    _head(tmp_path / "site").unlink()
    out = tmp_path / "out"
    done = _cli(wsiflow_cli, env, "run", str(cmu_svs), "--out", str(out))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("wsiflow: error audit-damaged:"), done.stderr
    assert not out.exists()
    verify = _cli(wsiflow_cli, env, "models", "verify")
    assert verify.returncode == 1 and "audit-damaged" in verify.stderr
    assert _cli(wsiflow_cli, env, "audit", "verify").returncode == 1


def test_an_unwritable_log_is_an_output_error(tmp_path):
    from pipeline import OutputError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="writing the audit log failed"):
        audit_event("run", directory=blocker / "site")


def test_a_garbled_line_is_named_by_its_number(tmp_path):
    _fill(tmp_path, 3)
    lines = _lines(tmp_path)
    _write(tmp_path, [lines[0], lines[1][:40], lines[2]])
    with pytest.raises(AuditLogError, match="line 2 of the audit log is not an audit record") as raised:
        read_audit_log(tmp_path)
    assert "audit verify" in raised.value.one_line()
    _write(tmp_path, [lines[0], json.dumps({"seq": 2}).encode(), lines[2]])  # JSON, but not a record
    with pytest.raises(AuditLogError, match="line 2 "):
        read_audit_log(tmp_path)
    audit_log_path(tmp_path).write_bytes(b"\xff\xfe garbage\n")
    with pytest.raises(AuditLogError, match="not UTF-8"):
        read_audit_log(tmp_path)
    assert not verify_audit_log(tmp_path).ok  # verify reads it anyway, and reports


def test_appending_after_a_garbled_last_line_without_a_head_is_refused(tmp_path):
    _fill(tmp_path, 2)
    lines = _lines(tmp_path)
    _write(tmp_path, [lines[0], lines[1][:30]])
    _head(tmp_path).unlink()
    _refused(tmp_path, "line 2 ")
    assert len(_lines(tmp_path)) == 2  # nothing appended to a chain it cannot continue


def test_a_damaged_middle_line_does_not_stop_appending(tmp_path):
    """Appending checks the end of the log (anchor, head, last line); verify checks every line."""
    _fill(tmp_path, 3)
    lines = _lines(tmp_path)
    _write(tmp_path, [lines[0], lines[1][:40], lines[2]])
    audit_event("view", directory=tmp_path)
    _broken(tmp_path, "line 2: not a valid audit record")
    assert len(_lines(tmp_path)) == 4
