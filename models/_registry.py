"""The local model registry: bundled models (read-only, in the package) and the site's.

Layout of both: ``ROOT/NAME/VERSION/manifest.json`` plus the weights file it names. The
site root also holds ``defaults.json``: the promoted default version of each name and the
history of promotions (for rollback). References are ``NAME`` (its default version) or
``NAME@VERSION``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import site_dir

from ._errors import AcceptanceError, ManifestError, ModelNotFoundError, ReadOnlyModelError
from ._loading import LoadedModel, load_model_from_dir
from ._manifest import MANIFEST_NAME, ModelManifest, Validation, read_manifest, write_manifest
from ._weights import read_verified_weights, sha256_bytes

__all__ = [
    "BUNDLED_ROOT",
    "DEFAULT_MODEL",
    "AcceptanceThresholds",
    "ModelEntry",
    "Registry",
    "parse_ref",
    "site_models_dir",
]

BUNDLED_ROOT = Path(__file__).resolve().parent / "bundled"
DEFAULT_MODEL = "tissue-qc"
_DEFAULTS_NAME = "defaults.json"


def site_models_dir() -> Path:
    """``$WSIFLOW_MODELS_DIR``, else ``models/`` in the site directory."""
    configured = os.environ.get("WSIFLOW_MODELS_DIR")
    return Path(configured) if configured else site_dir() / "models"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``name`` or ``name@version`` -> (name, version or None)."""
    name, _, version = ref.partition("@")
    if not name:
        raise ModelNotFoundError(f"empty model reference {ref!r}", hint="use NAME or NAME@VERSION")
    if not version:
        return name, None
    try:
        return name, int(version.removeprefix("v"))
    except ValueError:
        raise ModelNotFoundError(
            f"model version {version!r} in {ref!r} is not a number", hint="use NAME@VERSION, e.g. tissue-qc@1"
        ) from None


@dataclass(frozen=True)
class AcceptanceThresholds:
    """What a model version's validation must reach before it may become the default."""

    min_accuracy: float = 0.0
    min_balanced_accuracy: float = 0.85
    max_ece: float = 0.15

    def failures(self, metrics: dict[str, Any]) -> list[str]:
        problems = []
        checks = (
            ("accuracy", self.min_accuracy, ">="),
            ("balanced_accuracy", self.min_balanced_accuracy, ">="),
            ("ece", self.max_ece, "<="),
        )
        for key, limit, op in checks:
            value = metrics.get(key)
            if not isinstance(value, (int, float)):
                problems.append(f"{key} was not measured")
            elif (op == ">=" and value < limit) or (op == "<=" and value > limit):
                problems.append(f"{key} {value:.3f} (needs {op} {limit})")
        return problems


@dataclass(frozen=True)
class ModelEntry:
    manifest: ModelManifest
    directory: Path
    source: Literal["bundled", "site"]

    @property
    def weights_path(self) -> Path:
        return self.directory / self.manifest.weights_file


class Registry:
    """Bundled plus site models. Reads are cheap; nothing is loaded until asked."""

    def __init__(self, site_root: Path | None = None, bundled_root: Path = BUNDLED_ROOT) -> None:
        self.site_root = site_root or site_models_dir()
        self.bundled_root = bundled_root

    # -- reading ---------------------------------------------------------------------
    def _scan(self, root: Path, source: Literal["bundled", "site"]) -> list[ModelEntry]:
        entries: list[ModelEntry] = []
        if not root.is_dir():
            return entries
        for manifest_path in sorted(root.glob(f"*/*/{MANIFEST_NAME}")):
            manifest = read_manifest(manifest_path)
            directory = manifest_path.parent
            if (directory.parent.name, directory.name) != (manifest.name, str(manifest.version)):
                raise ManifestError(
                    f"manifest {manifest.ref} is stored under {directory.parent.name}/{directory.name}",
                    hint="keep each version in NAME/VERSION/",
                )
            entries.append(ModelEntry(manifest, directory, source))
        return entries

    def entries(self) -> list[ModelEntry]:
        """Every model version, bundled first, then by name and version."""
        found = self._scan(self.bundled_root, "bundled") + self._scan(self.site_root, "site")
        return sorted(found, key=lambda e: (e.manifest.name, e.manifest.version, e.source))

    def _defaults(self) -> dict[str, Any]:
        path = self.site_root / _DEFAULTS_NAME
        if not path.exists():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))

    def default_version(self, name: str) -> int | None:
        """The promoted version; else the bundled one; else the highest."""
        versions = [e for e in self.entries() if e.manifest.name == name]
        if not versions:
            return None
        promoted = self._defaults().get(name, {}).get("default")
        if promoted is not None and any(e.manifest.version == promoted for e in versions):
            return int(promoted)
        bundled = [e.manifest.version for e in versions if e.source == "bundled"]
        return max(bundled) if bundled else max(e.manifest.version for e in versions)

    def resolve(self, ref: str) -> ModelEntry:
        name, version = parse_ref(ref)
        if version is None:
            version = self.default_version(name)
        for entry in self.entries():
            if entry.manifest.name == name and entry.manifest.version == version:
                return entry
        known = sorted({e.manifest.ref for e in self.entries()})
        raise ModelNotFoundError(
            f"no model {ref!r} in the registry (known: {', '.join(known) or 'none'})"
        )

    def verify(self, entry: ModelEntry) -> str:
        """Check the weights against the manifest; the sha256 on success."""
        read_verified_weights(entry.weights_path, entry.manifest.weights_sha256)
        return entry.manifest.weights_sha256

    def load(self, ref: str) -> LoadedModel:
        entry = self.resolve(ref)
        return load_model_from_dir(entry.manifest, entry.directory)

    def next_version(self, name: str) -> int:
        return max((e.manifest.version for e in self.entries() if e.manifest.name == name), default=0) + 1

    # -- writing (site only) -----------------------------------------------------------
    def add(self, manifest: ModelManifest, weights: bytes) -> ModelEntry:
        """Store a new version in the site registry (weights first, manifest last)."""
        if sha256_bytes(weights) != manifest.weights_sha256:
            raise ManifestError("the manifest's sha256 does not match the weights being added")
        if any(e.manifest.ref == manifest.ref for e in self.entries()):
            raise ManifestError(
                f"{manifest.ref} already exists",
                hint=f"use version {self.next_version(manifest.name)} or remove the old one",
            )
        directory = self.site_root / manifest.name / str(manifest.version)
        staging = directory.with_name(f".{manifest.version}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True, mode=0o750)
        (staging / manifest.weights_file).write_bytes(weights)
        write_manifest(manifest, staging / MANIFEST_NAME)
        staging.rename(directory)
        return ModelEntry(manifest, directory, "site")

    def record_validation(self, entry: ModelEntry, validation: Validation) -> ModelEntry:
        if entry.source != "site":
            raise ReadOnlyModelError(f"{entry.manifest.ref} is bundled; its validation ships with it")
        manifest = entry.manifest.with_validation(validation)
        write_manifest(manifest, entry.directory / MANIFEST_NAME)
        return ModelEntry(manifest, entry.directory, "site")

    def remove(self, ref: str) -> ModelEntry:
        entry = self.resolve(ref)
        if entry.source == "bundled":
            raise ReadOnlyModelError(f"{entry.manifest.ref} is bundled and cannot be removed")
        if self._defaults().get(entry.manifest.name, {}).get("default") == entry.manifest.version:
            raise ReadOnlyModelError(
                f"{entry.manifest.ref} is the promoted default",
                hint="promote another version first",
            )
        shutil.rmtree(entry.directory)
        return entry

    def promote(self, ref: str, thresholds: AcceptanceThresholds) -> tuple[ModelEntry, int | None]:
        """Make ``ref`` the default of its name if its validation meets ``thresholds``.

        Returns the entry and the previous default version (kept, for rollback).
        """
        entry = self.resolve(ref)
        validation = entry.manifest.validation
        if validation is None:
            raise AcceptanceError(f"{entry.manifest.ref} has no validation results")
        problems = thresholds.failures(validation.metrics)
        if problems:
            raise AcceptanceError(f"{entry.manifest.ref} fails acceptance: {'; '.join(problems)}")
        name = entry.manifest.name
        previous = self.default_version(name)
        defaults = self._defaults()
        record = defaults.setdefault(name, {"default": None, "history": []})
        record["default"] = entry.manifest.version
        record["history"].append({"version": entry.manifest.version, "sha256": entry.manifest.weights_sha256})
        self.site_root.mkdir(parents=True, exist_ok=True)
        tmp = self.site_root / f".{_DEFAULTS_NAME}.tmp"
        tmp.write_text(json.dumps(defaults, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.site_root / _DEFAULTS_NAME)
        return entry, previous
