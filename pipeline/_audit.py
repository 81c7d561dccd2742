"""The site's audit log: append-only JSONL, each line chained to the one before.

Every line carries ``prev`` (the previous line's ``mac``) and ``mac``, an HMAC-SHA256 of
the line's canonical JSON keyed with the site secret. Editing, removing or reordering a
line breaks the chain; a ``head`` file (last sequence number and mac, written after each
append) also exposes lines cut off the end. Without the site secret nobody can forge a
consistent chain. Lines hold pseudonymous slide IDs and digests only: never paths, file
names or parameters in clear (parameters are recorded as a digest).
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._errors import ConfigError, OutputError
from ._privacy import site_dir, site_secret

__all__ = [
    "AUDIT_ACTIONS",
    "AUDIT_LOG_NAME",
    "AuditRecord",
    "AuditVerification",
    "audit_event",
    "audit_log_path",
    "params_digest",
    "read_audit_log",
    "verify_audit_log",
]

_log = logging.getLogger(__name__)

AUDIT_LOG_NAME = "audit.jsonl"
_HEAD_SUFFIX = ".head"
_GENESIS = "0" * 64

AUDIT_ACTIONS = frozenset({
    "run", "view", "review-save", "export", "deid",
    "model-import", "model-verify", "model-promote", "model-remove", "model-train",
})
"""Actions the log knows; anything else is a programming error."""

_FIELDS = ("seq", "time", "actor", "action", "slide_id", "model_digest", "params_digest", "outcome", "prev")


@dataclass(frozen=True)
class AuditRecord:
    """One line of the audit log (``time`` is UTC ISO 8601)."""

    seq: int
    time: str
    actor: str
    action: str
    slide_id: str | None
    model_digest: str | None
    params_digest: str | None
    outcome: str
    prev: str
    mac: str

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*_FIELDS, "mac")}


@dataclass(frozen=True)
class AuditVerification:
    """Result of :func:`verify_audit_log`: ``ok`` when the whole chain holds."""

    lines: int
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems


def audit_log_path(directory: Path | None = None) -> Path:
    """Where the site's audit log lives: ``<site dir>/audit.jsonl``."""
    return (directory or site_dir()) / AUDIT_LOG_NAME


def params_digest(params: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``params`` (the log keeps the digest, not the values)."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.geteuid()}"


def _mac(body: Mapping[str, Any], secret: bytes) -> str:
    text = json.dumps({k: body[k] for k in _FIELDS}, sort_keys=True, separators=(",", ":"))
    return hmac.new(secret, text.encode("utf-8"), hashlib.sha256).hexdigest()


def _read_head(path: Path) -> tuple[int, str] | None:
    try:
        head = json.loads(path.with_name(path.name + _HEAD_SUFFIX).read_text(encoding="utf-8"))
        return int(head["seq"]), str(head["mac"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return (-1, "")  # a damaged head never matches; verify reports it


def _write_head(path: Path, seq: int, mac: str) -> None:
    head = path.with_name(path.name + _HEAD_SUFFIX)
    tmp = head.with_name(f".{head.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"seq": seq, "mac": mac}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(head)


def _last_line(fh: Any) -> dict[str, Any] | None:
    fh.seek(0)
    last = None
    for line in fh:
        if line.strip():
            last = line
    return json.loads(last) if last else None


def audit_event(
    action: str,
    *,
    slide_id: str | None = None,
    model_digest: str | None = None,
    params: Mapping[str, Any] | None = None,
    outcome: str = "ok",
    directory: Path | None = None,
) -> AuditRecord:
    """Append one event to the site's audit log and return it.

    Appends are serialised with an exclusive lock, so concurrent wsiflow processes on the
    site keep one unbroken chain. Raises :class:`OutputError` when the log cannot be
    written: an action that cannot be audited should not pass silently.
    """
    if action not in AUDIT_ACTIONS:
        raise ConfigError(f"unknown audit action {action!r}", hint=f"use one of {sorted(AUDIT_ACTIONS)}")
    directory = directory or site_dir()
    path = audit_log_path(directory)
    try:
        secret = site_secret(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a+", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            head = _read_head(path)
            if head is None or head[0] < 0:
                # No usable head (first event, or it was lost): chain onto the last line.
                last = _last_line(fh)
                seq, prev = (int(last["seq"]) + 1, str(last["mac"])) if last else (1, _GENESIS)
            else:
                seq, prev = head[0] + 1, head[1]
            body: dict[str, Any] = {
                "seq": seq,
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "actor": _actor(),
                "action": action,
                "slide_id": slide_id,
                "model_digest": model_digest,
                "params_digest": params_digest(params) if params is not None else None,
                "outcome": outcome,
                "prev": prev,
            }
            record = AuditRecord(**body, mac=_mac(body, secret))
            fh.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            _write_head(path, seq, record.mac)
    except OSError as exc:
        raise OutputError(f"writing the audit log failed: {exc.strerror or type(exc).__name__}") from None
    _log.debug("audit %s %s %s", action, slide_id, outcome)
    return record


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
    prev, expected_seq, count = _GENESIS, 1, 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            problems.append(f"line {number}: empty line")
            continue
        count += 1
        try:
            body = json.loads(line)
            seq, mac = int(body["seq"]), str(body["mac"])
            computed = _mac(body, secret)
        except (ValueError, KeyError, TypeError):
            problems.append(f"line {number}: not a valid audit record (edited?)")
            continue
        if not hmac.compare_digest(computed, mac):
            problems.append(f"line {number} (seq {seq}): content does not match its mac (edited)")
        if seq != expected_seq:
            problems.append(f"line {number}: sequence {seq} where {expected_seq} was expected (lines removed or reordered)")
        if body["prev"] != prev:
            problems.append(f"line {number} (seq {seq}): does not follow the line before it (removed or reordered)")
        prev, expected_seq = mac, seq + 1
    head = _read_head(path)
    if head is None:
        if count:
            problems.append("the head file is missing: lines may have been cut off the end")
    elif head != (expected_seq - 1, prev):
        problems.append(
            f"the log ends at sequence {expected_seq - 1} but the head records {head[0]}: "
            "lines were cut off the end or the head was edited"
        )
    return AuditVerification(lines=count, problems=tuple(problems))
