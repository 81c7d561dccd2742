"""``wsiflow batch``: the same analysis as ``run``, orchestrated by Prefect, chunks on Dask."""

from __future__ import annotations

import argparse
import os

from pipeline import site_secret

from .._config import WsiflowConfig
from .._model_ref import describe_model
from .._slide_job import identify_jobs
from ._common import EXIT_FAILED, EXIT_OK
from ._options import (
    add_settings_options,
    add_slides_options,
    build_run_settings,
    expand_slides_or_report,
    pin_and_check_model,
)
from ._report import print_report, report_interrupted

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
    add_slides_options(batch)
    add_settings_options(batch)


def run_batch_command(args: argparse.Namespace, config: WsiflowConfig) -> int:
    try:
        return _run_batch(args, config)
    except KeyboardInterrupt:
        return report_interrupted()


def _run_batch(args: argparse.Namespace, config: WsiflowConfig) -> int:
    from .._batch import run_batch

    settings = build_run_settings(config, args)
    slides = expand_slides_or_report(args.slides)
    if not slides:
        return EXIT_FAILED
    # The flow loads and verifies the weights; here the manifest is enough.
    info, preprocessing = describe_model(settings.model, settings.models_dir)
    settings = pin_and_check_model(settings, preprocessing, info)
    batch_id, flow_rows, state = run_batch(settings, identify_jobs(slides, site_secret()))
    rows = []
    for flow_row in flow_rows:
        index = flow_row.pop("index")
        relative = flow_row["result_dir"]
        row = {"input_index": index, **flow_row,
               "result_dir": os.fspath(settings.out_dir / relative) if relative else None}
        if args.show_paths:
            row["input"] = slides[index]
        rows.append(row)
    print_report("batch", rows, as_json=args.json, batch_id=batch_id, state=state)
    return EXIT_FAILED if any(r["status"] == "failed" for r in rows) else EXIT_OK
