"""Reading the audit log back and checking its chain (every mac, sequence and link, the head)."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import site_dir, site_secret

from ._audit_chain import FIELDS, GENESIS, audit_log_path, line_mac, read_head
from ._errors import AuditLogError

__all__ = ["AuditVerification", "read_audit_log", "verify_audit_log"]


@dataclass(frozen=True)
class AuditVerification:
    """Result of :func:`verify_audit_log`: ``ok`` when the whole chain holds."""

    lines: int
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems


def parse_audit_line(line: str, number: int) -> dict[str, Any]:
    """One line of the log as a record dict (its fields present; mac not checked), else
    :class:`AuditLogError` naming the line number."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not all(key in record for key in (*FIELDS, "mac")):
        raise AuditLogError(f"line {number} of the audit log is not an audit record (damaged or edited)")
    return record


def read_audit_log(directory: Path | None = None) -> list[dict[str, Any]]:
    """The log's lines as dicts (unverified: see :func:`verify_audit_log`); a line that is
    not a record raises :class:`AuditLogError` with its number."""
    path = audit_log_path(directory)
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AuditLogError("the audit log is not UTF-8 text (damaged)") from None
    return [parse_audit_line(line, number) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def verify_audit_log(directory: Path | None = None) -> AuditVerification:
    """Check every line's mac and the chain; report edited, removed or reordered lines."""
    directory = directory or site_dir()
    path = audit_log_path(directory)
    if not path.exists():
        return AuditVerification(lines=0)
    secret = site_secret(directory)
    problems: list[str] = []
    prev, expected_seq, count = GENESIS, 1, 0
    # errors="replace": damaged bytes then fail their line's check instead of the whole read.
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            problems.append(f"line {number}: empty line")
            continue
        count += 1
        try:
            body = json.loads(line)
            seq, mac = int(body["seq"]), str(body["mac"])
            computed = line_mac(body, secret)
        except (ValueError, KeyError, TypeError):
            problems.append(f"line {number}: not a valid audit record (edited?)")
            continue
        if not hmac.compare_digest(computed, mac):
            problems.append(f"line {number} (seq {seq}): content does not match its mac (edited)")
        if seq != expected_seq:
            problems.append(
                f"line {number}: sequence {seq} where {expected_seq} was expected (lines removed or reordered)"
            )
        if body["prev"] != prev:
            problems.append(f"line {number} (seq {seq}): does not follow the line before it (removed or reordered)")
        prev, expected_seq = mac, seq + 1
    head = read_head(path)
    if head is None:
        if count:
            problems.append("the head file is missing: lines may have been cut off the end")
    elif head != (expected_seq - 1, prev):
        problems.append(
            f"the log ends at sequence {expected_seq - 1} but the head records {head[0]}: "
            "lines were cut off the end or the head was edited"
        )
    return AuditVerification(lines=count, problems=tuple(problems))
