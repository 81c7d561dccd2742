"""``wsiflow inspect``: geometry, µm/px, tissue and tile count of slides."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from models import Registry
from pipeline import (
    BACKEND_NAMES,
    GridSpec,
    MppPolicy,
    Preprocessing,
    SlideReport,
    inspect_slide,
    site_secret,
)

from .._config import WsiflowConfig
from ._common import EXIT_FAILED, EXIT_OK, mpp_arg, positive_int
from ._options import expand_slides_or_report

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
    inspect.add_argument("slides", nargs="+", metavar="SLIDE|DIR|GLOB",
                         help="slide files, DICOM-WSI folders, folders of slides, or quoted globs")
    inspect.add_argument("--json", action="store_true", help="one JSON object per slide, as a JSON list")
    inspect.add_argument("--mpp", type=mpp_arg, metavar="X[,Y]", help="µm/px for slides whose metadata has none")
    inspect.add_argument("--mpp-force", action="store_true", help="apply --mpp also to slides with a valid µm/px")
    inspect.add_argument("--model", metavar="NAME[@VERSION]",
                         help="lay the grid as this model would (default: config models.default)")
    inspect.add_argument("--backend", choices=BACKEND_NAMES, help="slide reader (default: config, else auto)")
    inspect.add_argument("--tile-size", type=positive_int, metavar="PX",
                         help="tile size in pixels at --target-mpp (default: the model's)")
    inspect.add_argument("--target-mpp", type=float, metavar="MPP",
                         help="µm/px the tiles are read at (default: the model's)")
    inspect.add_argument("--stride", type=positive_int, metavar="PX",
                         help="step between tiles in pixels (default: tile size)")
    inspect.add_argument("--min-tissue-fraction", type=float, metavar="F",
                         help="keep tiles with at least this tissue fraction")
    inspect.add_argument("--edge", choices=("pad", "drop"), help="keep (pad) or drop partial edge tiles")
    inspect.add_argument(
        "--show-paths", action="store_true",
        help="echo each SLIDE argument in the output (for your terminal only: paths can identify patients)",
    )


def _grid(config: WsiflowConfig, args: argparse.Namespace) -> GridSpec:
    """The grid to preview: options < config < the model's tile size and µm/px."""
    grid = config.grid
    tile, mpp = args.tile_size or grid.tile_size_px, args.target_mpp or grid.target_mpp
    if tile is None or mpp is None:
        registry = Registry(site_root=config.models.registry_dir) if config.models.registry_dir else Registry()
        prep: Preprocessing = registry.resolve(args.model or config.models.default).manifest.preprocessing
        tile, mpp = tile or prep.tile_size_px, mpp or prep.target_mpp
    return GridSpec(
        tile_size_px=tile, target_mpp=mpp,
        stride_px=args.stride if args.stride is not None else grid.stride_px,
        min_tissue_fraction=(
            args.min_tissue_fraction if args.min_tissue_fraction is not None else grid.min_tissue_fraction
        ),
        edge=args.edge or grid.edge,
    )


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
        lines.append(f"  mpp         {mpp.describe()}")
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
    grid = _grid(config, args)
    policy = MppPolicy(cli_mpp=args.mpp, overrides=config.mpp_overrides, force=args.mpp_force)
    slides = expand_slides_or_report(args.slides, refuse_missing=False)  # a diagnosis names each
    if not slides:
        return EXIT_FAILED
    secret = site_secret()
    reports: list[dict[str, object]] = []
    failed = 0
    total = len(slides)
    for index, slide in enumerate(slides):
        label = f"[{index + 1}/{total}]" + (f" {slide}" if args.show_paths else "")
        report = inspect_slide(
            slide,
            secret=secret,
            backend=args.backend or config.backend,
            mpp_policy=policy,
            tissue=config.tissue,
            grid=grid,
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
