"""The site's audit log: appending, checking before an audited action, and rotating.

Every line carries ``prev`` (the previous line's ``mac``) and ``mac``, an HMAC-SHA256 of
the line's canonical JSON keyed with the site secret (format in :mod:`._audit_chain`,
checking in :mod:`._audit_verify`). An authenticated head (the log's ID, last sequence
number and mac, rewritten after each append) and an authenticated anchor (the log's ID,
written when the log starts) expose lines cut off the end, a deleted log or head, and files
taken from another log. Lines hold pseudonymous slide IDs and digests only: never paths,
file names or parameters in clear (parameters are recorded as a digest).

Nothing here repairs or re-anchors a chain: appending onto a log whose anchor, head and last
line do not agree raises :class:`AuditLogError`; only :func:`rotate_audit_log`, an audited
step taken on purpose, starts a new log (the old one is kept beside it).
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import ConfigError, OutputError, site_dir, site_secret

from ._audit_chain import (
    AUDIT_ACTIONS,
    AuditAnchor,
    AuditHead,
    AuditRecord,
    audit_lock,
    audit_log_path,
    genesis,
    head_path,
    line_mac,
    line_text,
    new_log_id,
    read_anchor,
    read_head,
    write_anchor,
    write_head,
)
from ._audit_verify import AuditVerification, check_line, verify_unlocked
from ._errors import AuditLogError

__all__ = ["AuditRotation", "audit_event", "check_audit_log", "params_digest", "rotate_audit_log"]

_log = logging.getLogger(__name__)

_TAIL_BYTES = 4096
_MAX_LINE_BYTES = 1 << 16
"""A record is under 1 KiB; a last line longer than this is damage, not a record."""
_MAX_REASON = 200


def params_digest(params: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``params`` (the log keeps the digest, not the values)."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.geteuid()}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _line_count(log: Path) -> int:
    """How many lines the log has (only to name the last one in an error)."""
    data = log.read_bytes()
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


def _last_line(log: Path) -> bytes | None:
    """The log's last line without its newline, read from the end; None when the log is
    missing or empty. An unterminated or overlong last line raises :class:`AuditLogError`."""
    try:
        fd = os.open(log, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        want = min(size, _TAIL_BYTES)
        while True:
            fh.seek(size - want)
            tail = fh.read(want)
            if not tail.endswith(b"\n"):
                raise AuditLogError(f"line {_line_count(log)} of the audit log is not ended by a newline "
                                    "(cut off while written, or edited)")
            start = tail.rfind(b"\n", 0, len(tail) - 1)
            if start >= 0 or want == size:
                return tail[start + 1:-1]
            if want >= _MAX_LINE_BYTES:
                raise AuditLogError(f"line {_line_count(log)} of the audit log is far longer than any audit "
                                    "record (damaged)")
            want = min(size, want * 4)


def _tip(directory: Path, secret: bytes) -> AuditHead | None:
    """Where the next line chains on, once the anchor, the head and the log's last line agree;
    None for a site that never had a log. Any disagreement raises :class:`AuditLogError`."""
    log = audit_log_path(directory)
    anchor = read_anchor(directory, secret)
    head = read_head(log, secret)
    raw = _last_line(log)
    if anchor is None:
        if head is None and raw is None:
            return None
        raise AuditLogError("the audit anchor is missing (deleted?): the log cannot be tied to this site")
    if head is not None and head.log_id != anchor.log_id:
        raise AuditLogError(f"the audit head belongs to another log ({head.log_id[:12]}; this site keeps log "
                            f"{anchor.log_id[:12]}): it was copied from another log")
    if raw is None:
        raise AuditLogError(f"the audit log is missing or empty but this site has kept log {anchor.log_id[:12]} "
                            f"since {anchor.since}: it was deleted or emptied")
    try:
        last = check_line(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise AuditLogError(f"line {_line_count(log)} of the audit log is not UTF-8 text (damaged)") from None
    except ValueError as exc:
        raise AuditLogError(f"line {_line_count(log)} of the audit log is not an audit record ({exc})") from None
    if not hmac.compare_digest(line_mac(last, secret), last["mac"]):
        raise AuditLogError(f"line {_line_count(log)} (seq {last['seq']}) of the audit log does not match its mac "
                            "(edited)")
    start = head or AuditHead(anchor.log_id, 0, genesis(anchor.log_id, secret))
    at_head = (last["seq"], last["mac"]) == (start.seq, start.mac)
    # One authenticated line past the head is what a crash between the line and its head leaves.
    one_past = last["seq"] == start.seq + 1 and last["prev"] == start.mac
    if at_head or one_past:
        return AuditHead(anchor.log_id, last["seq"], last["mac"])
    if head is None:
        raise AuditLogError("the audit head is missing: lines may have been cut off the end of the log")
    raise AuditLogError(f"the audit log ends at sequence {last['seq']} but its head records {head.seq}: lines "
                        "were cut off the end, or the head was replaced")


def _start_log(directory: Path, secret: bytes) -> AuditHead:
    log_id = new_log_id()
    write_anchor(directory, AuditAnchor(log_id, _now()), secret)
    return AuditHead(log_id, 0, genesis(log_id, secret))


def _append(directory: Path, secret: bytes, tip: AuditHead, body: dict[str, Any]) -> AuditRecord:
    """Write one line after ``tip`` and move the head to it (caller holds the lock)."""
    log = audit_log_path(directory)
    body = {"seq": tip.seq + 1, "time": _now(), "actor": _actor(), **body, "prev": tip.mac}
    record = AuditRecord(**body, mac=line_mac(body, secret))
    data = (line_text(record.to_json()) + "\n").encode("utf-8")
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)  # never leave half a line: no chain can go on from it
            raise
    finally:
        os.close(fd)
    write_head(log, AuditHead(tip.log_id, record.seq, record.mac), secret)
    return record


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
    site keep one unbroken chain. Raises :class:`AuditLogError` when the log is damaged or
    inconsistent (nothing is appended), :class:`OutputError` when it cannot be written: an
    action that cannot be audited should not pass silently.
    """
    if action not in AUDIT_ACTIONS:
        raise ConfigError(f"unknown audit action {action!r}", hint=f"use one of {sorted(AUDIT_ACTIONS)}")
    directory = directory or site_dir()
    body: dict[str, Any] = {
        "action": action,
        "slide_id": slide_id,
        "model_digest": model_digest,
        "params_digest": params_digest(params) if params is not None else None,
        "outcome": outcome,
    }
    try:
        secret = site_secret(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with audit_lock(directory, exclusive=True):
            tip = _tip(directory, secret) or _start_log(directory, secret)
            record = _append(directory, secret, tip, body)
    except OSError as exc:
        raise OutputError(f"writing the audit log failed: {exc.strerror or type(exc).__name__}") from None
    _log.debug("audit %s %s %s", action, slide_id, outcome)
    return record


def check_audit_log(directory: Path | None = None) -> None:
    """Raise :class:`AuditLogError` when an event could not be appended now (the same checks
    as :func:`audit_event`: anchor, head and last line agree); a site without a log passes.
    Audited commands call it before they act, so nothing happens that cannot be audited."""
    directory = directory or site_dir()
    try:
        secret = site_secret(directory)
        with audit_lock(directory, exclusive=False):
            _tip(directory, secret)
    except OSError as exc:
        raise OutputError(f"reading the audit log failed: {exc.strerror or type(exc).__name__}") from None


@dataclass(frozen=True)
class AuditRotation:
    """What :func:`rotate_audit_log` did: the old log's state as verified, the names its
    files were kept under in the site dir, and the new log's first record."""

    previous: AuditVerification
    kept_as: tuple[str, ...]
    log_id: str
    record: AuditRecord

    @property
    def previous_state(self) -> str:
        """``none`` (there was no log), ``ok`` or ``broken:<number of problems>``."""
        return _state(self.previous)


def _state(verification: AuditVerification) -> str:
    if verification.ok:
        return "ok" if verification.log_id or verification.lines else "none"
    return f"broken:{len(verification.problems)}"


def _checked_reason(reason: str) -> str:
    # The reason is kept in clear in the log, which never holds paths: refuse anything path-like.
    text = " ".join(reason.split())
    if not text:
        raise ConfigError("the rotation has no reason",
                          hint='say why, e.g. --reason "head deleted during the 2026-03 disk incident"')
    if len(text) > _MAX_REASON:
        raise ConfigError(f"the reason has {len(text)} characters, over {_MAX_REASON}", hint="shorten it")
    if "/" in text or "\\" in text or not text.isprintable():
        raise ConfigError("the reason contains '/', '\\' or control characters (the audit log never holds paths)",
                          hint="describe the incident in words; no paths, file names or patient data")
    return text


def _keep_aside(directory: Path, log_id: str | None) -> tuple[str, ...]:
    """Move the log and its head to ``audit-<UTC time>-<log id>.jsonl[.head]`` in the site dir.

    The anchor is not kept: an old anchor beside the old log would let someone put that log
    back in place unnoticed. Its content is in the new log's first event.
    """
    log = audit_log_path(directory)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base, number = f"audit-{stamp}-{(log_id or 'unknown')[:8]}", 1
    name = f"{base}.jsonl"
    while (directory / name).exists() or head_path(directory / name).exists():
        number += 1
        name = f"{base}-{number}.jsonl"
    kept = []
    for source, target in ((log, directory / name), (head_path(log), head_path(directory / name))):
        if source.exists() or source.is_symlink():
            source.rename(target)
            kept.append(target.name)
    return tuple(kept)


def rotate_audit_log(reason: str, directory: Path | None = None) -> AuditRotation:
    """Start a new log on purpose (after an incident, or to archive a long log): the old log
    and head are verified and kept aside, and the new log's first event, ``audit-rotate``,
    records the reason and the old log's state (ID, events, last sequence, how far it
    verified). ``reason`` is kept in clear: it may not contain paths."""
    text = _checked_reason(reason)
    directory = directory or site_dir()
    try:
        secret = site_secret(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with audit_lock(directory, exclusive=True):
            previous = verify_unlocked(directory)
            kept = _keep_aside(directory, previous.log_id)
            tip = _start_log(directory, secret)
            outcome = (
                f"rotated;previous={previous.log_id or 'unknown'};events={previous.lines};"
                f"last_seq={previous.last_seq};verified_to={previous.verified_to};"
                f"state={_state(previous)};reason={text}"
            )
            params = {"reason": text, "previous": previous.to_json(), "kept_as": list(kept)}
            record = _append(directory, secret, tip, {
                "action": "audit-rotate", "slide_id": None, "model_digest": None,
                "params_digest": params_digest(params), "outcome": outcome,
            })
    except OSError as exc:
        raise OutputError(f"rotating the audit log failed: {exc.strerror or type(exc).__name__}") from None
    _log.info("audit log rotated: previous log %s kept as %s", previous.log_id, ", ".join(kept) or "nothing")
    return AuditRotation(previous, kept, tip.log_id, record)
