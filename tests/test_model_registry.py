"""The local registry: round trip, verification, refusal of tampered and pickled weights."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from models import (
    AcceptanceError,
    AcceptanceThresholds,
    ManifestError,
    ModelNotFoundError,
    ReadOnlyModelError,
    Registry,
    UnsafeWeightsError,
    Validation,
    WeightsIntegrityError,
    build_module,
    parse_manifest,
)
from models._import import import_model
from pipeline import PatchClassifier, classify_tiles
from tests._models import add_tiny_model, tiny_manifest


@pytest.fixture
def registry(tmp_path):
    return Registry(site_root=tmp_path / "site-models")


def test_round_trip(registry):
    manifest = add_tiny_model(registry)
    entry = registry.resolve("tiny")
    assert entry.source == "site" and entry.manifest == manifest
    assert parse_manifest(json.loads((entry.directory / "manifest.json").read_text())) == manifest
    model = registry.load("tiny@1")
    assert isinstance(model, PatchClassifier)
    tiles = np.random.default_rng(0).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    probabilities = classify_tiles(model, tiles)
    assert probabilities.shape == (5, 2)
    np.testing.assert_allclose(probabilities.sum(1), 1, rtol=1e-5)
    # Deterministic: the same input gives identical output.
    np.testing.assert_array_equal(probabilities, classify_tiles(registry.load("tiny"), tiles))


def test_versions_and_default(registry):
    add_tiny_model(registry, version=1)
    add_tiny_model(registry, version=2, seed=1)
    assert registry.next_version("tiny") == 3
    assert registry.default_version("tiny") == 2  # no bundled, none promoted: the highest
    with pytest.raises(ManifestError, match="already exists"):
        add_tiny_model(registry, version=2)
    with pytest.raises(ModelNotFoundError):
        registry.resolve("tiny@7")
    with pytest.raises(ModelNotFoundError):
        registry.resolve("nope")


def test_tampered_weights_are_refused_before_the_model_is_built(registry):
    add_tiny_model(registry)
    entry = registry.resolve("tiny")
    data = bytearray(entry.weights_path.read_bytes())
    data[-10] ^= 0xFF
    entry.weights_path.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="sha256"):
        registry.load("tiny")
    with pytest.raises(WeightsIntegrityError):
        registry.verify(entry)


def test_pickle_weights_are_refused(registry, tmp_path):
    data = tiny_manifest().to_json()
    data["weights"] = {"file": "weights.pt", "sha256": "0" * 64}
    with pytest.raises(ManifestError, match="safetensors"):
        parse_manifest(data)
    checkpoint = tmp_path / "model.pth"
    torch.save(build_module(tiny_manifest()).state_dict(), checkpoint)
    with pytest.raises(UnsafeWeightsError, match="allow-pickle-conversion"):
        import_model(registry, checkpoint, manifest_path=None)


def test_pickle_conversion_on_request_records_the_source_digest(registry, tmp_path):
    import hashlib

    module = build_module(tiny_manifest())
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in module.state_dict().items()}}, checkpoint)
    template = tmp_path / "m.json"
    data = tiny_manifest(name="imported").to_json()
    del data["weights"], data["version"]
    template.write_text(json.dumps(data))
    entry = import_model(registry, checkpoint, manifest_path=template, allow_pickle_conversion=True)
    assert entry.manifest.ref == "imported@1"
    assert entry.manifest.lineage.source_digest == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert entry.weights_path.suffix == ".safetensors"
    loaded = registry.load("imported")
    for key, value in module.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[key], value)


class _Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_malicious_pickle_does_not_run_even_with_conversion(registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "evil.pt"
    checkpoint.write_bytes(pickle.dumps({"weight": _Exploit()}))
    template = tmp_path / "m.json"
    template.write_text(json.dumps(tiny_manifest().to_json()))
    with pytest.raises(UnsafeWeightsError):
        import_model(registry, checkpoint, manifest_path=template, allow_pickle_conversion=True)
    assert not (tmp_path / "PWNED").exists()


def test_weights_that_do_not_fit_the_architecture_are_refused(registry, tmp_path):
    from models._weights import sha256_bytes, state_dict_to_safetensors

    weights = state_dict_to_safetensors({"bogus": torch.zeros(3)})
    manifest = replace(tiny_manifest(), weights_sha256=sha256_bytes(weights))
    registry.add(manifest, weights)
    with pytest.raises(ManifestError, match="do not fit"):
        registry.load("tiny")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("name", "Bad Name", "lower-case"),
        ("version", 0, "positive"),
        ("version", "1", "wrong type"),
        ("classes", [{"name": "a", "color": "#fff"}], "rrggbb"),
        ("classes", [{"name": "a", "color": "#ffffff"}], "two classes"),
        ("tile_size_px", 2, "out of range"),
        ("schema", "other/9", "schema"),
    ],
)
def test_manifest_schema_is_enforced(field, value, match):
    data = tiny_manifest().to_json()
    data[field] = value
    with pytest.raises(ManifestError, match=match):
        parse_manifest(data)


def test_promote_needs_validation_that_meets_thresholds_and_keeps_rollback(registry):
    add_tiny_model(registry, version=1)
    add_tiny_model(registry, version=2, seed=3)
    with pytest.raises(AcceptanceError, match="no validation"):
        registry.promote("tiny@1", AcceptanceThresholds())
    good = Validation("2026-01-01", "test", None, {"accuracy": 0.95, "balanced_accuracy": 0.93, "ece": 0.04})
    bad = Validation("2026-01-01", "test", None, {"accuracy": 0.7, "balanced_accuracy": 0.6, "ece": 0.3})
    registry.record_validation(registry.resolve("tiny@1"), good)
    registry.record_validation(registry.resolve("tiny@2"), bad)
    entry, previous = registry.promote("tiny@1", AcceptanceThresholds())
    assert entry.manifest.version == 1 and previous == 2
    assert registry.default_version("tiny") == 1
    with pytest.raises(AcceptanceError, match="balanced_accuracy 0.600"):
        registry.promote("tiny@2", AcceptanceThresholds())
    assert registry.resolve("tiny@2").manifest.version == 2  # the other version stays available
    with pytest.raises(ReadOnlyModelError, match="promoted default"):
        registry.remove("tiny@1")
    registry.remove("tiny@2")
    assert [e.manifest.ref for e in registry.entries() if e.source == "site"] == ["tiny@1"]


# --- registry trust: authenticated promotion records and defaults, links, broken manifests ---

GOOD = Validation("2026-01-01", "test", None, {"accuracy": 0.95, "balanced_accuracy": 0.93, "ece": 0.04})


def _promoted(registry, version=1):
    add_tiny_model(registry, version=version, seed=version)
    registry.record_validation(registry.resolve(f"tiny@{version}"), GOOD)
    registry.promote(f"tiny@{version}", AcceptanceThresholds())


def test_a_promoted_model_swapped_with_a_re_pinned_sha256_is_refused(registry):
    from models import RegistryIntegrityError
    from models._weights import sha256_bytes, state_dict_to_safetensors

    _promoted(registry)
    add_tiny_model(registry, version=2, seed=5)
    entry = registry.resolve("tiny@1")
    torch.manual_seed(9)
    weights = state_dict_to_safetensors(build_module(entry.manifest).state_dict())
    entry.weights_path.write_bytes(weights)
    data = json.loads((entry.directory / "manifest.json").read_text())
    data["weights"]["sha256"] = sha256_bytes(weights)
    (entry.directory / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(RegistryIntegrityError, match="changed since it was promoted"):
        registry.load("tiny")
    with pytest.raises(RegistryIntegrityError):
        registry.verify(registry.entries()[0])
    assert registry.load("tiny@2").manifest.version == 2  # the other version is unaffected


def test_edited_metrics_of_a_promoted_model_are_refused(registry):
    from models import RegistryIntegrityError

    _promoted(registry)
    path = registry.resolve("tiny@1").directory / "manifest.json"
    data = json.loads(path.read_text())
    data["validation"]["metrics"]["balanced_accuracy"] = 0.99
    path.write_text(json.dumps(data))
    with pytest.raises(RegistryIntegrityError, match="changed since it was promoted"):
        registry.resolve("tiny")


def test_metrics_edited_before_promotion_are_refused_at_promote(registry):
    from models import RegistryIntegrityError

    add_tiny_model(registry)
    bad = Validation("2026-01-01", "test", None, {"accuracy": 0.5, "balanced_accuracy": 0.5, "ece": 0.3})
    registry.record_validation(registry.resolve("tiny@1"), bad)
    path = registry.resolve("tiny@1").directory / "manifest.json"
    data = json.loads(path.read_text())
    data["validation"]["metrics"] = dict(GOOD.metrics)
    path.write_text(json.dumps(data))
    with pytest.raises(RegistryIntegrityError, match="differ from the validation recorded"):
        registry.promote("tiny@1", AcceptanceThresholds())


def test_a_hand_written_defaults_file_is_refused_and_the_bundled_model_keeps_working(tmp_path):
    from models import RegistryIntegrityError

    registry = Registry(site_root=tmp_path / "site-models")
    add_tiny_model(registry, version=1)
    add_tiny_model(registry, version=2, seed=2)
    (registry.site_root / "defaults.json").write_text(json.dumps({"tiny": {"default": 1, "history": []}}))
    with pytest.raises(RegistryIntegrityError, match="not authenticated"):
        registry.resolve("tiny")
    with pytest.raises(RegistryIntegrityError):
        registry.promote("tiny@1", AcceptanceThresholds())
    assert registry.resolve("tissue-qc").source == "bundled"  # falls back to the bundled version
    with pytest.raises(RegistryIntegrityError):
        registry.resolve("tiny@2")  # whether a site version was promoted cannot be told: refused too
    # Copied from another site (a valid record, another secret): refused too.
    other = Registry(site_root=tmp_path / "other", secret=b"o" * 32)
    add_tiny_model(other)
    other.record_validation(other.resolve("tiny@1"), GOOD)
    other.promote("tiny@1", AcceptanceThresholds())
    (registry.site_root / "defaults.json").write_bytes((other.site_root / "defaults.json").read_bytes())
    with pytest.raises(RegistryIntegrityError, match="does not match this site's secret"):
        registry.resolve("tiny")


def test_links_out_of_the_registry_are_refused(registry, tmp_path):
    from models import RegistryIntegrityError

    outside = Registry(site_root=tmp_path / "elsewhere", secret=b"e" * 32)
    add_tiny_model(outside, name="linked")
    (registry.site_root / "linked").mkdir(parents=True)
    (registry.site_root / "linked" / "1").symlink_to(outside.resolve("linked@1").directory)
    add_tiny_model(registry, name="tiny")
    [broken] = registry.broken()
    assert broken.ref == "linked@1" and isinstance(broken.error, RegistryIntegrityError)
    with pytest.raises(RegistryIntegrityError, match="leaves the registry"):
        registry.resolve("linked@1")
    # A weights file linked to a file outside: refused although its sha256 matches.
    entry = registry.resolve("tiny@1")
    copy = tmp_path / "outside.safetensors"
    copy.write_bytes(entry.weights_path.read_bytes())
    entry.weights_path.unlink()
    entry.weights_path.symlink_to(copy)
    with pytest.raises(RegistryIntegrityError, match="weights of tiny@1 are a link"):
        registry.load("tiny@1")
    assert registry.resolve("tissue-qc").source == "bundled"


def test_an_unparsable_manifest_breaks_only_its_own_model(registry):
    add_tiny_model(registry, name="good")
    add_tiny_model(registry, name="bad")
    (registry.site_root / "bad" / "1" / "manifest.json").write_text("{not json")
    assert [b.ref for b in registry.broken()] == ["bad@1"]
    assert {e.manifest.ref for e in registry.entries()} >= {"good@1", "tissue-qc@1"}
    assert registry.load("good").manifest.ref == "good@1"
    assert registry.resolve("tissue-qc").source == "bundled"
    with pytest.raises(ManifestError, match="bad@1: manifest is not valid JSON"):
        registry.resolve("bad@1")
    registry.remove("bad@1")  # removing is how it is cleared
    assert registry.broken() == []


def test_the_last_site_version_can_be_removed_with_confirmation(registry):
    _promoted(registry)
    with pytest.raises(ReadOnlyModelError, match="last site version"):
        registry.remove("tiny@1")
    registry.remove("tiny@1", confirm_last=True)
    assert not any(e.manifest.name == "tiny" for e in registry.entries())
    assert registry.promotions("tiny") == []
    assert registry.next_version("tiny") == 2  # a removed version number is not reused


def test_promote_names_the_true_previous_default(registry):
    add_tiny_model(registry, version=1)
    add_tiny_model(registry, version=2, seed=2)
    for version in (1, 2):
        registry.record_validation(registry.resolve(f"tiny@{version}"), GOOD)
    assert registry.promote("tiny@2", AcceptanceThresholds())[1] is None  # 2 was already the default
    assert registry.promote("tiny@1", AcceptanceThresholds())[1] == 2
    assert registry.promote("tiny@2", AcceptanceThresholds())[1] == 1
    with pytest.raises(ReadOnlyModelError, match="has been promoted"):
        registry.record_validation(registry.resolve("tiny@2"), GOOD)


def test_a_deleted_defaults_file_is_noticed(registry):
    from models import RegistryIntegrityError

    _promoted(registry)
    (registry.site_root / "defaults.json").unlink()
    with pytest.raises(RegistryIntegrityError, match="missing, but this registry has had one since"):
        registry.resolve("tiny")
    assert registry.resolve("tissue-qc").source == "bundled"
