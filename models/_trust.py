"""The site's trusted model publishers: Ed25519 public keys, authenticated with the site secret.

Kept in ``trusted-publishers.json`` in the site registry. The file carries an HMAC keyed with
the site secret (see :mod:`._sealing`), so someone who can write the registry folder but is
not the site's wsiflow user cannot add a key of their own.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import BundleError, RegistryIntegrityError
from ._manifest import now_iso
from ._sealing import read_sealed, write_sealed

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from ._registry import Registry

__all__ = [
    "TrustedKey",
    "fingerprint",
    "raw_key_fingerprint",
    "short_fingerprint",
    "parse_public_key",
    "trusted_keys",
    "trust_key",
    "untrust_key",
    "find_trusted_key",
]

_TRUST_NAME = "trusted-publishers.json"
_TRUST_KIND = "trusted-publishers"
_TRUST_WHAT = "the list of trusted publisher keys"
_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,63}$")
_MAX_KEY_BYTES = 16 * 1024


@dataclass(frozen=True)
class TrustedKey:
    name: str
    fingerprint: str
    """``SHA256:`` and the hex sha256 of the raw 32-byte public key."""
    public_key_pem: str
    added_at: str

    @property
    def short(self) -> str:
        return short_fingerprint(self.fingerprint)


def raw_key_fingerprint(raw_public_key: bytes) -> str:
    """``SHA256:`` and the hex sha256 of a raw 32-byte Ed25519 public key."""
    return "SHA256:" + hashlib.sha256(raw_public_key).hexdigest()


def fingerprint(key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return raw_key_fingerprint(key.public_bytes(Encoding.Raw, PublicFormat.Raw))


def short_fingerprint(full: str) -> str:
    """``SHA256:`` and the first 16 hex digits: what messages and logs show of a key."""
    return full[:23]


def parse_public_key(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (``wsiflow models keygen`` or ``openssl pkey -pubout``)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if b"PRIVATE KEY" in data:
        raise BundleError("that is a private key; a site trusts a publisher's public key",
                          hint="give the .pub file (`openssl pkey -in KEY.pem -pubout -out KEY.pub`)")
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError):
        raise BundleError("the file is not a PEM public key",
                          hint="give the publisher's .pub file from `wsiflow models keygen`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"the public key is {type(key).__name__.removeprefix('_')}, not Ed25519",
                          hint="wsiflow bundles are signed with Ed25519 keys (`wsiflow models keygen`)")
    return key


def _path(registry: Registry) -> Path:
    return registry.site_root / _TRUST_NAME


def _read(registry: Registry) -> dict[str, Any]:
    try:
        body = read_sealed(_path(registry), _TRUST_KIND, registry.secret, what=_TRUST_WHAT)
    except RegistryIntegrityError as exc:
        raise RegistryIntegrityError(
            exc.message,
            hint="move trusted-publishers.json aside and add the publishers' keys again "
                 "(`wsiflow models trust add KEY.pub --name NAME`), after checking their fingerprints",
        ) from None
    return body or {"keys": {}}


def trusted_keys(registry: Registry) -> list[TrustedKey]:
    """The keys this site trusts, by name."""
    keys = _read(registry).get("keys", {})
    return [TrustedKey(name, k["fingerprint"], k["public_key_pem"], k["added_at"]) for name, k in sorted(keys.items())]


def trust_key(registry: Registry, public_key_file: Path, name: str) -> TrustedKey:
    """Trust the Ed25519 public key in ``public_key_file`` under ``name``."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    if not _KEY_NAME_RE.match(name):
        raise BundleError(f"publisher name {name!r} must be letters, digits, '.', '_', '-' or spaces (up to 64)")
    try:
        with open(public_key_file, "rb") as fh:
            data = fh.read(_MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise BundleError(f"the key file cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(data) > _MAX_KEY_BYTES:
        raise BundleError("the key file is far larger than a public key")
    key = parse_public_key(data)
    body = _read(registry)
    keys = body.setdefault("keys", {})
    fp = fingerprint(key)
    if name in keys:
        known_print = short_fingerprint(keys[name]["fingerprint"])
        raise BundleError(f"a publisher named {name!r} is already trusted ({known_print}...)",
                          hint=f"remove it first: `wsiflow models trust remove {name}`")
    for other, known in keys.items():
        if known["fingerprint"] == fp:
            raise BundleError(f"this key is already trusted as {other!r}")
    pem = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode("ascii")
    keys[name] = {"fingerprint": fp, "public_key_pem": pem, "added_at": now_iso()}
    registry.site_root.mkdir(parents=True, exist_ok=True)
    write_sealed(_path(registry), _TRUST_KIND, body, registry.secret)
    return TrustedKey(name, fp, pem, keys[name]["added_at"])


def untrust_key(registry: Registry, name: str) -> TrustedKey:
    """Stop trusting the key named ``name`` (installed models stay; new bundles are refused)."""
    body = _read(registry)
    keys = body.get("keys", {})
    if name not in keys:
        raise BundleError(f"no trusted publisher named {name!r}", hint="`wsiflow models trust list` names them")
    removed = keys.pop(name)
    write_sealed(_path(registry), _TRUST_KIND, body, registry.secret)
    return TrustedKey(name, removed["fingerprint"], removed["public_key_pem"], removed["added_at"])


def find_trusted_key(registry: Registry, key_fingerprint: str) -> TrustedKey | None:
    return next((k for k in trusted_keys(registry) if k.fingerprint == key_fingerprint), None)
