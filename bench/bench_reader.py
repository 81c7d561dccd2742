"""The tile reader against OpenSlide and against the raw JPEG decode bound, per core.

    .venv/bin/python -m bench.bench_reader [--slide PATH] [--tile 224] [--mpp 1.0] [--passes 8]

Reads a non-overlapping grid of ``tile`` px tiles at ``mpp`` µm/px covering the whole slide
(the analysis' read, ``Slide.read_region_at_mpp``), on one thread, ``passes`` times with a
freshly opened slide each pass (cold caches on every side), and measures in the same run:

- the direct JPEG reader (stored tiles decoded with DCT scaling, then resized);
- the previous path (OpenSlide decodes at full size, then a Lanczos resize);
- ``openslide.read_region`` of each tile's level-0 area (what a naive tiler does);
- the raw decode bound: decoding each stored tile under the grid once, at the DCT scale the
  direct reader uses (Pillow/libjpeg-turbo) and at full size (imagecodecs), without any
  reading, pasting or resizing;
- pixel agreement: mean / max absolute difference (RGB, 0-255) between the direct reader's
  tiles and the previous path's, and a side-by-side PNG (``--png``) for a visual check.

Targets (issue 18): direct >= 5 x openslide level-0 per core, >= 0.8 x the raw decode bound.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

DEFAULT_SLIDE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def _positions(width: int, height: int, side_l0: float) -> list[tuple[float, float]]:
    across, down = max(1, int(width // side_l0)), max(1, int(height // side_l0))
    return [(c * side_l0, r * side_l0) for r in range(down) for c in range(across)]


def measure(slide_path: Path, tile: int, mpp: float, passes: int, png: Path | None) -> dict[str, object]:
    import imagecodecs
    import openslide
    import tifffile
    from PIL import Image

    from pipeline import open_slide
    from pipeline._jpeg_tiles import DECODER, decode_tile

    with open_slide(slide_path) as probe:
        side_l0 = tile * mpp / probe.mpp.mpp_x
        positions = _positions(probe.info.width, probe.info.height, side_l0)
        level = probe.best_level_for_mpp(mpp)
        reader = probe.reader
        direct = probe._direct
        ds = probe.info.level_downsamples[level]
        lw = tile * mpp / probe.level_mpp(level)[0]
        denom = direct.denominator_for(level, lw / tile) if direct is not None and direct.supports(level) else None

    def read_all(direct_reader: bool) -> tuple[float, list[np.ndarray]]:
        # Opened outside the timing (once per slide in an analysis), read with cold caches.
        with open_slide(slide_path) as slide:
            if not direct_reader and slide._direct is not None:
                slide._direct.close()
                slide._direct = None
            slide.best_level_for_mpp(mpp)  # the level check: once per slide, not per tile
            start = time.perf_counter()
            tiles = [slide.read_region_at_mpp(x, y, tile, tile, mpp) for x, y in positions]
            return time.perf_counter() - start, tiles

    n = len(positions)
    side = round(side_l0)

    def openslide_l0() -> tuple[float, list[np.ndarray]]:
        raw = openslide.OpenSlide(str(slide_path))
        start = time.perf_counter()
        for x, y in positions:
            raw.read_region((int(x), int(y)), 0, (side, side))
        took = time.perf_counter() - start
        raw.close()
        return took, []


    # The stored tiles of the read level under the grid (with the resize margin), once each.
    with tifffile.TiffFile(slide_path) as tif:
        page = next(p for p in tif.pages if p.is_tiled and (p.imagewidth, p.imagelength)
                    == tuple(openslide.OpenSlide(str(slide_path)).level_dimensions[level]))
        tw, th = page.tilewidth, page.tilelength
        per_row = -(-page.imagewidth // tw)
        per_col = -(-page.imagelength // th)
        wanted: set[int] = set()
        margin = 8
        for x, y in positions:
            lx0, ly0 = max(0, int(x / ds) - margin), max(0, int(y / ds) - margin)
            lx1 = min(page.imagewidth - 1, int((x / ds) + lw) + margin)
            ly1 = min(page.imagelength - 1, int((y / ds) + lw) + margin)
            for ty in range(ly0 // th, min(per_col - 1, ly1 // th) + 1):
                for tx in range(lx0 // tw, min(per_row - 1, lx1 // tw) + 1):
                    wanted.add(ty * per_row + tx)
        fh = tif.filehandle
        blobs = []
        for i in sorted(wanted):
            fh.seek(page.dataoffsets[i])
            blobs.append(fh.read(page.databytecounts[i]))
        tables = page.jpegtables or b""
        rgb = page.photometric == 2
    adobe = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + (b"\x00" if rgb else b"\x01")
    body = tables[2:-2] if tables else b""
    spliced = [b"\xff\xd8" + body + adobe + blob[2:] for blob in blobs]  # what the direct reader decodes
    d = denom or 1

    def decode_scaled() -> None:
        for data in spliced:
            decode_tile(data, tw // d, th // d)  # the direct reader's decoder, nothing else

    def decode_full() -> None:
        for blob in blobs:
            imagecodecs.jpeg8_decode(blob, tables=tables or None, colorspace="RGB" if rgb else None,
                                     outcolorspace="RGB")

    def decoded(fn) -> Callable[[], tuple[float, list[np.ndarray]]]:
        def run() -> tuple[float, list[np.ndarray]]:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start, []
        return run

    # Interleaved: each pass runs every method once, so a load change on this shared machine
    # hits all of them alike; the best pass of each counts.
    methods = {"direct": lambda: read_all(True), "previous": lambda: read_all(False), "openslide_l0": openslide_l0,
               "decode_scaled": decoded(decode_scaled), "decode_full": decoded(decode_full)}
    best: dict[str, float] = dict.fromkeys(methods, float("inf"))
    kept: dict[str, list[np.ndarray]] = {}
    for _ in range(passes):
        for name, method in methods.items():
            took, tiles = method()
            best[name] = min(best[name], took)
            kept[name] = tiles
    direct_s, old_s, openslide_s = best["direct"], best["previous"], best["openslide_l0"]
    scaled_s, full_s = best["decode_scaled"], best["decode_full"]
    new_tiles, old_tiles = kept["direct"], kept["previous"]

    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(new_tiles, old_tiles, strict=True)]
    if png is not None:
        worst = int(np.argmax([float(x.mean()) for x in diffs]))
        strip = np.concatenate([old_tiles[worst], new_tiles[worst],
                                np.clip(diffs[worst] * 8, 0, 255).astype(np.uint8)], axis=1)
        Image.fromarray(strip).save(png)

    rate = {"direct": n / direct_s, "previous": n / old_s, "openslide_l0": n / openslide_s,
            "decode_scaled": n / scaled_s, "decode_full": n / full_s}
    return {
        "slide": {"width": probe.info.width, "height": probe.info.height, "mpp": round(probe.mpp.mpp_x, 4),
                  "stored_tile_px": [tw, th]},
        "reader": reader, "decoder": DECODER,
        "tile_px": tile, "target_mpp": mpp, "read_level": level, "dct_denominator": denom,
        "tiles_per_pass": n, "stored_tiles_under_grid": len(blobs), "passes": passes,
        "tiles_per_s_1thread": {k: round(v, 1) for k, v in rate.items()},
        "ratios_per_core": {
            "direct_vs_openslide_level0": round(rate["direct"] / rate["openslide_l0"], 2),
            "direct_vs_previous_path": round(rate["direct"] / rate["previous"], 2),
            "direct_vs_raw_decode_at_dct_scale": round(rate["direct"] / rate["decode_scaled"], 3),
            "direct_vs_raw_decode_full_size": round(rate["direct"] / rate["decode_full"], 3),
        },
        "pixels_vs_previous_path": {
            "mean_abs_diff": round(float(np.mean([x.mean() for x in diffs])), 3),
            "worst_tile_mean_abs_diff": round(float(max(x.mean() for x in diffs)), 3),
            "max_abs_diff": int(max(int(x.max()) for x in diffs)),
        },
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--mpp", type=float, default=1.0)
    parser.add_argument("--passes", type=int, default=8)
    parser.add_argument("--png", type=Path, default=None, help="write old | direct | 8 x difference of the worst tile")
    args = parser.parse_args()
    print(json.dumps(measure(args.slide, args.tile, args.mpp, args.passes, args.png), indent=2))


if __name__ == "__main__":
    main()
