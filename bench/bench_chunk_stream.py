"""Small chunks without idle readers: one tile stream across chunks vs one stream per chunk.

    .venv/bin/python -m bench.bench_chunk_stream [--slide PATH] [--stride 28] [--repeats 2]

Classifies the same tiles of the sample slide three ways, in one process, alternating:
one chunk (64-cell blocks), 8-cell chunks each in its own stream (the old way: the reader
pool drains at every chunk end), and 8-cell chunks in one stream (``run_chunks``).
Prints tiles/s of each and the ratios as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))


def main() -> None:
    from models import Registry
    from pipeline import EngineSettings, GridSpec, make_tile_grid, open_slide, plan_chunks
    from pipeline._chunk_run import run_chunk, run_chunks
    from pipeline._omezarr import create_heatmap

    parser = argparse.ArgumentParser()
    parser.add_argument("--slide", type=Path, default=ROOT.parent / "shared/data/slides/CMU-1-Small-Region.svs")
    parser.add_argument("--stride", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    model = Registry().load("tissue-qc")
    prep = model.preprocessing
    slide = open_slide(args.slide)
    spec = GridSpec(prep.tile_size_px, prep.target_mpp, stride_px=args.stride)
    grid = make_tile_grid(slide.info.width, slide.info.height, slide.mpp.mpp_x, slide.mpp.mpp_y, spec)
    engine = EngineSettings(batch_size=64, device="cpu")
    rates: dict[str, list[float]] = {"one_chunk": [], "per_chunk_streams": [], "one_stream": []}
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(args.repeats):
            for name, cells in (("one_chunk", 64), ("per_chunk_streams", 8), ("one_stream", 8)):
                folder = Path(work) / f"{name}-{repeat}"
                (folder / "done").mkdir(parents=True)
                create_heatmap(folder / "heatmap", len(model.class_names), grid.n_rows, grid.n_cols, cells)
                tasks = plan_chunks(grid, cells)
                started = time.perf_counter()
                if name == "per_chunk_streams":
                    for task in tasks:
                        run_chunk(task, slide, model, spec, folder / "heatmap", folder / "done", engine)
                else:
                    run_chunks(tasks, slide, model, spec, folder / "heatmap", folder / "done", engine)
                rates[name].append(len(grid) / (time.perf_counter() - started))
    best = {name: round(max(values), 1) for name, values in rates.items()}
    print(json.dumps({
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "tiles": len(grid),
        "chunks_8_cells": len(plan_chunks(grid, 8)), "tiles_per_s_best": best,
        "one_stream_vs_per_chunk": round(best["one_stream"] / best["per_chunk_streams"], 3),
        "one_stream_vs_one_chunk": round(best["one_stream"] / best["one_chunk"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
