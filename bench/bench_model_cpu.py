"""Throughput of the bundled tissue-qc model on this machine's CPU (tiles/s).

    .venv/bin/python -m bench.bench_model_cpu [--tiles 512] [--batch-size 64]

Prints one JSON object. Target (issue 3): >= 30 tiles/s on 2 cores, model only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def main() -> None:
    import torch

    from models import Registry
    from pipeline import classify_tiles

    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="tissue-qc")
    args = parser.parse_args()
    model = Registry().load(args.model)
    size = model.preprocessing.tile_size_px
    tiles = np.random.default_rng(0).integers(0, 255, (args.tiles, size, size, 3), dtype=np.uint8)
    classify_tiles(model, tiles[: args.batch_size], batch_size=args.batch_size)  # warm-up
    start = time.perf_counter()
    classify_tiles(model, tiles, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "model": model.manifest.ref,
        "tiles": args.tiles,
        "batch_size": args.batch_size,
        "tiles_per_s": round(args.tiles / seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
