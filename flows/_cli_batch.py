"""``wsiflow batch``: the same analysis as ``run``, orchestrated by Prefect, chunks on Dask."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from ._cli_common import EXIT_FAILED, EXIT_OK
from ._cli_run import add_analysis_options, expand_slides
from ._config import WsiflowConfig

__all__ = ["add_batch_parser", "run_batch_command"]


def add_batch_parser(commands: argparse._SubParsersAction) -> None:
    batch = commands.add_parser(
        "batch",
        help="run slides as a Prefect flow with chunks on Dask (shows in the Prefect UI)",
        description=(
            "Like `run`, as a Prefect flow: one task per slide (named by its pseudonymous ID), "
            "chunks on a Dask cluster (--dask-address, config dask.address, else a LocalCluster "
            "on 127.0.0.1), a results table artifact, and a 'Partially failed' state when some "
            "slides fail. Uses the server in PREFECT_API_URL, else Prefect's embedded API."
        ),
    )
    add_analysis_options(batch)


def run_batch_command(args: argparse.Namespace, config: WsiflowConfig) -> int:
    from ._batch import BatchSpec, run_batch

    slides = expand_slides(args.slides)
    if not slides:
        print("wsiflow: error not-found: no slides matched the arguments", file=sys.stderr)
        return EXIT_FAILED
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = tuple(
        {"label": o.label, "vendor": o.vendor, "folder": os.fspath(o.folder) if o.folder else None,
         "mpp_x": o.mpp_x, "mpp_y": o.mpp_y, "only_if_missing": o.only_if_missing}
        for o in config.mpp_overrides
    )
    spec = BatchSpec(
        slides=tuple(os.fspath(os.path.abspath(s)) for s in slides),
        out=os.fspath(args.out.resolve()),
        model=args.model,
        models_dir=os.fspath(config.models_dir) if config.models_dir else None,
        stride_px=args.stride,
        min_tissue_fraction=args.min_tissue_fraction if args.min_tissue_fraction is not None else config.grid.min_tissue_fraction,
        edge=args.edge or config.grid.edge,
        chunk_cells=args.chunk_cells,
        overview_class=args.overview_class,
        backend=args.backend or config.backend,
        mpp=args.mpp,
        mpp_overrides=tuple({k: v for k, v in o.items() if v is not None} for o in overrides),
        tissue=asdict(config.tissue),
        batch_size=args.batch_size,
        readers=args.readers,
        device=args.device,
        dask_address=args.dask_address or config.dask_address,
        force=args.force,
    )
    batch_id, rows, state = run_batch(spec)
    if args.json:
        print(json.dumps({"batch_id": batch_id, "state": state, "slides": rows}, indent=2))
    else:
        for row in rows:
            label = f"[{row['index'] + 1}/{len(rows)}]" + (f" {slides[row['index']]}" if args.show_paths else "")
            if row["error"]:
                print(f"{label} slide {row['slide_id']} failed: {row['error']['kind']}: {row['error']['message']}")
            else:
                print(f"{label} slide {row['slide_id']}: {row['status']}, {row['tiles']} tiles -> {args.out / row['result']}")
        print(f"batch {batch_id}: {state}")
    return EXIT_FAILED if any(r["status"] == "failed" for r in rows) else EXIT_OK
