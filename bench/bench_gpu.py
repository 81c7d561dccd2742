"""GPU variant of the inference benchmark, for a lent H100/H200 (or any CUDA GPU).

    .venv/bin/python -m bench.bench_gpu [--arch resnet50] [--batch-size 256] [--tiles 8192]

A ResNet-50-class timm model (random weights: nothing is downloaded) in bf16 autocast with
channels_last. Reports model-only throughput on tiles already on the GPU, and the engine's
throughput (uint8 tiles from reader threads -> pinned memory -> non-blocking copy ->
normalise on the GPU -> model). Target (issue 4): engine >= 0.8 x model-only.
Exits with a message when no CUDA GPU is usable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--tiles", type=int, default=8192)
    parser.add_argument("--readers", type=int, default=8)
    args = parser.parse_args()

    import timm
    import torch

    from pipeline import EngineSettings, Preprocessing, classify_stream

    if not torch.cuda.is_available():
        print("no CUDA GPU is usable here; run this on a GPU machine", file=sys.stderr)
        return 2

    class Classifier:
        class_names = tuple(f"c{i}" for i in range(4))
        preprocessing = Preprocessing(224, 0.5, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        module = timm.create_model(args.arch, pretrained=False, num_classes=4)

    classifier = Classifier()
    model = classifier.module.cuda().eval().to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    batch = torch.randn(args.batch_size, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
        for _ in range(5):
            model(batch)
        torch.cuda.synchronize()
        start = time.perf_counter()
        steps = max(1, args.tiles // args.batch_size)
        for _ in range(steps):
            model(batch)
        torch.cuda.synchronize()
    model_only = steps * args.batch_size / (time.perf_counter() - start)

    bank = np.random.default_rng(0).integers(0, 255, (64, 224, 224, 3), dtype=np.uint8)
    settings = EngineSettings(batch_size=args.batch_size, readers=args.readers, prefetch_batches=3, device="cuda")
    classify_stream(classifier, lambda i: bank[i % 64], range(args.batch_size * 2), settings)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    classify_stream(classifier, lambda i: bank[i % 64], range(args.tiles), settings)
    torch.cuda.synchronize()
    engine = args.tiles / (time.perf_counter() - start)
    print(json.dumps({
        "gpu": torch.cuda.get_device_name(0),
        "arch": args.arch,
        "dtype": str(dtype),
        "batch_size": args.batch_size,
        "model_only_tiles_per_s": round(model_only, 1),
        "engine_tiles_per_s": round(engine, 1),
        "engine_vs_model_only": round(engine / model_only, 3),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
