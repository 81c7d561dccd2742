"""``wsiflow serve`` (a scheduled inbox deployment) and ``wsiflow server`` (a local Prefect server)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from pipeline import OFFLINE_ENV

from ._cli_common import EXIT_FAILED, EXIT_OK
from ._cli_run import DEFAULT_READERS
from ._config import WsiflowConfig

__all__ = ["add_serve_parser", "add_server_parser", "run_serve", "run_server"]


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="watch a scanner inbox on a schedule (a Prefect deployment; needs a Prefect server)",
        description=(
            "Create a Prefect deployment that looks at INBOX on a schedule, analyses each slide "
            "once it has finished copying (size unchanged since the previous look) and records "
            "which were processed or failed. Runs until stopped. Needs PREFECT_API_URL (see "
            "`wsiflow server`)."
        ),
    )
    serve.add_argument("--inbox", type=Path, required=True, metavar="DIR")
    serve.add_argument("--out", type=Path, required=True, metavar="DIR")
    serve.add_argument("--model", default="tissue-qc", metavar="NAME[@VERSION]")
    when = serve.add_mutually_exclusive_group()
    when.add_argument("--interval", type=int, metavar="SECONDS", help="look every N seconds (default 300)")
    when.add_argument("--cron", metavar="'M H D M W'", help="look on a cron schedule")
    serve.add_argument("--stride", type=int, metavar="PX")
    serve.add_argument("--dask-address", metavar="tcp://HOST:PORT")


def add_server_parser(commands: argparse._SubParsersAction) -> None:
    server = commands.add_parser(
        "server",
        help="start a local Prefect server (analytics off, 127.0.0.1 by default)",
        description="Start the Prefect server and UI for wsiflow runs. Set PREFECT_API_URL=http://HOST:PORT/api for clients.",
    )
    server.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    server.add_argument("--port", type=int, default=4200)


def run_serve(args: argparse.Namespace, config: WsiflowConfig) -> int:
    from ._batch import BatchSpec
    from ._inbox import inbox_flow, save_inbox

    if not os.environ.get("PREFECT_API_URL"):
        print("wsiflow: error config: serve needs a Prefect server -- start one with `wsiflow server` "
              "and set PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return EXIT_FAILED
    if not args.inbox.is_dir():
        print("wsiflow: error not-found: the inbox folder does not exist", file=sys.stderr)
        return EXIT_FAILED
    args.out.mkdir(parents=True, exist_ok=True)
    spec = BatchSpec(
        slides=(), out=os.fspath(args.out.resolve()), model=args.model,
        models_dir=os.fspath(config.models_dir) if config.models_dir else None,
        stride_px=args.stride, min_tissue_fraction=config.grid.min_tissue_fraction, edge=config.grid.edge,
        backend=config.backend, tissue=asdict(config.tissue), readers=DEFAULT_READERS,
        dask_address=args.dask_address or config.dask_address,
    )
    inbox_id = save_inbox(os.fspath(args.inbox), spec)
    schedule = {"cron": args.cron} if args.cron else {"interval": args.interval or 300}
    print(f"serving inbox {inbox_id} as deployment wsiflow-inbox/{inbox_id} ({schedule}); Ctrl-C stops", flush=True)
    inbox_flow.serve(name=inbox_id, parameters={"inbox_id": inbox_id}, **schedule)
    return EXIT_OK


def run_server(args: argparse.Namespace, config: WsiflowConfig) -> int:
    prefect = shutil.which("prefect", path=os.path.dirname(sys.executable)) or shutil.which("prefect")
    if prefect is None:
        print("wsiflow: error config: the prefect command is not installed in this environment", file=sys.stderr)
        return EXIT_FAILED
    env = {**os.environ, **OFFLINE_ENV, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    print(f"Prefect server on http://{args.host}:{args.port} -- clients: PREFECT_API_URL=http://{args.host}:{args.port}/api",
          flush=True)
    os.execve(prefect, [prefect, "server", "start", "--host", args.host, "--port", str(args.port)], env)
    return EXIT_OK  # not reached
