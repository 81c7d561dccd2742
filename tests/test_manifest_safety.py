"""A model manifest cannot make wsiflow go online or read a file (issue 14, item 7).

Only plain timm architecture names and an allow-list of constructor arguments with plain
values reach timm: ``hf-hub:``/``local-dir:`` names, ``checkpoint_path``, ``pretrained``,
``pretrained_cfg(_overlay)`` and path-like values are refused with a ManifestError naming
the field, when the manifest is read and again when the module is built.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import numpy as np
import pytest

from models import BUNDLED_ROOT, ManifestError, Registry, build_module, parse_manifest
from pipeline import classify_tiles
from tests._models import add_tiny_model, tiny_manifest

SECRET_DIR = "/srv/models/ZQXMODELSECRET"


def _with_architecture(timm_name: str | None = None, **kwargs: object) -> dict:
    data = tiny_manifest().to_json()
    if timm_name is not None:
        data["architecture"]["timm_name"] = timm_name
    data["architecture"]["kwargs"] = kwargs
    return data


@pytest.mark.parametrize(
    ("timm_name", "match"),
    [
        ("hf-hub:timm/resnet18.a1_in1k", "Hugging Face Hub reference"),
        ("hf_hub:timm/resnet18.a1_in1k", "Hugging Face Hub reference"),
        ("HF-HUB:timm/resnet18", "Hugging Face Hub reference"),
        (f"local-dir:{SECRET_DIR}", "local-dir reference"),
        (SECRET_DIR, "not a plain timm architecture name"),
        ("../ZQXMODELSECRET", "not a plain timm architecture name"),
        ("C:\\models\\ZQXMODELSECRET", "not a plain timm architecture name"),
        ("timm/resnet18", "not a plain timm architecture name"),
        ("ResNet18", "not a plain timm architecture name"),
        ("resnet18\n", "not a plain timm architecture name"),
        ("resnet18.a1.b2", "not a plain timm architecture name"),
    ],
)
def test_only_plain_timm_names_are_accepted(timm_name, match):
    with pytest.raises(ManifestError, match=match) as caught:
        parse_manifest(_with_architecture(timm_name))
    assert "architecture.timm_name" in str(caught.value)
    assert "ZQXMODELSECRET" not in caught.value.one_line()  # a refused path is never echoed


@pytest.mark.parametrize(
    ("kwargs", "field", "match"),
    [
        ({"checkpoint_path": f"{SECRET_DIR}/evil.pth"}, "checkpoint_path", "load a file"),
        ({"pretrained": True}, "pretrained", "download"),
        ({"pretrained_cfg": {"file": f"{SECRET_DIR}/w.bin"}}, "pretrained_cfg", "weights"),
        ({"pretrained_cfg_overlay": {"file": f"{SECRET_DIR}/w.bin"}}, "pretrained_cfg_overlay", "weights"),
        ({"pretrained_cfg_overlay": {"hf_hub_id": "timm/resnet18.a1_in1k"}}, "pretrained_cfg_overlay", "hub"),
        ({"cache_dir": SECRET_DIR}, "cache_dir", "download cache"),
        ({"num_classes": 7}, "num_classes", "classes"),
        ({"features_only": True}, "features_only", "not an allowed"),
        ({"drop_rate": SECRET_DIR}, "drop_rate", "must be a number"),
        ({"drop_rate": True}, "drop_rate", "must be a number"),
        ({"drop_path_rate": 1.5}, "drop_path_rate", "must be a number"),
        ({"global_pool": f"..{SECRET_DIR}"}, "global_pool", "must be one of"),
        ({"in_chans": 4}, "in_chans", "must be 3"),
        ({"img_size": [224, 224]}, "img_size", "whole number"),
    ],
)
def test_constructor_arguments_come_from_an_allow_list(kwargs, field, match):
    with pytest.raises(ManifestError, match=match) as caught:
        parse_manifest(_with_architecture(**kwargs))
    assert f"architecture.kwargs.{field}" in str(caught.value)
    assert "ZQXMODELSECRET" not in caught.value.one_line()


def test_allowed_arguments_build_the_architecture():
    data = _with_architecture(drop_rate=0.1, drop_path_rate=0.05, global_pool="max", in_chans=3)
    module = build_module(parse_manifest(data))
    assert module.global_pool.pool_type == "max"
    assert module.num_classes == 2


def test_a_manifest_made_in_code_is_checked_too():
    with pytest.raises(ManifestError, match="architecture.timm_name"):
        replace(tiny_manifest(), timm_name="hf-hub:timm/resnet18.a1_in1k")
    with pytest.raises(ManifestError, match="architecture.kwargs.checkpoint_path"):
        replace(tiny_manifest(), timm_kwargs={"checkpoint_path": "/x.pth"})


def test_building_checks_again_and_never_unpickles(tmp_path):
    """A manifest's kwargs changed after it was checked still never reach timm: a pickle
    that would leave a marker when loaded stays unloaded."""
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    checkpoint = tmp_path / "evil.pth"
    checkpoint.write_bytes(pickle.dumps(Payload()))
    manifest = tiny_manifest()
    manifest.timm_kwargs["checkpoint_path"] = str(checkpoint)  # the dict is the manifest's own
    with pytest.raises(ManifestError, match="architecture.kwargs.checkpoint_path"):
        build_module(manifest)
    assert not marker.exists()


def test_an_architecture_timm_does_not_have_is_refused_before_building():
    with pytest.raises(ManifestError, match="not an architecture of the installed timm"):
        build_module(parse_manifest(_with_architecture("no_such_architecture_xyz")))


def test_a_site_registry_manifest_with_a_checkpoint_path_is_refused(tmp_path):
    registry = Registry(site_root=tmp_path / "site-models")
    entry = registry.resolve(f"{add_tiny_model(registry).name}@1")
    path = entry.directory / "manifest.json"
    data = json.loads(path.read_text())
    data["architecture"]["kwargs"] = {"checkpoint_path": str(tmp_path / "evil.pth")}
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="architecture.kwargs.checkpoint_path"):
        Registry(site_root=tmp_path / "site-models").load("tiny@1")


def test_the_bundled_models_still_load():
    manifests = sorted(BUNDLED_ROOT.glob("*/*/manifest.json"))
    assert manifests, "no bundled model found"
    registry = Registry(site_root=None)
    for path in manifests:
        manifest = parse_manifest(json.loads(path.read_text()))
        model = registry.load(manifest.ref)
        size = manifest.tile_size_px
        tiles = np.full((2, size, size, 3), 200, dtype=np.uint8)
        probabilities = classify_tiles(model, tiles)
        assert probabilities.shape == (2, len(manifest.classes))
