"""The audit log's format: the lines and their HMAC chain, the head, the anchor, the lock.

A site's audit state is three owner-only files in the site dir, none of which can be forged
without the site secret:

- ``audit.jsonl``: one line per event in one canonical JSON form. Each line carries ``prev``
  (the previous line's ``mac``; for the first line, :func:`genesis` of the log's ID) and
  ``mac``, an HMAC-SHA256 of the line's canonical JSON keyed with the site secret.
- ``audit.jsonl.head``: the log's ID, last sequence number and last mac, authenticated
  with the site secret and rewritten after each append, so lines cut off the end, or a
  head taken from another log, are noticed.
- ``audit.anchor``: the log's ID and start time, authenticated, written when a log starts,
  so a site that had a log notices when the log or its head (or both) are gone.

``audit.lock`` serialises appends and rotations; it outlives a rotation, the log does not.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import site_dir

from ._errors import AuditLogError

__all__ = [
    "ANCHOR_NAME",
    "AUDIT_ACTIONS",
    "AUDIT_LOG_NAME",
    "FIELDS",
    "LINE_KEYS",
    "AuditAnchor",
    "AuditHead",
    "AuditRecord",
    "anchor_path",
    "audit_lock",
    "audit_log_path",
    "genesis",
    "head_path",
    "line_mac",
    "line_text",
    "new_log_id",
    "read_anchor",
    "read_head",
    "record_problem",
    "strict_json",
    "write_anchor",
    "write_head",
]

AUDIT_LOG_NAME = "audit.jsonl"
_HEAD_SUFFIX = ".head"
ANCHOR_NAME = "audit.anchor"
_LOCK_NAME = "audit.lock"

AUDIT_ACTIONS = frozenset({
    "run", "mpp-override", "view", "review-save", "export", "deid",
    "model-import", "model-verify", "model-promote", "model-remove", "model-train",
    "audit-rotate", "review-signoff",
    "model-install", "model-trust", "model-rollback", "model-validate", "model-pack",
    "model-federate",
})
"""Actions the log knows; anything else is a programming error."""

FIELDS = ("seq", "time", "actor", "action", "slide_id", "model_digest", "params_digest", "outcome", "prev")
"""The fields of a line that its mac covers (all but ``mac`` itself)."""

LINE_KEYS = (*FIELDS, "mac")
"""Every key of a line, in the order it is written; no other key is allowed."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_REQUIRED_TEXT = ("time", "actor", "action", "outcome")
_OPTIONAL_TEXT = ("slide_id", "model_digest", "params_digest")


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
        return {name: getattr(self, name) for name in LINE_KEYS}


@dataclass(frozen=True)
class AuditHead:
    """Where a log ends: its ID, last sequence number and last mac (0 and the genesis before any line)."""

    log_id: str
    seq: int
    mac: str


@dataclass(frozen=True)
class AuditAnchor:
    """Which log the site keeps, and since when (UTC ISO 8601)."""

    log_id: str
    since: str


def audit_log_path(directory: Path | None = None) -> Path:
    """Where the site's audit log lives: ``<site dir>/audit.jsonl``."""
    return (directory or site_dir()) / AUDIT_LOG_NAME


def head_path(log: Path) -> Path:
    return log.with_name(log.name + _HEAD_SUFFIX)


def anchor_path(directory: Path) -> Path:
    return directory / ANCHOR_NAME


def new_log_id() -> str:
    """A random ID for a new log (128 bits, hex)."""
    return secrets.token_hex(16)


def _auth(kind: str, fields: Mapping[str, Any], secret: bytes) -> str:
    # "kind" is never a line field, so these texts can never equal a line's canonical JSON.
    text = json.dumps({"kind": kind, **fields}, sort_keys=True, separators=(",", ":"))
    return hmac.new(secret, text.encode("utf-8"), hashlib.sha256).hexdigest()


def line_mac(body: Mapping[str, Any], secret: bytes) -> str:
    """HMAC-SHA256 (hex) of the canonical JSON of a line's :data:`FIELDS`."""
    text = json.dumps({k: body[k] for k in FIELDS}, sort_keys=True, separators=(",", ":"))
    return hmac.new(secret, text.encode("utf-8"), hashlib.sha256).hexdigest()


def genesis(log_id: str, secret: bytes) -> str:
    """The ``prev`` of a log's first line: binds the whole chain to the log's ID."""
    return _auth("genesis", {"log_id": log_id}, secret)


def line_text(record: Mapping[str, Any]) -> str:
    """The one form a line is written in (no newline): compact JSON, keys in :data:`LINE_KEYS` order."""
    return json.dumps({name: record[name] for name in LINE_KEYS}, separators=(",", ":"))


def _show(key: str) -> str:
    return repr(key[:32] + ("..." if len(key) > 32 else ""))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            # json.loads would keep the last value silently; another reader may take the first.
            raise ValueError(f"duplicated key {_show(key)}")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON number {name}")


def strict_json(text: str) -> Any:
    """``json.loads`` that refuses duplicated keys and NaN/Infinity; ValueError says why."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError:
        raise ValueError("not JSON") from None


def record_problem(obj: Any) -> str | None:
    """Why ``obj`` is not a well-formed line record (keys and types), or None."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    unknown = [key for key in obj if key not in LINE_KEYS]
    if unknown:
        return f"unknown key {_show(unknown[0])}"
    missing = [key for key in LINE_KEYS if key not in obj]
    if missing:
        return f"missing key {missing[0]!r}"
    if type(obj["seq"]) is not int or obj["seq"] < 1:
        return "seq is not a positive integer"
    for key in _REQUIRED_TEXT:
        if not isinstance(obj[key], str):
            return f"{key} is not text"
    for key in _OPTIONAL_TEXT:
        if obj[key] is not None and not isinstance(obj[key], str):
            return f"{key} is neither text nor null"
    for key in ("prev", "mac"):
        if not isinstance(obj[key], str) or not _HEX64.fullmatch(obj[key]):
            return f"{key} is not a 64-digit hex mac"
    return None


def _read_object(path: Path, what: str, keys: set[str]) -> dict[str, Any] | None:
    """A small JSON file of exactly ``keys``; None when it does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditLogError(f"the audit {what} cannot be read ({exc.strerror or type(exc).__name__})",
                            hint="give the user running wsiflow read access to the site dir") from None
    try:
        obj = strict_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise AuditLogError(f"the audit {what} is not valid JSON (damaged or edited)") from None
    if not isinstance(obj, dict) or set(obj) != keys:
        raise AuditLogError(f"the audit {what} does not have the fields wsiflow writes (damaged or edited)")
    return obj


def _authentic(obj: Mapping[str, Any], kind: str, fields: tuple[str, ...], secret: bytes, what: str) -> None:
    if not isinstance(obj["auth"], str) or not _HEX64.fullmatch(obj["auth"]) or not hmac.compare_digest(
        _auth(kind, {k: obj[k] for k in fields}, secret), obj["auth"]
    ):
        raise AuditLogError(
            f"the audit {what} does not match this site's secret (edited, forged, or copied from another site)"
        )


def read_head(log: Path, secret: bytes) -> AuditHead | None:
    """The log's authenticated head; None when there is none. A damaged, unauthenticated or
    forged head raises :class:`AuditLogError`."""
    path = head_path(log)
    try:
        obj = _read_object(path, "head", {"log_id", "seq", "mac", "auth"})
    except AuditLogError:
        if _is_legacy_head(path):
            raise AuditLogError(
                "the audit log's head was written by an earlier wsiflow and is not authenticated, so a cut-off "
                "end cannot be ruled out",
                hint="check the log with `wsiflow audit verify`, then start an authenticated log with "
                     "`wsiflow audit rotate --reason \"upgrade\"` (the old log is kept beside it)",
            ) from None
        raise
    if obj is None:
        return None
    _authentic(obj, "head", ("log_id", "seq", "mac"), secret, "head")
    return AuditHead(str(obj["log_id"]), int(obj["seq"]), str(obj["mac"]))


def _is_legacy_head(path: Path) -> bool:
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and set(obj) == {"seq", "mac"}


def read_anchor(directory: Path, secret: bytes) -> AuditAnchor | None:
    """The site's authenticated anchor; None when there is none. A damaged or forged one raises
    :class:`AuditLogError`."""
    obj = _read_object(anchor_path(directory), "anchor", {"log_id", "since", "auth"})
    if obj is None:
        return None
    _authentic(obj, "anchor", ("log_id", "since"), secret, "anchor")
    return AuditAnchor(str(obj["log_id"]), str(obj["since"]))


def _write_private_json(path: Path, obj: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically and durably (owner-only, fsynced, folder fsynced)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, separators=(",", ":"))
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_head(log: Path, head: AuditHead, secret: bytes) -> None:
    """Replace the log's head (authenticated with the site secret)."""
    fields = {"log_id": head.log_id, "seq": head.seq, "mac": head.mac}
    _write_private_json(head_path(log), {**fields, "auth": _auth("head", fields, secret)})


def write_anchor(directory: Path, anchor: AuditAnchor, secret: bytes) -> None:
    """Replace the site's anchor (authenticated with the site secret)."""
    fields = {"log_id": anchor.log_id, "since": anchor.since}
    _write_private_json(anchor_path(directory), {**fields, "auth": _auth("anchor", fields, secret)})


@contextmanager
def audit_lock(directory: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold the site's audit lock: exclusive to append or rotate, shared to read a consistent
    state. A shared lock on a site without a lock file (nothing was ever appended) holds nothing."""
    path = directory / _LOCK_NAME
    if exclusive:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    else:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            yield
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)
