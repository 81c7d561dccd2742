"""What ``run`` and ``batch`` print: a line per slide, totals, or one JSON document.

The JSON document (``--json``) has one shape for both commands (documented in README,
"The run report")::

    {"command": "run" | "batch", "batch_id": str | null, "state": str,
     "counts": {"done": n, "reused": n, "failed": n},
     "slides": [{"input_index": i, "slide_id", "status", "result_dir", "model", "tiles",
                 "tiles_per_s", "chunks_computed", "chunks_total", "mpp", "error",
                 "duration_s"}, ...]}

An interrupted run (Ctrl-C) prints no document: one line on stderr and exit code 130.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline import ResultFolder

from ._common import EXIT_INTERRUPTED

__all__ = ["slide_lines", "print_report", "state_of", "report_interrupted"]

"""Stopped by Ctrl-C (128 + SIGINT, what shells report)."""


def _mpp_text(row: dict[str, Any]) -> str:
    mpp = row.get("mpp")
    if not mpp:
        return ""
    from pipeline import MppResolution

    return MppResolution(
        mpp["mpp_x"], mpp["mpp_y"], mpp["source"], mpp["metadata_mpp_x"], mpp["metadata_mpp_y"],
        mpp["override"], mpp.get("declined"),
    ).describe()


def slide_lines(label: str, row: dict[str, Any]) -> tuple[list[str], bool]:
    """The terminal lines for one slide's row, and whether they go to stderr (a failure)."""
    sid = row["slide_id"] or "(unreadable)"
    if row["error"]:
        error = row["error"]
        text = f"{error['kind']}: {error['message']}" + (f" -- {error['hint']}" if error["hint"] else "")
        return [f"{label} slide {sid} failed: {' '.join(text.split())}"], True
    folder = ResultFolder(Path(row["result_dir"]))
    if row["status"] == "reused":
        lines = [f"{label} slide {sid}: reused the complete result in {folder.path} "
                 f"({row['tiles']} tiles; --force recomputes)"]
    else:
        rate = f", {row['tiles_per_s']:.1f} tiles/s" if row["tiles_per_s"] else ""
        resumed = (f", resumed: {row['chunks_computed']} of {row['chunks_total']} chunks computed"
                   if row["chunks_computed"] < row["chunks_total"] else "")
        lines = [f"{label} slide {sid}: done, {row['tiles']} tiles{rate}{resumed}",
                 f"    overview {folder.overview}", f"    heatmap  {folder.heatmap}"]
    mpp = _mpp_text(row)
    if mpp:
        lines.insert(1, f"    {mpp}")
    return lines, False


def state_of(rows: list[dict[str, Any]]) -> str:
    failed = sum(r["status"] == "failed" for r in rows)
    return "Completed" if not failed else "Failed" if failed == len(rows) else "Partially failed"


def print_report(command: str, rows: list[dict[str, Any]], *, as_json: bool, batch_id: str | None = None,
                 state: str | None = None, printed: bool = False) -> None:
    """Totals (after the slide lines, printed here unless ``printed``), or the JSON document."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "reused", "failed")}
    if as_json:
        document = {"command": command, "batch_id": batch_id, "state": state or state_of(rows),
                    "counts": counts, "slides": rows}
        print(json.dumps(document, indent=2, ensure_ascii=False))
        return
    if not printed:
        for row in rows:
            label = f"[{row['input_index'] + 1}/{len(rows)}]" + (f" {row['input']}" if "input" in row else "")
            lines, to_stderr = slide_lines(label, row)
            print("\n".join(lines), file=sys.stderr if to_stderr else sys.stdout)
    prefix = f"batch {batch_id}: " if batch_id else ""
    print(f"{prefix}{len(rows)} slide(s): {counts['done']} done, {counts['reused']} reused, {counts['failed']} failed")
    for row in rows:
        if row["error"]:
            print(f"  failed [{row['input_index'] + 1}/{len(rows)}] {row['error']['kind']}: {row['error']['message']}")


def report_interrupted() -> int:
    """After Ctrl-C stopped a run or batch: one line that says a rerun resumes; the exit code."""
    # On a terminal the line follows the ^C echo (or a progress bar a child left), not joins it.
    start = "\n" if sys.stderr.isatty() else ""
    print(f"{start}wsiflow: interrupted -- finished chunks are kept; run the same command again to resume",
          file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED
