"""A tiny timm model in a site registry, for fast registry/training tests."""

from __future__ import annotations

from pathlib import Path

import torch

from models import ClassInfo, ModelManifest, Registry, build_module
from models._manifest import now_iso
from models._weights import sha256_bytes, state_dict_to_safetensors

__all__ = ["tiny_manifest", "add_tiny_model", "add_tiny_model_with_tiles", "signed_zip", "bundle_members", "rezip"]


def tiny_manifest(name: str = "tiny", version: int = 1, classes: tuple[str, ...] = ("background", "tissue")) -> ModelManifest:
    palette = ("#cccccc", "#2ca02c", "#1f3fbf", "#ff7f0e")
    return ModelManifest(
        name=name,
        version=version,
        timm_name="test_efficientnet",
        classes=tuple(ClassInfo(c, palette[i % 4]) for i, c in enumerate(classes)),
        tile_size_px=64,
        target_mpp=4.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        weights_file="weights.safetensors",
        weights_sha256="0" * 64,
        intended_use="tests only",
        created_at=now_iso(),
    )


def add_tiny_model(registry: Registry, name: str = "tiny", version: int = 1, seed: int = 0) -> ModelManifest:
    from dataclasses import replace

    manifest = tiny_manifest(name, version)
    torch.manual_seed(seed)
    weights = state_dict_to_safetensors(build_module(manifest).state_dict())
    manifest = replace(manifest, weights_sha256=sha256_bytes(weights))
    registry.add(manifest, weights)
    return manifest


def registry_at(path: Path) -> Registry:
    return Registry(site_root=path)


def add_tiny_model_with_tiles(registry: Registry, name: str, tile_size_px: int, target_mpp: float,
                              seed: int = 0) -> ModelManifest:
    """The tiny model, taking ``tile_size_px`` px tiles at ``target_mpp`` µm/px (e.g. 4096 px tiles)."""
    from dataclasses import replace

    manifest = replace(tiny_manifest(name), tile_size_px=tile_size_px, target_mpp=target_mpp)
    torch.manual_seed(seed)
    weights = state_dict_to_safetensors(build_module(manifest).state_dict())
    manifest = replace(manifest, weights_sha256=sha256_bytes(weights))
    registry.add(manifest, weights)
    return manifest


def signed_zip(members: dict[str, bytes], key_path: Path, out: Path, *, statement_edit=None,
               extra: dict[str, bytes] | None = None) -> Path:
    """A bundle signed with ``key_path`` over exactly ``members`` (then ``extra`` added unsigned):
    for tests that need a bundle ``pack`` would never write."""
    import base64
    import hashlib
    import json
    import zipfile

    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from models._bundle import BUNDLE_FORMAT
    from models._manifest import SCHEMA
    from models._sealing import canonical_json
    from models._trust import fingerprint

    key = load_pem_private_key(key_path.read_bytes(), password=None)
    manifest = json.loads(members["manifest.json"])
    statement = {
        "format": BUNDLE_FORMAT, "schema": SCHEMA, "name": manifest["name"], "version": manifest["version"],
        "publisher": fingerprint(key.public_key()), "created_at": "2026-01-01T00:00:00+00:00",
        "members": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in members.items()},
    }
    if statement_edit:
        statement_edit(statement)
    signature = base64.b64encode(key.sign(canonical_json(statement))).decode()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in {**members, **(extra or {})}.items():
            archive.writestr(name, data)
        archive.writestr("signature.json", json.dumps({"statement": statement, "signature": signature}))
    return out


def bundle_members(path: Path) -> dict[str, bytes]:
    """The members of a bundle (signature.json included)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def rezip(members: dict[str, bytes], out: Path) -> Path:
    import zipfile

    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out
