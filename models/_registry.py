"""The local model registry: bundled models (read-only, in the package) and the site's.

Layout of both: ``ROOT/NAME/VERSION/manifest.json`` plus the weights file it names. The
site root also holds ``defaults.json``, authenticated with the site secret (see
:mod:`._sealing`): per name, the stack of promotion records (version, weights and manifest
digests, the metrics it was promoted on; the top is the default, ``rollback`` pops it), the
validations ``validate --record`` made on this site, the versions installed from signed
bundles (candidates until validated and promoted) and the highest version ever installed
(so an older bundle cannot be installed again). References are ``NAME`` (its default
version) or ``NAME@VERSION``.

What is checked when a model is resolved: the state file's HMAC (a hand-written or edited
``defaults.json`` is refused; a bundled model stays usable), that a promoted version's
manifest (weights sha256, recorded metrics) is the one promoted, that no version folder,
manifest or weights file links out of the registry; one unreadable manifest makes only its
own version unusable (:meth:`Registry.broken`).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

from pipeline import WsiflowError, site_dir, site_secret

from ._errors import (
    AcceptanceError,
    ManifestError,
    ModelNotFoundError,
    ReadOnlyModelError,
    RegistryIntegrityError,
)
from ._loading import LoadedModel, load_model_from_dir
from ._manifest import MANIFEST_NAME, ModelManifest, Validation, now_iso, read_manifest, write_manifest
from ._sealing import canonical_json, inside, read_sealed, write_sealed
from ._weights import read_verified_weights, sha256_bytes

__all__ = [
    "BUNDLED_ROOT",
    "DEFAULT_MODEL",
    "AcceptanceThresholds",
    "BrokenEntry",
    "ModelEntry",
    "Registry",
    "parse_ref",
    "manifest_digest",
    "site_models_dir",
]

_log = logging.getLogger(__name__)

BUNDLED_ROOT = Path(__file__).resolve().parent / "bundled"
DEFAULT_MODEL = "tissue-qc"
_DEFAULTS_NAME = "defaults.json"
_STATE_KIND = "registry-state"
_ANCHOR_KIND = "registry-anchor"
_ANCHORS_DIR = "registry-anchors"
_LOCK_NAME = ".registry.lock"
_STATE_WHAT = "the registry's defaults.json"
_STATE_HINT = (
    "move defaults.json aside (keep it for the incident review), then record the validations again "
    "(`wsiflow validate NAME@VERSION ... --record`) and promote (`wsiflow models promote NAME@VERSION`)"
)


def manifest_digest(manifest: ModelManifest) -> str:
    """sha256 of a manifest's canonical JSON: pins its weights digest and recorded metrics."""
    return hashlib.sha256(canonical_json(manifest.to_json())).hexdigest()


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


@dataclass(frozen=True)
class BrokenEntry:
    """A version folder whose manifest cannot be used; only this version is affected."""

    name: str
    version: str
    source: Literal["bundled", "site"]
    error: WsiflowError

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _serialised(method: Callable[Concatenate[Registry, _P], _R]) -> Callable[Concatenate[Registry, _P], _R]:
    """Run a method that rewrites ``defaults.json`` under the registry's lock (never nested)."""
    @functools.wraps(method)
    def locked(self: Registry, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._locked():
            return method(self, *args, **kwargs)
    return locked


def _regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


class Registry:
    """Bundled plus site models. Reads are cheap; nothing is loaded until asked."""

    def __init__(self, site_root: Path | None = None, bundled_root: Path = BUNDLED_ROOT,
                 secret: bytes | None = None) -> None:
        self.site_root = site_root or site_models_dir()
        self.bundled_root = bundled_root
        self._secret_value = secret

    @property
    def secret(self) -> bytes:
        """The site secret that authenticates the registry's records (read when first needed)."""
        if self._secret_value is None:
            self._secret_value = site_secret()
        return self._secret_value

    # -- reading ---------------------------------------------------------------------
    def _scan_one(self, root: Path, manifest_path: Path, source: Literal["bundled", "site"]) -> ModelEntry:
        directory = manifest_path.parent
        if source == "site" and not (inside(directory, root) and inside(manifest_path, root)):
            raise RegistryIntegrityError(
                "the version folder or its manifest is a link that leaves the registry; wsiflow never follows one",
                hint="remove the link (`wsiflow models remove NAME@VERSION`) and install the model properly",
            )
        manifest = read_manifest(manifest_path)
        if (directory.parent.name, directory.name) != (manifest.name, str(manifest.version)):
            raise ManifestError(
                f"manifest {manifest.ref} is stored under {directory.parent.name}/{directory.name}",
                hint="keep each version in NAME/VERSION/",
            )
        return ModelEntry(manifest, directory, source)

    def _scan(self, root: Path, source: Literal["bundled", "site"]) -> tuple[list[ModelEntry], list[BrokenEntry]]:
        entries: list[ModelEntry] = []
        broken: list[BrokenEntry] = []
        if not root.is_dir():
            return entries, broken
        for manifest_path in sorted(root.glob(f"*/*/{MANIFEST_NAME}")):
            name, version = manifest_path.parent.parent.name, manifest_path.parent.name
            if name.startswith(".") or version.startswith("."):
                continue  # a version being added (staging) or removed
            try:
                entries.append(self._scan_one(root, manifest_path, source))
            except (ManifestError, RegistryIntegrityError) as exc:
                broken.append(BrokenEntry(name, version, source, exc))
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
                broken.append(BrokenEntry(name, version, source, ManifestError(f"the manifest cannot be read ({why})")))
        return entries, broken

    def _scan_all(self) -> tuple[list[ModelEntry], list[BrokenEntry]]:
        bundled, bundled_broken = self._scan(self.bundled_root, "bundled")
        site, site_broken = self._scan(self.site_root, "site")
        found = sorted(bundled + site, key=lambda e: (e.manifest.name, e.manifest.version, e.source))
        return found, bundled_broken + site_broken

    def entries(self) -> list[ModelEntry]:
        """Every usable model version, bundled first, then by name and version."""
        return self._scan_all()[0]

    def broken(self) -> list[BrokenEntry]:
        """Version folders that cannot be used (unreadable manifest, link out of the registry)."""
        return self._scan_all()[1]

    # -- the authenticated state ---------------------------------------------------------
    def _anchor_path(self) -> Path:
        # In the owner-only site dir, not the registry: whoever can write the registry cannot delete it.
        key = hashlib.sha256(str(self.site_root.resolve()).encode("utf-8")).hexdigest()[:24]
        return site_dir() / _ANCHORS_DIR / f"{key}.json"

    def _state(self) -> dict[str, Any]:
        """The authenticated state (``{}`` for a site that never promoted, validated or installed)."""
        path = self.site_root / _DEFAULTS_NAME
        if not os.path.lexists(path):
            if not os.path.lexists(self._anchor_path()):
                return {}  # a registry that never had a state: nothing to check (no secret is created)
            anchor = read_sealed(self._anchor_path(), _ANCHOR_KIND, self.secret, what="the registry's anchor")
            if anchor is not None and anchor.get("root") == str(self.site_root.resolve()):
                raise RegistryIntegrityError(
                    f"the registry's defaults.json is missing, but this registry has had one since "
                    f"{anchor.get('since')}: it was deleted (promotions, site validations and install records "
                    "with it)",
                    hint=f"restore it from a backup; if its loss is known and accepted, delete the anchor "
                         f"{_ANCHORS_DIR}/{self._anchor_path().name} in the site directory, then validate "
                         "(--record) and promote again",
                )
            return {}
        try:
            body = read_sealed(path, _STATE_KIND, self.secret, what=_STATE_WHAT)
        except RegistryIntegrityError as exc:
            raise RegistryIntegrityError(exc.message, hint=_STATE_HINT) from None
        return body or {}

    def _write_state(self, state: Mapping[str, Any]) -> None:
        self.site_root.mkdir(parents=True, exist_ok=True)
        write_sealed(self.site_root / _DEFAULTS_NAME, _STATE_KIND, state, self.secret)
        anchor = self._anchor_path()
        if not anchor.exists():  # from now on a missing defaults.json is noticed
            write_sealed(anchor, _ANCHOR_KIND, {"root": str(self.site_root.resolve()), "since": now_iso()},
                         self.secret)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise read-modify-write of ``defaults.json`` between wsiflow processes."""
        self.site_root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.site_root / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def promotions(self, name: str) -> list[dict[str, Any]]:
        """The promotion records of ``name``, oldest first; the last is the default."""
        return list(self._state().get("promotions", {}).get(name, []))

    def site_validation(self, entry: ModelEntry) -> dict[str, Any] | None:
        """The validation ``validate --record`` made of ``entry`` on this site, if its weights are unchanged."""
        record = self._state().get("validations", {}).get(entry.manifest.ref)
        if record is None or record.get("weights_sha256") != entry.manifest.weights_sha256:
            return None
        return dict(record)

    def install_record(self, entry: ModelEntry) -> dict[str, Any] | None:
        """How ``entry`` was installed from a signed bundle (publisher, bundle digest), if it was."""
        record = self._state().get("installs", {}).get(entry.manifest.ref)
        return dict(record) if record is not None else None

    def is_candidate(self, entry: ModelEntry) -> bool:
        """Installed from a bundle and never promoted: never the default by itself."""
        if entry.source != "site" or self.install_record(entry) is None:
            return False
        return all(p["version"] != entry.manifest.version for p in self.promotions(entry.manifest.name))

    def high_water(self, name: str) -> int:
        """The highest version of ``name`` this site has installed or removed (0: none)."""
        return int(self._state().get("high_water", {}).get(name, 0))

    def default_version(self, name: str) -> int | None:
        """The promoted version; else the bundled one; else the highest that is not a candidate.

        An unauthentic ``defaults.json`` is refused, except that a name with a bundled version
        falls back to it (the bundled model keeps working; the error is logged).
        """
        versions = [e for e in self.entries() if e.manifest.name == name]
        bundled = [e.manifest.version for e in versions if e.source == "bundled"]
        try:
            stack = self.promotions(name)
            candidates = {e.manifest.version for e in versions if self.is_candidate(e)}
        except RegistryIntegrityError as exc:
            if bundled:
                _log.warning("using bundled %s@%d: %s", name, max(bundled), exc.one_line())
                return max(bundled)
            raise
        if stack:
            return int(stack[-1]["version"])
        if bundled:
            return max(bundled)
        eligible = [e.manifest.version for e in versions if e.manifest.version not in candidates]
        return max(eligible) if eligible else None

    def check_promoted(self, entry: ModelEntry) -> None:
        """Refuse a promoted version whose manifest (weights digest, metrics) changed since promotion."""
        if entry.source != "site":
            return
        records = [p for p in self.promotions(entry.manifest.name) if p["version"] == entry.manifest.version]
        if records and records[-1]["manifest_sha256"] != manifest_digest(entry.manifest):
            raise RegistryIntegrityError(
                f"{entry.manifest.ref} changed since it was promoted (its manifest, weights digest or recorded "
                "metrics differ from the promotion record)",
            )

    def resolve(self, ref: str) -> ModelEntry:
        name, version = parse_ref(ref)
        if version is None:
            version = self.default_version(name)
            if version is None and any(e.manifest.name == name for e in self.entries()):
                raise ModelNotFoundError(
                    f"{name} has only candidate versions (installed, not yet validated and promoted)",
                    hint=f"validate one with `wsiflow validate {name}@VERSION ... --record`, then "
                         f"`wsiflow models promote {name}@VERSION`",
                )
        entries, broken = self._scan_all()
        for entry in entries:
            if entry.manifest.name == name and entry.manifest.version == version:
                self.check_promoted(entry)
                return entry
        for bad in broken:
            if (bad.name, bad.version) == (name, str(version)):
                raise type(bad.error)(f"{bad.ref}: {bad.error.message}", hint=bad.error.hint)
        known = sorted({e.manifest.ref for e in entries})
        raise ModelNotFoundError(
            f"no model {ref!r} in the registry (known: {', '.join(known) or 'none'})"
        )

    def _check_links(self, entry: ModelEntry) -> None:
        if entry.source != "site" or inside(entry.weights_path, self.site_root):
            return
        if not _regular_file(entry.weights_path):
            return  # the loader refuses it and says what it is (a device, a pipe, missing)
        raise RegistryIntegrityError(
            f"the weights of {entry.manifest.ref} are a link that leaves the registry; wsiflow never follows one",
            hint="remove the version and install it again from a trusted copy",
        )

    def verify(self, entry: ModelEntry) -> str:
        """Check the weights against the manifest; the sha256 on success."""
        self.check_promoted(entry)
        self._check_links(entry)
        read_verified_weights(entry.weights_path, entry.manifest.weights_sha256)
        return entry.manifest.weights_sha256

    def load_entry(self, entry: ModelEntry, *, build: bool = True) -> LoadedModel:
        """Every registry check, then the verified load (sha256 first, then a strict load).

        ``build=False``: the same checks and sha256 now, the module built (and the weights'
        fit to it checked) on first use, so a process that never computes a tile never
        imports torch or timm (see :class:`LoadedModel`)."""
        self.check_promoted(entry)
        self._check_links(entry)
        return load_model_from_dir(entry.manifest, entry.directory, build=build)

    def load(self, ref: str, *, build: bool = True) -> LoadedModel:
        return self.load_entry(self.resolve(ref), build=build)

    def next_version(self, name: str) -> int:
        highest = max((e.manifest.version for e in self.entries() if e.manifest.name == name), default=0)
        return max(highest, self.high_water(name)) + 1

    # -- writing (site only) -----------------------------------------------------------
    def add(self, manifest: ModelManifest, weights: bytes,
            extra_files: Mapping[str, bytes] | None = None) -> ModelEntry:
        """Store a new version in the site registry (weights first, manifest last).

        ``extra_files`` (plain names: model card, the publisher's validation report) go beside.
        """
        if sha256_bytes(weights) != manifest.weights_sha256:
            raise ManifestError("the manifest's sha256 does not match the weights being added")
        known = {e.manifest.ref for e in self.entries()} | {b.ref for b in self.broken()}
        if manifest.ref in known:
            raise ManifestError(
                f"{manifest.ref} already exists",
                hint=f"use version {self.next_version(manifest.name)} or remove the old one",
            )
        directory = self.site_root / manifest.name / str(manifest.version)
        staging = directory.with_name(f".{manifest.version}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True, mode=0o750)
        (staging / manifest.weights_file).write_bytes(weights)
        for file_name, data in (extra_files or {}).items():
            (staging / file_name).write_bytes(data)
        write_manifest(manifest, staging / MANIFEST_NAME)
        staging.rename(directory)
        return ModelEntry(manifest, directory, "site")

    @_serialised
    def record_install(self, entry: ModelEntry, record: Mapping[str, Any]) -> None:
        """Remember that ``entry`` came from a signed bundle (a candidate) and raise the high-water mark."""
        state = self._state()
        state.setdefault("installs", {})[entry.manifest.ref] = dict(record)
        marks = state.setdefault("high_water", {})
        marks[entry.manifest.name] = max(int(marks.get(entry.manifest.name, 0)), entry.manifest.version)
        self._write_state(state)

    @_serialised
    def record_validation(self, entry: ModelEntry, validation: Validation) -> ModelEntry:
        if entry.source != "site":
            raise ReadOnlyModelError(f"{entry.manifest.ref} is bundled; its validation ships with it")
        state = self._state()
        stack = state.get("promotions", {}).get(entry.manifest.name, [])
        if any(p["version"] == entry.manifest.version for p in stack):
            raise ReadOnlyModelError(
                f"{entry.manifest.ref} has been promoted; the validation it was promoted on stays recorded",
                hint="validate without --record to re-check it, or record on a new version",
            )
        manifest = entry.manifest.with_validation(validation)
        write_manifest(manifest, entry.directory / MANIFEST_NAME)
        state.setdefault("validations", {})[entry.manifest.ref] = {
            "weights_sha256": manifest.weights_sha256,
            "metrics": dict(validation.metrics),
            "date": validation.date,
            "dataset_digest": validation.dataset_digest,
        }
        self._write_state(state)
        return ModelEntry(manifest, entry.directory, "site")

    @_serialised
    def remove(self, ref: str, *, confirm_last: bool = False) -> ModelEntry | BrokenEntry:
        """Delete a site version. The promoted default only when it is the name's last site
        version, and the last site version of a name only with ``confirm_last``."""
        name, version = parse_ref(ref)
        if version is None:
            raise ModelNotFoundError(f"remove needs a version ({ref!r})", hint=f"use {name}@VERSION")
        broken = [b for b in self.broken() if (b.name, b.version, b.source) == (name, str(version), "site")]
        if broken:  # removing is how a broken version is cleared
            shutil.rmtree(self.site_root / name / str(version))
            return broken[0]
        entry = next((e for e in self.entries() if e.manifest.ref == f"{name}@{version}"), None)
        if entry is None:
            return self.resolve(ref)  # raises ModelNotFoundError naming the known models
        if entry.source == "bundled":
            raise ReadOnlyModelError(f"{entry.manifest.ref} is bundled and cannot be removed")
        site_versions = [e for e in self.entries() if e.manifest.name == name and e.source == "site"]
        last = len(site_versions) == 1
        state = self._state()
        stack = state.get("promotions", {}).get(name, [])
        if stack and stack[-1]["version"] == version and not last:
            raise ReadOnlyModelError(
                f"{entry.manifest.ref} is the promoted default",
                hint=f"`wsiflow models rollback {name}` or promote another version first",
            )
        if last and not confirm_last:
            raise ReadOnlyModelError(
                f"{entry.manifest.ref} is the last site version of {name}",
                hint=f"confirm with `wsiflow models remove {entry.manifest.ref} --yes`",
            )
        if stack:
            state.setdefault("promotions", {})[name] = [p for p in stack if p["version"] != version]
        state.get("validations", {}).pop(entry.manifest.ref, None)
        state.get("installs", {}).pop(entry.manifest.ref, None)
        marks = state.setdefault("high_water", {})
        marks[name] = max(int(marks.get(name, 0)), version)
        self._write_state(state)
        shutil.rmtree(entry.directory)
        return entry

    def _acceptance_metrics(self, entry: ModelEntry) -> dict[str, Any]:
        if entry.source == "bundled":
            validation = entry.manifest.validation
            if validation is None:
                raise AcceptanceError(f"{entry.manifest.ref} has no validation results")
            return validation.metrics
        record = self.site_validation(entry)
        if record is None:
            raise AcceptanceError(
                f"{entry.manifest.ref} has no validation recorded on this site"
                + (" (a candidate installed from a bundle)" if self.is_candidate(entry) else ""),
                hint=f"validate it on your own labelled data: `wsiflow validate {entry.manifest.ref} ... --record`",
            )
        if entry.manifest.validation is None or entry.manifest.validation.metrics != record["metrics"]:
            raise RegistryIntegrityError(
                f"the metrics in {entry.manifest.ref}'s manifest differ from the validation recorded on this site",
            )
        return dict(record["metrics"])

    @_serialised
    def promote(self, ref: str, thresholds: AcceptanceThresholds) -> tuple[ModelEntry, int | None]:
        """Make ``ref`` the default of its name if the validation recorded on this site (for a
        bundled version: the one it ships with) meets ``thresholds``.

        Returns the entry and the version that was the default before (None when it is the same).
        """
        entry = self.resolve(ref)
        problems = thresholds.failures(self._acceptance_metrics(entry))
        if problems:
            raise AcceptanceError(f"{entry.manifest.ref} fails acceptance: {'; '.join(problems)}")
        name = entry.manifest.name
        previous = self.default_version(name)
        state = self._state()
        stack = state.setdefault("promotions", {}).setdefault(name, [])
        stack.append({
            "version": entry.manifest.version,
            "weights_sha256": entry.manifest.weights_sha256,
            "manifest_sha256": manifest_digest(entry.manifest),
            "promoted_at": now_iso(),
        })
        self._write_state(state)
        return entry, (previous if previous != entry.manifest.version else None)

    @_serialised
    def rollback(self, name: str) -> tuple[int, int]:
        """Make the version promoted before the current default the default again.

        Returns (the default before, the default now); with no earlier promotion the bundled
        version (or the highest non-candidate) becomes the default again.
        """
        state = self._state()
        original = list(state.get("promotions", {}).get(name, []))
        stack = list(original)
        if not stack:
            raise AcceptanceError(f"{name} has no promoted version to roll back",
                                  hint="`wsiflow models list` shows the default of each model")
        current = int(stack.pop()["version"])
        present = {e.manifest.version for e in self.entries() if e.manifest.name == name}
        while stack and (stack[-1]["version"] == current or stack[-1]["version"] not in present):
            stack.pop()  # a version removed since, or the same version promoted twice
        state["promotions"][name] = stack
        self._write_state(state)
        now = self.default_version(name)
        if now is None or now == current:
            state["promotions"][name] = original
            self._write_state(state)
            raise AcceptanceError(f"{name}@{current} is the only version of {name} there is to use",
                                  hint="install or train another version, validate and promote it")
        return current, now
