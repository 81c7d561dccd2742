"""``wsiflow models|train|validate`` as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import Registry
from pipeline import content_digest
from tests._models import add_tiny_model
from tests.conftest import shared_file

LIST_KEYS = {"name", "version", "sha256", "classes", "target_mpp", "tile_size_px"}


@pytest.fixture
def site(tmp_path):
    """A private site registry holding a tiny model; env for CLI subprocesses."""
    root = tmp_path / "site-models"
    add_tiny_model(Registry(site_root=root))
    return root, {**os.environ, "WSIFLOW_MODELS_DIR": str(root)}


def _run(cli, *args, env=None, cwd=None):
    return subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


@pytest.mark.slow
def test_list_show_verify(wsiflow_cli, site):
    _, env = site
    result = _run(wsiflow_cli, "models", "list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = {row["ref"]: row for row in json.loads(result.stdout)}
    assert "tiny@1" in rows and "tissue-qc@1" in rows and "tissue-qc@2" in rows
    for row in rows.values():
        assert LIST_KEYS <= row.keys()
    assert rows["tissue-qc@2"]["source"] == "bundled" and rows["tissue-qc@2"]["default"] and not rows["tissue-qc@1"]["default"]
    assert rows["tissue-qc@2"]["classes"] == ["background", "tissue", "pen", "blur"]
    shown = json.loads(_run(wsiflow_cli, "models", "show", "tissue-qc", "--json", env=env).stdout)
    assert shown["weights"]["file"].endswith(".safetensors") and shown["validation"]["metrics"]["accuracy"] > 0
    verify = _run(wsiflow_cli, "models", "verify", "--json", env=env)
    assert verify.returncode == 0, verify.stderr
    assert all(r["ok"] for r in json.loads(verify.stdout))


@pytest.mark.slow
def test_verify_reports_tampering_with_exit_1(wsiflow_cli, site, tmp_path):
    root, env = site
    env = {**env, "WSIFLOW_HOME": str(tmp_path / "audit-site")}  # its own audit log
    weights = root / "tiny" / "1" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    result = _run(wsiflow_cli, "models", "verify", "tiny", env=env)
    assert result.returncode == 1
    assert "weights-tampered" in result.stderr and "Traceback" not in result.stderr
    predict = _run(wsiflow_cli, "models", "predict", "tiny", shared_file("images/he-tile-240px.png"), env=env)
    assert predict.returncode == 1 and "weights-tampered" in predict.stderr
    from privacy import read_audit_log

    [event] = [e for e in read_audit_log(tmp_path / "audit-site") if e["action"] == "model-verify"]
    assert event["outcome"] == "failed:weights-tampered" and event["model_digest"]


def test_bundled_model_cannot_be_removed(wsiflow_cli, site):
    _, env = site
    result = _run(wsiflow_cli, "models", "remove", "tissue-qc@1", env=env)
    assert result.returncode == 1 and "read-only-model" in result.stderr


@pytest.mark.slow
def test_predict_with_the_bundled_model(wsiflow_cli, site, tmp_path):
    _, env = site
    tile = shared_file("images/he-tile-240px.png")  # real H&E at ~0.5 µm/px
    glass = tmp_path / "glass.png"
    rng = np.random.default_rng(0)
    Image.fromarray(np.clip(rng.normal(238, 2, (224, 224, 3)), 0, 255).astype(np.uint8)).save(glass)
    result = _run(wsiflow_cli, "models", "predict", "tissue-qc", tile, glass, "--mpp", "0.5", "--json", env=env)
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)
    assert first["image"] == str(tile) and first["class"] == "tissue"
    assert second["class"] == "background"
    assert set(first["probabilities"]) == {"background", "tissue", "pen", "blur"}
    assert sum(first["probabilities"].values()) == pytest.approx(1, abs=1e-4)


def _geojson(path, features):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation", "classification": {"name": name}}}
        for name, ring in features
    ]}))
    return path


def _box(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


@pytest.mark.slow
def test_finetune_validate_promote(wsiflow_cli, site, tmp_path, cmu_svs):
    root, env = site
    annotations = _geojson(tmp_path / "cmu.geojson", [
        ("tissue", _box(700, 1500, 1700, 2800)),
        ("background", _box(0, 0, 450, 900)),
    ])
    trained = _run(
        wsiflow_cli, "train", "--slides", cmu_svs, "--annotations", annotations, "--base", "tiny",
        "--name", "tiny-site", "--epochs", "2", "--per-class", "12", "--json", env=env,
    )
    assert trained.returncode == 0, trained.stderr
    result = json.loads(trained.stdout)
    assert result["ref"] == "tiny-site@1" and result["parent"] == "tiny@1"
    registry = Registry(site_root=root)
    entry = registry.resolve("tiny-site@1")
    lineage = entry.manifest.lineage
    assert lineage.parent_sha256 == registry.resolve("tiny@1").manifest.weights_sha256
    assert lineage.slide_digests == (content_digest(cmu_svs),)
    assert len(lineage.annotation_digests) == 1 and lineage.training_data_digest
    manifest_text = (entry.directory / "manifest.json").read_text()
    assert cmu_svs.name not in manifest_text and "cmu.geojson" not in manifest_text
    base_sd = registry.load("tiny@1").module.state_dict()
    new_sd = registry.load("tiny-site@1").module.state_dict()
    assert any(not np.array_equal(base_sd[k].numpy(), new_sd[k].numpy()) for k in base_sd if base_sd[k].is_floating_point())

    # Validating on the training slide: a warning, and never recorded.
    out = tmp_path / "report"
    refused = _run(
        wsiflow_cli, "validate", "tiny-site@1", "--slides", cmu_svs, "--annotations", annotations,
        "--per-class", "10", "--out", out, "--record", "--json", env=env,
    )
    assert refused.returncode == 1 and "validation-overlap" in refused.stderr and "1 of the 1" in refused.stderr
    validated = _run(
        wsiflow_cli, "validate", "tiny-site@1", "--slides", cmu_svs, "--annotations", annotations,
        "--per-class", "10", "--out", out, "--json", env=env,
    )
    assert validated.returncode == 0, validated.stderr
    assert "warning" in validated.stderr and "optimistic" in validated.stderr
    report = json.loads(validated.stdout)
    assert report["metrics"]["n"] == 20 and not report["recorded"]
    for name in ("validation.json", "validation.png", "validation.html"):
        assert (out / name).stat().st_size > 0
    assert registry.resolve("tiny-site@1").manifest.validation is None
    recorded = _run(wsiflow_cli, "validate", "tiny-site@1", "--patches", _patch_folder(tmp_path / "patches"),
                    "--out", tmp_path / "r2", "--record", "--json", env=env)
    assert recorded.returncode == 0, recorded.stderr
    assert registry.resolve("tiny-site@1").manifest.validation is not None
    from privacy import read_audit_log

    digest = entry.manifest.weights_sha256
    events = [(e["action"], e["outcome"]) for e in read_audit_log(Path(os.environ["WSIFLOW_HOME"]))
              if e["model_digest"] == digest or e["outcome"].endswith("validate-record")][-3:]
    assert events == [("model-train", "ok"), ("model-validate", "failed:validation-overlap;step=validate-record"),
                      ("model-validate", "ok;step=validate-record")]

    strict = tmp_path / "strict.yaml"
    strict.write_text("models: {acceptance: {min_balanced_accuracy: 1.01}}\n")
    refused = _run(wsiflow_cli, "--config", strict, "models", "promote", "tiny-site@1", env=env)
    assert refused.returncode == 1 and "not-accepted" in refused.stderr
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text("models: {acceptance: {min_balanced_accuracy: 0.0, max_ece: 1.0}}\n")
    promoted = _run(wsiflow_cli, "--config", lenient, "models", "promote", "tiny-site@1", "--json", env=env)
    assert promoted.returncode == 0, promoted.stderr
    assert registry.default_version("tiny-site") == 1


def _patch_folder(folder):
    for name, colour in (("background", 240), ("tissue", 150)):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((64, 64, 3), colour + i, np.uint8)).save(folder / name / f"{i}.png")
    return folder


@pytest.mark.slow
def test_validate_on_a_labelled_patch_folder(wsiflow_cli, site, tmp_path):
    _, env = site
    folder = _patch_folder(tmp_path / "patches")
    result = _run(wsiflow_cli, "validate", "tiny", "--patches", folder, "--out", tmp_path / "r", "--json", env=env)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["n"] == 6 and len(metrics["confusion_matrix"]) == 2
    (folder / "tumour").mkdir()
    bad = _run(wsiflow_cli, "validate", "tiny", "--patches", folder, "--out", tmp_path / "r2", env=env)
    assert bad.returncode == 1 and "tumour" in bad.stderr


@pytest.mark.slow
def test_signed_bundle_workflow(wsiflow_cli, site, tmp_path):
    """Publisher: keygen, pack. Site: trust, install (a candidate), promote refused, validate
    --record, promote, rollback; the last version removed with --yes; every step audited."""
    from privacy import read_audit_log

    _, env = site
    home, root = tmp_path / "home", tmp_path / "bundle-site-models"  # a site of its own: secret, audit log
    publisher_env = {**env, "WSIFLOW_MODELS_DIR": str(tmp_path / "publisher-models"),
                     "WSIFLOW_HOME": str(tmp_path / "publisher-home")}
    env = {**env, "WSIFLOW_HOME": str(home), "WSIFLOW_MODELS_DIR": str(root)}
    add_tiny_model(Registry(site_root=root, secret=_secret(home)))
    publisher = Registry(site_root=tmp_path / "publisher-models", secret=_secret(tmp_path / "publisher-home"))
    add_tiny_model(publisher, version=2, seed=2)
    (publisher.resolve("tiny@2").directory / "MODEL_CARD.md").write_text("# tiny 2\n")

    keygen = _run(wsiflow_cli, "models", "keygen", "--out", tmp_path / "acme.pem", env=publisher_env)
    assert keygen.returncode == 0, keygen.stderr
    assert "SHA256:" in keygen.stdout and (tmp_path / "acme.pub").exists()
    bundle = tmp_path / "tiny-2.wsimodel"
    packed = _run(wsiflow_cli, "models", "pack", "tiny@2", "--key", tmp_path / "acme.pem", "--out", bundle,
                  env=publisher_env)
    assert packed.returncode == 0, packed.stderr

    untrusted = _run(wsiflow_cli, "models", "install", bundle, env=env)
    assert untrusted.returncode == 1 and "bundle-untrusted" in untrusted.stderr
    assert len(untrusted.stderr.strip().splitlines()) == 1 and "Traceback" not in untrusted.stderr
    trusted = _run(wsiflow_cli, "models", "trust", "add", tmp_path / "acme.pub", "--name", "acme", env=env)
    assert trusted.returncode == 0, trusted.stderr
    listed = json.loads(_run(wsiflow_cli, "models", "trust", "list", "--json", env=env).stdout)
    assert [k["name"] for k in listed] == ["acme"] and listed[0]["fingerprint"].startswith("SHA256:")
    installed = _run(wsiflow_cli, "models", "install", bundle, "--json", env=env)
    assert installed.returncode == 0, installed.stderr
    assert json.loads(installed.stdout)["candidate"] is True
    rows = {r["ref"]: r for r in json.loads(_run(wsiflow_cli, "models", "list", "--json", env=env).stdout)}
    assert rows["tiny@2"]["candidate"] and not rows["tiny@2"]["default"] and rows["tiny@1"]["default"]

    lenient = tmp_path / "lenient.yaml"
    lenient.write_text("models: {acceptance: {min_balanced_accuracy: 0.0, max_ece: 1.0}}\n")
    refused = _run(wsiflow_cli, "--config", lenient, "models", "promote", "tiny@2", env=env)
    assert refused.returncode == 1 and "not-accepted" in refused.stderr and "on this site" in refused.stderr
    validated = _run(wsiflow_cli, "validate", "tiny@2", "--patches", _patch_folder(tmp_path / "patches"),
                     "--out", tmp_path / "r", "--record", env=env)
    assert validated.returncode == 0, validated.stderr
    promoted = _run(wsiflow_cli, "--config", lenient, "models", "promote", "tiny@2", env=env)
    assert promoted.returncode == 0, promoted.stderr
    assert "previous default: tiny@1" in promoted.stdout
    rolled = _run(wsiflow_cli, "models", "rollback", "tiny", "--json", env=env)
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout) == {"name": "tiny", "previous_default": 2, "default": 1}

    removed = _run(wsiflow_cli, "models", "remove", "tiny@2", env=env)
    assert removed.returncode == 0, removed.stderr
    last = _run(wsiflow_cli, "models", "remove", "tiny@1", env=env)
    assert last.returncode == 1 and "--yes" in last.stderr
    assert _run(wsiflow_cli, "models", "remove", "tiny@1", "--yes", env=env).returncode == 0

    outcomes = [(e["action"], e["outcome"]) for e in read_audit_log(home)]
    assert outcomes == [
        ("model-install", "failed:bundle-untrusted"),
        ("model-trust", "ok;step=trust-add"),
        ("model-install", "ok"),
        ("model-promote", "failed:not-accepted"),
        ("model-validate", "ok;step=validate-record"),
        ("model-promote", "ok"),
        ("model-rollback", "ok"),
        ("model-remove", "ok"),
        ("model-remove", "failed:read-only-model"),
        ("model-remove", "ok"),
    ]


def _secret(home):
    from pipeline import site_secret

    return site_secret(home)


@pytest.mark.slow
def test_list_shows_a_broken_manifest_and_the_rest_still_run(wsiflow_cli, site, tmp_path):
    root, env = site
    add_tiny_model(Registry(site_root=root), name="bad")
    (root / "bad" / "1" / "manifest.json").write_text("{not json")
    listed = _run(wsiflow_cli, "models", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "! bad@1" in listed.stdout and "BROKEN bad-manifest" in listed.stdout and "tiny@1" in listed.stdout
    tile = shared_file("images/he-tile-240px.png")
    predict = _run(wsiflow_cli, "models", "predict", "tissue-qc", tile, "--mpp", "0.5", env=env)
    assert predict.returncode == 0, predict.stderr
    bad = _run(wsiflow_cli, "models", "predict", "bad@1", tile, env=env)
    assert bad.returncode == 1 and "bad-manifest" in bad.stderr
    verify = _run(wsiflow_cli, "models", "verify", env=env)
    assert verify.returncode == 1 and "bad@1: error bad-manifest" in verify.stderr
    assert "tiny@1: ok" in verify.stdout and "tissue-qc@1: ok" in verify.stdout
