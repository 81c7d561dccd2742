"""The audit log's chained format: record fields, the HMAC of a line, and the head file.

Every line carries ``prev`` (the previous line's ``mac``) and ``mac``, an HMAC-SHA256 of
the line's canonical JSON keyed with the site secret. The ``head`` file next to the log
holds the last sequence number and mac, so lines cut off the end are noticed too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import site_dir

__all__ = [
    "AUDIT_ACTIONS",
    "AUDIT_LOG_NAME",
    "FIELDS",
    "GENESIS",
    "AuditRecord",
    "audit_log_path",
    "line_mac",
    "read_head",
    "write_head",
]

AUDIT_LOG_NAME = "audit.jsonl"
_HEAD_SUFFIX = ".head"
GENESIS = "0" * 64
"""The ``prev`` of the first line."""

AUDIT_ACTIONS = frozenset({
    "run", "mpp-override", "view", "review-save", "export", "deid",
    "model-import", "model-verify", "model-promote", "model-remove", "model-train",
})
"""Actions the log knows; anything else is a programming error."""

FIELDS = ("seq", "time", "actor", "action", "slide_id", "model_digest", "params_digest", "outcome", "prev")
"""The fields of a line that its mac covers (all but ``mac`` itself)."""


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
        return {name: getattr(self, name) for name in (*FIELDS, "mac")}


def audit_log_path(directory: Path | None = None) -> Path:
    """Where the site's audit log lives: ``<site dir>/audit.jsonl``."""
    return (directory or site_dir()) / AUDIT_LOG_NAME


def line_mac(body: Mapping[str, Any], secret: bytes) -> str:
    """HMAC-SHA256 (hex) of the canonical JSON of a line's :data:`FIELDS`."""
    text = json.dumps({k: body[k] for k in FIELDS}, sort_keys=True, separators=(",", ":"))
    return hmac.new(secret, text.encode("utf-8"), hashlib.sha256).hexdigest()


def read_head(path: Path) -> tuple[int, str] | None:
    """(last seq, last mac) from the log's head file; None when there is none."""
    try:
        head = json.loads(path.with_name(path.name + _HEAD_SUFFIX).read_text(encoding="utf-8"))
        return int(head["seq"]), str(head["mac"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return (-1, "")  # a damaged head never matches; verify reports it


def write_head(path: Path, seq: int, mac: str) -> None:
    """Replace the log's head file atomically (owner-only, fsynced)."""
    head = path.with_name(path.name + _HEAD_SUFFIX)
    tmp = head.with_name(f".{head.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"seq": seq, "mac": mac}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(head)
