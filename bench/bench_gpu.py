"""One command for a lent GPU: reader, model and end to end on a generated gigapixel slide.

    .venv/bin/python -m bench.bench_gpu                 # on the GPU machine (< 8 min)
    .venv/bin/python -m bench.bench_gpu --quick         # a small CPU check that the script works

Generates a 1.07-gigapixel JPEG-tiled pyramidal TIFF of real tissue texture (0.5 µm/px,
25 % tissue in 16 x 16-tile islands, ``bench/_mosaic.py``; reused when it exists), finds its tissue and lays each
model's grid on it, then for tissue-qc (the bundled model) and a ResNet-50 (timm, random
weights: nothing is downloaded) measures, in one process:

- model only: the engine's model path (normalise + forward + softmax) on uint8 tiles
  already on the device, batches back to back;
- reader: ``Slide.read_region_at_mpp`` of the tissue tiles on ``--readers`` threads, no model
  (and on 1, half and all of the usable cores: does decoding scale, or does the GIL cap it?);
- end to end: ``classify_stream`` (reader threads -> pinned buffers -> copy stream ->
  model), with the GPU's busy time from CUDA events and the time the model waited for readers;
- slides/hour at 10,000 tiles a slide from the end-to-end rate (inference only: per-slide
  fixed costs are measured by ``bench/bench_overhead.py``);
- the batch size: the engine's automatic choice (largest that fits, from trial forwards)
  unless ``--batch-size`` is given. On CPU also end to end over the shared-cores bound
  1 / (1/model + 1/reader) (model and readers then compete for the same cores).

Tiles cycle over the slide's tissue tiles until ``--tiles`` are done. Prints a table and one
JSON document (also written to ``--json`` when given). Exits 2 when ``--device cuda`` is asked
for and no GPU is usable.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


class _TimmClassifier:
    """A ResNet-50-class model with random weights, 224 px at 0.5 µm/px, ImageNet normalisation."""

    def __init__(self, arch: str) -> None:
        import timm

        from pipeline import Preprocessing

        self.class_names = tuple(f"class{i}" for i in range(4))
        self.preprocessing = Preprocessing(224, 0.5, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        self.module = timm.create_model(arch, pretrained=False, num_classes=len(self.class_names))


def _tissue_tiles(slide, spec) -> list[tuple[float, float]]:
    from pipeline import TissueParams, detect_tissue, make_tile_grid

    params = TissueParams()
    mask = detect_tissue(slide.read_thumbnail(params.mask_mpp), params.mask_mpp, params)
    grid = make_tile_grid(slide.info.width, slide.info.height, slide.mpp.mpp_x, slide.mpp.mpp_y, spec, mask)
    return [(float(x), float(y)) for x, y in zip(grid.x, grid.y, strict=True)]


def _model_only(model, classifier, device: str, batch_size: int, tiles: int) -> float:
    import torch

    tile = classifier.preprocessing.tile_size_px
    bank = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (batch_size, tile, tile, 3), dtype=np.uint8))
    batch = bank.to(device)
    for _ in range(3):  # warm-up (cuDNN autotuning, allocator)
        model.forward(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    steps = max(2, tiles // batch_size)
    start = time.perf_counter()
    for _ in range(steps):
        model.forward(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def _reader_rate(read, count: int, threads: int) -> float:
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(read, range(count)):
            pass
    return count / (time.perf_counter() - start)


def measure_model(name: str, classifier, slide, device: str, args: argparse.Namespace) -> dict[str, object]:
    from pipeline import EngineSettings, EngineStats, GridSpec, classify_stream
    from pipeline._engine import _auto_batch_size, _Model, batch_size_for, usable_cores

    prep = classifier.preprocessing
    spec = GridSpec(prep.tile_size_px, prep.target_mpp)
    positions = _tissue_tiles(slide, spec)
    if not positions:
        raise SystemExit("the generated slide has no tissue tiles")
    tile, mpp = prep.tile_size_px, prep.target_mpp
    count = args.tiles

    def read(i: int) -> np.ndarray:
        x, y = positions[i % len(positions)]
        return slide.read_region_at_mpp(x, y, tile, tile, mpp)

    model = _Model(classifier, device, args.cpu_threads)
    choose_start = time.perf_counter()
    # The engine's own choice when none is given (what `wsiflow run` does with batch_size null).
    batch_size = batch_size_for(tile, args.batch_size) if args.batch_size else _auto_batch_size(model, tile)
    choose_s = time.perf_counter() - choose_start
    model_only = _model_only(model, classifier, device, batch_size, min(count, args.model_tiles))

    reader = _reader_rate(read, count, args.readers)
    scaling_tiles = min(count, args.scaling_tiles)
    cores = usable_cores()
    scaling = {str(n): round(_reader_rate(read, scaling_tiles, n), 1) for n in sorted({1, max(1, cores // 2), cores})}
    # The same tiles decoded in reader processes (the engine's reader_processes option).
    from dataclasses import replace

    from pipeline._chunk_run import _tile_reader

    processes = args.reader_processes or cores
    in_processes = _tile_reader(slide, EngineSettings(reader_processes=processes), tile, mpp)

    def read_in_processes(i: int) -> np.ndarray:
        return in_processes(*positions[i % len(positions)])

    _reader_rate(read_in_processes, min(count, 4 * processes), processes)  # start the processes
    scaling[f"{processes}_processes"] = round(_reader_rate(read_in_processes, scaling_tiles, processes), 1)

    settings = EngineSettings(batch_size=batch_size, readers=args.readers, prefetch_batches=args.prefetch,
                              device=device, cpu_threads=args.cpu_threads)
    classify_stream(classifier, read, range(min(count, 2 * batch_size)), settings)  # warm-up
    stats = EngineStats()
    start = time.perf_counter()
    classify_stream(classifier, read, range(count), settings, stats=stats)
    end_to_end = count / (time.perf_counter() - start)
    start = time.perf_counter()
    classify_stream(classifier, read_in_processes, range(count),
                    replace(settings, readers=max(settings.readers, processes)))
    end_to_end_processes = count / (time.perf_counter() - start)
    bound = min(model_only, reader)
    shared = 1 / (1 / model_only + 1 / reader)
    return {
        "model": name,
        "tile_px": tile, "target_mpp": mpp, "read_level": slide.best_level_for_mpp(mpp),
        "tissue_tiles_on_slide": len(positions), "tiles_measured": count,
        "batch_size": batch_size, "batch_size_chosen_by": "given" if args.batch_size else "engine (auto)",
        "batch_size_choice_s": round(choose_s, 2),
        "model_only_tiles_per_s": round(model_only, 1),
        "reader_tiles_per_s": round(reader, 1),
        "reader_tiles_per_s_by_threads": scaling,
        "end_to_end_tiles_per_s": round(end_to_end, 1),
        "end_to_end_tiles_per_s_reader_processes": round(end_to_end_processes, 1),
        "end_to_end_vs_min_component": round(end_to_end / bound, 3),
        "end_to_end_vs_model_only": round(end_to_end / model_only, 3),
        # Only meaningful on CPU, where the model and the readers share the cores.
        "end_to_end_vs_shared_cores_bound": round(end_to_end / shared, 3) if device == "cpu" else None,
        "gpu_busy_pct": round(100 * stats.gpu_busy_s / stats.wall_s, 1) if stats.gpu_busy_s is not None else None,
        "model_loop_waiting_for_readers_pct": round(100 * stats.wait_for_readers_s / stats.wall_s, 1),
        "slides_per_hour_at_10000_tiles": round(3600 * end_to_end / 10_000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 4096 px slide, 64 tiles, CPU: checks the script")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    parser.add_argument("--size", type=int, default=None, help="slide side in px (default 32768: 1.07 gigapixels)")
    parser.add_argument("--tissue", type=float, default=None, help="tissue fraction of the slide (default 0.25)")
    parser.add_argument("--tiles", type=int, default=None, help="tiles per end-to-end and reader measure")
    parser.add_argument("--model-tiles", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the engine's automatic choice")
    parser.add_argument("--readers", type=int, default=None,
                        help="reader threads (default: the engine's, one per usable core)")
    parser.add_argument("--scaling-tiles", type=int, default=4000, help="tiles per reader-scaling measure")
    parser.add_argument("--reader-processes", type=int, default=0, help="reader processes to compare (default: cores)")
    parser.add_argument("--prefetch", type=int, default=3)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--models", default="tissue-qc,timm", help="comma list of tissue-qc, timm")
    parser.add_argument("--work", type=Path, default=Path("/tmp/wsiflow-bench-gpu"))
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from pipeline import default_readers
    from pipeline._engine import usable_cores

    cores = usable_cores()
    args.device = args.device or ("cpu" if args.quick else "auto")
    args.size = args.size or (4096 if args.quick else 32768)
    args.tiles = args.tiles or (64 if args.quick else 20_000)
    args.tissue = args.tissue or (1.0 if args.quick else 0.25)  # a small slide is one island: make it tissue
    args.model_tiles = min(args.model_tiles, 64) if args.quick else args.model_tiles
    args.scaling_tiles = min(args.scaling_tiles, 64) if args.quick else args.scaling_tiles
    args.readers = args.readers or default_readers()
    args.cpu_threads = cores

    import torch

    from bench._mosaic import write_mosaic_slide
    from models import Registry
    from pipeline import open_slide, resolve_device

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU is usable here; run this on a GPU machine (or use --quick / --device cpu)", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / f"mosaic-{args.size}-{args.tissue:g}.tiff"
    generate_s = 0.0
    if not path.exists():
        write_mosaic_slide(path, args.source, args.size, args.tissue)
        generate_s = time.perf_counter() - started
    report: dict[str, object] = {
        "machine": {"cpus": cores, "processor": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                    "torch": torch.__version__},
        "device": device, "readers": args.readers, "quick": args.quick,
        "slide": {"side_px": args.size, "gigapixels": round(args.size**2 / 1e9, 3),
                  "file_mib": round(path.stat().st_size / 2**20, 1), "generate_s": round(generate_s, 1)},
        "models": [],
    }
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    with open_slide(path) as slide:
        report["reader"] = slide.reader
        for name in wanted:
            if name == "tissue-qc":
                classifier = Registry().load("tissue-qc")
            elif name == "timm":
                classifier, name = _TimmClassifier(args.arch), f"{args.arch} (timm, random weights)"
            else:
                raise SystemExit(f"unknown model {name!r}: use tissue-qc or timm")
            report["models"].append(measure_model(name, classifier, slide, device, args))  # type: ignore[union-attr]
    report["total_s"] = round(time.perf_counter() - started, 1)
    keys = ["batch_size", "model_only_tiles_per_s", "end_to_end_tiles_per_s", "end_to_end_vs_model_only",
            "end_to_end_vs_min_component", "end_to_end_vs_shared_cores_bound", "gpu_busy_pct",
            "reader_tiles_per_s", "reader_tiles_per_s_by_threads", "end_to_end_tiles_per_s_reader_processes",
            "slides_per_hour_at_10000_tiles"]
    for row in report["models"]:  # type: ignore[union-attr]
        print(f"{row['model']}: " + ", ".join(f"{k}={row[k]}" for k in keys), file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
