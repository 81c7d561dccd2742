"""``wsiflow export``: copy a result's shareable files out of the site, recorded in the audit log.

Exported: the summary, class-region GeoJSON, tile table and review (pseudonymous IDs,
digests and numbers only, never paths). ``--dicom`` instead writes the result as DICOM
objects filed with its DICOM-WSI source (a Segmentation and Microscopy Bulk Simple
Annotations, see docs/pacs.md): those carry the source's patient and study, by design.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from pipeline import ConfigError, NotAResultError, OutputError, ResultFolder, is_dicom_folder, write_dicom_results
from privacy import audit_event

from .._config import WsiflowConfig
from ._common import EXIT_OK

__all__ = ["add_export_parser", "run_export", "export_result", "export_dicom"]


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="copy a result's tables, GeoJSON and review out for sharing (audited)",
        description=(
            "Copy a complete result's summary, tile table, class-region GeoJSON and reviewed annotations "
            "to OUT/<slide id>-<model>-v<version>-<digest>/ for a collaborator or QuPath. "
            "Reviewers' free-text comments and "
            "names are left out unless asked for: a comment typed during review may name a patient."
        ),
    )
    export.add_argument(
        "result", type=Path, metavar="RESULT_DIR", help="OUT/<slide id>/<model>/ (its latest) or one result folder"
    )
    export.add_argument("--out", type=Path, required=True, metavar="DIR")
    export.add_argument("--keep-comments", action="store_true", help="keep review comments and reviewer names")
    export.add_argument(
        "--dicom", action="store_true",
        help="write the result as DICOM (Segmentation + Bulk Annotations) on the frame of reference of --source",
    )
    export.add_argument("--source", type=Path, metavar="DICOM_DIR",
                        help="with --dicom: the DICOM-WSI folder the result was computed from")
    export.add_argument("--json", action="store_true")


def _review_problem(document: object) -> str | None:
    """What makes a parsed review unusable, or None."""
    if not isinstance(document, dict) or not isinstance(document.get("features"), list):
        return "not a GeoJSON FeatureCollection"
    if not isinstance(document.get("wsiflow_review"), (dict, type(None))):
        return "its wsiflow_review entry is not an object"
    if not all(isinstance(f, dict) and isinstance(f.get("properties"), (dict, type(None)))
               for f in document["features"]):
        return "a feature is not a GeoJSON Feature"
    return None


def _read_review(path: Path) -> dict[str, Any]:
    """The result's review; a damaged one is refused before anything is written, rather
    than exported (or half-scrubbed of reviewers' comments)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        problem: str | None = f"not valid JSON ({exc.msg} at line {exc.lineno})"
    except UnicodeDecodeError:
        problem = "not UTF-8 text"
    else:
        problem = _review_problem(document)
        if problem is None:
            return document
    raise NotAResultError(
        f"the result's review (review.geojson) is damaged: {problem}",
        hint="open the result in `wsiflow view` and save the review again, or move review.geojson out of the "
             "result folder to export without it",
    )


def _scrub_review(document: dict[str, Any]) -> dict[str, Any]:
    document = json.loads(json.dumps(document))
    meta = document.get("wsiflow_review") or {}
    meta.pop("reviewer", None)
    for feature in document.get("features", []):
        props = feature.get("properties") or {}
        props.pop("comment", None)
        props.pop("reviewer", None)
    return document


def export_result(result_dir: Path, out_dir: Path, *, keep_comments: bool = False) -> Path:
    """Copy the shareable files of ``result_dir`` into a new folder under ``out_dir``; that folder."""
    folder = ResultFolder.find(result_dir)
    if folder is None or not folder.is_complete():
        raise NotAResultError("not a complete wsiflow result folder")
    summary = folder.read_summary()
    review = _read_review(folder.review) if folder.review.is_file() else None
    # The result folder's own name is v<version>-<digest>.
    target = out_dir / f"{summary.slide_id}-{summary.model.name}-{folder.path.resolve().name}"
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for source in (folder.summary_path, folder.geojson, folder.tiles, folder.review):
            name = source.name
            if not source.is_file():
                continue
            if source == folder.review and review is not None and not keep_comments:
                (tmp / name).write_text(json.dumps(_scrub_review(review), indent=1), encoding="utf-8")
            else:
                shutil.copyfile(source, tmp / name)
        if target.exists():
            shutil.rmtree(target)
        tmp.replace(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"exporting failed: {exc.strerror or type(exc).__name__}") from None
    audit_event("export", slide_id=summary.slide_id, model_digest=summary.model.sha256,
                params={"files": sorted(p.name for p in target.iterdir()), "keep_comments": keep_comments})
    return target


def export_dicom(result_dir: Path, source: Path, out_dir: Path) -> list[Path]:
    """Write the DICOM objects of ``result_dir`` (computed from the DICOM-WSI ``source``) into ``out_dir``."""
    folder = ResultFolder.find(result_dir)
    if folder is None or not folder.is_complete():
        raise NotAResultError("not a complete wsiflow result folder")
    if not (source.is_dir() and is_dicom_folder(source)):
        raise NotAResultError("--source is not a DICOM-WSI folder",
                              hint="give the DICOM-WSI folder the result was computed from")
    summary = folder.read_summary()
    try:
        paths = write_dicom_results(folder, source, out_dir)
    except OSError as exc:
        raise OutputError(f"writing the DICOM objects failed: {exc.strerror or type(exc).__name__}") from None
    audit_event("export", slide_id=summary.slide_id, model_digest=summary.model.sha256,
                params={"files": sorted(p.name for p in paths), "format": "dicom"})
    return paths


def run_export(args: argparse.Namespace, config: WsiflowConfig) -> int:
    if args.dicom:
        if args.source is None:
            raise ConfigError("--dicom needs --source", hint="add --source DICOM_DIR (the slide's DICOM-WSI folder)")
        paths = export_dicom(args.result, args.source, args.out)
        if args.json:
            print(json.dumps({"exported": str(args.out), "files": [p.name for p in paths]}, indent=2))
        else:
            print(f"exported {', '.join(p.name for p in paths)} to {args.out}", file=sys.stdout)
        return EXIT_OK
    target = export_result(args.result, args.out, keep_comments=args.keep_comments)
    files = sorted(p.name for p in target.iterdir())
    if args.json:
        print(json.dumps({"exported": str(target), "files": files}, indent=2))
    else:
        print(f"exported {', '.join(files)} to {target}", file=sys.stdout)
    return EXIT_OK
