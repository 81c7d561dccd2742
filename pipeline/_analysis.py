"""Analyse one slide into a result folder: tissue -> grid -> chunks -> model -> outputs.

Result folder ``OUT/<slide_id>/<model name>/`` (nothing inside names the slide file):

- ``heatmap.ome.zarr``  per-class probabilities, multiscale, in µm
- ``tissue.ome.zarr``   the tissue mask
- ``tiles.parquet``     one row per analysed tile
- ``results.geojson``   tiles as QuPath detections, class regions as annotations
- ``summary.json``      counts, areas, hotspots, timings, provenance
- ``overview.png``      thumbnail + heatmap + legend
- ``result.json``       written last, atomically: the result is complete only with it

While running, ``.work/`` holds the run key and one marker per finished chunk, so a killed
run resumes where it stopped and produces the same heatmap bit for bit.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from ._backend import BackendName, open_backend
from ._chunks import ChunkTask, plan_chunks
from ._classifier import PatchClassifier
from ._engine import EngineSettings, classify_stream, resolve_device
from ._errors import OutputError, WsiflowError
from ._grid import GridSpec, TileGrid, make_tile_grid
from ._mpp import MppPolicy
from ._omezarr import (
    HeatmapGeometry,
    create_heatmap,
    finalize_heatmap,
    read_heatmap_level0,
    write_heatmap_block,
    write_mask_image,
)
from ._overview import write_overview
from ._privacy import content_digest, record_slide_location, slide_id
from ._slide import Slide, backend_mpp
from ._tables import TileResults, write_geojson, write_tile_table
from ._tissue import TissueParams, detect_tissue

__all__ = [
    "ModelInfo",
    "AnalysisParams",
    "SlideOutcome",
    "ChunkExecutor",
    "ChunkJob",
    "analyse_slide",
    "run_chunk",
    "RESULT_MANIFEST",
]

_log = logging.getLogger(__name__)

RESULT_MANIFEST = "result.json"
_WORK = ".work"
_OVERVIEW_MAX_PX = 1024


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model, for provenance (the engine itself only needs the classifier)."""

    name: str
    version: int
    sha256: str
    class_colors: tuple[str, ...]


@dataclass(frozen=True)
class AnalysisParams:
    """Every parameter of an analysis; all of them are recorded with the results."""

    stride_px: int | None = None
    """Step between tiles at the model's µm/px; None = the model's tile size."""
    min_tissue_fraction: float = 0.25
    edge: Literal["pad", "drop"] = "pad"
    tissue: TissueParams = field(default_factory=TissueParams)
    chunk_cells: int = 64
    """Heatmap block edge in grid cells: the unit of work and of Zarr chunking."""
    region_threshold: float = 0.5
    hotspots: int = 10
    overview_class: str | None = None
    """Class shown in overview.png; None = the second class (the first is usually background)."""

    def grid_spec(self, classifier: PatchClassifier) -> GridSpec:
        prep = classifier.preprocessing
        return GridSpec(
            tile_size_px=prep.tile_size_px,
            target_mpp=prep.target_mpp,
            stride_px=self.stride_px,
            min_tissue_fraction=self.min_tissue_fraction,
            edge=self.edge,
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tissue"] = asdict(self.tissue)
        return data


@dataclass(frozen=True)
class SlideOutcome:
    slide_id: str | None
    status: Literal["done", "reused", "failed"]
    result_dir: Path | None
    tiles: int | None
    error: WsiflowError | None = None
    tiles_per_s: float | None = None
    chunks_computed: int = 0
    chunks_total: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id,
            "status": self.status,
            "result_dir": str(self.result_dir) if self.result_dir else None,
            "tiles": self.tiles,
            "tiles_per_s": self.tiles_per_s,
            "chunks_computed": self.chunks_computed,
            "chunks_total": self.chunks_total,
            "error": {"kind": self.error.kind, "message": self.error.message, "hint": self.error.hint} if self.error else None,
        }


@dataclass(frozen=True)
class ChunkJob:
    """What any worker needs to run a slide's chunks: paths and settings, never pixels,
    models or open handles. Paths must be valid where the worker runs (shared storage)."""

    slide_id: str
    slide_path: str
    backend: str
    mpp_x: float
    mpp_y: float
    grid: GridSpec
    heatmap_path: str
    done_dir: str
    engine: EngineSettings


class ChunkExecutor(Protocol):
    """Runs every task: in this process (``run_local``) or elsewhere (from ``job``).

    ``advance(n)`` reports tiles finished by executors that cannot report per batch.
    Must raise a :class:`WsiflowError` for a chunk that fails.
    """

    def __call__(
        self,
        tasks: Sequence[ChunkTask],
        job: ChunkJob,
        run_local: Callable[[ChunkTask], None],
        advance: Callable[[int], None] | None,
    ) -> None: ...


def _sequential(
    tasks: Sequence[ChunkTask], job: ChunkJob, run_local: Callable[[ChunkTask], None],
    advance: Callable[[int], None] | None,
) -> None:
    for task in tasks:
        run_local(task)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError:
        # Disk full mid-write: leave no half-written temp file behind (it would hold space).
        tmp.unlink(missing_ok=True)
        raise


def run_chunk(
    task: ChunkTask,
    slide: Slide,
    classifier: PatchClassifier,
    grid_spec: GridSpec,
    heatmap_path: Path,
    done_dir: Path,
    engine: EngineSettings,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Read a chunk's tiles, classify them, write its heatmap block, mark it done."""
    tile, mpp = grid_spec.tile_size_px, grid_spec.target_mpp

    def read(i: int) -> np.ndarray:
        return slide.read_region_at_mpp(task.x[i], task.y[i], tile, tile, mpp)

    probabilities = classify_stream(classifier, read, range(len(task)), engine, on_batch)
    write_heatmap_block(heatmap_path, task.row_range, task.col_range, task.rows, task.cols, probabilities)
    _atomic_write(done_dir / f"{task.name}.done", str(len(task)))


def _run_key(digest: str, model: ModelInfo, params: AnalysisParams, grid: GridSpec, mpp: dict[str, Any], backend: str) -> str:
    material = json.dumps(
        {"slide": digest, "model": model.sha256, "classes": model.class_colors, "params": params.to_json(),
         "grid": asdict(grid), "mpp": [mpp["mpp_x"], mpp["mpp_y"]], "backend": backend},
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()


@contextmanager
def _result_lock(result_dir: Path, sid: str) -> Iterator[None]:
    """One writer per result folder: a second submission waits, then finds it complete."""
    result_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = result_dir.parent / f".{result_dir.name}.lock"
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log.info("slide %s: another run is writing this result; waiting for it", sid)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(result_dir: Path, key: str) -> bool:
    manifest = result_dir / RESULT_MANIFEST
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("key") == key
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _prepare_work(result_dir: Path, key: str) -> tuple[Path, bool]:
    """The work dir; resume when it belongs to the same run key, else start clean."""
    work = result_dir / _WORK
    run_file = work / "run.json"
    try:
        if json.loads(run_file.read_text(encoding="utf-8")).get("key") == key:
            return work, True
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    if result_dir.exists():
        shutil.rmtree(result_dir)
    (work / "chunks").mkdir(parents=True)
    _atomic_write(run_file, json.dumps({"key": key}))
    return work, False


def _summary(
    sid: str, model: ModelInfo, classifier: PatchClassifier, params: AnalysisParams, grid: TileGrid,
    slide: Slide, results: TileResults, tissue_area_mm2: float, tissue_fraction: float, mask_mpp: float,
    engine: EngineSettings, device: str, timings: dict[str, float], regions: int,
) -> dict[str, Any]:
    names = classifier.class_names
    stride_um = grid.spec.effective_stride_px * grid.spec.target_mpp
    n = len(results.rows)
    counts = np.bincount(results.predicted, minlength=len(names)) if n else np.zeros(len(names), int)
    cx, cy = results.centre_um()
    hotspots = {}
    for i, name in enumerate(names):
        order = np.argsort(-results.probabilities[:, i], kind="stable")[: params.hotspots] if n else []
        hotspots[name] = [
            {"row": int(results.rows[k]), "col": int(results.cols[k]), "x_um": round(float(cx[k]), 2),
             "y_um": round(float(cy[k]), 2), "probability": round(float(results.probabilities[k, i]), 6)}
            for k in order
        ]
    return {
        "slide_id": sid,
        "tiles": n,
        "grid": {"rows": grid.n_rows, "cols": grid.n_cols, "stride_um": stride_um,
                 "tile_um": grid.spec.tile_size_px * grid.spec.target_mpp},
        "tissue": {"area_mm2": round(tissue_area_mm2, 4), "fraction": round(tissue_fraction, 4), "mask_mpp": mask_mpp},
        "classes": {
            name: {
                "tiles": int(counts[i]),
                "fraction": round(float(counts[i]) / n, 6) if n else 0.0,
                "area_mm2": round(float(counts[i]) * stride_um * stride_um / 1e6, 6),
                "mean_probability": round(float(results.probabilities[:, i].mean()), 6) if n else 0.0,
            }
            for i, name in enumerate(names)
        },
        "hotspots": hotspots,
        "regions": regions,
        "timings": timings,
        "provenance": {
            "wsiflow_version": package_version("wsiflow"),
            "model": {"name": model.name, "version": model.version, "sha256": model.sha256},
            "parameters": {**params.to_json(), "grid": asdict(grid.spec),
                           "engine": {"batch_size": engine.batch_size, "readers": engine.readers,
                                      "cpu_threads": engine.cpu_threads}},
            "mpp": slide.mpp.to_json(),
            "slide": {"width": slide.info.width, "height": slide.info.height,
                      "levels": len(slide.info.level_dimensions), "vendor": slide.info.vendor,
                      "objective_power": slide.info.objective_power},
            "backend": slide.info.backend,
            "device": device,
        },
    }


def analyse_slide(
    path: str | os.PathLike[str],
    classifier: PatchClassifier,
    model: ModelInfo,
    *,
    out_dir: Path,
    secret: bytes,
    params: AnalysisParams | None = None,
    engine: EngineSettings | None = None,
    mpp_policy: MppPolicy | None = None,
    backend: BackendName = "auto",
    force: bool = False,
    executor: ChunkExecutor | None = None,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> SlideOutcome:
    """Analyse one slide; wsiflow errors are returned in the outcome, never raised.

    ``progress(total_tiles, already_done)`` may return a callback taking tiles per batch.
    """
    params = params or AnalysisParams()
    engine = engine or EngineSettings()
    sid: str | None = None
    try:
        start = time.perf_counter()
        opened = open_backend(path, backend)  # first: it tells missing/unreadable/unsupported apart
        try:
            digest = content_digest(path)
            sid = slide_id(digest, secret)
            resolution = backend_mpp(opened, path, mpp_policy)
        except BaseException:
            opened.close()
            raise
        with Slide(opened, resolution) as slide, ExitStack() as held:
            spec = params.grid_spec(classifier)
            key = _run_key(digest, model, params, spec, resolution.to_json(), slide.info.backend)
            result_dir = Path(out_dir) / sid / model.name
            held.enter_context(_result_lock(result_dir, sid))
            record_slide_location(sid, path)
            if not force and _is_complete(result_dir, key):
                summary = json.loads((result_dir / "summary.json").read_text(encoding="utf-8"))
                return SlideOutcome(sid, "reused", result_dir, summary["tiles"])
            if force and result_dir.exists():
                shutil.rmtree(result_dir)
            work, resumed = _prepare_work(result_dir, key)
            if resumed:
                _log.info("slide %s: resuming an interrupted run", sid)

            mask_mpp = params.tissue.mask_mpp
            mask = detect_tissue(slide.read_thumbnail(mask_mpp), mask_mpp, params.tissue)
            grid = make_tile_grid(slide.info.width, slide.info.height, resolution.mpp_x, resolution.mpp_y, spec, mask)
            tissue_s = time.perf_counter() - start

            heatmap_path = result_dir / "heatmap.ome.zarr"
            names = classifier.class_names
            if not (resumed and (heatmap_path / "0").exists()):
                create_heatmap(heatmap_path, len(names), grid.n_rows, grid.n_cols, params.chunk_cells)
            tasks = plan_chunks(grid, params.chunk_cells)
            done_dir = work / "chunks"
            pending = [t for t in tasks if not (done_dir / f"{t.name}.done").exists()]
            pending_tiles = sum(len(t) for t in pending)
            on_batch = progress(len(grid), len(grid) - pending_tiles) if progress else None
            device = resolve_device(engine.device)

            def run(task: ChunkTask) -> None:
                run_chunk(task, slide, classifier, spec, heatmap_path, done_dir, engine, on_batch)

            job = ChunkJob(
                slide_id=sid, slide_path=os.fspath(Path(path).resolve()), backend=slide.info.backend,
                mpp_x=resolution.mpp_x, mpp_y=resolution.mpp_y, grid=spec,
                heatmap_path=os.fspath(heatmap_path.resolve()), done_dir=os.fspath(done_dir.resolve()), engine=engine,
            )
            infer_start = time.perf_counter()
            (executor or _sequential)(pending, job, run, on_batch)
            inference_s = time.perf_counter() - infer_start

            final_start = time.perf_counter()
            level0 = read_heatmap_level0(heatmap_path)
            results = TileResults(
                grid.rows, grid.cols, grid.x, grid.y, grid.tile_width_l0, grid.tile_height_l0,
                (resolution.mpp_x, resolution.mpp_y), grid.tissue_fraction,
                level0[:, grid.rows, grid.cols].T.copy() if len(grid) else np.zeros((0, len(names)), np.float32),
                names,
            )
            stride_um = spec.effective_stride_px * spec.target_mpp
            geometry = HeatmapGeometry(spacing_um=stride_um, origin_um=spec.tile_size_px * spec.target_mpp / 2)
            finalize_heatmap(heatmap_path, names, model.class_colors, geometry,
                             {"slide_id": sid, "model": f"{model.name}@{model.version}"})
            write_mask_image(result_dir / "tissue.ome.zarr", mask.mask, mask.mpp)
            write_tile_table(results, result_dir / "tiles.parquet")
            regions = write_geojson(
                results, level0, model.class_colors, (grid.stride_x_l0, grid.stride_y_l0),
                params.region_threshold, result_dir / "results.geojson",
            )
            overview_class = params.overview_class or names[min(1, len(names) - 1)]
            if overview_class not in names:
                overview_class = names[min(1, len(names) - 1)]
            extent_um = max(slide.info.width * resolution.mpp_x, slide.info.height * resolution.mpp_y)
            thumb_mpp = max(extent_um / _OVERVIEW_MAX_PX, resolution.mpp_x, resolution.mpp_y)
            write_overview(
                slide.read_thumbnail(thumb_mpp), thumb_mpp, level0[names.index(overview_class)],
                stride_um, geometry.origin_um, overview_class,
                f"slide {sid} · {model.name}@{model.version} · P({overview_class})", result_dir / "overview.png",
            )
            finalize_s = time.perf_counter() - final_start
            computed = pending_tiles
            timings = {
                "tissue_s": round(tissue_s, 3),
                "inference_s": round(inference_s, 3),
                "finalize_s": round(finalize_s, 3),
                "total_s": round(time.perf_counter() - start, 3),
                "tiles_computed": computed,
                "tiles_per_s": round(computed / inference_s, 2) if computed and inference_s > 0 else None,
            }
            summary = _summary(sid, model, classifier, params, grid, slide, results, mask.area_mm2, mask.fraction,
                               mask.mpp, engine, device, timings, regions)
            _atomic_write(result_dir / "summary.json", json.dumps(summary, indent=2))
            # The manifest first, then drop .work: should writing the manifest fail (disk
            # full), the chunk markers are still there and a rerun only redoes the finalising.
            _atomic_write(result_dir / RESULT_MANIFEST, json.dumps({
                "complete": True,
                "key": key,
                "slide_id": sid,
                "model": f"{model.name}@{model.version}",
                "files": ["heatmap.ome.zarr", "tissue.ome.zarr", "tiles.parquet", "results.geojson",
                          "summary.json", "overview.png"],
            }, indent=2))
            shutil.rmtree(work, ignore_errors=True)
            return SlideOutcome(
                sid, "done", result_dir, len(grid), tiles_per_s=timings["tiles_per_s"],
                chunks_computed=len(pending), chunks_total=len(tasks),
            )
    except WsiflowError as exc:
        _log.info("slide %s failed: %s", sid, exc.kind)
        return SlideOutcome(sid, "failed", None, None, error=exc)
    except OSError as exc:
        # Writing results failed (ENOSPC, EACCES...): report it without the path.
        error = OutputError(f"writing results failed: {exc.strerror or type(exc).__name__}")
        _log.info("slide %s failed: %s", sid, error.kind)
        return SlideOutcome(sid, "failed", None, None, error=error)
