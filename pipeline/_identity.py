"""A slide's identity: its content digest and pseudonymous ID, computed once per slide.

Hashing a multi-gigabyte slide takes seconds, so the identity is computed once where a
slide enters wsiflow (the CLI, the batch flow, the inbox) and passed along as a small
descriptor to tasks, child processes and the analysis. One error policy: a slide that
cannot be read raises a :class:`WsiflowError` leaf naming why (never the path).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from ._errors import CorruptSlideError, SlideNotFoundError, SlidePermissionError
from ._privacy import _file_digest, site_dir, slide_id

__all__ = ["SlideIdentity", "identify_slide", "DIGEST_CACHE_MIN_BYTES"]

_log = logging.getLogger(__name__)

DIGEST_CACHE_MIN_BYTES = 64 << 20
"""Files at least this large have their digest remembered (by device, inode, size, mtime and
ctime: any write changes the ctime, which no user can set back), so a slide seen before is
not read again just to be named: a reused result of a 4 GB slide is reported in about a
second instead of the tens of seconds hashing takes. Smaller files hash in well under a second."""
_CACHE_NAME = "digest-cache.json"
_CACHE_MAX_ENTRIES = 4096
_memo: dict[str, tuple[list[int], str]] = {}
_memo_lock = threading.Lock()


@dataclass(frozen=True)
class SlideIdentity:
    """``digest``: sha256 (hex) of the slide's bytes; ``slide_id``: its site pseudonym."""

    digest: str
    slide_id: str


def identify_slide(path: str | os.PathLike[str], secret: bytes) -> SlideIdentity:
    """Hash the slide at ``path`` (a file or a DICOM-WSI folder) into its identity.

    Raises :class:`SlideNotFoundError`, :class:`SlidePermissionError`, or
    :class:`CorruptSlideError` for other read failures.
    """
    slide_path = Path(path)
    try:
        digest = _content_digest(slide_path)
    except FileNotFoundError:
        raise SlideNotFoundError.at(slide_path) from None
    except PermissionError:
        raise SlidePermissionError("the slide cannot be read: permission denied") from None
    except IsADirectoryError:
        raise CorruptSlideError("the slide is a folder that cannot be hashed") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SlideNotFoundError.at(slide_path) from None
        reason = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        raise CorruptSlideError(f"reading the slide's bytes failed ({reason})") from None
    return SlideIdentity(digest, slide_id(digest, secret))


def _content_digest(path: Path) -> str:
    """:func:`pipeline.content_digest`, with large files' digests remembered (see
    :data:`DIGEST_CACHE_MIN_BYTES`); the same value, bit for bit."""
    if path.is_dir():
        parts = sorted(
            _cached_file_digest(p) for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".")
        )
        return hashlib.sha256(b"".join(parts)).hexdigest()
    return _cached_file_digest(path).hex()


def _cached_file_digest(path: Path) -> bytes:
    with open(path, "rb") as fh:  # opened first: missing/permission errors as before
        st = os.fstat(fh.fileno())
    if not stat.S_ISREG(st.st_mode) or st.st_size < DIGEST_CACHE_MIN_BYTES:
        return _file_digest(path)
    key = f"{st.st_dev}:{st.st_ino}"
    fingerprint = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    with _memo_lock:
        known = _memo.get(key)
    if known is None:
        known = _load_cache().get(key)
    if known is not None and list(known[0]) == fingerprint:
        return bytes.fromhex(known[1])
    digest = _file_digest(path)
    after = os.stat(path)
    if [after.st_size, after.st_mtime_ns, after.st_ctime_ns] == fingerprint:  # not written while hashed
        with _memo_lock:
            _memo[key] = (fingerprint, digest.hex())
        _store(key, fingerprint, digest.hex())
    return digest


def _cache_path() -> Path:
    return site_dir() / _CACHE_NAME


def _load_cache() -> dict[str, tuple[list[int], str]]:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
        return {str(k): (list(v[0]), str(v[1])) for k, v in data.items()}
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return {}  # absent or damaged: hash again


def _store(key: str, fingerprint: list[int], digest_hex: str) -> None:
    """Add one entry (owner-only file, under a lock, atomically replaced); failures only log."""
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path.with_name(f".{_CACHE_NAME}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = _load_cache()
            entries.pop(key, None)
            entries[key] = (fingerprint, digest_hex)
            kept = dict(list(entries.items())[-_CACHE_MAX_ENTRIES:])
            tmp = path.with_name(f".{_CACHE_NAME}.{os.getpid()}.tmp")
            tmp_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(tmp_fd, "w", encoding="utf-8") as out:
                json.dump(kept, out)
            tmp.replace(path)
    except OSError as exc:
        _log.debug("the digest cache was not updated (%s)", type(exc).__name__)
