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
