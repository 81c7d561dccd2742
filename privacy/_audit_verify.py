"""Reading the audit log back and checking it: every line's form and mac, the chain, the
head and the anchor (format in :mod:`._audit_chain`)."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline import site_dir, site_secret

from ._audit_chain import (
    AuditHead,
    anchor_path,
    audit_lock,
    audit_log_path,
    genesis,
    head_path,
    line_mac,
    line_text,
    read_anchor,
    read_head,
    record_problem,
    strict_json,
)
from ._errors import AuditLogError

__all__ = [
    "AuditVerification",
    "check_line",
    "log_lines",
    "parse_audit_line",
    "read_audit_log",
    "verify_audit_log",
    "verify_unlocked",
]

_T = TypeVar("_T")


@dataclass(frozen=True)
class AuditVerification:
    """Result of :func:`verify_audit_log`: ``ok`` when the whole chain, head and anchor hold.

    ``log_id`` and ``since`` come from the anchor (or the head); ``last_seq`` is the last
    sequence number read; ``verified_to`` the last one up to which every line checks out.
    """

    lines: int
    problems: tuple[str, ...] = field(default_factory=tuple)
    log_id: str | None = None
    since: str | None = None
    last_seq: int = 0
    verified_to: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "lines": self.lines, "problems": list(self.problems), "log_id": self.log_id,
                "since": self.since, "last_seq": self.last_seq, "verified_to": self.verified_to}


def check_line(line: str) -> dict[str, Any]:
    """A line as its record, if it is exactly what wsiflow writes (mac not checked); else
    ValueError saying why: not JSON, a duplicated, unknown or missing key, a wrong type, or
    a form wsiflow never writes (re-encoded: its mac would not notice)."""
    record = strict_json(line)
    why = record_problem(record)
    if why:
        raise ValueError(why)
    if line_text(record) != line:
        raise ValueError("not in the form wsiflow writes (re-encoded or edited)")
    return dict(record)


def parse_audit_line(line: str, number: int) -> dict[str, Any]:
    """One line of the log as a record dict (mac not checked), else :class:`AuditLogError`
    naming the line number."""
    try:
        return check_line(line)
    except ValueError as exc:
        raise AuditLogError(f"line {number} of the audit log is not an audit record ({exc})") from None


def log_lines(data: bytes) -> tuple[list[bytes], bool]:
    """The log's lines (without newlines) and whether its last line ends with a newline."""
    if not data:
        return [], True
    lines = data.split(b"\n")
    terminated = lines[-1] == b""
    return (lines[:-1] if terminated else lines), terminated


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditLogError(f"the audit log cannot be read ({exc.strerror or type(exc).__name__})",
                            hint="give the user running wsiflow read access to the site dir") from None


def read_audit_log(directory: Path | None = None) -> list[dict[str, Any]]:
    """The log's lines as dicts (unverified: see :func:`verify_audit_log`); a line that is
    not a record raises :class:`AuditLogError` with its number."""
    data = _read_bytes(audit_log_path(directory))
    if data is None:
        return []
    records = []
    for number, raw in enumerate(log_lines(data)[0], start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise AuditLogError(f"line {number} of the audit log is not UTF-8 text (damaged)") from None
        if line.strip():
            records.append(parse_audit_line(line, number))
    return records


def _attempt(problems: list[str], read: Callable[[], _T | None]) -> tuple[_T | None, bool]:
    """``read()``, its AuditLogError recorded as a problem; (value, whether it failed)."""
    try:
        return read(), False
    except AuditLogError as exc:
        problems.append(exc.message)
        return None, True


def verify_audit_log(directory: Path | None = None) -> AuditVerification:
    """Check every line (form, mac, sequence, link), the head and the anchor; report edited,
    removed, reordered or cut-off lines, a deleted log or head, and files from another log."""
    directory = directory or site_dir()
    with audit_lock(directory, exclusive=False):
        return verify_unlocked(directory)


def verify_unlocked(directory: Path) -> AuditVerification:
    """:func:`verify_audit_log` for a caller that holds the audit lock."""
    log = audit_log_path(directory)
    if not any(p.exists() or p.is_symlink() for p in (log, head_path(log), anchor_path(directory))):
        return AuditVerification(lines=0)  # nothing was ever audited here (or everything was deleted)
    secret = site_secret(directory)
    problems: list[str] = []
    anchor, anchor_bad = _attempt(problems, lambda: read_anchor(directory, secret))
    head, head_bad = _attempt(problems, lambda: read_head(log, secret))
    log_id = anchor.log_id if anchor else head.log_id if head else None
    since = anchor.since if anchor else None
    if anchor is None and not anchor_bad and not head_bad:
        problems.append("the audit anchor is missing (deleted?): the log cannot be tied to this site")
    if anchor is not None and head is not None and head.log_id != anchor.log_id:
        problems.append(f"the head belongs to another log ({head.log_id[:12]}; this site keeps log "
                        f"{anchor.log_id[:12]}): it was copied from another log")
    try:
        data = _read_bytes(log)
    except AuditLogError as exc:
        return AuditVerification(0, (*problems, exc.message), log_id, since)
    if not data:
        kept = f"log {log_id[:12]}" + (f" since {since}" if since else "") if log_id else "a log"
        state = "missing" if data is None else "empty"
        problems.append(f"the audit log is {state} but this site has kept {kept}: it was deleted or emptied")
        return AuditVerification(0, tuple(problems), log_id, since)
    lines, terminated = log_lines(data)
    chain = _check_chain(lines, genesis(log_id, secret) if log_id else None, secret)
    problems += chain.problems
    if not terminated:
        problems.append(f"line {len(lines)}: not ended by a newline (cut off while written, or edited)")
    if chain.last is not None:
        problems += _check_end(chain.last, chain.count, head, head_bad, genesis(log_id, secret) if log_id else None)
    return AuditVerification(chain.count, tuple(problems), log_id, since,
                             int(chain.last["seq"]) if chain.last else 0, chain.verified_to)


@dataclass(frozen=True)
class _Chain:
    count: int
    problems: list[str]
    last: dict[str, Any] | None
    verified_to: int


def _check_chain(lines: list[bytes], first_prev: str | None, secret: bytes) -> _Chain:
    """Every line's form, mac, sequence and link to the line before (the first one's to the
    log's genesis, when the log's ID is known)."""
    problems: list[str] = []
    prev, expected_seq, count, verified_to, intact = first_prev, 1, 0, 0, True
    last: dict[str, Any] | None = None
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            problems.append(f"line {number}: empty line")
            intact = False
            continue
        count += 1
        try:
            record = check_line(raw.decode("utf-8"))
        except UnicodeDecodeError:
            problems.append(f"line {number}: not UTF-8 text (damaged)")
            intact = False
            continue
        except ValueError as exc:
            problems.append(f"line {number}: not a valid audit record ({exc})")
            intact = False
            continue
        seq, found = record["seq"], len(problems)
        if not hmac.compare_digest(line_mac(record, secret), record["mac"]):
            problems.append(f"line {number} (seq {seq}): content does not match its mac (edited, or not "
                            "written with this site's secret)")
        if seq != expected_seq:
            problems.append(
                f"line {number}: sequence {seq} where {expected_seq} was expected (lines removed or reordered)"
            )
        if prev is not None and record["prev"] != prev:
            problems.append(f"line {number} (seq {seq}): does not follow the line before it "
                            + ("(removed or reordered)" if number > 1 else "(it does not start this site's log)"))
        intact = intact and len(problems) == found
        if intact:
            verified_to = seq
        prev, expected_seq, last = record["mac"], seq + 1, record
    return _Chain(count, problems, last, verified_to)


def _check_end(last: dict[str, Any], count: int, head: AuditHead | None, head_bad: bool,
               first_prev: str | None) -> list[str]:
    """The log's end against its head. One authenticated line past the head is fine: the
    head is rewritten just after each line, and a crash in between leaves exactly that."""
    if head is not None:
        if (last["seq"], last["mac"]) == (head.seq, head.mac):
            return []
        if last["seq"] == head.seq + 1 and last["prev"] == head.mac:
            return []
        return [f"the log ends at sequence {last['seq']} but its head records {head.seq}: lines were cut off "
                "the end, or the head was replaced"]
    if head_bad:
        return []  # already reported
    if count == 1 and last["seq"] == 1 and first_prev is not None and last["prev"] == first_prev:
        return []  # the first line of a new log, written just before its first head
    return ["the head is missing: lines may have been cut off the end"]

