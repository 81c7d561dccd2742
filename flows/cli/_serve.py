"""``wsiflow serve`` (a scheduled inbox deployment) and ``wsiflow server`` (a local Prefect server)."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path

from pipeline import OFFLINE_ENV

from .._config import WsiflowConfig
from .._model_ref import describe_model
from ._common import EXIT_FAILED, EXIT_OK
from ._options import add_settings_options, build_run_settings, pin_and_check_model

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
    when = serve.add_mutually_exclusive_group()
    when.add_argument("--interval", type=int, metavar="SECONDS", help="look every N seconds (default 300)")
    when.add_argument("--cron", metavar="'M H D M W'", help="look on a cron schedule")
    add_settings_options(serve)


def add_server_parser(commands: argparse._SubParsersAction) -> None:
    server = commands.add_parser(
        "server",
        help="start a local Prefect server (analytics off, 127.0.0.1 by default)",
        description=(
            "Start the Prefect server and UI for wsiflow runs. Set PREFECT_API_URL=http://HOST:PORT/api for clients."
        ),
    )
    server.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    server.add_argument("--port", type=int, default=4200)
    server.add_argument(
        "--ui-api-url", metavar="URL",
        help="the API address the UI in a browser uses (default http://HOST:PORT/api; with --host 0.0.0.0, "
             "this machine's name)",
    )


def run_serve(args: argparse.Namespace, config: WsiflowConfig) -> int:
    from .._inbox import inbox_flow, save_inbox

    if not os.environ.get("PREFECT_API_URL"):
        print("wsiflow: error config: serve needs a Prefect server -- start one with `wsiflow server` "
              "and set PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return EXIT_FAILED
    if not args.inbox.is_dir():
        print("wsiflow: error not-found: the inbox folder does not exist", file=sys.stderr)
        return EXIT_FAILED
    settings = build_run_settings(config, args)
    info, preprocessing = describe_model(settings.model, settings.models_dir)
    # Not pinned: an inbox follows the model's default version, so a promotion takes over.
    settings = pin_and_check_model(settings, preprocessing, info, pin=False)
    inbox_id = save_inbox(os.fspath(args.inbox), settings)
    schedule = {"cron": args.cron} if args.cron else {"interval": args.interval or 300}
    print(f"serving inbox {inbox_id} as deployment wsiflow-inbox/{inbox_id} ({schedule}); Ctrl-C stops", flush=True)
    inbox_flow.serve(name=inbox_id, parameters={"inbox_id": inbox_id}, **schedule)
    return EXIT_OK


def run_server(args: argparse.Namespace, config: WsiflowConfig) -> int:
    prefect = shutil.which("prefect", path=os.path.dirname(sys.executable)) or shutil.which("prefect")
    if prefect is None:
        print("wsiflow: error config: the prefect command is not installed in this environment", file=sys.stderr)
        return EXIT_FAILED
    public_host = socket.gethostname() if args.host in ("0.0.0.0", "::") else args.host
    api_url = args.ui_api_url or f"http://{public_host}:{args.port}/api"
    env = {
        **os.environ, **OFFLINE_ENV,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The UI asks its browser to call this API; Prefect's default ignores --host/--port.
        "PREFECT_UI_API_URL": api_url,
        # An offline server must not advertise cloud upgrades.
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    }
    print(f"Prefect server on http://{public_host}:{args.port} -- clients: PREFECT_API_URL={api_url}", flush=True)
    os.execve(prefect, [prefect, "server", "start", "--host", args.host, "--port", str(args.port)], env)
    return EXIT_OK  # not reached
