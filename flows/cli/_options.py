"""Options shared by ``run``, ``batch`` and ``serve``, and the one place they become settings.

Precedence, lowest first: built-in defaults < the config file (``--config`` or
``$WSIFLOW_CONFIG``) < command-line options. Every option defaults to "not given" so the
config is never masked by an argparse default.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
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
)

from .._config import WsiflowConfig
from ._common import mpp_arg, positive_int

__all__ = ["add_settings_options", "add_slides_options", "build_run_settings", "expand_slides_or_report",
           "pin_and_check_model"]


def add_slides_options(parser: argparse.ArgumentParser) -> None:
    """The slides to analyse and how to report them (``run`` and ``batch``)."""
    parser.add_argument("slides", nargs="+", metavar="SLIDE|DIR|GLOB",
                        help="slide files, DICOM-WSI folders, folders of slides, or quoted globs")
    parser.add_argument("--force", action="store_true", help="recompute even when a complete result exists")
    parser.add_argument("--json", action="store_true", help="one JSON document (see README: the run report)")
    parser.add_argument("--show-paths", action="store_true", help="echo each slide's path in the terminal output")


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """Every option that goes into :class:`pipeline.RunSettings` (``run``, ``batch``, ``serve``)."""
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
                      help="class shown in overview.png (default: the second class)")
    engine = parser.add_argument_group("engine (default: config)")
    engine.add_argument("--device", choices=("auto", "cpu", "cuda"))
    engine.add_argument("--batch-size", type=positive_int, metavar="N")
    engine.add_argument("--readers", type=positive_int, metavar="N",
                        help="tile reader threads (default: cores, 2 to 8)")
    where = parser.add_argument_group("where it runs (default: config)")
    where.add_argument("--backend", choices=BACKEND_NAMES, help="slide reader")
    where.add_argument("--dask-address", metavar="tcp://HOST:PORT", help="run chunks on this existing Dask scheduler")
    where.add_argument(
        "--no-isolate", action="store_true",
        help="analyse slides in this process, not a child process (starts a few seconds faster, but a "
             "crash in the slide-decoding library then stops the whole run)",
    )


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


def _check_dask_address(address: str | None) -> str | None:
    if address is not None and not re.fullmatch(r"(tcp|tls|inproc|ucx)://[^\s/]+(:\d+)?/?", address):
        raise ConfigError(f"dask address {address!r} is not a scheduler URL", hint="use tcp://HOST:PORT")
    return address


def expand_slides_or_report(arguments: list[str]) -> list[str]:
    """The slides the arguments mean; an empty list after printing the one-line error."""
    slides = [os.fspath(p) for p in expand_slide_arguments(arguments)]
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


def build_run_settings(config: WsiflowConfig, args: argparse.Namespace) -> RunSettings:
    """The run settings of a command: config values overridden by the options given."""
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
    return RunSettings(
        out_dir=_check_out_dir(Path(args.out)),
        model=option("model") or config.models.default,
        models_dir=config.models.registry_dir,
        analysis=analysis,
        engine=engine,
        mpp=MppPolicy(cli_mpp=option("mpp"), overrides=config.mpp_overrides, force=bool(option("mpp_force"))),
        backend=option("backend") or config.backend,
        isolate=config.isolate and not option("no_isolate"),
        dask_address=_check_dask_address(option("dask_address") or config.dask.address),
        force=bool(option("force")),
    )
