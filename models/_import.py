"""``models import``: bring a model into the site registry, converting pickles only on request."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from pipeline import ConfigError

from ._errors import ManifestError, UnsafeWeightsError, WeightsIntegrityError
from ._loading import build_module
from ._manifest import MANIFEST_NAME, Lineage, now_iso, parse_manifest, read_manifest
from ._registry import ModelEntry, Registry
from ._weights import (
    PICKLE_SUFFIXES,
    check_safetensors,
    read_verified_weights,
    read_weights_file,
    sha256_bytes,
    state_dict_from_pickle,
    state_dict_from_safetensors,
    state_dict_to_safetensors,
)

__all__ = ["import_model"]


def _read_source(source: Path) -> bytes:
    """The bytes of the file to import (a regular file, read to its size)."""
    try:
        return read_weights_file(source, what="the file to import")
    except WeightsIntegrityError as exc:  # nothing is pinned yet: the offered file is what is unsafe
        raise UnsafeWeightsError(
            exc.message,
            hint="give a model folder, a .safetensors file or a checkpoint that is a regular file",
        ) from None


def _template(path: Path | None, weights_sha: str, registry: Registry) -> dict:
    if path is None:
        raise ManifestError(
            "importing bare weights needs a manifest describing them",
            hint=(
                "pass --manifest M.json "
                "(name, architecture, classes, tile_size_px, target_mpp, normalization, intended_use)"
            ),
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"the manifest is not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise ManifestError("the manifest must be a JSON object")
    data.setdefault("schema", "wsiflow.model/1")
    data.setdefault("created_at", now_iso())
    if "version" not in data and isinstance(data.get("name"), str):
        data["version"] = registry.next_version(data["name"])
    data["weights"] = {"file": "weights.safetensors", "sha256": weights_sha}
    return data


def import_model(
    registry: Registry,
    source: Path,
    *,
    manifest_path: Path | None = None,
    allow_pickle_conversion: bool = False,
) -> ModelEntry:
    """Add a model to the site registry from a model folder, a .safetensors or a checkpoint."""
    if not os.path.lexists(source):
        raise ConfigError("the model to import does not exist", hint="check the SOURCE path")
    if source.is_dir():
        manifest = read_manifest(source / MANIFEST_NAME)
        weights = read_verified_weights(source / manifest.weights_file, manifest.weights_sha256)
        module = build_module(manifest)
        module.load_state_dict(state_dict_from_safetensors(weights), strict=True)
        return registry.add(manifest, weights)
    if source.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle_conversion:
            raise UnsafeWeightsError(
                f"{source.suffix} checkpoints are pickles; refusing without --allow-pickle-conversion"
            )
        source_digest = sha256_bytes(_read_source(source))
        state = state_dict_from_pickle(source)
        weights = state_dict_to_safetensors(state)
        manifest = parse_manifest(_template(manifest_path, sha256_bytes(weights), registry))
        manifest = replace(manifest, lineage=replace(manifest.lineage or Lineage(), source_digest=source_digest))
    elif source.suffix == ".safetensors":
        weights = _read_source(source)
        check_safetensors(weights)  # a renamed pickle or TorchScript is refused before anything else
        manifest = parse_manifest(_template(manifest_path, sha256_bytes(weights), registry))
    else:
        raise UnsafeWeightsError(
            f"cannot import {source.suffix or 'a file without suffix'}: "
            "give a model folder, .safetensors or a checkpoint"
        )
    module = build_module(manifest)
    try:
        module.load_state_dict(state_dict_from_safetensors(weights), strict=True)
    except RuntimeError as exc:
        raise ManifestError(f"the weights do not fit {manifest.timm_name!r}: {str(exc)[:300]}") from exc
    return registry.add(manifest, weights)
