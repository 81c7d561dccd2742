"""``wsiflow deid IN OUT``: write a de-identified copy of a slide, or nothing (fail closed)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline import WsiflowError, identify_slide, site_secret
from privacy import audit_event, deidentify_slide

from .._config import WsiflowConfig
from ._common import EXIT_FAILED, EXIT_OK

__all__ = ["add_deid_parser", "run_deid"]

_log = logging.getLogger("wsiflow")


def add_deid_parser(commands: argparse._SubParsersAction) -> None:
    deid = commands.add_parser(
        "deid",
        help="write a de-identified copy of a slide (Aperio SVS, tiled TIFF, DICOM-WSI)",
        description=(
            "Copy the slide's proven pyramid levels with their tiles byte for byte (pixel-identical) "
            "and nothing else: label, macro, thumbnail and any other page are dropped, Aperio metadata "
            "is cut to AppMag and MPP, DICOM keeps only an allow-list of the WSI image's attributes "
            "(PS3.15 113100 Basic Profile + 113104 Clean Structured Content; UIDs keyed pseudonyms). "
            "The copy is checked in OpenSlide before it is moved into place; any format or "
            "field wsiflow cannot handle safely stops the run and nothing is written."
        ),
    )
    deid.add_argument("input", metavar="IN", help="slide file, or DICOM-WSI folder (or one of its instances)")
    deid.add_argument("output", metavar="OUT", type=Path, help="new file (TIFF input) or new folder (DICOM input)")
    deid.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    deid.add_argument("--json", action="store_true", help="print the report as one JSON object")
    deid.add_argument(
        "--show-paths", action="store_true",
        help="echo IN and OUT in the output (for your terminal only: paths can identify patients)",
    )


def _input_slide_id(path: str) -> str | None:
    try:
        return identify_slide(path, site_secret()).slide_id
    except WsiflowError:
        return None  # unreadable input: the deid error itself says why


def run_deid(args: argparse.Namespace, config: WsiflowConfig) -> int:
    del config  # deid has no configurable settings: what is kept is fixed on purpose
    sid = _input_slide_id(args.input)
    paths = f" {args.input} -> {args.output}" if args.show_paths else ""
    try:
        report = deidentify_slide(args.input, args.output, overwrite=args.overwrite)
    except WsiflowError as exc:
        audit_event("deid", slide_id=sid, params={"format": None}, outcome=f"failed:{exc.kind}")
        print(f"wsiflow: error{paths} {exc.one_line()}", file=sys.stderr)
        if args.debug:
            _log.debug("traceback", exc_info=exc)
        return EXIT_FAILED
    audit_event("deid", slide_id=sid, params={"format": report.format, "levels": report.levels_kept})
    if args.json:
        data = report.to_json()
        data["slide_id"] = sid
        if args.show_paths:
            data["input"], data["output"] = args.input, str(args.output)
        print(json.dumps(data, ensure_ascii=False))
    else:
        print(f"slide {sid or '(unidentified)'}{paths}: {report.summary()}")
    return EXIT_OK
