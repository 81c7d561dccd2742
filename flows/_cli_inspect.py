"""``wsiflow inspect``: geometry, µm/px, tissue and tile count of slides."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace

from pipeline import BACKEND_NAMES, MppPolicy, SlideReport, inspect_slide, site_secret

from ._cli_common import EXIT_FAILED, EXIT_OK, mpp_arg
from ._config import WsiflowConfig

__all__ = ["add_inspect_parser", "run_inspect"]

_log = logging.getLogger("wsiflow")


def add_inspect_parser(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="report geometry, µm/px, tissue and tile count of slides",
        description=(
            "Report per slide: dimensions, levels, µm/px, objective power, vendor, backend, "
            "stored tile size, tissue area and fraction, and how many tiles the grid keeps."
        ),
    )
    inspect.add_argument("slides", nargs="+", metavar="SLIDE", help="slide file or DICOM-WSI folder")
    inspect.add_argument("--json", action="store_true", help="one JSON object per slide, as a JSON list")
    inspect.add_argument("--mpp", type=mpp_arg, metavar="X[,Y]", help="µm/px to use, overriding the slide metadata (recorded)")
    inspect.add_argument("--backend", choices=BACKEND_NAMES, help="slide reader (default: config, else auto)")
    inspect.add_argument("--tile-size", type=int, metavar="PX", help="tile size in pixels at --target-mpp")
    inspect.add_argument("--target-mpp", type=float, metavar="MPP", help="µm/px the tiles are read at")
    inspect.add_argument("--stride", type=int, metavar="PX", help="step between tiles in pixels (default: tile size)")
    inspect.add_argument("--min-tissue-fraction", type=float, metavar="F", help="keep tiles with at least this tissue fraction")
    inspect.add_argument("--edge", choices=("pad", "drop"), help="keep (pad) or drop partial edge tiles")
    inspect.add_argument(
        "--show-paths", action="store_true",
        help="echo each SLIDE argument in the output (for your terminal only: paths can identify patients)",
    )


def _grid_from_args(config: WsiflowConfig, args: argparse.Namespace) -> WsiflowConfig:
    changes = {
        "tile_size_px": args.tile_size,
        "target_mpp": args.target_mpp,
        "stride_px": args.stride,
        "min_tissue_fraction": args.min_tissue_fraction,
        "edge": args.edge,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    grid = replace(config.grid, **changes) if changes else config.grid
    backend = args.backend or config.backend
    return replace(config, grid=grid, backend=backend)


def _fmt(value: float | None, unit: str = "", digits: int = 4) -> str:
    return "unknown" if value is None else f"{value:.{digits}g}{unit}"


def _human(report: SlideReport, label: str) -> str:
    data = report.to_json()
    lines = [f"{label} slide {data['slide_id'] or '(unidentified)'}"]
    if report.info is not None:
        info = report.info
        lines.append(f"  size        {info.width} x {info.height} px, {len(info.level_dimensions)} level(s)")
        tile = "x".join(map(str, info.native_tile_size)) if info.native_tile_size else "untiled"
        lines.append(
            f"  scanner     vendor {info.vendor or 'unknown'}, objective {_fmt(info.objective_power, 'x')}, "
            f"backend {info.backend}, stored tiles {tile}"
        )
    if report.mpp is not None:
        mpp = report.mpp
        source = "slide metadata" if mpp.source == "metadata" else f"OVERRIDE {mpp.override}"
        if mpp.is_override:
            source += f"; metadata said {_fmt(mpp.metadata_mpp_x)} x {_fmt(mpp.metadata_mpp_y)}"
        lines.append(f"  mpp         {mpp.mpp_x:g} x {mpp.mpp_y:g} µm/px ({source})")
    if report.tissue_area_mm2 is not None:
        lines.append(
            f"  tissue      {report.tissue_area_mm2:.3f} mm², {100 * (report.tissue_fraction or 0):.1f} % "
            f"of the slide (mask at {report.tissue_mpp:g} µm/px)"
        )
        grid = report.grid
        lines.append(
            f"  grid        {grid.tile_size_px} px at {grid.target_mpp:g} µm/px, stride "
            f"{grid.effective_stride_px} px, edge {grid.edge}: {report.tiles_kept} of "
            f"{report.grid_rows} x {report.grid_cols} tiles kept (>= {grid.min_tissue_fraction:g} tissue)"
        )
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace, config: WsiflowConfig) -> int:
    config = _grid_from_args(config, args)
    policy = MppPolicy(cli_mpp=args.mpp, overrides=config.mpp_overrides)
    secret = site_secret()
    reports: list[dict[str, object]] = []
    failed = 0
    total = len(args.slides)
    for index, slide in enumerate(args.slides):
        label = f"[{index + 1}/{total}]" + (f" {slide}" if args.show_paths else "")
        report = inspect_slide(
            slide,
            secret=secret,
            backend=config.backend,  # type: ignore[arg-type]
            mpp_policy=policy,
            tissue=config.tissue,
            grid=config.grid,
        )
        if report.error is not None:
            failed += 1
            print(f"{label} error {report.error.one_line()}", file=sys.stderr)
            if args.debug:
                _log.debug("traceback", exc_info=report.error)
        if args.json:
            entry = report.to_json()
            entry["input_index"] = index
            if args.show_paths:
                entry["input"] = slide
            reports.append(entry)
        elif report.info is not None:
            print(_human(report, label))
    if args.json:
        print(json.dumps(reports, indent=2, ensure_ascii=False))
    return EXIT_FAILED if failed else EXIT_OK
