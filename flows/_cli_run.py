"""``wsiflow run``: classify slides into heatmaps, tables, GeoJSON and summaries."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path


from models import DEFAULT_MODEL
from pipeline import (
    BACKEND_NAMES,
    SLIDE_SUFFIXES,
    AnalysisParams,
    EngineSettings,
    ModelInfo,
    MppPolicy,
    SlideOutcome,
    analyse_slide,
    is_dicom_folder,
    site_secret,
)

from ._cli_common import EXIT_FAILED, EXIT_OK, audit_run, mpp_arg
from ._cli_models import registry_for
from ._config import WsiflowConfig
from ._isolate import SlideRequest, progress_bar_factory

__all__ = ["add_run_parser", "add_analysis_options", "run_run", "expand_slides", "SLIDE_SUFFIXES", "DEFAULT_READERS"]

DEFAULT_READERS = max(2, min(8, os.cpu_count() or 2))


def add_analysis_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``run`` and ``batch``."""
    parser.add_argument("slides", nargs="+", metavar="SLIDE|DIR|GLOB")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="results folder")
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME[@VERSION]", help=f"default: {DEFAULT_MODEL}")
    parser.add_argument("--mpp", type=mpp_arg, metavar="X[,Y]", help="µm/px to use, overriding slide metadata (recorded)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N")
    parser.add_argument("--readers", type=int, default=DEFAULT_READERS, metavar="N",
                        help=f"tile reader threads (default: cores, at most 8; here {DEFAULT_READERS})")
    parser.add_argument("--stride", type=int, metavar="PX", help="step between tiles at the model's µm/px (default: tile size)")
    parser.add_argument("--min-tissue-fraction", type=float, metavar="F", help="keep tiles with at least this tissue (default: config)")
    parser.add_argument("--edge", choices=("pad", "drop"), help="partial edge tiles (default: config)")
    parser.add_argument("--chunk-cells", type=int, default=64, metavar="N", help="heatmap block edge in tiles: unit of work/resume")
    parser.add_argument("--overview-class", metavar="CLASS", help="class shown in overview.png (default: the second class)")
    parser.add_argument("--backend", choices=BACKEND_NAMES, help="slide reader (default: config, else auto)")
    parser.add_argument(
        "--dask-address", metavar="tcp://HOST:PORT",
        help="run chunks on this existing Dask scheduler (default: config dask.address)",
    )
    parser.add_argument("--force", action="store_true", help="recompute even when a complete result exists")
    parser.add_argument("--json", action="store_true", help="one JSON object per slide, as a JSON list")
    parser.add_argument("--show-paths", action="store_true", help="echo each slide's path in the terminal output")
    parser.add_argument(
        "--no-isolate", action="store_true",
        help="analyse slides in this process, not a child process (starts a few seconds faster, but a "
             "crash in the slide-decoding library then stops the whole run)",
    )


def add_run_parser(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run",
        help="classify slides into heatmaps (OME-Zarr), tables, GeoJSON and summaries",
        description=(
            "Analyse each slide with a registry model: tissue detection, tile grid, batched "
            "inference, results in OUT/<slide id>/<model>/. Interrupted runs resume; complete "
            "results with the same slide content, model and parameters are reused. Runs in this "
            "process (no server), or sends chunks to --dask-address."
        ),
    )
    add_analysis_options(run)
    run.add_argument(
        "--in-process", action="store_true",
        help="stay in this process even when PREFECT_API_URL names a server",
    )


def expand_slides(arguments: list[str]) -> list[str]:
    """Files, DICOM folders, folders of slides and glob patterns -> slide paths (ordered, unique)."""
    found: list[str] = []
    for argument in arguments:
        matches = sorted(glob.glob(argument)) if any(ch in argument for ch in "*?[") else [argument]
        for match in matches:
            path = Path(match)
            if path.is_dir() and not is_dicom_folder(path):
                children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
                found.extend(
                    str(p) for p in children
                    if (p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES) or (p.is_dir() and is_dicom_folder(p))
                )
            else:
                found.append(match)
    unique: list[str] = []
    for item in found:
        if item not in unique:
            unique.append(item)
    return unique


def run_run(args: argparse.Namespace, config: WsiflowConfig) -> int:
    if os.environ.get("PREFECT_API_URL") and not args.in_process:
        # A server is configured: run as the batch flow so the run shows in its UI.
        from ._cli_batch import run_batch_command

        return run_batch_command(args, config)
    registry = registry_for(config)
    model = registry.load(args.model)
    manifest = model.manifest
    info = ModelInfo(manifest.name, manifest.version, manifest.weights_sha256, tuple(c.color for c in manifest.classes))
    params = AnalysisParams(
        stride_px=args.stride,
        min_tissue_fraction=args.min_tissue_fraction if args.min_tissue_fraction is not None else config.grid.min_tissue_fraction,
        edge=args.edge or config.grid.edge,
        tissue=config.tissue,
        chunk_cells=args.chunk_cells,
        overview_class=args.overview_class,
    )
    params.grid_spec(model)  # validate stride etc. before touching any slide
    engine = EngineSettings(batch_size=args.batch_size, readers=args.readers, device=args.device)
    policy = MppPolicy(cli_mpp=args.mpp, overrides=config.mpp_overrides)
    slides = expand_slides(args.slides)
    if not slides:
        print("wsiflow: error not-found: no slides matched the arguments", file=sys.stderr)
        return EXIT_FAILED
    secret = site_secret()
    args.out.mkdir(parents=True, exist_ok=True)
    address = args.dask_address or config.dask_address
    executor = None
    client = None
    isolated = None
    if address:
        from distributed import Client

        from ._dask import DaskChunkExecutor, ModelRef

        client = Client(address, timeout="60s")
        executor = DaskChunkExecutor(
            client, ModelRef(str(registry.site_root.resolve()), manifest.ref, manifest.weights_sha256)
        )
    elif not args.no_isolate:
        from ._dask import ModelRef
        from ._isolate import IsolatedSlideRunner

        isolated = IsolatedSlideRunner(
            ModelRef(str(registry.site_root.resolve()), manifest.ref, manifest.weights_sha256), info
        )
    outcomes: list[tuple[int, str, SlideOutcome]] = []
    for index, slide in enumerate(slides):
        label = f"[{index + 1}/{len(slides)}]" + (f" {slide}" if args.show_paths else "")
        if isolated is not None:
            outcome = isolated.run(SlideRequest(
                slide, label, not args.json, args.out, secret, params, engine, policy,
                args.backend or config.backend, args.force,
            ))
        else:
            outcome = analyse_slide(
                slide, model, info, out_dir=args.out, secret=secret, params=params, engine=engine,
                mpp_policy=policy, backend=args.backend or config.backend, force=args.force,  # type: ignore[arg-type]
                progress=progress_bar_factory(label, not args.json), executor=executor,
            )
        outcomes.append((index, slide, outcome))
        audit_run(outcome, info, params, via="run", mpp=args.mpp, backend=args.backend or config.backend)
        if outcome.error is not None:
            print(f"{label} slide {outcome.slide_id or '(unreadable)'} failed: {outcome.error.one_line()}", file=sys.stderr)
        elif not args.json:
            if outcome.status == "reused":
                print(f"{label} slide {outcome.slide_id}: reused the complete result in {outcome.result_dir} "
                      f"({outcome.tiles} tiles; --force recomputes)")
            else:
                rate = f", {outcome.tiles_per_s:.1f} tiles/s" if outcome.tiles_per_s else ""
                resumed = (f", resumed: {outcome.chunks_computed} of {outcome.chunks_total} chunks computed"
                           if outcome.chunks_computed < outcome.chunks_total else "")
                print(f"{label} slide {outcome.slide_id}: done, {outcome.tiles} tiles{rate}{resumed}")
                print(f"    overview {outcome.result_dir / 'overview.png'}")
                print(f"    heatmap  {outcome.result_dir / 'heatmap.ome.zarr'}")
    if client is not None:
        client.close()
    if isolated is not None:
        isolated.close()
    failed = [(i, o) for i, _, o in outcomes if o.status == "failed"]
    if args.json:
        rows = []
        for index, slide, outcome in outcomes:
            row = {**outcome.to_json(), "input_index": index}
            if args.show_paths:
                row["input"] = slide
            rows.append(row)
        print(json.dumps(rows, indent=2))
    else:
        counts = {s: sum(o.status == s for _, _, o in outcomes) for s in ("done", "reused", "failed")}
        print(f"{len(outcomes)} slide(s): {counts['done']} done, {counts['reused']} reused, {counts['failed']} failed")
        for index, outcome in failed:
            print(f"  failed [{index + 1}/{len(slides)}] {outcome.error.kind}: {outcome.error.message}")  # type: ignore[union-attr]
    return EXIT_FAILED if failed else EXIT_OK
