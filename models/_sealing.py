"""Records of the site registry authenticated with the site secret.

Folder permissions say who may write the registry; they cannot say whether what is there was
written by wsiflow on this site. Every record wsiflow relies on (each version's seal, the
promotion records in ``defaults.json``, the trusted publisher keys, the install high-water
marks) carries an HMAC-SHA256 over its canonical JSON keyed with the site secret, so a record
written by hand, edited, or copied from another site is refused when it is read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._errors import RegistryIntegrityError

__all__ = ["canonical_json", "record_auth", "read_sealed", "write_sealed", "inside"]

_MAX_RECORD_BYTES = 4 << 20


def canonical_json(value: Any) -> bytes:
    """The one byte form a record is authenticated (and signed) in."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def record_auth(kind: str, body: Mapping[str, Any], secret: bytes) -> str:
    # The kind is part of the text, so a record of one kind never passes as another.
    text = canonical_json({"kind": f"wsiflow.{kind}", "body": body})
    return hmac.new(secret, text, hashlib.sha256).hexdigest()


def read_sealed(path: Path, kind: str, secret: bytes, *, what: str) -> dict[str, Any] | None:
    """The body of an authenticated record; None when the file does not exist.

    A record that is not JSON, not in wsiflow's form, or whose HMAC does not match the site
    secret raises :class:`RegistryIntegrityError` naming ``what`` (never the path).
    """
    if path.is_symlink():
        raise RegistryIntegrityError(f"{what} is a symbolic link; wsiflow never writes one")
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RegistryIntegrityError(f"{what} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(data) > _MAX_RECORD_BYTES:
        raise RegistryIntegrityError(f"{what} is far larger than any record wsiflow writes")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RegistryIntegrityError(f"{what} is not valid JSON (damaged or edited)") from None
    if not isinstance(obj, dict) or set(obj) != {"body", "auth"} or not isinstance(obj["body"], dict):
        raise RegistryIntegrityError(
            f"{what} is not authenticated with this site's secret (written by hand or by an earlier wsiflow)"
        )
    auth = obj["auth"]
    if not isinstance(auth, str) or not hmac.compare_digest(record_auth(kind, obj["body"], secret), auth):
        raise RegistryIntegrityError(
            f"{what} does not match this site's secret (edited, forged, or copied from another site)"
        )
    return dict(obj["body"])


def write_sealed(path: Path, kind: str, body: Mapping[str, Any], secret: bytes) -> None:
    """Write an authenticated record atomically (temp file + rename), owner/group readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = json.dumps({"body": dict(body), "auth": record_auth(kind, body, secret)}, indent=2, sort_keys=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    tmp.replace(path)


def inside(path: Path, root: Path) -> bool:
    """Whether ``path``, with every link resolved, lies inside ``root`` (links resolved too)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a link loop
        return False
