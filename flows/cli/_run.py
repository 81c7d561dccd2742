"""``wsiflow run``: classify slides into heatmaps, tables, GeoJSON and summaries."""

from __future__ import annotations

import argparse
import os
import sys
import time

from pipeline import site_secret

from .._config import WsiflowConfig
from .._dask import SlideInterrupted
from .._model_ref import resolve_model
from .._runs import Interrupt, SlideRunner, interruptible
from .._slide_job import identify_job
from ._common import EXIT_FAILED, EXIT_OK
from ._options import (
    add_settings_options,
    add_slides_options,
    build_run_settings,
    expand_slides_or_report,
    pin_and_check_model,
)
from ._report import print_report, report_interrupted, slide_lines

__all__ = ["add_run_parser", "run_run"]


def add_run_parser(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run",
        help="classify slides into heatmaps (OME-Zarr), tables, GeoJSON and summaries",
        description=(
            "Analyse each slide with a registry model: tissue detection, tile grid, batched "
            "inference, results in OUT/<slide id>/<model>/v<version>-<params digest>/ (OUT/<slide id>/"
            "<model>/latest points at the newest). Interrupted runs resume; complete results with the "
            "same slide content, model and parameters are reused; other parameters never replace them. "
            "Runs in this process (no server), or sends chunks to --dask-address."
        ),
    )
    add_slides_options(run)
    add_settings_options(run)
    run.add_argument(
        "--in-process", action="store_true",
        help="stay in this process even when PREFECT_API_URL names a server",
    )


def run_run(args: argparse.Namespace, config: WsiflowConfig) -> int:
    if os.environ.get("PREFECT_API_URL") and not args.in_process:
        # A server is configured: run as the batch flow so the run shows in its UI.
        from ._batch import run_batch_command

        return run_batch_command(args, config)
    try:
        with interruptible() as interrupt:
            return _run_slides(args, config, interrupt)
    except (KeyboardInterrupt, SlideInterrupted):
        return report_interrupted()


def _run_slides(args: argparse.Namespace, config: WsiflowConfig, interrupt: Interrupt) -> int:
    settings = build_run_settings(config, args)
    slides = expand_slides_or_report(args.slides)
    if not slides:
        return EXIT_FAILED
    model, info, loaded = resolve_model(settings.model, settings.models_dir)
    settings = pin_and_check_model(settings, loaded.preprocessing, info)
    secret = site_secret()
    runner = SlideRunner(settings, model, info)
    interrupt.on_stop(runner.stop)
    rows = []
    try:
        for index, slide in enumerate(slides):
            label = f"[{index + 1}/{len(slides)}]" + (f" {slide}" if args.show_paths else "")
            job = identify_job(slide, secret, label, show_progress=not args.json)
            started = time.monotonic()
            outcome = runner.run(job, via="run")
            row = {"input_index": index, **outcome.to_json(), "duration_s": round(time.monotonic() - started, 2)}
            if args.show_paths:
                row["input"] = slide
            rows.append(row)
            lines, to_stderr = slide_lines(job.label, row)
            if to_stderr or not args.json:
                print("\n".join(lines), file=sys.stderr if to_stderr else sys.stdout, flush=True)
    finally:
        runner.close()
    print_report("run", rows, as_json=args.json, printed=True)
    return EXIT_FAILED if any(r["status"] == "failed" for r in rows) else EXIT_OK
