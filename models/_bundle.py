"""Signed model bundles (``.wsimodel``): publisher keys, packing, verification, installing.

A bundle is an uncompressed zip of flat members: ``manifest.json``, the weights
(``*.safetensors``), ``MODEL_CARD.md``, optionally ``validation.json`` (the publisher's
validation report), and ``signature.json``: a statement (format, schema, model name and
version, the publisher key's fingerprint, every other member's sha256 and size) and an
Ed25519 signature over the statement's canonical JSON. Installing checks, in order: member
names and kinds (no paths, links, folders, duplicates or compression), the signature and
that its key is trusted by the site, that the members are exactly those signed and unchanged,
the manifest (schema, architecture allow-list, name/version as signed), the weights (pinned
sha256, safetensors, a strict load), and that the version is newer than any this site has
had. The model is then a candidate: the site's own ``validate --record`` must pass the
acceptance thresholds before ``promote`` makes it the default.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import stat
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import WsiflowError

from ._errors import (
    BundleError,
    DowngradeError,
    ManifestError,
    TamperedBundleError,
    UnsignedBundleError,
    UntrustedPublisherError,
)
from ._loading import build_module
from ._manifest import MANIFEST_NAME, SCHEMA, ModelManifest, now_iso, parse_manifest
from ._registry import ModelEntry, Registry
from ._sealing import canonical_json
from ._trust import TrustedKey, find_trusted_key, fingerprint, parse_public_key, short_fingerprint
from ._weights import (
    check_safetensors,
    read_verified_weights,
    read_weights_file,
    sha256_bytes,
    state_dict_from_safetensors,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["BUNDLE_FORMAT", "PackedBundle", "VerifiedBundle", "keygen", "pack_bundle", "open_bundle",
           "install_bundle"]

BUNDLE_FORMAT = "wsiflow.bundle/1"
SIGNATURE_NAME = "signature.json"
CARD_NAME = "MODEL_CARD.md"
REPORT_NAME = "validation.json"
PUBLISHER_REPORT_NAME = "publisher-validation.json"
"""What the publisher's validation report is called once installed (the site's own is recorded separately)."""
PASSPHRASE_ENV = "WSIFLOW_KEY_PASSPHRASE"
_MEMBER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_BUNDLE_BYTES = 8 << 30
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class PackedBundle:
    path: Path
    ref: str
    publisher: str
    """The signing key's fingerprint."""
    sha256: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class VerifiedBundle:
    manifest: ModelManifest
    weights: bytes
    card: bytes
    report: bytes | None
    publisher: TrustedKey
    sha256: str


# -- publisher keys ---------------------------------------------------------------------
def keygen(private_key_path: Path) -> tuple[Path, str]:
    """Write a new Ed25519 private key (PEM, owner-only; encrypted when ``$WSIFLOW_KEY_PASSPHRASE``
    is set) and its public key beside it (``.pub``). Returns the public key's path and fingerprint."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        BestAvailableEncryption,
        Encoding,
        KeySerializationEncryption,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    public_path = private_key_path.with_suffix(".pub")
    if private_key_path == public_path:
        raise BundleError("the private key file must not end in .pub", hint="e.g. --out publisher.pem")
    for path in (private_key_path, public_path):
        if os.path.lexists(path):
            raise BundleError(f"a key file already exists ({path.name}); refusing to overwrite a key",
                              hint="choose another --out name")
    key = Ed25519PrivateKey.generate()
    passphrase = os.environ.get(PASSPHRASE_ENV)
    encryption: KeySerializationEncryption = (
        BestAvailableEncryption(passphrase.encode("utf-8")) if passphrase else NoEncryption()
    )
    private_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)
    fd = os.open(private_key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_key = key.public_key()
    public_path.write_bytes(public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return public_path, fingerprint(public_key)


def read_private_key(
    path: Path, error: type[WsiflowError], what: str, make_hint: str, read_hint: str | None = None
) -> Ed25519PrivateKey:
    """An Ed25519 private key (PKCS8 PEM; encrypted ones need ``$WSIFLOW_KEY_PASSPHRASE``);
    ``error`` (named ``what``, with the hints) when it cannot be read or is not one."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"the {what} cannot be read ({exc.strerror or type(exc).__name__})", hint=read_hint) from None
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        key = load_pem_private_key(data, password=passphrase.encode("utf-8") if passphrase else None)
    except TypeError:
        raise error(f"the {what} is encrypted", hint=f"set {PASSPHRASE_ENV} to its passphrase") from None
    except ValueError:
        raise error(f"the {what} is not a PEM private key (or the passphrase is wrong)", hint=make_hint) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise error(f"the {what} is not an Ed25519 key", hint=make_hint)
    return key


def _private_key(path: Path) -> Ed25519PrivateKey:
    return read_private_key(path, BundleError, "publisher key",
                            "make one with `wsiflow models keygen --out KEY.pem` or "
                            "`openssl genpkey -algorithm ed25519 -out KEY.pem`")


# -- packing ----------------------------------------------------------------------------
def _optional_file(path: Path | None, default: Path, what: str) -> bytes | None:
    chosen = path if path is not None else default
    if path is None and not chosen.is_file():
        return None
    try:
        return read_weights_file(chosen, what=what)
    except ValueError as exc:
        raise BundleError(str(exc)) from None


def pack_bundle(entry: ModelEntry, key_path: Path, out: Path, *, card: Path | None = None,
                report: Path | None = None) -> PackedBundle:
    """Sign ``entry`` (manifest, verified weights, model card, validation report) into ``out``."""
    key = _private_key(key_path)
    manifest = entry.manifest
    weights = read_verified_weights(entry.weights_path, manifest.weights_sha256)
    card_bytes = _optional_file(card, entry.directory / CARD_NAME, "the model card")
    if card_bytes is None:
        raise BundleError(f"{manifest.ref} has no model card",
                          hint="write one (intended use, training data, validation, known failures) and pass --card")
    report_bytes = _optional_file(report, entry.directory / "validation" / REPORT_NAME, "the validation report")
    members: dict[str, bytes] = {
        MANIFEST_NAME: (json.dumps(manifest.to_json(), indent=2) + "\n").encode("utf-8"),
        manifest.weights_file: weights,
        CARD_NAME: card_bytes,
    }
    if report_bytes is not None:
        members[REPORT_NAME] = report_bytes
    publisher = fingerprint(key.public_key())
    statement = {
        "format": BUNDLE_FORMAT,
        "schema": SCHEMA,
        "name": manifest.name,
        "version": manifest.version,
        "publisher": publisher,
        "created_at": now_iso(),
        "members": {name: {"sha256": sha256_bytes(data), "size": len(data)} for name, data in members.items()},
    }
    signature = base64.b64encode(key.sign(canonical_json(statement))).decode("ascii")
    members[SIGNATURE_NAME] = (json.dumps({"statement": statement, "signature": signature}, indent=2) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            archive.writestr(info, data)
    data = buffer.getvalue()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return PackedBundle(out, manifest.ref, publisher, sha256_bytes(data), tuple(members))


# -- verifying --------------------------------------------------------------------------
def _shown(name: str) -> str:
    return repr(name) if _MEMBER_RE.match(name) else "a member whose name is a path or has odd characters"


def _members(data: bytes) -> dict[str, bytes]:
    """The bundle's members, if every one is a plain, uncompressed file with a plain name."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise BundleError("the file is not a wsiflow model bundle (not a zip archive)",
                          hint="install a .wsimodel made with `wsiflow models pack`") from None
    members: dict[str, bytes] = {}
    with archive:
        for info in archive.infolist():
            name = info.filename
            if not _MEMBER_RE.match(name) or ".." in name:
                raise TamperedBundleError(f"the bundle holds {_shown(name)} (path traversal); wsiflow bundles "
                                          "hold plain file names only")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise TamperedBundleError(f"bundle member {name!r} is a symbolic link; wsiflow bundles hold files only")
            if info.is_dir() or stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # no type bits: a plain file
                raise TamperedBundleError(f"bundle member {name!r} is not a plain file")
            if name in members:
                raise TamperedBundleError(f"bundle member {name!r} is there twice")
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                raise TamperedBundleError(f"bundle member {name!r} is compressed; wsiflow bundles are stored as is")
            try:
                members[name] = archive.read(info)
            except (zipfile.BadZipFile, OSError, ValueError) as exc:
                raise TamperedBundleError(f"bundle member {name!r} cannot be read ({type(exc).__name__})") from None
    return members


def _statement(raw: bytes) -> tuple[dict[str, Any], bytes]:
    try:
        doc = json.loads(raw.decode("utf-8"))
        statement, signature = doc["statement"], base64.b64decode(doc["signature"], validate=True)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, binascii.Error):
        raise TamperedBundleError("the bundle's signature.json is not a signed statement") from None
    required = {"format": str, "schema": str, "name": str, "version": int, "publisher": str, "members": dict}
    if not isinstance(statement, dict) or any(not isinstance(statement.get(k), t) for k, t in required.items()):
        raise TamperedBundleError("the bundle's signed statement lacks a field or has the wrong type")
    if statement["format"] != BUNDLE_FORMAT:
        raise BundleError(f"bundle format {statement['format'][:40]!r} is not {BUNDLE_FORMAT!r}",
                          hint="update wsiflow, or ask the publisher for a bundle this version reads")
    return statement, signature


def open_bundle(registry: Registry, path: Path) -> VerifiedBundle:
    """Verify a bundle completely (see the module docstring); nothing is written."""
    from cryptography.exceptions import InvalidSignature

    try:
        data = read_weights_file(path, what="the bundle")
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    if len(data) > _MAX_BUNDLE_BYTES:
        raise BundleError("the bundle is larger than any model bundle wsiflow installs (8 GiB)")
    members = _members(data)
    if SIGNATURE_NAME not in members:
        raise UnsignedBundleError("the bundle is not signed (it has no signature.json)")
    statement, signature = _statement(members.pop(SIGNATURE_NAME))
    trusted = find_trusted_key(registry, statement["publisher"])
    if trusted is None:
        raise UntrustedPublisherError(
            f"the bundle is signed by key {short_fingerprint(statement['publisher'])}..., "
            "which this site does not trust"
        )
    public_key = parse_public_key(trusted.public_key_pem.encode("ascii"))
    try:
        public_key.verify(signature, canonical_json(statement))
    except InvalidSignature:
        raise TamperedBundleError(
            f"the signature does not match the bundle's statement (key {trusted.name!r}): the statement was changed"
        ) from None
    signed = statement["members"]
    for name in sorted(set(members) - set(signed)):
        raise TamperedBundleError(f"bundle member {name!r} is not in the signed statement (added after signing)")
    for name in sorted(set(signed) - set(members)):
        raise TamperedBundleError(f"signed member {name!r} is missing from the bundle (removed after signing)")
    for name, content in sorted(members.items()):
        pinned = signed[name]
        if not isinstance(pinned, dict) or pinned.get("sha256") != sha256_bytes(content) or (
                pinned.get("size") != len(content)):
            raise TamperedBundleError(f"bundle member {name!r} changed after signing (its sha256 differs)")
    if MANIFEST_NAME not in members or CARD_NAME not in members:
        raise BundleError("the bundle lacks its manifest or model card")
    try:
        manifest = parse_manifest(json.loads(members[MANIFEST_NAME].decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"the bundle's manifest is not valid JSON ({type(exc).__name__})") from None
    if (manifest.name, manifest.version, SCHEMA) != (statement["name"], statement["version"], statement["schema"]):
        raise TamperedBundleError(
            f"the manifest names {manifest.ref} but the signed statement "
            f"{statement['name'][:64]}@{statement['version']}"
        )
    allowed = {MANIFEST_NAME, CARD_NAME, REPORT_NAME, manifest.weights_file}
    for name in sorted(set(members) - allowed):
        raise BundleError(f"bundle member {name!r} is not a file a wsiflow bundle holds")
    weights = members.get(manifest.weights_file)
    if weights is None or sha256_bytes(weights) != manifest.weights_sha256:
        raise TamperedBundleError("the bundle's weights do not match the sha256 its manifest pins")
    check_safetensors(weights)
    module = build_module(manifest)
    try:
        module.load_state_dict(state_dict_from_safetensors(weights), strict=True)
    except RuntimeError as exc:
        raise ManifestError(f"the weights do not fit {manifest.timm_name!r}: {str(exc)[:300]}") from exc
    return VerifiedBundle(manifest, weights, members[CARD_NAME], members.get(REPORT_NAME), trusted, sha256_bytes(data))


def install_bundle(registry: Registry, path: Path) -> tuple[ModelEntry, VerifiedBundle]:
    """Verify ``path`` and add its model to the site registry as a candidate."""
    bundle = open_bundle(registry, path)
    manifest = bundle.manifest
    had = max([registry.high_water(manifest.name)]
              + [e.manifest.version for e in registry.entries() if e.manifest.name == manifest.name])
    if manifest.version <= had:
        raise DowngradeError(f"{manifest.ref} is not newer than version {had} of {manifest.name}, which this site "
                             "has (or had)")
    extra = {CARD_NAME: bundle.card}
    if bundle.report is not None:
        extra[PUBLISHER_REPORT_NAME] = bundle.report
    # The publisher's validation is kept as their report; only the site's own counts for promote.
    entry = registry.add(replace(manifest, validation=None), bundle.weights, extra)
    registry.record_install(entry, {
        "publisher": bundle.publisher.fingerprint,
        "publisher_name": bundle.publisher.name,
        "bundle_sha256": bundle.sha256,
        "weights_sha256": manifest.weights_sha256,
        "installed_at": now_iso(),
    })
    return entry, bundle
