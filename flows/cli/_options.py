"""Options shared by ``run``, ``batch`` and ``serve``, and the one place they become settings.

Precedence, lowest first: built-in defaults < the config file (``--config`` or
``$WSIFLOW_CONFIG``) < command-line options. Every option defaults to "not given" so the
config is never masked by an argparse default.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline import (
    BACKEND_NAMES,
    AnalysisParams,
    ConfigError,
    ModelInfo,
    MppPolicy,
    Preprocessing,
    RunSettings,
    expand_slide_arguments,
    resolve_device,
)

from .._config import WsiflowConfig, check_dask_address
from ._common import mpp_arg, positive_int

__all__ = ["add_settings_options", "add_slides_options", "build_run_settings", "expand_slides_or_report",
           "pin_and_check_model", "settings_from_options"]

DASK_CONNECT_TIMEOUT_S = 2.0
"""A scheduler that does not accept a connection in this time is refused (Dask itself waits 60 s)."""
PREFECT_HEALTH_TIMEOUT_S = 3.0
"""A Prefect API that does not answer its health check in this time is refused."""


def add_slides_options(parser: argparse.ArgumentParser) -> None:
    """The slides to analyse and how to report them (``run`` and ``batch``)."""
    parser.add_argument("slides", nargs="+", metavar="SLIDE|DIR|GLOB",
                        help="slide files, DICOM-WSI folders, folders of slides, or quoted globs")
    parser.add_argument("--force", action="store_true", help="recompute even when a complete result exists")
    parser.add_argument("--json", action="store_true", help="one JSON document (see README: the run report)")
    parser.add_argument("--show-paths", action="store_true", help="echo each slide's path in the terminal output")


def add_settings_options(parser: argparse.ArgumentParser, *, with_out: bool = True) -> None:
    """Every option that goes into :class:`pipeline.RunSettings` (``run``, ``batch``, ``serve``;
    ``retry`` without ``--out``: an inbox keeps its output folder)."""
    if with_out:
        parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="results folder")
    parser.add_argument("--model", metavar="NAME[@VERSION]", help="registry model (default: config models.default)")
    mpp = parser.add_argument_group("µm/px")
    mpp.add_argument("--mpp", type=mpp_arg, metavar="X[,Y]",
                     help="µm/px for slides whose metadata has none (recorded and audited)")
    mpp.add_argument("--mpp-force", action="store_true",
                     help="apply --mpp also to slides whose metadata has a valid µm/px")
    grid = parser.add_argument_group("grid and results (default: config)")
    grid.add_argument("--stride", type=positive_int, metavar="PX",
                      help="step between tiles at the model's µm/px (default: tile size)")
    grid.add_argument("--min-tissue-fraction", type=float, metavar="F", help="keep tiles with at least this tissue")
    grid.add_argument("--edge", choices=("pad", "drop"), help="partial edge tiles")
    grid.add_argument("--chunk-cells", type=positive_int, metavar="N",
                      help="heatmap block edge in tiles: unit of work/resume")
    grid.add_argument("--overview-class", metavar="CLASS",
                      help="class shown in overview.png (default: the most informative: highest mean "
                           "probability among classes other than the first, background and tissue)")
    engine = parser.add_argument_group("engine (default: config)")
    engine.add_argument("--device", choices=("auto", "cpu", "cuda"))
    engine.add_argument("--batch-size", type=positive_int, metavar="N")
    engine.add_argument("--readers", type=positive_int, metavar="N",
                        help="tile reader threads (default: cores, 2 to 8)")
    engine.add_argument("--slide-time-limit", type=_seconds, metavar="S",
                        help="seconds one slide's analysis may take before it fails (its finished chunks are kept); "
                             "0: no limit (default: config engine.slide_time_limit_s, 21600 = 6 h)")
    where = parser.add_argument_group("where it runs (default: config)")
    where.add_argument("--backend", choices=BACKEND_NAMES, help="slide reader")
    where.add_argument("--dask-address", metavar="tcp://HOST:PORT",
                       help="run chunks on this existing Dask scheduler (tls://HOST:PORT: with the certificates "
                            "of config dask.tls_*)")
    where.add_argument(
        "--no-isolate", action="store_true",
        help="analyse slides in this process, not a child process (starts a few seconds faster, but a "
             "crash in the slide-decoding library then stops the whole run)",
    )


def _seconds(text: str) -> float:
    """A number of seconds >= 0 (0: no limit), refused by argparse before anything is loaded."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 (no limit) or a positive number of seconds")
    return value


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _check_out_dir(out: Path) -> Path:
    """``--out`` must be (or be creatable as) a folder: refused now, not after the model loads."""
    out = out.resolve()
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == out else "lies under a file"
                raise ConfigError(f"--out {where}", hint="give a folder for the results")
            break
    return out


def _dask_address(option: str | None, config: WsiflowConfig) -> str | None:
    return check_dask_address(option, "--dask-address") if option else config.dask.address


def _dask_tls(address: str | None, config: WsiflowConfig) -> dict[str, Path | None]:
    """The config's client certificates, for a ``tls://`` scheduler only: a ``tcp://``
    ``--dask-address`` (a local test cluster) does not take them."""
    tls = address is not None and address.startswith("tls://")
    return {
        "dask_tls_ca_file": config.dask.tls_ca_file if tls else None,
        "dask_tls_client_cert": config.dask.tls_client_cert if tls else None,
        "dask_tls_client_key": config.dask.tls_client_key if tls else None,
    }


_TLS_REMEDY = ("dask.tls_ca_file must be the authority that signed the scheduler's certificate, "
               "dask.tls_client_cert a client certificate it signed, dask.tls_client_key that certificate's key")


def _tls_context(settings: RunSettings) -> ssl.SSLContext:
    """The client side of Dask's mutual TLS (as ``distributed.security`` makes it: CA-verified,
    no host name check, TLS 1.2 or later), from the settings' certificate files."""
    ca, cert, key = settings.dask_tls_ca_file, settings.dask_tls_client_cert, settings.dask_tls_client_key
    step = "dask.tls_ca_file"
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.fspath(ca) if ca else None)
        step = "dask.tls_client_cert" + (" or dask.tls_client_key" if key else "")
        context.load_cert_chain(os.fspath(cert) if cert else "", os.fspath(key) if key else None)
    except FileNotFoundError:
        raise ConfigError(f"{step} does not exist", hint=_TLS_REMEDY) from None
    except PermissionError:
        raise ConfigError(f"{step} cannot be read: permission denied",
                          hint="make the certificate files readable by the user that runs wsiflow") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise ConfigError(f"{step} is not a usable PEM certificate/key ({reason})", hint=_TLS_REMEDY) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # Dask's choice: a dedicated CA, clusters addressed by IP
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT  # as Dask: openssl-made certificates lack some extensions
    return context


def _check_tls_handshake(sock: socket.socket, address: str, context: ssl.SSLContext) -> None:
    """Both sides of the mutual TLS: the scheduler's certificate is signed by our authority,
    and it accepts ours (with TLS 1.3 a refusal arrives as an alert on the first read; a
    Dask scheduler speaks first, so an accepted client reads its greeting)."""
    try:
        with context.wrap_socket(sock) as tls:
            tls.settimeout(DASK_CONNECT_TIMEOUT_S)
            with contextlib.suppress(TimeoutError):  # no refusal in time: the scheduler took it
                tls.recv(1)
    except ssl.SSLCertVerificationError:
        raise ConfigError(f"the Dask scheduler at {address} has a certificate that dask.tls_ca_file did not sign",
                          hint=_TLS_REMEDY) from None
    except ssl.SSLError as exc:
        reason = exc.reason or type(exc).__name__
        if "WRONG_VERSION_NUMBER" in reason.upper() or "RECORD_LAYER" in reason.upper():
            raise ConfigError(f"the Dask scheduler at {address} does not speak TLS",
                              hint="use its tcp:// address, or start it with --tls-ca-file, --tls-cert and "
                                   "--tls-key") from None
        raise ConfigError(f"the Dask scheduler at {address} refused wsiflow's TLS client certificate ({reason})",
                          hint=_TLS_REMEDY) from None
    except TimeoutError:
        raise ConfigError(f"the Dask scheduler at {address} did not answer the TLS handshake in "
                          f"{DASK_CONNECT_TIMEOUT_S:g} s (a tcp:// scheduler?)",
                          hint="start it with --tls-ca-file, --tls-cert and --tls-key, or use its tcp:// address "
                               "(on this machine only)") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"the TLS handshake with the Dask scheduler at {address} failed ({reason})",
                          hint=_TLS_REMEDY) from None


def _dask_has_tls_config() -> bool:
    """Dask's own config (``distributed.comm.tls``, e.g. from ``DASK_DISTRIBUTED__COMM__TLS__*``)
    names a CA and a client certificate."""
    import dask.config

    return bool(dask.config.get("distributed.comm.tls.ca-file", None)
                and dask.config.get("distributed.comm.tls.client.cert", None))


def _check_dask_reachable(settings: RunSettings) -> None:
    """A TCP connection to the scheduler, so a stopped one is refused in seconds, not after
    Dask's 60 s connect timeout; with ``tls://`` and certificates, the TLS handshake too, so a
    wrong or refused certificate is one line, not a minute's wait and a traceback."""
    address = settings.dask_address or ""
    url = urllib.parse.urlsplit(address)
    if url.scheme not in ("tcp", "tls") or not url.hostname:
        return  # inproc:// and ucx:// are not plain TCP; Dask reports those itself
    tls = url.scheme == "tls" and settings.dask_tls_ca_file is not None
    if url.scheme == "tls" and not tls and not _dask_has_tls_config():
        raise ConfigError(f"the Dask scheduler {address} is tls://, but no client certificates are configured",
                          hint="set dask.tls_ca_file, dask.tls_client_cert and dask.tls_client_key in the config "
                               "(--config)")
    context = _tls_context(settings) if tls else None  # bad files are refused before any connection
    try:
        sock = socket.create_connection((url.hostname, url.port or 8786), timeout=DASK_CONNECT_TIMEOUT_S)
    except TimeoutError:
        reason = f"no answer in {DASK_CONNECT_TIMEOUT_S:g} s"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
    else:
        if context is None:
            sock.close()
        else:
            _check_tls_handshake(sock, address, context)
        return
    raise ConfigError(
        f"no Dask scheduler answers at {address} ({reason})",
        hint="start the scheduler (dask scheduler) or fix --dask-address / dask.address; leave both "
             "unset to run the chunks on this machine",
    )


_GPU_DRIVER_NODES = ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
"""Device files a CUDA (or ROCm) GPU needs on Linux: NVIDIA's driver, WSL2's, ROCm's."""


def _check_cuda() -> None:
    """``--device cuda`` needs a usable GPU. Without any GPU driver's device file that is
    certain at once; otherwise torch decides (importing it takes seconds)."""
    if sys.platform == "linux" and not any(os.path.exists(node) for node in _GPU_DRIVER_NODES):
        raise ConfigError("device cuda (--device or engine.device) was asked for, but this machine has no GPU driver",
                          hint="use --device cpu or auto, or install the GPU's driver")
    resolve_device("cuda")


def _check_prefect_api(api_url: str) -> None:
    """The Prefect API in ``PREFECT_API_URL`` answers its health check (else Prefect fails
    later with a long traceback)."""
    health = api_url.rstrip("/") + "/health"
    remedy = ("start the server (`wsiflow server`) and set PREFECT_API_URL=http://HOST:PORT/api, or unset "
              "PREFECT_API_URL (`run` then stays in this process; `batch` uses Prefect's embedded API)")
    if urllib.parse.urlsplit(health).scheme not in ("http", "https"):
        raise ConfigError(f"PREFECT_API_URL {api_url!r} is not an http(s) URL", hint=remedy)
    try:
        with urllib.request.urlopen(health, timeout=PREFECT_HEALTH_TIMEOUT_S):
            return
    except urllib.error.HTTPError as exc:
        raise ConfigError(f"PREFECT_API_URL {api_url} answers, but not as a Prefect API (HTTP {exc.code})",
                          hint="it ends in /api, e.g. http://127.0.0.1:4200/api") from None
    except (OSError, ValueError) as exc:
        cause = getattr(exc, "reason", exc)  # URLError wraps the socket's error
        reason = getattr(cause, "strerror", None) or str(cause) or type(exc).__name__
        raise ConfigError(f"no Prefect server answers at PREFECT_API_URL {api_url} ({reason})",
                          hint=remedy) from None


def expand_slides_or_report(arguments: list[str], *, refuse_missing: bool = True) -> list[str]:
    """The slides the arguments mean; an empty list after printing the one-line error.

    A plain argument that does not exist is a :class:`ConfigError` (exit 2) before
    anything starts, unless ``refuse_missing`` is False (``inspect`` reports it as a slide
    that is not found); a broken link or link loop in a folder stays in its place, so the
    command reports it as a failed slide by its position and goes on with the others.
    """
    expanded = expand_slide_arguments(arguments, refuse_missing=refuse_missing, keep_broken_links=True)
    slides = [os.fspath(p) for p in expanded]
    if not slides:
        print("wsiflow: error not-found: no slides matched the arguments", file=sys.stderr)
    return slides


def pin_and_check_model(settings: RunSettings, preprocessing: Preprocessing, info: ModelInfo,
                        *, pin: bool = True) -> RunSettings:
    """Refuse grid options the model cannot take before any slide, pin the model version
    (a promotion mid-run then changes nothing), and make the output folder."""
    settings.analysis.grid.spec(preprocessing, info.ref)
    if pin:
        settings = replace(settings, model=info.ref)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    return settings


def settings_from_options(config: WsiflowConfig, args: argparse.Namespace) -> RunSettings:
    """The run settings of a command: config values overridden by the options given
    (checked for themselves; nothing outside this process is asked)."""
    option = lambda name: getattr(args, name, None)  # noqa: E731 - commands lack some options
    grid = replace(config.grid, **_given(stride_px=option("stride"), min_tissue_fraction=option("min_tissue_fraction"),
                                         edge=option("edge")))
    analysis = AnalysisParams(
        grid=grid,
        tissue=config.tissue,
        **{
            **vars(config.analysis),
            **_given(chunk_cells=option("chunk_cells"), overview_class=option("overview_class")),
        },
    )
    engine = replace(config.engine, **_given(batch_size=option("batch_size"), readers=option("readers"),
                                             device=option("device")))
    if option("slide_time_limit") is not None:
        engine = replace(engine, slide_time_limit_s=option("slide_time_limit") or None)
    dask_address = _dask_address(option("dask_address"), config)
    return RunSettings(
        out_dir=_check_out_dir(Path(args.out)),
        model=option("model") or config.models.default,
        models_dir=config.models.registry_dir,
        analysis=analysis,
        engine=engine,
        mpp=MppPolicy(cli_mpp=option("mpp"), overrides=config.mpp_overrides, force=bool(option("mpp_force"))),
        backend=option("backend") or config.backend,
        isolate=config.isolate and not option("no_isolate"),
        dask_address=dask_address,
        **_dask_tls(dask_address, config),
        force=bool(option("force")),
    )


def build_run_settings(config: WsiflowConfig, args: argparse.Namespace) -> RunSettings:
    """:func:`settings_from_options`, then what the run will need outside its options,
    checked in seconds before any model, child process or cluster starts: a usable GPU for
    ``--device cuda`` (when chunks run here), the Dask scheduler, the Prefect API."""
    settings = settings_from_options(config, args)
    if settings.dask_address:
        _check_dask_reachable(settings)
    api_url = os.environ.get("PREFECT_API_URL")
    if api_url and not getattr(args, "in_process", False):  # run --in-process never talks to it
        _check_prefect_api(api_url)
    if settings.engine.device == "cuda" and not settings.dask_address:  # a cluster's GPUs are its own
        _check_cuda()
    return settings
