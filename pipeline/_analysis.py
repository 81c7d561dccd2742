"""Analyse one slide into a result folder: tissue -> grid -> chunks -> model -> outputs.

The folder layout and file names belong to :class:`pipeline.ResultFolder`. While running,
``.work/`` holds the run key and one marker per finished chunk, so a killed run resumes
where it stopped and produces the same heatmap bit for bit. A complete result with the
same run key (slide content, model, parameters, µm/px, backend) is reused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._backend import open_backend
from ._chunk_run import ChunkExecutor, ChunkJob, chunk_marker, run_chunks, run_sequentially
from ._chunks import ChunkTask, choose_chunk_cells, plan_chunks
from ._classifier import PatchClassifier
from ._engine import resolve_device
from ._errors import OutputError, WorkerError, WsiflowError
from ._grid import GridSpec, TileGrid, make_tile_grid
from ._identity import SlideIdentity, identify_slide
from ._omezarr import (
    HeatmapGeometry,
    create_heatmap,
    finalize_heatmap,
    read_heatmap_level0,
    write_mask_image,
)
from ._outcome import SlideOutcome
from ._overview import choose_overview_class, write_overview
from ._privacy import record_slide_location
from ._progress import Progress
from ._result import ModelInfo, ResultFolder, ResultManifest, atomic_write_text
from ._settings import RunSettings, analysis_digest
from ._slide import Slide, backend_mpp
from ._summary import SummaryInputs, build_summary
from ._tables import TileResults, write_geojson, write_tile_table
from ._tissue import TissueMask, detect_tissue

__all__ = ["analyse_slide"]

_log = logging.getLogger(__name__)

_OVERVIEW_MAX_PX = 1024


@dataclass
class _Attempt:
    """What is known about a slide so far: reported even when the analysis fails."""

    model: str
    slide_id: str | None = None
    slide: Slide | None = None
    started: float = field(default_factory=time.perf_counter)

    def failed(self, error: WsiflowError) -> SlideOutcome:
        _log.info("slide %s failed: %s", self.slide_id, error.kind)
        mpp = self.slide.mpp if self.slide is not None else None
        return SlideOutcome(self.slide_id, "failed", None, None, error=error, mpp=mpp, model=self.model)


class _Deadline:
    """``engine.slide_time_limit_s``, checked between steps and after each batch of tiles.

    In this process a long native call (one huge read, one batch) cannot be interrupted; an
    isolated run's parent also kills the child that goes on past the limit (``flows``).
    """

    def __init__(self, limit_s: float | None, started: float) -> None:
        self._limit_s = limit_s
        self._started = started

    def check(self) -> None:
        if self._limit_s is not None and time.perf_counter() - self._started > self._limit_s:
            raise WorkerError(
                f"the slide's analysis ran past the time limit of {self._limit_s:g} s and was stopped",
                hint="raise --slide-time-limit (engine.slide_time_limit_s) if the slide is just large, or check "
                     "it with `wsiflow inspect`; finished chunks are kept, so a rerun resumes",
                transient=False,
            )


class _Clock:
    """Wall time of each step, for summary.json's timings."""

    def __init__(self, started: float) -> None:
        self._started = started
        self._last = started
        self._last_part = started
        self._laps: dict[str, float] = {}
        self._parts: dict[str, float] = {}
        self.tiles_per_s: float | None = None

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self._laps[name] = round(now - self._last, 3)
        self._last = self._last_part = now

    def part(self, name: str) -> None:
        """A step inside the current lap (each output written): reported under ``parts``."""
        now = time.perf_counter()
        self._parts[name] = round(now - self._last_part, 3)
        self._last_part = now

    def timings(self, tiles_computed: int) -> dict[str, object]:
        inference_s = self._laps.get("inference_s", 0.0)
        self.tiles_per_s = round(tiles_computed / inference_s, 2) if tiles_computed and inference_s > 0 else None
        return {**self._laps, "total_s": round(time.perf_counter() - self._started, 3),
                "tiles_computed": tiles_computed, "tiles_per_s": self.tiles_per_s, "parts": dict(self._parts)}


@dataclass(frozen=True)
class _Plan:
    """Where and what one analysis computes."""

    spec: GridSpec
    key: str
    folder: ResultFolder


@dataclass(frozen=True)
class _Context:
    """One slide's analysis: what is analysed, with what, and where it goes."""

    path: Path
    slide: Slide
    identity: SlideIdentity
    classifier: PatchClassifier
    model: ModelInfo
    settings: RunSettings
    plan: _Plan


@dataclass(frozen=True)
class _Layout:
    """The tissue mask, the tile grid on it, and the chunks still to compute."""

    mask: TissueMask
    grid: TileGrid
    chunk_cells: int
    tasks: list[ChunkTask]
    pending: list[ChunkTask]

    @property
    def pending_tiles(self) -> int:
        return sum(len(t) for t in self.pending)


@contextmanager
def _open(path: Path, settings: RunSettings, secret: bytes, identity: SlideIdentity | None,
          attempt: _Attempt) -> Iterator[tuple[Slide, SlideIdentity]]:
    """Open the slide, know its identity (hashed here unless given) and resolve its µm/px."""
    opened = open_backend(path, settings.backend)  # first: tells missing/unreadable/unsupported apart
    try:
        identity = identity or identify_slide(path, secret)
        attempt.slide_id = identity.slide_id
        resolution = backend_mpp(opened, path, settings.mpp)
    except BaseException:
        opened.close()
        raise
    with Slide(opened, resolution) as slide:
        attempt.slide = slide
        yield slide, identity


def _plan(slide: Slide, identity: SlideIdentity, classifier: PatchClassifier, model: ModelInfo,
          settings: RunSettings) -> _Plan:
    spec = settings.analysis.grid.spec(classifier.preprocessing, model.ref)
    # The reader (backend, or backend + direct JPEG reader) decides the pixels: a result made
    # with another reader lives in another folder and is never resumed with this one.
    digest = analysis_digest(model, settings.analysis, spec, slide.mpp, slide.reader)
    key = hashlib.sha256(f"{identity.digest}:{digest}".encode()).hexdigest()
    return _Plan(spec, key, ResultFolder.for_run(settings.out_dir, identity.slide_id, model, digest))


@contextmanager
def _result_lock(folder: ResultFolder, sid: str) -> Iterator[None]:
    """One writer per result folder: a second submission waits, then finds it complete."""
    folder.path.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log.info("slide %s: another run is writing this result; waiting for it", sid)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare_work(folder: ResultFolder, key: str, force: bool) -> bool:
    """Make ``.work/``; True when it resumes an interrupted run with the same key."""
    run_file = folder.work / "run.json"
    if not force:
        try:
            if json.loads(run_file.read_text(encoding="utf-8")).get("key") == key:
                _log.info("resuming an interrupted run")
                return True
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    if folder.path.exists():
        shutil.rmtree(folder.path)
    folder.chunk_markers.mkdir(parents=True)
    atomic_write_text(run_file, json.dumps({"key": key}))
    return False


def _reused(folder: ResultFolder, attempt: _Attempt, sid: str) -> SlideOutcome:
    folder.mark_latest()
    summary = folder.read_summary()
    mpp = attempt.slide.mpp if attempt.slide is not None else None
    return SlideOutcome(sid, "reused", folder.path, summary.tiles, mpp=mpp, model=attempt.model)


def _layout(slide: Slide, spec: GridSpec, settings: RunSettings, folder: ResultFolder) -> _Layout:
    tissue = settings.analysis.tissue
    mask = detect_tissue(slide.read_thumbnail(tissue.mask_mpp), tissue.mask_mpp, tissue)
    grid = make_tile_grid(slide.info.width, slide.info.height, slide.mpp.mpp_x, slide.mpp.mpp_y, spec, mask)
    chunk_cells = choose_chunk_cells(grid, settings.analysis.chunk_cells)
    tasks = plan_chunks(grid, chunk_cells)
    pending = [t for t in tasks if not chunk_marker(folder.chunk_markers, t).exists()]
    return _Layout(mask, grid, chunk_cells, tasks, pending)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _stage(progress: Progress | None, sid: str | None, name: str, detail: str = "") -> None:
    _log.info("slide %s: %s%s", sid, name, f" ({detail})" if detail else "")
    if progress is not None:
        progress.stage(name, detail)


def _logged_progress(sid: str, total: int, done: int, shown: Callable[[int], None] | None,
                     deadline: _Deadline) -> Callable[[int], None]:
    """The tile callback: passes batches on to ``shown``, logs every tenth of the slide
    at INFO (what ``-v`` and a Prefect worker's log show instead of a bar) and stops the
    slide past its time limit (finished chunks are marked before it is called)."""
    state = {"done": done, "logged": done * 10 // max(total, 1)}

    def advance(tiles: int) -> None:
        deadline.check()
        state["done"] += tiles
        tenth = state["done"] * 10 // max(total, 1)
        if tenth > state["logged"]:
            state["logged"] = tenth
            _log.info("slide %s: %d/%d tiles (%d %%)", sid, state["done"], total, 100 * state["done"] // total)
        if shown is not None:
            shown(tiles)

    return advance


def _compute(ctx: _Context, layout: _Layout, resumed: bool, executor: ChunkExecutor | None,
             progress: Progress | None, deadline: _Deadline) -> None:
    """Run the pending chunks (here or on ``executor``) into the heatmap's level 0."""
    folder, slide, settings = ctx.plan.folder, ctx.slide, ctx.settings
    if not (resumed and (folder.heatmap / "0").exists()):
        create_heatmap(folder.heatmap, len(ctx.classifier.class_names), layout.grid.n_rows, layout.grid.n_cols,
                       layout.chunk_cells)
    grid_total = len(layout.grid)
    done = grid_total - layout.pending_tiles
    _stage(progress, ctx.identity.slide_id, "classifying",
           f"{_count(grid_total, 'tile')} in {_count(len(layout.tasks), 'chunk')}"
           + (f", {len(layout.tasks) - len(layout.pending)} already done" if resumed else ""))
    on_batch = _logged_progress(ctx.identity.slide_id, grid_total, done,
                                progress.tiles(grid_total, done) if progress else None, deadline)

    def run_here(tasks: Sequence[ChunkTask]) -> None:
        run_chunks(tasks, slide, ctx.classifier, ctx.plan.spec, folder.heatmap, folder.chunk_markers,
                   settings.engine, on_batch)

    job = ChunkJob(
        slide_id=ctx.identity.slide_id, slide_path=os.fspath(ctx.path.resolve()), backend=slide.info.backend,
        mpp_x=slide.mpp.mpp_x, mpp_y=slide.mpp.mpp_y, grid=ctx.plan.spec,
        heatmap_path=os.fspath(folder.heatmap.resolve()), done_dir=os.fspath(folder.chunk_markers.resolve()),
        engine=settings.engine, reader=slide.reader,
    )
    (executor or run_sequentially)(layout.pending, job, run_here, on_batch)


def _write_outputs(ctx: _Context, layout: _Layout, clock: _Clock) -> tuple[TileResults, int]:
    """Heatmap pyramid, tissue mask, tile table, GeoJSON and overview; the table and regions."""
    folder, spec, grid, params = ctx.plan.folder, ctx.plan.spec, layout.grid, ctx.settings.analysis
    slide, model, sid = ctx.slide, ctx.model, ctx.identity.slide_id
    names = ctx.classifier.class_names
    level0 = read_heatmap_level0(folder.heatmap)
    probabilities = level0[:, grid.rows, grid.cols].T.copy() if len(grid) else np.zeros((0, len(names)), np.float32)
    results = TileResults(grid, probabilities, tuple(names), sid, model.ref)
    stride_um = spec.effective_stride_px * spec.target_mpp
    geometry = HeatmapGeometry(spacing_um=stride_um, origin_um=spec.tile_size_px * spec.target_mpp / 2)
    clock.part("read_heatmap_s")
    finalize_heatmap(folder.heatmap, names, model.class_colors, geometry, {"slide_id": sid, "model": model.ref})
    clock.part("heatmap_pyramid_s")
    write_mask_image(folder.tissue, layout.mask.mask, layout.mask.mpp)
    clock.part("tissue_mask_s")
    write_tile_table(results, folder.tiles)
    clock.part("tile_table_s")
    regions = write_geojson(results, model.class_colors, params.region_threshold, folder.geojson)
    clock.part("geojson_s")
    choice = choose_overview_class(names, probabilities, params.overview_class)
    shown = choice.class_name
    note = None
    if not len(grid):
        note = ("no tissue found: 0 tiles analysed" if not layout.mask.mask.any()
                else "0 tiles analysed: no tile reached the tissue threshold")
    kept = np.zeros(level0.shape[1:], dtype=bool)
    kept[grid.rows, grid.cols] = True
    extent_um = max(slide.info.width * slide.mpp.mpp_x, slide.info.height * slide.mpp.mpp_y)
    thumb_mpp = max(extent_um / _OVERVIEW_MAX_PX, slide.mpp.mpp_x, slide.mpp.mpp_y)
    thumbnail = slide.read_thumbnail(thumb_mpp)
    clock.part("overview_read_s")
    write_overview(
        thumbnail, thumb_mpp, level0[names.index(shown)], kept, stride_um, geometry.origin_um,
        shown, f"slide {sid} · {model.ref} · P({shown})\n{choice.reason}", folder.overview, note,
    )
    clock.part("overview_write_s")
    return results, regions


def _seal(folder: ResultFolder, key: str, sid: str, model: ModelInfo, summary: dict[str, object]) -> None:
    """summary.json, then result.json (complete), then drop ``.work`` and move ``latest``."""
    atomic_write_text(folder.summary_path, json.dumps(summary, indent=2))
    # The manifest first, then drop .work: should writing the manifest fail (disk full),
    # the chunk markers are still there and a rerun only redoes the finalising.
    folder.write_manifest(ResultManifest(key=key, slide_id=sid, model=model.ref))
    shutil.rmtree(folder.work, ignore_errors=True)
    folder.mark_latest()


def analyse_slide(
    path: str | os.PathLike[str],
    classifier: PatchClassifier,
    model: ModelInfo,
    settings: RunSettings,
    *,
    secret: bytes,
    identity: SlideIdentity | None = None,
    executor: ChunkExecutor | None = None,
    progress: Progress | None = None,
    on_model_built: Callable[[], None] | None = None,
) -> SlideOutcome:
    """Analyse one slide with ``settings``; wsiflow errors are returned in the outcome, never raised.

    ``identity`` (computed once by the caller) saves hashing the slide again. A lazily loaded
    model is built here when the slide needs it; that time does not count against the slide's
    time limit, and ``on_model_built`` tells the caller when it is done (a watchdog restarts its clock).
    """
    attempt = _Attempt(model=model.ref)
    _stage(progress, identity.slide_id if identity else None, "opening")
    slide_path = Path(path)
    try:
        clock = _Clock(attempt.started)
        with _open(slide_path, settings, secret, identity, attempt) as (slide, ident):
            clock.lap("open_s")  # opening the slide (and hashing it when no identity was given)
            sid = ident.slide_id
            plan = _plan(slide, ident, classifier, model, settings)
            with _result_lock(plan.folder, sid):
                record_slide_location(sid, slide_path)
                if not settings.force and plan.folder.is_complete(plan.key):
                    _stage(progress, sid, "reused", "a complete result with the same parameters exists")
                    return _reused(plan.folder, attempt, sid)
                resumed = _prepare_work(plan.folder, plan.key, settings.force)
                build_s = 0.0
                if executor is None and not getattr(classifier, "built", True):
                    # A model loaded lazily (models.LoadedModel) is built here, once per process:
                    # not for a reused result, not inside the inference's clock or the time limit.
                    _stage(progress, sid, "building model")
                    build_start = time.perf_counter()
                    classifier.module  # noqa: B018
                    build_s = time.perf_counter() - build_start
                    if on_model_built is not None:
                        on_model_built()
                clock.lap("prepare_s")
                ctx = _Context(slide_path, slide, ident, classifier, model, settings, plan)
                deadline = _Deadline(settings.engine.slide_time_limit_s, attempt.started + build_s)
                _stage(progress, sid, "finding tissue")
                layout = _layout(slide, plan.spec, settings, plan.folder)
                clock.lap("tissue_s")
                deadline.check()
                _compute(ctx, layout, resumed, executor, progress, deadline)
                clock.lap("inference_s")
                deadline.check()
                _stage(progress, sid, "writing results")
                results, regions = _write_outputs(ctx, layout, clock)
                clock.lap("finalize_s")
                summary = build_summary(SummaryInputs(
                    sid, model, classifier.class_names, settings.analysis, layout.grid, slide, results,
                    layout.mask, settings.engine, resolve_device(settings.engine.device),
                    clock.timings(layout.pending_tiles), regions, layout.chunk_cells, len(layout.tasks),
                ))
                _seal(plan.folder, plan.key, sid, model, summary)
                return SlideOutcome(
                    sid, "done", plan.folder.path, len(layout.grid), tiles_per_s=clock.tiles_per_s,
                    chunks_computed=len(layout.pending), chunks_total=len(layout.tasks),
                    mpp=slide.mpp, model=model.ref,
                )
    except WsiflowError as exc:
        return attempt.failed(exc)
    except OSError as exc:
        # Writing results failed (ENOSPC, EACCES...): report it without the path.
        return attempt.failed(OutputError(f"writing results failed: {exc.strerror or type(exc).__name__}"))
