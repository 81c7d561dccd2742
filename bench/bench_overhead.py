"""Per-slide fixed cost of a batch: 20 small distinct slides, wall time split by stage.

    .venv/bin/python -m bench.bench_overhead [--slides 20] [--work /tmp/wsiflow-overhead] [--cli | --cli-only]

Makes ``--slides`` copies of the sample slide, each with different bytes appended after its
last image data (TIFF readers ignore them), so every copy has its own content digest and
slide ID and nothing is reused. Then, in one process, like a batch: the model is loaded
once, and each slide is hashed (``identify_slide``) and analysed (``analyse_slide``, CPU).
Per slide it reports the hashing time and the stages ``summary.json`` records (opening,
preparing the result folder, tissue detection, inference, and each output written), plus
what is left (sealing the result). Overhead = wall time - inference. The first slide pays
one-off costs (imports, the first decode); the median is over the others.

``--hash-gib N`` also times naming an N GiB file twice (the second time from the site's
digest cache, as a reused result of a multi-GB slide is). ``--cli`` also times, each in a
fresh process of the tree this file is in (start-up included): ``wsiflow run`` of a missing
file, with a bad argument, of one slide, the same run again (reused), ``models verify
tissue-qc``, and ``Registry().load`` + building the module; for each, the seconds to the
first output line and to the end (``--cli-only``: these alone). To compare two trees in one
run, copy this file into the other (``git archive HEAD | tar -x -C /tmp/before``) and run
both at the same time. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

DEFAULT_SLIDE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def make_slides(source: Path, folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    paths = []
    for i in range(count):
        path = folder / f"copy-{i:03d}.svs"
        path.write_bytes(data + f"wsiflow-bench-overhead-{i:08d}".encode())
        paths.append(path)
    return paths


def _flatten(timings: dict[str, object]) -> dict[str, float]:
    flat = {k: float(v) for k, v in timings.items() if k.endswith("_s") and isinstance(v, (int, float))}
    parts = timings.get("parts")
    if isinstance(parts, dict):
        flat.update({f"finalize.{k}": float(v) for k, v in parts.items()})
    return flat


_WATCHED = ("matplotlib", "pandas", "pyarrow", "zarr", "torch", "timm", "prefect", "dask", "distributed")


def run_batch(paths: list[Path], out: Path, stride_px: int | None) -> dict[str, object]:
    start = time.perf_counter()
    from models import Registry
    from pipeline import (
        AnalysisParams,
        EngineSettings,
        GridSettings,
        ModelInfo,
        RunSettings,
        analyse_slide,
        identify_slide,
    )
    imports_s = time.perf_counter() - start

    start = time.perf_counter()
    model = Registry().load("tissue-qc")
    m = model.manifest
    info = ModelInfo(m.name, m.version, m.weights_sha256, tuple(c.color for c in m.classes))
    model_load_s = time.perf_counter() - start
    grid = GridSettings(stride_px=stride_px) if stride_px else GridSettings()
    settings = RunSettings(out_dir=out, model="tissue-qc", analysis=AnalysisParams(grid=grid),
                           engine=EngineSettings(device="cpu"))
    secret = b"b" * 32
    rows = []
    for path in paths:
        t0 = time.perf_counter()
        identity = identify_slide(path, secret)
        hash_s = time.perf_counter() - t0
        outcome = analyse_slide(path, model, info, settings, secret=secret, identity=identity)
        wall_s = time.perf_counter() - t0
        if outcome.status != "done" or outcome.result_dir is None:
            raise RuntimeError(f"slide {identity.slide_id}: {outcome.status} {outcome.error}")
        summary = json.loads((Path(outcome.result_dir) / "summary.json").read_text())
        stages = {"hash_s": hash_s, **_flatten(summary["timings"])}
        analysed = stages.pop("total_s")
        stages.pop("tiles_per_s", None)
        stages["seal_and_rest_s"] = wall_s - hash_s - analysed
        rows.append({"wall_s": wall_s, "tiles": outcome.tiles, "reader": summary["provenance"].get("reader"),
                     "overhead_s": wall_s - stages.get("inference_s", 0.0), "stages": stages})
    later = rows[1:] or rows
    names = sorted({k for r in rows for k in r["stages"]})
    return {
        "imports_s": round(imports_s, 3),
        "model_load_s": round(model_load_s, 3),
        "slides": len(rows),
        "tiles_per_slide": rows[0]["tiles"],
        "reader": rows[0]["reader"],
        "first_slide": {"wall_s": round(rows[0]["wall_s"], 3), "overhead_s": round(rows[0]["overhead_s"], 3),
                        "stages": {k: round(v, 3) for k, v in rows[0]["stages"].items()}},
        "median_after_first": {
            "wall_s": round(statistics.median(r["wall_s"] for r in later), 3),
            "overhead_s": round(statistics.median(r["overhead_s"] for r in later), 3),
            "stages": {k: round(statistics.median(r["stages"].get(k, 0.0) for r in later), 3) for k in names},
        },
        "max_overhead_after_first_s": round(max(r["overhead_s"] for r in later), 3),
        # Libraries a batch of analyses imported (the model was loaded, so torch and timm are).
        "imported": sorted(m for m in _WATCHED if m in sys.modules),
    }


_CLI = "import sys; from flows.cli import main; sys.exit(main())"
"""The ``wsiflow`` entry point of the tree this file is in (``ROOT``), not the installed one."""


def _timed(command: list[str], env: dict[str, str], until: str | None = None) -> dict[str, float | int | None]:
    """A fresh process: seconds to its first output line, to the first line containing
    ``until`` (when given), and to its end; its exit code."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    assert process.stdout is not None
    first = seen = None
    for line in iter(process.stdout.readline, b""):
        now = time.perf_counter() - start
        first = now if first is None else first
        if until is not None and seen is None and until.encode() in line:
            seen = now
    rc = process.wait(timeout=600)
    timing: dict[str, float | int | None] = {
        "first_line_s": None if first is None else round(first, 2),
        "total_s": round(time.perf_counter() - start, 2), "rc": rc,
    }
    if until is not None:
        timing[f"{until}_line_s"] = None if seen is None else round(seen, 2)
    return timing


def run_cli(slide: Path, work: Path) -> dict[str, object]:
    """The commands of issue 18's start-up targets, each in a fresh process (start-up included)."""
    env = {**os.environ, "WSIFLOW_HOME": str(work / "site")}
    cli = [sys.executable, "-c", _CLI]
    out = work / "cli-out"
    shutil.rmtree(out, ignore_errors=True)
    load = ("import sys, time; t = time.perf_counter(); from models import Registry; "
            "m = Registry().load('tissue-qc'); m.module; print(round(time.perf_counter() - t, 3))")
    return {
        "missing_file_error": _timed([*cli, "run", str(work / "missing.svs"), "--out", str(out)], env),
        "bad_argument_error": _timed([*cli, "run", "--bad-arg"], env),
        "one_slide_run": _timed([*cli, "run", str(slide), "--out", str(out)], env, "done"),
        "same_run_reused": _timed([*cli, "run", str(slide), "--out", str(out)], env, "reused"),
        "models_verify": _timed([*cli, "models", "verify", "tissue-qc"], env),
        "model_load_fresh_process": _timed([sys.executable, "-c", load], env),
    }


def hash_large(work: Path, size_gib: float) -> dict[str, float]:
    """``identify_slide`` of a large file: first time (read and hashed), then as a new process
    would see it (the site's digest cache), then after the file is touched (hashed again)."""
    from pipeline import _identity, identify_slide

    path = work / "large.bin"
    size = int(size_gib * 2**30)
    if not path.exists() or path.stat().st_size != size:
        block = os.urandom(1 << 24)
        with open(path, "wb") as fh:
            for _ in range(size // len(block)):
                fh.write(block)
    secret = b"h" * 32
    path.touch()

    def timed() -> float:
        _identity._memo.clear()  # a new process: only the site's cache file is known
        start = time.perf_counter()
        identify_slide(path, secret)
        return round(time.perf_counter() - start, 3)

    first = timed()
    return {"file_gib": round(size / 2**30, 2), "first_s": first, "again_s": timed(),
            "first_gib_per_s": round(size / 2**30 / first, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--slides", type=int, default=20)
    parser.add_argument("--stride", type=int, default=None, help="grid stride in px (default: the model's tile)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/wsiflow-overhead"))
    parser.add_argument("--cli", action="store_true")
    parser.add_argument("--cli-only", action="store_true", help="only the CLI timings (no batch)")
    parser.add_argument("--hash-gib", type=float, default=0.0, help="also time hashing a file of this size")
    args = parser.parse_args()
    os.environ.setdefault("WSIFLOW_HOME", str(args.work / "site"))
    paths = make_slides(args.source, args.work / "slides", args.slides)
    out = args.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    report: dict[str, object] = {"cpus": os.cpu_count(), "root": str(ROOT), "load_before": os.getloadavg()}
    if not args.cli_only:
        report["batch"] = run_batch(paths, out, args.stride)
    if args.cli or args.cli_only:
        report["cli"] = run_cli(paths[0], args.work)
    if args.hash_gib:
        report["hash_large"] = hash_large(args.work, args.hash_gib)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
