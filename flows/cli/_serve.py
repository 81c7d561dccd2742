"""``wsiflow serve`` (a scheduled inbox deployment) and ``wsiflow server`` (a local Prefect server)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from pipeline import OFFLINE_ENV, ConfigError, RunSettings

from .._config import WsiflowConfig
from .._model_ref import describe_model
from ._common import EXIT_INTERRUPTED, EXIT_OK, ctrl_c_stops_this_process, positive_int
from ._options import add_settings_options, build_run_settings, pin_and_check_model

__all__ = ["add_serve_parser", "add_server_parser", "run_serve", "run_server", "register_inbox",
           "settings_option_names", "given_options", "serve_options", "config_source", "check_inbox_settings",
           "describe_deployment", "is_loopback_host"]


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="watch a scanner inbox on a schedule (a Prefect deployment; needs a Prefect server)",
        description=(
            "Create a Prefect deployment that looks at INBOX on a schedule, analyses each slide "
            "once it has finished copying (size unchanged since the previous look) and records "
            "which were processed or failed (`wsiflow retry` re-runs failed ones). Runs until "
            "stopped (Ctrl-C); serving the same INBOX and --out again continues the same inbox. "
            "Needs PREFECT_API_URL (see `wsiflow server`)."
        ),
    )
    serve.add_argument("--inbox", type=Path, required=True, metavar="DIR")
    when = serve.add_mutually_exclusive_group()
    when.add_argument("--interval", type=positive_int, metavar="SECONDS", help="look every N seconds (default 300)")
    when.add_argument("--cron", metavar="'M H D M W'", help="look on a cron schedule")
    add_settings_options(serve)


def add_server_parser(commands: argparse._SubParsersAction) -> None:
    server = commands.add_parser(
        "server",
        help="start a local Prefect server (analytics off, 127.0.0.1 by default)",
        description=(
            "Start the Prefect server and UI for wsiflow runs. Set PREFECT_API_URL=http://HOST:PORT/api for clients. "
            "Any --host other than loopback needs authentication: set PREFECT_SERVER_API_AUTH_STRING='user:password' "
            "for the server (clients then set PREFECT_API_AUTH_STRING to the same value; the UI asks for it), or "
            "put a reverse proxy with TLS and authentication in front and keep the server on 127.0.0.1."
        ),
    )
    server.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    server.add_argument("--port", type=int, default=4200)
    server.add_argument(
        "--ui-api-url", metavar="URL",
        help="the API address the UI in a browser uses (default http://HOST:PORT/api; with --host 0.0.0.0, "
             "this machine's name)",
    )
    server.add_argument(
        "--allow-unauthenticated", action="store_true",
        help="bind a non-loopback --host without PREFECT_SERVER_API_AUTH_STRING: anyone who reaches the port can "
             "read and start runs (only behind a proxy or firewall that authenticates for it)",
    )


def settings_option_names() -> tuple[str, ...]:
    """The argparse names of the settings options (``add_settings_options``)."""
    probe = argparse.ArgumentParser(add_help=False)
    add_settings_options(probe)
    return tuple(vars(probe.parse_args(["--out", "."])))


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The settings options given on the command line, as JSON values."""
    options: dict[str, Any] = {}
    for name in settings_option_names():
        value = getattr(args, name, None)
        if value is None or value is False:
            continue
        options[name] = list(value) if isinstance(value, tuple) else os.fspath(value) if isinstance(value, Path) \
            else value
    return options


def serve_options(args: argparse.Namespace, settings: RunSettings) -> dict[str, Any]:
    """The settings options ``serve`` was given (JSON), stored with the inbox so that
    ``wsiflow retry`` can rebuild its settings as ``serve`` built them."""
    return {**given_options(args), "out": os.fspath(settings.out_dir)}


def config_source(args: argparse.Namespace) -> str | None:
    """The config file this command read (``--config``, else ``$WSIFLOW_CONFIG``); None: built-in."""
    chosen = args.config if args.config is not None else os.environ.get("WSIFLOW_CONFIG")
    return os.fspath(Path(chosen).resolve()) if chosen else None


def check_inbox_settings(settings: RunSettings) -> RunSettings:
    """Refuse grid options the model cannot take before anything is stored. Not pinned: an
    inbox follows the model's default version, so a promotion takes over."""
    info, preprocessing = describe_model(settings.model, settings.models_dir)
    return pin_and_check_model(settings, preprocessing, info, pin=False)


def _require_prefect_api() -> None:
    """serve registers a deployment: it needs a Prefect server (the environment's or the
    Prefect profile's PREFECT_API_URL; ``build_run_settings`` checks that it answers)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError("serve needs a Prefect server, and PREFECT_API_URL is not set",
                          hint="start one with `wsiflow server` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    os.environ.setdefault("PREFECT_API_URL", str(url))  # a profile's URL: checked like the environment's


def _schedule(args: argparse.Namespace) -> dict[str, Any]:
    if not args.cron:
        return {"interval": args.interval or 300}
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=args.cron)
    except ValueError:
        raise ConfigError(f"--cron {args.cron!r} is not a cron schedule",
                          hint="five fields: minute hour day month weekday, e.g. '*/10 * * * *'") from None
    return {"cron": args.cron}


def describe_deployment(inbox_id: str, settings: RunSettings, schedule: dict[str, Any]) -> str:
    """The deployment's description in the Prefect UI (IDs, never paths)."""
    when = f"every {schedule['interval']} s" if "interval" in schedule else f"on cron '{schedule['cron']}'"
    return (
        f"Scanner inbox {inbox_id} (wsiflow serve), looked at {when}: each slide whose copy has finished "
        f"(size and time unchanged since the previous look) is analysed once with model {settings.model} "
        f"(its default version at each look) as a wsiflow-batch subflow. Results go to the output folder "
        f"given to serve, one folder per pseudonymous slide ID (<slide id>/<model>/...). The ledger "
        f"(inboxes/{inbox_id}/ in the site directory) records each slide as processed or failed; after fixing "
        f"the cause of a failure, `wsiflow retry --inbox-id {inbox_id} --all-failed` submits it again."
    )


def register_inbox(args: argparse.Namespace, config: WsiflowConfig) -> tuple[str, RunSettings, bool]:
    """Store the inbox ``serve`` watches: its ID, settings, and whether it continues an
    inbox stored earlier for the same folder and output folder (its ledger is kept)."""
    from .._inbox import find_inbox, save_inbox  # Prefect loads with it: only for the commands that need it

    if not args.inbox.is_dir():
        raise ConfigError("--inbox is not a folder", hint="give the folder the scanner copies slides into")
    settings = check_inbox_settings(build_run_settings(config, args))
    existing = find_inbox(os.fspath(args.inbox), settings.out_dir)
    inbox_id = save_inbox(os.fspath(args.inbox), settings, inbox_id=existing,
                          options=serve_options(args, settings), config_file=config_source(args))
    return inbox_id, settings, existing is not None


def run_serve(args: argparse.Namespace, config: WsiflowConfig) -> int:
    from prefect.runner import Runner
    from prefect.types.entrypoint import EntrypointType

    from .._inbox import inbox_flow

    schedule = _schedule(args)
    _require_prefect_api()
    inbox_id, settings, resumed = register_inbox(args, config)
    runner = Runner(name=f"wsiflow-{inbox_id}", pause_on_shutdown=True)
    runner.add_flow(
        inbox_flow, name=inbox_id, parameters={"inbox_id": inbox_id}, tags=["wsiflow", "inbox"],
        description=describe_deployment(inbox_id, settings, schedule),
        # The module, not this installation's file path, is what the deployment records.
        entrypoint_type=EntrypointType.MODULE_PATH, **schedule,
    )
    when = f"every {schedule['interval']} s" if "interval" in schedule else f"on cron '{schedule['cron']}'"
    print(f"serving inbox {inbox_id}{' (continued: its ledger is kept)' if resumed else ''} as deployment "
          f"wsiflow-inbox/{inbox_id}, looking {when}; Ctrl-C stops", flush=True)
    ctrl_c_stops_this_process()
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        print(_stopped(inbox_id), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    print(_stopped(inbox_id), file=sys.stderr, flush=True)
    return EXIT_OK


def _stopped(inbox_id: str) -> str:
    return (f"wsiflow: serve stopped: deployment wsiflow-inbox/{inbox_id} is paused; the ledger of inbox "
            f"{inbox_id} is kept (serve the same --inbox and --out again to continue it)")


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` keeps a server on this machine: a loopback address or
    ``localhost``. Other names are not resolved (no lookup); they count as reachable."""
    text = host.strip().strip("[]").lower()
    if text in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _server_auth_configured() -> bool:
    """Whether the Prefect server will require basic authentication: a non-blank
    PREFECT_SERVER_API_AUTH_STRING in the environment, a profile or prefect.toml, exactly
    as the server reads it."""
    from prefect.settings import get_current_settings

    secret = get_current_settings().server.api.auth_string
    return secret is not None and bool(secret.get_secret_value().strip())


def _check_exposure(args: argparse.Namespace) -> bool:
    """Refuse a server reachable from other machines that anyone could use; True when
    Prefect's authentication is on."""
    authenticated = _server_auth_configured()
    if is_loopback_host(args.host) or authenticated or args.allow_unauthenticated:
        return authenticated
    raise ConfigError(
        f"--host {args.host} makes the Prefect API and UI reachable from other machines, and no authentication "
        "is configured (anyone could read runs and start them)",
        hint="set PREFECT_SERVER_API_AUTH_STRING='user:password' for the server (clients set PREFECT_API_AUTH_STRING "
             "to the same value), or keep --host 127.0.0.1 behind a reverse proxy with TLS and authentication; "
             "--allow-unauthenticated binds anyway",
    )


def run_server(args: argparse.Namespace, config: WsiflowConfig) -> int:
    prefect = shutil.which("prefect", path=os.path.dirname(sys.executable)) or shutil.which("prefect")
    if prefect is None:
        raise ConfigError("the prefect command is not installed in this environment",
                          hint="reinstall wsiflow in this environment (Prefect is one of its dependencies)")
    authenticated = _check_exposure(args)
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
    clients = f"PREFECT_API_URL={api_url}"
    if authenticated:
        clients += " and PREFECT_API_AUTH_STRING (the server's user:password; the UI asks for it)"
    elif not is_loopback_host(args.host):
        print(f"wsiflow: warning: --allow-unauthenticated: anyone who reaches {args.host}:{args.port} can read and "
              "start runs", file=sys.stderr, flush=True)
    print(f"Prefect server on http://{public_host}:{args.port} -- clients: {clients}", flush=True)
    os.execve(prefect, [prefect, "server", "start", "--host", args.host, "--port", str(args.port)], env)
    return EXIT_OK  # not reached
