"""The site's audit log: append-only JSONL, each line chained to the one before.

Every line carries ``prev`` (the previous line's ``mac``) and ``mac``, an HMAC-SHA256 of
the line's canonical JSON keyed with the site secret (format in :mod:`._audit_chain`,
checking in :mod:`._audit_verify`). Editing, removing or reordering a line breaks the
chain; a ``head`` file (last sequence number and mac, written after each append) also
exposes lines cut off the end. Without the site secret nobody can forge a consistent
chain. Lines hold pseudonymous slide IDs and digests only: never paths, file names or
parameters in clear (parameters are recorded as a digest).
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import ConfigError, OutputError, site_dir, site_secret

from ._audit_chain import AUDIT_ACTIONS, GENESIS, AuditRecord, audit_log_path, line_mac, read_head, write_head
from ._audit_verify import parse_audit_line

__all__ = ["audit_event", "params_digest"]

_log = logging.getLogger(__name__)


def params_digest(params: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``params`` (the log keeps the digest, not the values)."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.geteuid()}"


def _last_line(fh: Any) -> dict[str, Any] | None:
    """The last record, to chain onto (a damaged one raises: the chain cannot go on from it)."""
    fh.seek(0)
    last, last_number = None, 0
    for number, line in enumerate(fh, start=1):
        if line.strip():
            last, last_number = line, number
    return parse_audit_line(last, last_number) if last else None


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
            head = read_head(path)
            if head is None or head[0] < 0:
                # No usable head (first event, or it was lost): chain onto the last line.
                last = _last_line(fh)
                seq, prev = (int(last["seq"]) + 1, str(last["mac"])) if last else (1, GENESIS)
            else:
                seq, prev = head[0] + 1, head[1]
            body: dict[str, Any] = {
                "seq": seq,
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "actor": _actor(),
                "action": action,
                "slide_id": slide_id,
                "model_digest": model_digest,
                "params_digest": params_digest(params) if params is not None else None,
                "outcome": outcome,
                "prev": prev,
            }
            record = AuditRecord(**body, mac=line_mac(body, secret))
            fh.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            write_head(path, seq, record.mac)
    except OSError as exc:
        raise OutputError(f"writing the audit log failed: {exc.strerror or type(exc).__name__}") from None
    _log.debug("audit %s %s %s", action, slide_id, outcome)
    return record
