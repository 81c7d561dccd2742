"""The result folder: the one place that knows its layout, file names and metadata keys.

Layout (nothing in a path or file names the slide file)::

    OUT/<slide id>/<model name>/v<version>-<params digest>/   one result per model
        heatmap.ome.zarr   tissue.ome.zarr   tiles.parquet        version and parameters
        results.geojson    summary.json      overview.png
        result.json        written last, atomically: the result is complete only with it
        review.geojson     written by the viewer's review widget
        .work/             while running: run key and one marker per finished chunk
    OUT/<slide id>/<model name>/latest -> v<version>-<params digest>   the newest complete one

Results with other parameters, another µm/px or another model version live side by side;
nothing is silently replaced. The writers (analysis), ``wsiflow export``, ``wsiflow view``
and the napari plugin all go through :class:`ResultFolder`.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args

from ._backend import BACKEND_NAMES, BackendName
from ._errors import NotAResultError, WsiflowError
from ._mpp import MppResolution, MppSource

__all__ = [
    "RESULT_MANIFEST",
    "RESULT_FILES",
    "LATEST_LINK",
    "ModelInfo",
    "ModelProvenance",
    "ResultManifest",
    "ResultSummary",
    "ResultFolder",
    "atomic_write_text",
]

RESULT_MANIFEST = "result.json"
LATEST_LINK = "latest"
_HEATMAP = "heatmap.ome.zarr"
_TISSUE = "tissue.ome.zarr"
_TILES = "tiles.parquet"
_GEOJSON = "results.geojson"
_SUMMARY = "summary.json"
_OVERVIEW = "overview.png"
_REVIEW = "review.geojson"
_WORK = ".work"
RESULT_FILES: tuple[str, ...] = (_HEATMAP, _TISSUE, _TILES, _GEOJSON, _SUMMARY, _OVERVIEW)
"""Every output of an analysis, listed in ``result.json``."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file and rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError:
        # Disk full mid-write: leave no half-written temp file behind (it would hold space).
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model, for provenance (the engine itself only needs the classifier)."""

    name: str
    version: int
    sha256: str
    class_colors: tuple[str, ...]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ModelProvenance:
    """The model a result was computed with, as recorded in ``summary.json``."""

    name: str
    version: int
    sha256: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ResultManifest:
    """``result.json``: the run key (what was computed) and the files of a complete result."""

    key: str
    slide_id: str
    model: str
    files: tuple[str, ...] = RESULT_FILES
    complete: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"complete": self.complete, "key": self.key, "slide_id": self.slide_id,
                "model": self.model, "files": list(self.files)}


@dataclass(frozen=True)
class ResultSummary:
    """The typed part of ``summary.json`` that tools rely on; ``data`` is the whole document."""

    slide_id: str
    tiles: int
    model: ModelProvenance
    mpp: MppResolution
    backend: BackendName
    hotspots: dict[str, list[dict[str, Any]]]
    data: dict[str, Any]


_L = TypeVar("_L", bound=str)
_MPP_SOURCES: tuple[MppSource, ...] = get_args(MppSource)


def _one_of(value: object, allowed: tuple[_L, ...], key: str) -> _L:
    """``value`` as the ``Literal`` whose values are ``allowed``; ValueError if it is none of them."""
    for option in allowed:
        if value == option:
            return option
    raise ValueError(f"{key} = {value!r} is not one of {', '.join(allowed)}")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotAResultError(f"the result folder has no {what}") from None
    except (OSError, ValueError) as exc:
        raise NotAResultError(f"the result's {what} is unreadable ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise NotAResultError(f"the result's {what} is not a JSON object")
    return data


@dataclass(frozen=True)
class ResultFolder:
    """One result folder (``OUT/<slide id>/<model>/v<version>-<params digest>/``)."""

    path: Path

    @classmethod
    def for_run(cls, out_dir: Path, slide_id: str, model: ModelInfo, params_digest: str) -> ResultFolder:
        """Where the result of ``model`` with parameters ``params_digest`` on a slide goes."""
        return cls(Path(out_dir) / slide_id / model.name / f"v{model.version}-{params_digest[:12]}")

    @classmethod
    def latest(cls, out_dir: Path, slide_id: str, model_name: str) -> ResultFolder:
        """The newest complete result of ``model_name`` on a slide (through ``latest``)."""
        return cls(Path(out_dir) / slide_id / model_name / LATEST_LINK)

    @classmethod
    def find(cls, path: Path) -> ResultFolder | None:
        """``path`` as one result folder, with links resolved (so a later run moving
        ``latest`` never changes what a caller holds): a result folder itself; a model folder
        (its ``latest``, else its newest complete result); or a slide folder holding exactly
        one model. None if it is none of these."""
        path = Path(path)
        if not path.is_dir():
            return None
        if cls(path).looks_complete() and not (path / LATEST_LINK).exists():
            return cls(path.resolve())
        newest = cls._newest(path)
        if newest is not None:
            return newest
        # A slide folder: its one model's newest result.
        found = [f for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
                 if (f := cls._newest(p)) is not None]
        return found[0] if len(found) == 1 else None

    @classmethod
    def _newest(cls, model_dir: Path) -> ResultFolder | None:
        """``latest`` if it points at a complete result, else the newest complete one."""
        latest = cls(model_dir / LATEST_LINK)
        if latest.looks_complete():
            return cls(latest.path.resolve())
        complete = [cls(p) for p in model_dir.iterdir()
                    if p.is_dir() and not p.name.startswith(".") and cls(p).looks_complete()]
        if not complete:
            return None
        return max(complete, key=lambda f: f.manifest_path.stat().st_mtime_ns)

    @property
    def heatmap(self) -> Path:
        return self.path / _HEATMAP

    @property
    def tissue(self) -> Path:
        return self.path / _TISSUE

    @property
    def tiles(self) -> Path:
        return self.path / _TILES

    @property
    def geojson(self) -> Path:
        return self.path / _GEOJSON

    @property
    def summary_path(self) -> Path:
        return self.path / _SUMMARY

    @property
    def overview(self) -> Path:
        return self.path / _OVERVIEW

    @property
    def manifest_path(self) -> Path:
        return self.path / RESULT_MANIFEST

    @property
    def review(self) -> Path:
        return self.path / _REVIEW

    @property
    def work(self) -> Path:
        """``.work/``: the run key and chunk markers of an unfinished run."""
        return self.path / _WORK

    @property
    def chunk_markers(self) -> Path:
        return self.work / "chunks"

    @property
    def lock_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.lock"

    def looks_complete(self) -> bool:
        """A manifest and a heatmap are there (cheap; :meth:`is_complete` checks the key)."""
        return self.manifest_path.is_file() and self.heatmap.is_dir()

    def is_complete(self, key: str | None = None) -> bool:
        """Complete, and (when ``key`` is given) computed with exactly that run key."""
        try:
            manifest = self.read_manifest()
        except WsiflowError:
            return False
        return manifest.complete and (key is None or manifest.key == key)

    def read_manifest(self) -> ResultManifest:
        data = _read_json(self.manifest_path, RESULT_MANIFEST)
        try:
            return ResultManifest(
                key=str(data["key"]), slide_id=str(data["slide_id"]), model=str(data["model"]),
                files=tuple(data.get("files") or RESULT_FILES), complete=bool(data.get("complete")),
            )
        except KeyError as exc:
            raise NotAResultError(f"the result's {RESULT_MANIFEST} lacks {exc.args[0]!r}") from None

    def write_manifest(self, manifest: ResultManifest) -> None:
        atomic_write_text(self.manifest_path, json.dumps(manifest.to_json(), indent=2))

    def read_summary(self) -> ResultSummary:
        data = _read_json(self.summary_path, _SUMMARY)
        try:
            provenance = data["provenance"]
            model = provenance["model"]
            mpp = provenance["mpp"]
            return ResultSummary(
                slide_id=str(data["slide_id"]),
                tiles=int(data["tiles"]),
                model=ModelProvenance(str(model["name"]), int(model["version"]), str(model["sha256"])),
                mpp=MppResolution(
                    float(mpp["mpp_x"]), float(mpp["mpp_y"]), _one_of(mpp["source"], _MPP_SOURCES, "mpp.source"),
                    mpp.get("metadata_mpp_x"), mpp.get("metadata_mpp_y"), mpp.get("override"), mpp.get("declined"),
                ),
                backend=_one_of(provenance["backend"], BACKEND_NAMES, "backend"),
                hotspots=dict(data.get("hotspots") or {}),
                data=data,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise NotAResultError(f"the result's {_SUMMARY} is incomplete ({type(exc).__name__}: {exc})") from None

    def mark_latest(self) -> None:
        """Point the model folder's ``latest`` at this result (atomically replaced)."""
        link = self.path.parent / LATEST_LINK
        tmp = self.path.parent / f".{LATEST_LINK}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(self.path.name, tmp)
        tmp.replace(link)
