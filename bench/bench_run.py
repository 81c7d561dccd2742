"""End-to-end benchmark of `wsiflow run` on a generated >= 1 gigapixel slide of real tissue.

    .venv/bin/python -m bench.bench_run [--size 32768] [--tissue 0.25] [--work /tmp/wsiflow-bench]

Reports, from one run, as JSON: model-only throughput on pre-decoded tiles; reader-only
throughput (the engine's reader threads, no model) beside single-threaded
``openslide.read_region`` and raw JPEG decode of the same tiles; end-to-end tiles/s; peak
RSS of a full run (``--no-isolate``) on the slide and on one of 4x the area; identity hashing
of the largest slide (first time, then as a later process finds it). Targets (issue 4): end-to-end >=
0.9 x min(model-only, reader-only); reader >= 3 x openslide.read_region per core; peak RSS
grows < 20 % for the 4x slide.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script (python bench/bench_run.py): find `bench` and the product
    sys.path.insert(0, str(ROOT))


def _tiles(slide_path: Path, count: int):
    from models import Registry
    from pipeline import GridSpec, make_tile_grid, open_slide

    model = Registry().load("tissue-qc")
    prep = model.preprocessing
    slide = open_slide(slide_path)
    grid = make_tile_grid(*slide.dimensions, slide.mpp.mpp_x, slide.mpp.mpp_y, GridSpec(prep.tile_size_px, prep.target_mpp))
    # Tiles on tissue: skip the glass (bright) ones using a cheap look at the centre pixel.
    picks = []
    for x, y in zip(grid.x, grid.y):
        if slide.read_region(int(x + 200), int(y + 200), 0, 1, 1).mean() < 230:
            picks.append((float(x), float(y)))
        if len(picks) >= count:
            break
    return model, slide, picks


def measure_components(slide_path: Path, count: int, readers: int) -> dict[str, float]:
    import openslide
    import tifffile

    from pipeline import EngineSettings, classify_stream

    model, slide, picks = _tiles(slide_path, count)
    prep = model.preprocessing
    tile, mpp = prep.tile_size_px, prep.target_mpp
    decoded = np.stack([slide.read_region_at_mpp(x, y, tile, tile, mpp) for x, y in picks[:128]])
    # Model only: the engine's own model path, fed pre-decoded tiles from memory.
    settings = EngineSettings(batch_size=64, readers=1, device="cpu")
    classify_stream(model, lambda i: decoded[i % len(decoded)], range(64), settings)
    start = time.perf_counter()
    classify_stream(model, lambda i: decoded[i % len(decoded)], range(count), settings)
    model_only = count / (time.perf_counter() - start)

    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    with ThreadPoolExecutor(readers) as pool:
        list(pool.map(lambda p: slide.read_region_at_mpp(p[0], p[1], tile, tile, mpp), picks))
    reader_only = len(picks) / (time.perf_counter() - start)

    raw = openslide.OpenSlide(str(slide_path))
    side = round(tile * mpp / slide.mpp.mpp_x)
    start = time.perf_counter()
    for x, y in picks:
        raw.read_region((int(x), int(y)), 0, (side, side))
    openslide_rate = len(picks) / (time.perf_counter() - start)
    # The same, reading the pyramid level the reader itself uses (no resize).
    level = slide.best_level_for_mpp(mpp)
    side_level = round(tile * mpp / slide.level_mpp(level)[0])
    start = time.perf_counter()
    for x, y in picks:
        raw.read_region((int(x), int(y)), level, (side_level, side_level))
    openslide_level_rate = len(picks) / (time.perf_counter() - start)

    # Raw JPEG decode of the stored tiles covering the same regions (level 0, single thread).
    with tifffile.TiffFile(slide_path) as tif:
        page = tif.pages[0]
        per_row = -(-page.imagewidth // page.tilewidth)
        indices = set()
        for x, y in picks:
            for ty in range(int(y) // 256, (int(y) + side - 1) // 256 + 1):
                for tx in range(int(x) // 256, (int(x) + side - 1) // 256 + 1):
                    indices.add(ty * per_row + tx)
        fh = tif.filehandle
        blobs = []
        for i in sorted(indices):
            fh.seek(page.dataoffsets[i])
            blobs.append(fh.read(page.databytecounts[i]))
        tables = page.jpegtables
    import imagecodecs

    start = time.perf_counter()
    for blob in blobs:
        imagecodecs.jpeg8_decode(blob, tables=tables, colorspace="RGB", outcolorspace="RGB")
    jpeg_tiles_per_s = len(blobs) / (time.perf_counter() - start)
    jpeg_per_model_tile = jpeg_tiles_per_s * len(picks) / len(blobs)

    return {
        "model_only_tiles_per_s": round(model_only, 1),
        "reader_only_tiles_per_s": round(reader_only, 1),
        "reader_threads": readers,
        "openslide_read_region_tiles_per_s_1thread": round(openslide_rate, 1),
        "openslide_read_region_same_level_tiles_per_s_1thread": round(openslide_level_rate, 1),
        "reader_level": level,
        "raw_jpeg_decode_model_tiles_per_s_1thread": round(jpeg_per_model_tile, 1),
        "tiles_measured": len(picks),
    }


def run_and_measure(slide_path: Path, out: Path, readers: int) -> dict[str, float]:
    """A full `wsiflow run` in a child process: its tiles/s and peak RSS."""
    env = {**os.environ, "WSIFLOW_HOME": str(out / "site")}
    start = time.perf_counter()
    # VmHWM (peak RSS of this process image) rather than ru_maxrss, which Linux carries
    # over from the forking parent across exec.
    code = (
        "import re, sys; from flows.cli import main; rc = main(sys.argv[1:]); "
        "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
        "print('RSS', hwm, file=sys.stderr); sys.exit(rc)"
    )
    result = subprocess.run(
        # --no-isolate: the process measured is the one that analyses the slide (isolated, the
        # analysis runs in a child whose peak RSS the parent's VmHWM does not show).
        [sys.executable, "-c", code, "run", str(slide_path), "--out", str(out), "--json", "--force",
         "--readers", str(readers), "--device", "cpu", "--no-isolate"],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    (row,) = json.loads(result.stdout)["slides"]  # the run report (one document, see README)
    rss_kib = int(next(line.split()[1] for line in result.stderr.splitlines() if line.startswith("RSS")))
    summary = json.loads((Path(row["result_dir"]) / "summary.json").read_text())
    return {
        "tiles": row["tiles"],
        "end_to_end_tiles_per_s": row["tiles_per_s"],
        "wall_s": round(wall, 1),
        "tissue_s": summary["timings"]["tissue_s"],
        "finalize_s": summary["timings"]["finalize_s"],
        "peak_rss_mib": round(rss_kib / 1024, 1),
    }


def hash_identity(slide_path: Path, work: Path) -> dict[str, float]:
    """``identify_slide`` of ``slide_path`` in two fresh processes sharing one new site
    directory: the first reads and hashes the file, the second finds its digest cached."""
    site = work / "hash-site"
    if site.exists():
        import shutil

        shutil.rmtree(site)
    code = ("import sys, time; from pipeline import identify_slide; t = time.perf_counter(); "
            "identify_slide(sys.argv[1], b'h' * 32); print(time.perf_counter() - t)")
    env = {**os.environ, "WSIFLOW_HOME": str(site)}
    times = [float(subprocess.run([sys.executable, "-c", code, str(slide_path)], capture_output=True, text=True,
                                  env=env, cwd=ROOT, check=True).stdout) for _ in range(2)]
    size_gib = slide_path.stat().st_size / 2**30
    return {"file_gib": round(size_gib, 3), "first_s": round(times[0], 3), "again_s": round(times[1], 3),
            "first_gib_per_s": round(size_gib / times[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32768, help="side of the 1x slide in level-0 px (32768 = 1.07 gigapixel)")
    parser.add_argument("--tissue", type=float, default=0.25, help="fraction of the slide covered by tissue islands")
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/wsiflow-bench"))
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs")
    parser.add_argument("--skip-4x", action="store_true")
    args = parser.parse_args()
    from bench._mosaic import write_mosaic_slide

    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
    }
    slides = {"1x": args.size} if args.skip_4x else {"1x": args.size, "4x": args.size * 2}
    paths = {}
    for name, side in slides.items():
        path = args.work / f"mosaic-{side}.tiff"
        if not path.exists():
            start = time.perf_counter()
            write_mosaic_slide(path, args.source, side, args.tissue)
            report[f"generate_{name}_s"] = round(time.perf_counter() - start, 1)
        paths[name] = path
        report[f"slide_{name}"] = {"side_px": side, "gigapixels": round(side * side / 1e9, 2),
                                    "file_mib": round(path.stat().st_size / 2**20, 1)}
    # Full runs first, in fresh processes: this process has not loaded torch yet, so its idle
    # OpenMP threads cannot steal cycles from them.
    for name, path in paths.items():
        report[f"run_{name}"] = run_and_measure(path, args.work / f"out-{name}", args.readers)
    report["identity_hashing"] = hash_identity(paths["4x" if "4x" in paths else "1x"], args.work)
    report["components"] = measure_components(paths["1x"], 512, args.readers)
    comp = report["components"]
    e2e = report["run_1x"]["end_to_end_tiles_per_s"]
    report["ratios"] = {
        "end_to_end_vs_min_component": round(e2e / min(comp["model_only_tiles_per_s"], comp["reader_only_tiles_per_s"]), 3),
        "reader_vs_openslide_per_core": round(comp["reader_only_tiles_per_s"] / args.readers / comp["openslide_read_region_tiles_per_s_1thread"], 3),
    }
    if "run_4x" in report:
        report["ratios"]["peak_rss_4x_vs_1x"] = round(report["run_4x"]["peak_rss_mib"] / report["run_1x"]["peak_rss_mib"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
