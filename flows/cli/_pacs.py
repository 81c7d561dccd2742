"""``wsiflow pacs watch`` (DICOMweb) and ``wsiflow pacs listen`` (DIMSE): analyse slides from
the archive, store results back.

Each look finds new slide microscopy series (QIDO-RS, modality SM), analyses them and
stores a Segmentation (heatmap) and Microscopy Bulk Simple Annotations (tiles, regions) into
the slide's study (STOW-RS). ``--once`` looks once in the foreground; otherwise the watch is
stored in the site directory and served as a scheduled Prefect deployment (like ``serve``)
that looks every ``--interval-s`` seconds until Ctrl-C. What is printed names slide IDs only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading

from pipeline import ConfigError, ModelInfo, RunSettings

from .._config import WsiflowConfig
from .._dask import SlideInterrupted
from .._model_ref import resolve_model
from .._pacs import PacsLook, PacsSlide, check_dicomweb, pacs_look, save_watch
from .._pacs_listen import PacsListener, parse_node
from .._runs import SlideRunner, interruptible
from ._common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, ctrl_c_stops_this_process
from ._options import add_settings_options, build_run_settings, pin_and_check_model
from ._serve import _require_prefect_api, check_inbox_settings, config_source, serve_options

__all__ = ["add_pacs_parser", "run_pacs", "describe_watch"]


def add_pacs_parser(commands: argparse._SubParsersAction) -> None:
    pacs = commands.add_parser(
        "pacs",
        help="analyse slides from a PACS (DICOMweb) and store the results back as DICOM",
        description="Connect wsiflow to the hospital's image archive (see docs/pacs.md).",
    )
    actions = pacs.add_subparsers(dest="pacs_command", required=True, metavar="ACTION")
    watch = actions.add_parser(
        "watch",
        help="look for new slide series over DICOMweb, analyse them, store SEG + ANN into their study",
        description=(
            "Find slide microscopy series (QIDO-RS, modality SM) not analysed yet, retrieve each into a private "
            "cache in the site directory, analyse it, and store the heatmap as a fractional Segmentation and "
            "the tiles and regions as Microscopy Bulk Simple Annotations into the slide's study (STOW-RS). "
            "Each series is analysed once (a ledger in the site directory); the cache is removed afterwards. "
            "Without --once the watch is served as a scheduled Prefect deployment (wsiflow-pacs-watch/<watch ID>, "
            "like `wsiflow serve`; needs PREFECT_API_URL) until Ctrl-C."
        ),
    )
    watch.add_argument("--dicomweb", required=True, metavar="URL",
                       help="the archive's DICOMweb root, e.g. http://pacs:8042/dicom-web")
    watch.add_argument("--once", action="store_true", help="look once in the foreground and exit")
    watch.add_argument("--interval-s", type=float, default=60.0, metavar="S",
                       help="seconds between the deployment's scheduled looks")
    watch.add_argument("--settle-s", type=float, default=30.0, metavar="S",
                       help="take a series once its instance count is unchanged this long (0: at once)")
    watch.add_argument("--json", action="store_true", help="with --once: the look as one JSON document")
    add_settings_options(watch)
    listen = actions.add_parser(
        "listen",
        help="a DICOM node (C-STORE SCP): analyse each pushed slide series once, C-STORE the results back",
        description=(
            "Accept VL Whole Slide Microscopy instances pushed by a scanner or a PACS routing rule; once a series "
            "has had no new instance for --settle-s seconds it is analysed (once: a ledger in the site directory) "
            "and its Segmentation and Bulk Annotations are sent by C-STORE to --store-to. Runs until Ctrl-C."
        ),
    )
    listen.add_argument("--ae-title", default="WSIFLOW", metavar="AET", help="this node's AE title")
    listen.add_argument("--port", type=int, required=True, help="the port to listen on")
    listen.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on (default loopback; the server's address for the network)")
    listen.add_argument("--store-to", required=True, metavar="AE@HOST:PORT",
                        help="where the results go (the archive's DICOM node)")
    listen.add_argument("--settle-s", type=float, default=30.0, metavar="S",
                        help="a series is complete once no instance of it arrived for this long")
    listen.add_argument("--json", action="store_true", help="one JSON line per analysed series")
    add_settings_options(listen)


def _print_look(look: PacsLook, as_json: bool) -> None:
    if as_json:
        print(json.dumps(look.to_json()), flush=True)
        return
    if look.busy:
        print("another look at this archive is running; nothing done", flush=True)
        return
    print(f"{look.found} slide series in the archive, {look.already_done} done before", flush=True)
    for slide in look.slides:
        if slide.status == "failed":
            print(f"  {slide.slide_id or '?'}: failed ({slide.error_kind}) {slide.error_message}", file=sys.stderr,
                  flush=True)
        elif slide.status == "settling":
            print("  one series still arriving: taken once it settles", flush=True)
        else:
            print(f"  {slide.slide_id}: {slide.status}, {slide.stored} DICOM objects stored in its study", flush=True)


def _print_slide(slide: PacsSlide, as_json: bool) -> None:
    if as_json:
        print(json.dumps(slide.to_json()), flush=True)
    elif slide.status == "failed":
        print(f"{slide.slide_id or '?'}: failed ({slide.error_kind}) {slide.error_message}", file=sys.stderr,
              flush=True)
    else:
        print(f"{slide.slide_id}: {slide.status}, {slide.stored} DICOM objects sent back", flush=True)


def _listen(args: argparse.Namespace, runner: SlideRunner, info: ModelInfo) -> int:
    listener = PacsListener(args.ae_title, args.host, args.port, parse_node(args.store_to), runner, info,
                            settle_s=args.settle_s)
    stop = threading.Event()
    listener.start()
    if not args.json:
        print(f"listening as {args.ae_title} on {args.host}:{args.port}; Ctrl-C stops", flush=True)
    try:
        listener.serve(lambda slide: _print_slide(slide, args.json), stop)
    finally:
        listener.stop()
    return EXIT_OK


def _watch_once(args: argparse.Namespace, settings: RunSettings, runner: SlideRunner, info: ModelInfo) -> int:
    look = pacs_look(args.dicomweb, settings, runner, info, settle_s=args.settle_s)
    _print_look(look, args.json)
    return EXIT_FAILED if any(s.status == "failed" for s in look.slides) else EXIT_OK


def describe_watch(watch_id: str, settings: RunSettings, interval_s: float, settle_s: float) -> str:
    """The deployment's description in the Prefect UI (IDs, never the URL or paths)."""
    return (
        f"PACS watch {watch_id} (wsiflow pacs watch), looked at every {interval_s:g} s: each slide microscopy "
        f"series of the archive (QIDO-RS, modality SM) not analysed yet, once its instance count has been "
        f"unchanged for {settle_s:g} s, is retrieved into a private cache, analysed once with model "
        f"{settings.model} (its default version at each look), and its heatmap (fractional Segmentation) and "
        f"tiles and regions (Microscopy Bulk Simple Annotations) are stored into the slide's study (STOW-RS). "
        f"Results also go to the output folder given to pacs watch, one folder per pseudonymous slide ID. The "
        f"ledger (pacs/{watch_id}/ in the site directory) records each series as processed or failed; a failed "
        f"series is not retried until its ledger entry is removed."
    )


def _serve_watch(args: argparse.Namespace, config: WsiflowConfig) -> int:
    """Store the watch and serve it as a scheduled deployment until Ctrl-C."""
    if not args.interval_s > 0:
        raise ConfigError(f"--interval-s {args.interval_s:g} is not a positive number of seconds",
                          hint="give the seconds between looks, e.g. --interval-s 60")
    _require_prefect_api()
    settings = check_inbox_settings(build_run_settings(config, args))
    watch_id, resumed = save_watch(args.dicomweb, settings, settle_s=args.settle_s,
                                   options=serve_options(args, settings), config_file=config_source(args))
    from prefect.runner import Runner
    from prefect.types.entrypoint import EntrypointType

    from .._pacs import pacs_watch_flow  # Prefect loads with it: only for the deployment

    runner = Runner(name=f"wsiflow-{watch_id}", pause_on_shutdown=True)
    runner.add_flow(
        pacs_watch_flow, name=watch_id, parameters={"watch_id": watch_id}, tags=["wsiflow", "pacs"],
        description=describe_watch(watch_id, settings, args.interval_s, args.settle_s),
        # The module, not this installation's file path, is what the deployment records.
        entrypoint_type=EntrypointType.MODULE_PATH, interval=args.interval_s,
    )
    print(f"watching archive {watch_id}{' (continued: its ledger is kept)' if resumed else ''} as deployment "
          f"wsiflow-pacs-watch/{watch_id}, looking every {args.interval_s:g} s; Ctrl-C stops", flush=True)
    stopped = (f"wsiflow: pacs watch stopped: deployment wsiflow-pacs-watch/{watch_id} is paused; the ledger of "
               f"archive {watch_id} is kept (watch the same --dicomweb again to continue it)")
    ctrl_c_stops_this_process()
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        print(stopped, file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    print(stopped, file=sys.stderr, flush=True)
    return EXIT_OK


def run_pacs(args: argparse.Namespace, config: WsiflowConfig) -> int:
    # Usage errors and an unreachable archive are refused before the model loads.
    if args.pacs_command == "listen":
        parse_node(args.store_to)
    else:
        check_dicomweb(args.dicomweb)
        if not args.once:
            return _serve_watch(args, config)
    settings = build_run_settings(config, args)
    model, info, loaded = resolve_model(settings.model, settings.models_dir)
    settings = pin_and_check_model(settings, loaded.preprocessing, info)
    runner = SlideRunner(settings, model, info)
    try:
        with interruptible() as interrupt:
            interrupt.on_stop(runner.stop)
            if args.pacs_command == "listen":
                return _listen(args, runner, info)
            return _watch_once(args, settings, runner, info)
    except (KeyboardInterrupt, SlideInterrupted):
        print("wsiflow: stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        runner.close()
