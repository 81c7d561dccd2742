"""Privacy helpers: the site directory and secret, pseudonymous slide IDs, offline defaults.

A slide ID is an HMAC of the slide's *content* keyed with a per-site secret: the same
slide gets the same ID wherever it is stored or however it is named, nobody outside the
site can recompute it from a file they have, and it reveals nothing about the file name.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import platformdirs

__all__ = [
    "OFFLINE_ENV",
    "apply_offline_env",
    "site_dir",
    "site_secret",
    "content_digest",
    "slide_id",
    "record_slide_location",
    "lookup_slide_location",
]

OFFLINE_ENV: dict[str, str] = {
    # Prefect: no usage analytics from the server or the client.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # Hugging Face / timm: never reach the hub.
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    # Flower (wsiflow federate): no usage telemetry, no release check.
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
"""Environment defaults that keep every dependency off the network."""

_SECRET_NAME = "site.key"
_SECRET_BYTES = 32
_CHUNK_BYTES = 8 * 1024 * 1024


def apply_offline_env(environ: dict[str, str] | None = None) -> None:
    """Set :data:`OFFLINE_ENV` defaults (values the user already set win)."""
    target = os.environ if environ is None else environ
    for key, value in OFFLINE_ENV.items():
        target.setdefault(key, value)


def site_dir() -> Path:
    """The site's private wsiflow directory: ``$WSIFLOW_HOME`` or the user data dir."""
    configured = os.environ.get("WSIFLOW_HOME")
    return Path(configured) if configured else Path(platformdirs.user_data_dir("wsiflow"))


def site_secret(directory: Path | None = None) -> bytes:
    """The site secret, created (owner-only permissions) on first use."""
    directory = directory or site_dir()
    path = directory / _SECRET_NAME
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_bytes(_SECRET_BYTES)
    tmp = directory / f".{_SECRET_NAME}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    try:
        # link() fails if another process won the race; then everyone uses its secret.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes()


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.digest()


def content_digest(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a slide's bytes; for a DICOM folder, of its files' sorted digests."""
    slide_path = Path(path)
    if slide_path.is_dir():
        parts = sorted(
            _file_digest(p) for p in slide_path.iterdir()
            if p.is_file() and not p.name.startswith(".")
        )
        return hashlib.sha256(b"".join(parts)).hexdigest()
    return _file_digest(slide_path).hex()


def slide_id(digest_hex: str, secret: bytes) -> str:
    """The pseudonymous ID of a slide whose :func:`content_digest` is ``digest_hex``."""
    mac = hmac.new(secret, bytes.fromhex(digest_hex), hashlib.sha256).hexdigest()
    return f"s-{mac[:20]}"


_INDEX_NAME = "slide-index.json"


def record_slide_location(sid: str, path: str | os.PathLike[str], directory: Path | None = None) -> None:
    """Remember where slide ``sid`` was read from, in the site's private index (owner-only).

    The index maps pseudonymous IDs back to paths for the site's own tools (the viewer
    opens a result's slide through it); it is never written into results.
    """
    import fcntl
    import json

    directory = directory or site_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    index = directory / _INDEX_NAME
    fd = os.open(index, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        text = fh.read()
        entries = json.loads(text) if text.strip() else {}
        location = os.fspath(Path(path).resolve())
        if entries.get(sid) != location:
            entries[sid] = location
            fh.seek(0)
            fh.truncate()
            json.dump(entries, fh, indent=1)


def lookup_slide_location(sid: str, directory: Path | None = None) -> Path | None:
    """The path slide ``sid`` was last read from on this site, if known and still there."""
    import json

    index = (directory or site_dir()) / _INDEX_NAME
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    location = entries.get(sid)
    return Path(location) if location and Path(location).exists() else None
