"""Model manifests: the schema, parsing (validated) and serialisation.

A manifest pins everything needed to run a model the way it was trained: architecture,
classes and colours, tile size and µm/px, normalisation, and the sha256 of its weights.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import Preprocessing

from ._errors import ManifestError

__all__ = [
    "SCHEMA",
    "ClassInfo",
    "Lineage",
    "Validation",
    "ModelManifest",
    "parse_manifest",
    "read_manifest",
    "write_manifest",
    "MANIFEST_NAME",
    "ALLOWED_TIMM_KWARGS",
    "check_architecture",
]

SCHEMA = "wsiflow.model/1"
MANIFEST_NAME = "manifest.json"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_COLOR_RE = re.compile(r"^#[0-9a-fA-F]{6}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_TIMM_NAME_RE = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)?")
"""A plain timm architecture, optionally with a pretrained tag (``resnet50.a1_in1k``)."""
_TIMM_SOURCES = {
    "hf-hub:": "a Hugging Face Hub reference (timm would download it)",
    "hf_hub:": "a Hugging Face Hub reference (timm would download it)",
    "local-dir:": "a local-dir reference (timm would build it from files in a folder)",
}
_GLOBAL_POOLS = frozenset({"", "avg", "max", "avgmax", "catavgmax", "token", "map"})


def _rate(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


def _size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 8 <= value <= 8192


ALLOWED_TIMM_KWARGS: dict[str, tuple[str, Any]] = {
    "in_chans": ("3 (wsiflow feeds RGB tiles)", lambda v: v == 3 and not isinstance(v, bool)),
    "drop_rate": ("a number from 0 to below 1", _rate),
    "drop_path_rate": ("a number from 0 to below 1", _rate),
    "attn_drop_rate": ("a number from 0 to below 1", _rate),
    "proj_drop_rate": ("a number from 0 to below 1", _rate),
    "pos_drop_rate": ("a number from 0 to below 1", _rate),
    "global_pool": (f"one of {', '.join(repr(p) for p in sorted(_GLOBAL_POOLS))}",
                    lambda v: isinstance(v, str) and v in _GLOBAL_POOLS),
    "img_size": ("a whole number of pixels, 8 to 8192", _size),
}
"""The constructor arguments a manifest may give timm, each with what it may be: plain
numbers and names only, so nothing in a manifest can make timm read a file or download."""
_REFUSED_TIMM_KWARGS = {
    "pretrained": "would make timm download weights",
    "pretrained_cfg": "can point timm at weights to download or read",
    "pretrained_cfg_overlay": "can point timm at weights to download or read (a file or a hub)",
    "checkpoint_path": "would make timm load a file (torch.load) when the model is built",
    "cache_dir": "names a download cache",
    "num_classes": "comes from the manifest's classes",
}


def _looks_like_a_path(text: str) -> bool:
    return any(ch in text for ch in ":/\\") or text.startswith((".", "~"))


def check_architecture(timm_name: object, kwargs: object) -> None:
    """:class:`ManifestError` naming the field unless ``timm_name`` is a plain timm
    architecture name and ``kwargs`` only allowed constructor arguments with plain values.

    A manifest comes from whoever put a model into the registry: a hub reference
    (``hf-hub:``), a ``local-dir:`` or a ``checkpoint_path`` would make timm go online or
    unpickle a file when the model is built, before any sha256 is checked.
    """
    if not isinstance(timm_name, str):
        raise ManifestError(f"manifest field architecture.timm_name = {timm_name!r} has the wrong type")
    for prefix, what in _TIMM_SOURCES.items():
        if timm_name.lower().startswith(prefix):
            raise ManifestError(
                f"manifest field architecture.timm_name is {what}; only plain timm architecture names are allowed",
                hint="name the architecture (e.g. 'resnet50') and ship the weights as the manifest's safetensors file",
            )
    if not _TIMM_NAME_RE.fullmatch(timm_name):
        shown = "a path or reference" if _looks_like_a_path(timm_name) else repr(timm_name[:80])
        raise ManifestError(
            f"manifest field architecture.timm_name ({shown}) is not a plain timm architecture name "
            "(lower-case letters, digits and '_', optionally '.tag')",
            hint="name a timm architecture, e.g. 'resnet50' or 'mobilenetv3_small_100'",
        )
    if not isinstance(kwargs, Mapping):
        raise ManifestError("manifest field architecture.kwargs must be an object")
    for key, value in kwargs.items():
        where = f"architecture.kwargs.{key}" if isinstance(key, str) and _TIMM_NAME_RE.fullmatch(key) else (
            "architecture.kwargs")
        if key in _REFUSED_TIMM_KWARGS:
            raise ManifestError(
                f"manifest field {where} is refused: it {_REFUSED_TIMM_KWARGS[key]}",
                hint="remove it; wsiflow builds the architecture without pretrained weights and loads only the "
                     "manifest's verified safetensors",
            )
        if key not in ALLOWED_TIMM_KWARGS:
            shown = "a key" if not isinstance(key, str) or _looks_like_a_path(key) else repr(key[:80])
            raise ManifestError(
                f"manifest field {where}: {shown} is not an allowed timm constructor argument",
                hint=f"allowed: {', '.join(sorted(ALLOWED_TIMM_KWARGS))}",
            )
        what, accepts = ALLOWED_TIMM_KWARGS[key]
        if not accepts(value):
            shown = "a path" if isinstance(value, str) and _looks_like_a_path(value) else repr(value)[:80]
            raise ManifestError(f"manifest field {where} = {shown} must be {what}")


@dataclass(frozen=True)
class ClassInfo:
    name: str
    color: str
    """Display colour, ``#rrggbb``."""


@dataclass(frozen=True)
class Lineage:
    """Where a model came from: digests only, never file names."""

    parent: str | None = None
    """``name@version`` of the model it was fine-tuned from."""
    parent_sha256: str | None = None
    training_data_digest: str | None = None
    slide_digests: tuple[str, ...] = ()
    annotation_digests: tuple[str, ...] = ()
    source_digest: str | None = None
    """sha256 of the checkpoint it was imported from (``models import``)."""


@dataclass(frozen=True)
class Validation:
    date: str
    dataset: str
    """What it was validated on, in words (no paths)."""
    dataset_digest: str | None
    metrics: dict[str, Any]


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: int
    timm_name: str
    classes: tuple[ClassInfo, ...]
    tile_size_px: int
    target_mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_file: str
    weights_sha256: str
    intended_use: str
    created_at: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    lineage: Lineage = field(default_factory=Lineage)
    validation: Validation | None = None

    def __post_init__(self) -> None:
        # However a manifest is made (read, imported, trained), timm never sees another form.
        check_architecture(self.timm_name, self.timm_kwargs)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.tile_size_px, self.target_mpp, self.mean, self.std)

    def with_validation(self, validation: Validation) -> ModelManifest:
        return replace(self, validation=validation)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "version": self.version,
            "architecture": {"timm_name": self.timm_name, "kwargs": dict(self.timm_kwargs)},
            "classes": [asdict(c) for c in self.classes],
            "tile_size_px": self.tile_size_px,
            "target_mpp": self.target_mpp,
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "weights": {"file": self.weights_file, "sha256": self.weights_sha256},
            "lineage": {
                **asdict(self.lineage),
                "slide_digests": list(self.lineage.slide_digests),
                "annotation_digests": list(self.lineage.annotation_digests),
            },
            "intended_use": self.intended_use,
            "validation": asdict(self.validation) if self.validation else None,
            "created_at": self.created_at,
        }


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    if key not in data:
        raise ManifestError(f"manifest field {where}{key} is missing")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ManifestError(f"manifest field {where}{key} = {value!r} has the wrong type")
    return value


def _triple(values: object, where: str) -> tuple[float, float, float]:
    if not (isinstance(values, list) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values)):
        raise ManifestError(f"manifest field {where} must be a list of 3 numbers, got {values!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


def parse_manifest(data: object) -> ModelManifest:
    """Validate a manifest document (already parsed from JSON/YAML)."""
    if not isinstance(data, dict):
        raise ManifestError("a manifest must be a JSON object")
    if data.get("schema") != SCHEMA:
        raise ManifestError(f"manifest schema {data.get('schema')!r} is not {SCHEMA!r}")
    name = _get(data, "name", str)
    if not _NAME_RE.match(name):
        raise ManifestError(f"model name {name!r} must be lower-case letters, digits, '.', '_' or '-'")
    version = _get(data, "version", int)
    if version < 1:
        raise ManifestError(f"model version {version} must be a positive integer")
    arch = _get(data, "architecture", dict)
    timm_name = _get(arch, "timm_name", str, "architecture.")
    timm_kwargs = arch.get("kwargs") or {}
    check_architecture(timm_name, timm_kwargs)
    classes_raw = _get(data, "classes", list)
    classes = []
    for i, entry in enumerate(classes_raw):
        if not isinstance(entry, dict):
            raise ManifestError(f"manifest field classes[{i}] must be an object")
        cname = _get(entry, "name", str, f"classes[{i}].")
        color = _get(entry, "color", str, f"classes[{i}].")
        if not _COLOR_RE.match(color):
            raise ManifestError(f"class {cname!r} colour {color!r} must be #rrggbb")
        classes.append(ClassInfo(cname, color.lower()))
    if len(classes) < 2 or len({c.name for c in classes}) != len(classes):
        raise ManifestError("a model needs at least two classes with distinct names")
    tile = _get(data, "tile_size_px", int)
    mpp = float(_get(data, "target_mpp", (int, float)))
    if tile < 8 or not (math.isfinite(mpp) and 0.05 <= mpp <= 1000):
        raise ManifestError(f"tile_size_px {tile} / target_mpp {mpp} out of range")
    norm = _get(data, "normalization", dict)
    mean = _triple(norm.get("mean"), "normalization.mean")
    std = _triple(norm.get("std"), "normalization.std")
    if any(s <= 0 for s in std):
        raise ManifestError("normalization.std values must be positive")
    weights = _get(data, "weights", dict)
    weights_file = _get(weights, "file", str, "weights.")
    if "/" in weights_file or "\\" in weights_file or weights_file.startswith("."):
        raise ManifestError(f"weights.file {weights_file!r} must be a plain file name beside the manifest")
    if not weights_file.endswith(".safetensors"):
        raise ManifestError(
            f"weights.file {weights_file!r} is not a .safetensors file; wsiflow loads safetensors only"
        )
    sha = _get(weights, "sha256", str, "weights.")
    if not _SHA_RE.match(sha):
        raise ManifestError(f"weights.sha256 {sha!r} is not 64 lower-case hex digits")
    lineage_raw = data.get("lineage") or {}
    if not isinstance(lineage_raw, dict):
        raise ManifestError("manifest field lineage must be an object")
    allowed = {f for f in Lineage.__dataclass_fields__}
    if set(lineage_raw) - allowed:
        raise ManifestError(f"unknown lineage field(s) {sorted(set(lineage_raw) - allowed)}")
    lineage = Lineage(
        **{
            **lineage_raw,
            "slide_digests": tuple(lineage_raw.get("slide_digests") or ()),
            "annotation_digests": tuple(lineage_raw.get("annotation_digests") or ()),
        }
    )
    validation_raw = data.get("validation")
    validation = None
    if validation_raw is not None:
        if not isinstance(validation_raw, dict):
            raise ManifestError("manifest field validation must be an object or null")
        validation = Validation(
            date=_get(validation_raw, "date", str, "validation."),
            dataset=_get(validation_raw, "dataset", str, "validation."),
            dataset_digest=validation_raw.get("dataset_digest"),
            metrics=_get(validation_raw, "metrics", dict, "validation."),
        )
    return ModelManifest(
        name=name,
        version=version,
        timm_name=timm_name,
        timm_kwargs=dict(timm_kwargs),
        classes=tuple(classes),
        tile_size_px=tile,
        target_mpp=mpp,
        mean=mean,
        std=std,
        weights_file=weights_file,
        weights_sha256=sha,
        lineage=lineage,
        intended_use=_get(data, "intended_use", str),
        validation=validation,
        created_at=_get(data, "created_at", str),
    )


def read_manifest(path: Path) -> ModelManifest:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"manifest is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    return parse_manifest(data)


def write_manifest(manifest: ModelManifest, path: Path) -> None:
    """Write atomically (temp file + rename): a reader never sees half a manifest."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
