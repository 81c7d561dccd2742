"""Signed model bundles: pack, trust, install as a candidate, the site's gate, rollback, and
every refusal (unsigned, untrusted, tampered, downgraded, unsafe)."""

from __future__ import annotations

import json
import os
import stat
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from models import (
    AcceptanceError,
    AcceptanceThresholds,
    BundleError,
    DowngradeError,
    ManifestError,
    ModelNotFoundError,
    Registry,
    TamperedBundleError,
    UnsignedBundleError,
    UntrustedPublisherError,
    Validation,
    install_bundle,
    keygen,
    open_bundle,
    pack_bundle,
    trust_key,
    trusted_keys,
    untrust_key,
)
from models._weights import sha256_bytes
from tests._models import add_tiny_model, bundle_members, rezip, signed_zip

GOOD = Validation("2026-01-01", "site patches", None, {"accuracy": 0.95, "balanced_accuracy": 0.93, "ece": 0.04})


@pytest.fixture
def publisher(tmp_path):
    """A publisher's registry with tiny@1..3 (each with a model card) and a signing key."""
    registry = Registry(site_root=tmp_path / "publisher-models", secret=b"p" * 32)
    for version in (1, 2, 3):
        add_tiny_model(registry, version=version, seed=version)
        (registry.resolve(f"tiny@{version}").directory / "MODEL_CARD.md").write_text(f"# tiny {version}\n")
    key = tmp_path / "keys" / "acme.pem"
    key.parent.mkdir()
    public, _ = keygen(key)
    return registry, key, public


@pytest.fixture
def site(tmp_path, publisher):
    """A site registry (its own secret) that trusts the publisher."""
    registry = Registry(site_root=tmp_path / "site-models", secret=b"s" * 32)
    trust_key(registry, publisher[2], "acme")
    return registry


def _pack(publisher, version, tmp_path) -> Path:
    registry, key, _ = publisher
    out = tmp_path / f"tiny-{version}.wsimodel"
    pack_bundle(registry.resolve(f"tiny@{version}"), key, out)
    return out


def test_keygen_writes_an_owner_only_key_and_refuses_to_overwrite(tmp_path):
    public, fp = keygen(tmp_path / "k.pem")
    assert public.name == "k.pub" and fp.startswith("SHA256:") and len(fp) == 7 + 64
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    with pytest.raises(BundleError, match="already exists"):
        keygen(tmp_path / "k.pem")


def test_an_openssl_key_can_sign(tmp_path, publisher):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, public = tmp_path / "o.pem", tmp_path / "o.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", key], check=True)
    subprocess.run(["openssl", "pkey", "-in", key, "-pubout", "-out", public], check=True)
    site = Registry(site_root=tmp_path / "s", secret=b"s" * 32)
    trusted = trust_key(site, public, "openssl publisher")
    out = tmp_path / "o.wsimodel"
    packed = pack_bundle(publisher[0].resolve("tiny@1"), key, out)
    assert packed.publisher == trusted.fingerprint
    assert open_bundle(site, out).publisher.name == "openssl publisher"


def test_trust_list_add_remove(site, publisher, tmp_path):
    [key] = trusted_keys(site)
    assert key.name == "acme" and key.fingerprint.startswith("SHA256:")
    with pytest.raises(BundleError, match="already trusted"):
        trust_key(site, publisher[2], "acme-again")
    with pytest.raises(BundleError, match="private key"):
        trust_key(site, publisher[1], "oops")
    assert untrust_key(site, "acme").fingerprint == key.fingerprint
    assert trusted_keys(site) == []
    with pytest.raises(BundleError, match="no trusted publisher"):
        untrust_key(site, "acme")


def test_the_trust_list_cannot_be_edited_by_hand(site, tmp_path):
    from models import RegistryIntegrityError

    path = site.site_root / "trusted-publishers.json"
    doc = json.loads(path.read_text())
    doc["body"]["keys"]["mallory"] = dict(doc["body"]["keys"]["acme"])
    path.write_text(json.dumps(doc))
    with pytest.raises(RegistryIntegrityError, match="does not match this site's secret"):
        trusted_keys(site)


def test_a_signed_bundle_installs_as_a_candidate_that_only_site_validation_can_promote(site, publisher, tmp_path):
    add_tiny_model(site, version=1)  # the site's own model, the default so far
    entry, bundle = install_bundle(site, _pack(publisher, 2, tmp_path))
    assert entry.manifest.ref == "tiny@2" and bundle.publisher.name == "acme"
    assert entry.manifest.validation is None  # the publisher's validation does not count here
    assert (entry.directory / "MODEL_CARD.md").read_text() == "# tiny 2\n"
    assert site.is_candidate(entry) and site.install_record(entry)["publisher_name"] == "acme"
    assert site.default_version("tiny") == 1  # a candidate is never the default by itself
    with pytest.raises(AcceptanceError, match="no validation recorded on this site"):
        site.promote("tiny@2", AcceptanceThresholds())
    # A validation written into the manifest by hand does not count either.
    manifest_path = entry.directory / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["validation"] = {"date": "x", "dataset": "x", "dataset_digest": None, "metrics": dict(GOOD.metrics)}
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(AcceptanceError, match="no validation recorded"):
        site.promote("tiny@2", AcceptanceThresholds())
    bad = replace(GOOD, metrics={"accuracy": 0.6, "balanced_accuracy": 0.5, "ece": 0.3})
    site.record_validation(site.resolve("tiny@2"), bad)
    with pytest.raises(AcceptanceError, match="fails acceptance"):
        site.promote("tiny@2", AcceptanceThresholds())
    site.record_validation(site.resolve("tiny@2"), GOOD)
    promoted, previous = site.promote("tiny@2", AcceptanceThresholds())
    assert previous == 1 and site.default_version("tiny") == 2
    assert not site.is_candidate(promoted)
    assert site.load("tiny").manifest.weights_sha256 == publisher[0].resolve("tiny@2").manifest.weights_sha256


def test_rollback_restores_the_previously_promoted_version(site, publisher, tmp_path):
    add_tiny_model(site, version=1)
    site.record_validation(site.resolve("tiny@1"), GOOD)
    site.promote("tiny@1", AcceptanceThresholds())
    install_bundle(site, _pack(publisher, 2, tmp_path))
    site.record_validation(site.resolve("tiny@2"), GOOD)
    assert site.promote("tiny@2", AcceptanceThresholds())[1] == 1
    assert site.promote("tiny@2", AcceptanceThresholds())[1] is None  # promoting the default again
    assert site.rollback("tiny") == (2, 1)
    assert site.default_version("tiny") == 1
    with pytest.raises(AcceptanceError, match="only version"):
        site.rollback("tiny")  # nothing earlier than 1 (2 is a candidate again)
    assert site.default_version("tiny") == 1


def test_rollback_of_a_bundled_name_returns_to_the_bundled_version(tmp_path, publisher):
    from models import BUNDLED_ROOT

    bundled = tmp_path / "bundled"
    (bundled / "tiny").mkdir(parents=True)
    import shutil

    shutil.copytree(publisher[0].resolve("tiny@1").directory, bundled / "tiny" / "1")
    site = Registry(site_root=tmp_path / "s", bundled_root=bundled, secret=b"s" * 32)
    trust_key(site, publisher[2], "acme")
    install_bundle(site, _pack(publisher, 3, tmp_path))
    assert site.default_version("tiny") == 1  # bundled
    site.record_validation(site.resolve("tiny@3"), GOOD)
    assert site.promote("tiny@3", AcceptanceThresholds())[1] == 1
    assert site.rollback("tiny") == (3, 1) and site.resolve("tiny").source == "bundled"
    assert BUNDLED_ROOT.is_dir()


def test_unsigned_bundle_is_refused(site, publisher, tmp_path):
    members = bundle_members(_pack(publisher, 2, tmp_path))
    del members["signature.json"]
    with pytest.raises(UnsignedBundleError, match="not signed"):
        install_bundle(site, rezip(members, tmp_path / "unsigned.wsimodel"))
    (tmp_path / "plain.wsimodel").write_bytes(b"not a zip at all")
    with pytest.raises(BundleError, match="not a zip"):
        install_bundle(site, tmp_path / "plain.wsimodel")
    assert not (site.site_root / "tiny").exists()


def test_untrusted_bundle_is_refused(site, publisher, tmp_path):
    bundle = _pack(publisher, 2, tmp_path)
    untrust_key(site, "acme")
    with pytest.raises(UntrustedPublisherError, match="does not trust"):
        install_bundle(site, bundle)
    # Another key claiming the trusted key's fingerprint does not verify.
    trust_key(site, publisher[2], "acme")
    keygen(tmp_path / "mallory.pem")
    members = bundle_members(bundle)
    del members["signature.json"]
    trusted_fp = trusted_keys(site)[0].fingerprint
    forged = signed_zip(members, tmp_path / "mallory.pem", tmp_path / "forged.wsimodel",
                        statement_edit=lambda s: s.update(publisher=trusted_fp))
    with pytest.raises(TamperedBundleError, match="signature does not match"):
        install_bundle(site, forged)


def _weights_flipped(members):
    data = bytearray(members["weights.safetensors"])
    data[-5] ^= 0xFF
    return {**members, "weights.safetensors": bytes(data)}


@pytest.mark.parametrize(("change", "match"), [
    (_weights_flipped, "'weights.safetensors' changed after signing"),
    (lambda m: {**m, "MODEL_CARD.md": b"# better\n"}, "'MODEL_CARD.md' changed after signing"),
    (lambda m: {**m, "extra.txt": b"hello"}, "'extra.txt' is not in the signed statement"),
    (lambda m: {k: v for k, v in m.items() if k != "MODEL_CARD.md"}, "'MODEL_CARD.md' is missing"),
    (lambda m: {**m, "../evil.py": b"x"}, "path traversal"),
    (lambda m: {**m, "sub/manifest.json": b"x"}, "path traversal"),
    (lambda m: {**m, "signature.json": m["signature.json"].replace(b'"version": 2', b'"version": 9')},
     "signature does not match"),
], ids=["weights", "card", "added", "removed", "traversal", "folder", "statement"])
def test_tampered_bundle_is_refused(site, publisher, tmp_path, change, match):
    members = bundle_members(_pack(publisher, 2, tmp_path))
    with pytest.raises(TamperedBundleError, match=match):
        install_bundle(site, rezip(change(members), tmp_path / "tampered.wsimodel"))
    assert not (site.site_root / "tiny").exists()


def test_a_symlink_member_is_refused(site, publisher, tmp_path):
    members = bundle_members(_pack(publisher, 2, tmp_path))
    out = tmp_path / "link.wsimodel"
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        info = zipfile.ZipInfo("validation.json")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(TamperedBundleError, match="symbolic link"):
        install_bundle(site, out)


def test_a_manifest_swapped_with_its_digests_re_pinned_but_not_re_signed_is_refused(site, publisher, tmp_path):
    members = bundle_members(_pack(publisher, 2, tmp_path))
    other = publisher[0].resolve("tiny@3")
    weights = other.weights_path.read_bytes()
    manifest = json.loads(members["manifest.json"])
    manifest["weights"]["sha256"] = sha256_bytes(weights)
    signature = json.loads(members["signature.json"])
    new_manifest = json.dumps(manifest).encode()
    for name, data in (("manifest.json", new_manifest), ("weights.safetensors", weights)):
        signature["statement"]["members"][name] = {"sha256": sha256_bytes(data), "size": len(data)}
    swapped = {**members, "manifest.json": new_manifest, "weights.safetensors": weights,
               "signature.json": json.dumps(signature).encode()}
    with pytest.raises(TamperedBundleError, match="signature does not match"):
        install_bundle(site, rezip(swapped, tmp_path / "swapped.wsimodel"))


def test_a_signed_bundle_with_an_unsafe_manifest_is_refused(site, publisher, tmp_path):
    members = bundle_members(_pack(publisher, 2, tmp_path))
    del members["signature.json"]
    manifest = json.loads(members["manifest.json"])
    manifest["architecture"] = {"timm_name": "hf-hub:someone/model", "kwargs": {}}
    members["manifest.json"] = json.dumps(manifest).encode()
    with pytest.raises(ManifestError, match="Hugging Face Hub"):
        install_bundle(site, signed_zip(members, publisher[1], tmp_path / "hub.wsimodel"))
    manifest["architecture"] = {"timm_name": "test_efficientnet", "kwargs": {}}
    members["manifest.json"] = json.dumps(manifest).encode()
    with pytest.raises(TamperedBundleError, match="signed statement"):
        install_bundle(site, signed_zip(members, publisher[1], tmp_path / "renamed.wsimodel",
                                        statement_edit=lambda s: s.update(version=7)))


def test_downgrades_are_refused_even_after_removal(site, publisher, tmp_path):
    install_bundle(site, _pack(publisher, 3, tmp_path))
    with pytest.raises(DowngradeError, match="not newer than version 3"):
        install_bundle(site, _pack(publisher, 2, tmp_path))
    with pytest.raises(DowngradeError, match="not newer than version 3"):
        install_bundle(site, _pack(publisher, 3, tmp_path))
    site.remove("tiny@3", confirm_last=True)
    with pytest.raises(DowngradeError, match="not newer than version 3"):
        install_bundle(site, _pack(publisher, 3, tmp_path))
    assert site.next_version("tiny") == 4


def test_only_candidates_means_no_default(site, publisher, tmp_path):
    install_bundle(site, _pack(publisher, 2, tmp_path))
    with pytest.raises(ModelNotFoundError, match="only candidate versions"):
        site.resolve("tiny")
    assert site.load("tiny@2").manifest.ref == "tiny@2"  # named explicitly, e.g. to validate it
    assert os.path.exists(site.site_root / "defaults.json")
