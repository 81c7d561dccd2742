"""End to end against the shared-cores bound, all three measured in one run.

    .venv/bin/python -m bench.bench_e2e [--size 16384] [--tissue 0.5] [--passes 3]

On a generated JPEG-tiled pyramid of real tissue texture (``bench/_mosaic.py``; reused when
it exists), for the tissue tiles of one model's grid, measures interleaved pass by pass
(so that load changes hit every measure alike):

- model only: ``classify_stream`` fed pre-decoded tiles from memory (same batch size and
  torch threads as the run);
- reader only: ``Slide.read_region_at_mpp`` of the same tiles on the run's reader count
  (a freshly opened slide each pass, as a run has);
- end to end: ``classify_stream`` reading the same tiles (a freshly opened slide), with
  the engine's settings as a ``wsiflow run`` would use them.

On a CPU the model and the readers share the cores, so the best possible end to end is
1 / (1/model + 1/reader) (each side alone uses every core); the report gives end to end
over that bound (issue 18 target: >= 0.85) and over min(model, reader). ``--sweep``
also runs end to end with other torch-thread / reader counts (explicit settings) to show
what the engine's choice leaves on the table. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def _grid(slide_path: Path, classifier: Any) -> Any:
    from pipeline import GridSpec, TissueParams, detect_tissue, make_tile_grid, open_slide

    prep = classifier.preprocessing
    spec = GridSpec(prep.tile_size_px, prep.target_mpp)
    params = TissueParams()
    with open_slide(slide_path) as slide:
        mask = detect_tissue(slide.read_thumbnail(params.mask_mpp), params.mask_mpp, params)
        return spec, make_tile_grid(slide.info.width, slide.info.height, slide.mpp.mpp_x, slide.mpp.mpp_y, spec, mask)


def _classifier(name: str) -> Any:
    if name == "tissue-qc":
        from models import Registry

        return Registry().load("tissue-qc")
    from bench.bench_gpu import _TimmClassifier

    return _TimmClassifier(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16384, help="slide side in level-0 px")
    parser.add_argument("--tissue", type=float, default=0.5)
    parser.add_argument("--mpp", type=float, default=0.5,
                        help="the slide's µm/px (0.5: tissue-qc reads level 1 as stored; e.g. 0.45 adds a resize)")
    parser.add_argument("--tiles", type=int, default=0, help="tiles per measure (0: every tissue tile)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--model", default="tissue-qc", help="tissue-qc, or a timm architecture (random weights)")
    parser.add_argument("--readers", type=int, default=None, help="default: the engine's choice")
    parser.add_argument("--cpu-threads", type=int, default=None, help="default: the engine's choice")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the engine's choice")
    parser.add_argument("--reader-processes", type=int, default=0, help="decode in N processes (0: threads)")
    parser.add_argument("--sweep", action="store_true", help="also end to end at other thread/reader counts")
    parser.add_argument("--work", type=Path, default=Path("/tmp/wsiflow-e2e"))
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    args = parser.parse_args()

    import torch

    from bench._mosaic import write_mosaic_slide
    from pipeline import EngineSettings, EngineStats, classify_stream, open_slide

    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / f"mosaic-{args.size}-{args.tissue:g}{'' if args.mpp == 0.5 else f'-{args.mpp:g}mpp'}.tiff"
    if not path.exists():
        write_mosaic_slide(path, args.source, args.size, args.tissue, mpp=args.mpp)
    classifier = _classifier(args.model)
    prep = classifier.preprocessing
    tile, mpp = prep.tile_size_px, prep.target_mpp
    spec, grid = _grid(path, classifier)
    positions = [(float(x), float(y)) for x, y in zip(grid.x, grid.y, strict=True)]
    if args.tiles:
        positions = [positions[i % len(positions)] for i in range(args.tiles)]
    count = len(positions)

    base = EngineSettings(device="cpu")
    overrides = {k: v for k, v in (("readers", args.readers), ("cpu_threads", args.cpu_threads),
                                   ("batch_size", args.batch_size), ("reader_processes", args.reader_processes))
                 if v is not None}
    settings = EngineSettings(**{**_fields(base), **overrides})
    with open_slide(path) as slide:
        decoded = np.stack([slide.read_region_at_mpp(x, y, tile, tile, mpp) for x, y in positions])

    def model_only() -> tuple[float, dict[str, Any]]:
        # The engine's path with reading replaced by a copy from memory; its torch threads
        # are the run's (cpu_threads), its one "reader" only copies.
        stats = EngineStats()
        start = time.perf_counter()
        classify_stream(classifier, decoded.__getitem__, range(count),
                        EngineSettings(**{**_fields(settings), "readers": 1}), stats=stats)
        return count / (time.perf_counter() - start), {}

    from pipeline._chunk_run import _tile_reader

    threads = max(settings.readers, settings.reader_processes)

    def reader_only() -> tuple[float, dict[str, Any]]:
        # The run's reading path: threads, or threads waiting on reader processes.
        with open_slide(path) as slide:
            read_at = _tile_reader(slide, settings, tile, mpp)
            start = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                for _ in pool.map(lambda p: read_at(*p), positions):
                    pass
            return count / (time.perf_counter() - start), {}

    def end_to_end(engine: EngineSettings) -> tuple[float, dict[str, Any]]:
        with open_slide(path) as slide:
            read_at = _tile_reader(slide, engine, tile, mpp)
            stats = EngineStats()
            start = time.perf_counter()
            classify_stream(classifier, lambda i: read_at(*positions[i]), range(count),
                            replace(engine, readers=max(engine.readers, engine.reader_processes)), stats=stats)
            rate = count / (time.perf_counter() - start)
            return rate, {"waiting_for_readers_pct": round(100 * stats.wait_for_readers_s / stats.wall_s, 1),
                          "batch_size": stats.batch_size, "cpu_threads": stats.cpu_threads,
                          "readers": stats.readers}

    def chunks() -> tuple[float, dict[str, Any]]:
        # What `wsiflow run` does for the inference stage: every tissue tile of the grid, cut
        # into the run's chunks, each chunk's heatmap block written and marked when done.
        import shutil
        import tempfile

        from pipeline import plan_chunks
        from pipeline._chunk_run import run_chunks
        from pipeline._chunks import choose_chunk_cells
        from pipeline._omezarr import create_heatmap

        cells = choose_chunk_cells(grid, None)
        tasks = plan_chunks(grid, cells)
        folder = Path(tempfile.mkdtemp(dir=args.work))
        try:
            (folder / "done").mkdir()
            create_heatmap(folder / "h.zarr", len(classifier.class_names), grid.n_rows, grid.n_cols, cells)
            with open_slide(path) as slide:
                start = time.perf_counter()
                run_chunks(tasks, slide, classifier, spec, folder / "h.zarr", folder / "done", settings)
                return len(grid) / (time.perf_counter() - start), {"chunks": len(tasks)}
        finally:
            shutil.rmtree(folder)

    measures: dict[str, Any] = {"model_only": model_only, "reader_only": reader_only,
                                "end_to_end": lambda: end_to_end(settings)}
    if not args.tiles:
        measures["run_chunks"] = chunks
    if args.sweep:
        cores = len(os.sched_getaffinity(0))
        for threads in sorted({1, max(1, cores // 2), cores}):
            for readers in sorted({1, max(1, cores // 2), cores, cores + 1}):
                engine = EngineSettings(**{**_fields(settings), "cpu_threads": threads, "readers": readers})
                measures[f"end_to_end_t{threads}_r{readers}"] = lambda e=engine: end_to_end(e)
    model_only()  # warm-up: first forward, allocator, thread pools (and reader processes)
    reader_only()
    rates: dict[str, list[float]] = {name: [] for name in measures}
    extra: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for _ in range(args.passes):
        for name, measure in measures.items():
            rate, info = measure()
            rates[name].append(rate)
            extra[name] = info
    best = {name: max(values) for name, values in rates.items()}
    model, reader, e2e = best["model_only"], best["reader_only"], best["end_to_end"]
    bound = 1 / (1 / model + 1 / reader)
    load = os.getloadavg()
    report: dict[str, Any] = {
        "machine": {"cpus_usable": len(os.sched_getaffinity(0)),
                    "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "load_average_after": [round(v, 2) for v in load]},
        "slide": {"side_px": args.size, "tissue": args.tissue, "file_mib": round(path.stat().st_size / 2**20, 1)},
        "model": args.model, "tiles_per_measure": count, "passes": args.passes,
        "engine": {"batch_size": extra["end_to_end"]["batch_size"], "readers": settings.readers,
                   "cpu_threads": extra["end_to_end"]["cpu_threads"], "reader_processes": settings.reader_processes},
        "tiles_per_s_best": {k: round(v, 1) for k, v in best.items()},
        "tiles_per_s_median": {k: round(statistics.median(v), 1) for k, v in rates.items()},
        "end_to_end_waiting_for_readers_pct": extra["end_to_end"]["waiting_for_readers_pct"],
        "shared_cores_bound_tiles_per_s": round(bound, 1),
        "end_to_end_vs_shared_cores_bound": round(e2e / bound, 3),
        "end_to_end_vs_min_component": round(e2e / min(model, reader), 3),
        **({"run_chunks_vs_shared_cores_bound": round(best["run_chunks"] / bound, 3),
            "run_chunks_chunks": extra["run_chunks"]["chunks"]} if "run_chunks" in best else {}),
        "total_s": round(time.perf_counter() - started, 1),
    }
    if args.sweep:
        report["sweep_vs_bound"] = {k: round(v / bound, 3) for k, v in best.items() if k.startswith("end_to_end_t")}
    print(json.dumps(report, indent=2))
    return 0


def _fields(settings: Any) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(settings, f.name) for f in fields(settings)}


if __name__ == "__main__":
    sys.exit(main())
