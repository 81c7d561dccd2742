"""Reading the audit log back and checking its chain (every mac, sequence and link, the head)."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import site_dir, site_secret

from ._audit_chain import GENESIS, audit_log_path, line_mac, read_head

__all__ = ["AuditVerification", "read_audit_log", "verify_audit_log"]


@dataclass(frozen=True)
class AuditVerification:
    """Result of :func:`verify_audit_log`: ``ok`` when the whole chain holds."""

    lines: int
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems


def read_audit_log(directory: Path | None = None) -> list[dict[str, Any]]:
    """The log's lines as dicts (unverified; see :func:`verify_audit_log`)."""
    path = audit_log_path(directory)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def verify_audit_log(directory: Path | None = None) -> AuditVerification:
    """Check every line's mac and the chain; report edited, removed or reordered lines."""
    directory = directory or site_dir()
    path = audit_log_path(directory)
    if not path.exists():
        return AuditVerification(lines=0)
    secret = site_secret(directory)
    problems: list[str] = []
    prev, expected_seq, count = GENESIS, 1, 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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
