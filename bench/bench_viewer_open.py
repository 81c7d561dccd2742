"""Opening the result of a generated 100k x 100k px slide in the viewer: time and memory.

    .venv/bin/python -m bench.bench_viewer_open [--size 100000] [--work /tmp/wsiflow-bench-viewer]

Generates a JPEG-tiled pyramidal TIFF (real tissue tiles from the sample slide on glass),
analyses it with the bundled model once, then, in a fresh process, opens the result with
the napari reader (layer data, as napari gets it), reads one screen of slide pixels and
one of heatmap at full resolution, and reports wall times and peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script (python bench/bench_viewer_open.py): find `bench`
    sys.path.insert(0, str(ROOT))

_CLI = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
_TILE = 256


def write_big_slide(path: Path, size_px: int, source: Path, mpp: float = 0.5) -> None:
    """Tiles come from a bank of real tissue tiles (level 0) or their reductions; no big arrays."""
    import tifffile
    from PIL import Image

    from bench._mosaic import _texture

    bank = _texture(source)
    rng = np.random.default_rng(0)
    n = -(-size_px // _TILE)
    islands = rng.random((n // 64 + 1, n // 64 + 1)) < 0.2
    glass = np.full((_TILE, _TILE, 3), 242, np.uint8)

    def tiles(level: int) -> Iterator[np.ndarray]:
        factor = 2**level
        count = -(-n // factor)
        reduced = [np.asarray(Image.fromarray(t).reduce(min(factor, 16)).resize((_TILE, _TILE))) for t in bank[:16]]
        for r in range(count):
            for c in range(count):
                if islands[(r * factor) // 64, (c * factor) // 64]:
                    yield bank[(r * 31 + c * 17) % len(bank)] if level == 0 else reduced[(r + c) % len(reduced)]
                else:
                    yield glass

    levels = 1
    while size_px // 2**levels >= 1024:
        levels += 1
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        for level in range(levels):
            side = -(-n // 2**level) * _TILE
            writer.write(
                tiles(level), shape=(side, side, 3), dtype=np.uint8, tile=(_TILE, _TILE), photometric="rgb",
                compression="jpeg", compressionargs={"level": 80},
                resolution=(1e4 / (mpp * 2**level),) * 2, resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
            )


_OPEN = r"""
import json, re, sys, time
import numpy as np
t0 = time.perf_counter()
import npe2
npe2.PluginManager.instance().discover()
t1 = time.perf_counter()
layers = npe2.read([sys.argv[1]], plugin_name="wsiflow", stack=False)
t2 = time.perf_counter()
slide = layers[0][0]
level0 = slide[0] if isinstance(slide, list) else slide
screen = np.asarray(level0[50000:51080, 50000:51920])
t3 = time.perf_counter()
heat = layers[2][0]
heat = heat[0] if isinstance(heat, list) else heat
np.asarray(heat)
t4 = time.perf_counter()
hwm = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"plugin_discovery_s": round(t1 - t0, 2), "open_layers_s": round(t2 - t1, 2),
                  "one_screen_level0_s": round(t3 - t2, 2), "full_heatmap_s": round(t4 - t3, 2),
                  "layers": [m["name"] for _, m, _ in layers], "level0_shape": list(level0.shape),
                  "slide_levels": len(slide) if isinstance(slide, list) else 1, "peak_rss_mib": round(hwm / 1024, 1)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/wsiflow-bench-viewer"))
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    slide = args.work / f"big-{args.size}.tiff"
    report: dict[str, object] = {"size_px": args.size}
    if not slide.exists():
        start = time.perf_counter()
        write_big_slide(slide, args.size, args.source)
        report["generate_s"] = round(time.perf_counter() - start, 1)
    report["file_mib"] = round(slide.stat().st_size / 2**20, 1)
    env = {**os.environ, "WSIFLOW_HOME": str(args.work / "site")}
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", _CLI, "run", str(slide), "--out", str(args.work / "out"), "--json"],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )
    if run.returncode != 0:
        raise SystemExit(run.stderr[-3000:])
    (row,) = json.loads(run.stdout)["slides"]  # the run report (one document, see README)
    report["analysis"] = {"tiles": row["tiles"], "status": row["status"], "wall_s": round(time.perf_counter() - start, 1)}
    opened = subprocess.run([sys.executable, "-c", _OPEN, row["result_dir"]], capture_output=True, text=True, env=env, cwd=ROOT)
    if opened.returncode != 0:
        raise SystemExit(opened.stderr[-3000:])
    report["open"] = json.loads(opened.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
