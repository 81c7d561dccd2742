"""The scanner inbox: a scheduled Prefect deployment that analyses slides as they arrive.

The inbox (its folder, output folder and analysis settings) is stored in the site
directory under an inbox ID; the deployment's only parameter is that ID. A ledger beside
it remembers every slide seen: a slide is processed once its size and modification time
are unchanged since the previous tick (the copy has finished), then recorded as
processed or failed (with the error); it is not retried unless the file changes.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from pipeline import ConfigError, RunSettings, expand_slide_arguments, site_dir, site_secret

from ._batch import batch_flow, save_batch
from ._slide_job import identify_jobs

__all__ = ["save_inbox", "load_inbox", "inbox_tick", "inbox_flow", "read_ledger"]


def _inbox_dir(inbox_id: str) -> Path:
    directory = site_dir() / "inboxes" / inbox_id
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def save_inbox(inbox: str, settings: RunSettings) -> str:
    """Store an inbox (folder + the run settings to apply) and return its ID."""
    inbox_id = f"i-{secrets.token_hex(5)}"
    data = {"inbox": os.fspath(Path(inbox).resolve()), "settings": settings.to_json()}
    fd = os.open(_inbox_dir(inbox_id) / "inbox.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    return inbox_id


def load_inbox(inbox_id: str) -> tuple[Path, RunSettings]:
    data = json.loads((_inbox_dir(inbox_id) / "inbox.json").read_text(encoding="utf-8"))
    if "settings" not in data:
        raise ConfigError(
            f"inbox {inbox_id} was registered by an older wsiflow",
            hint="start it again with `wsiflow serve --inbox ... --out ...` (a new inbox ID)",
        )
    return Path(data["inbox"]), RunSettings.from_json(data["settings"])


def read_ledger(inbox_id: str) -> dict[str, dict[str, Any]]:
    path = _inbox_dir(inbox_id) / "ledger.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _write_ledger(inbox_id: str, ledger: dict[str, dict[str, Any]]) -> None:
    path = _inbox_dir(inbox_id) / "ledger.json"
    tmp = path.with_name(".ledger.json.tmp")
    tmp.write_text(json.dumps(ledger, indent=1), encoding="utf-8")
    tmp.replace(path)


def _fingerprint(path: Path) -> list[int]:
    """Size and mtime (ns) of a slide file, or summed over a DICOM folder's files."""
    if path.is_dir():
        files = [p.stat() for p in path.iterdir() if p.is_file()]
        return [sum(s.st_size for s in files), max((s.st_mtime_ns for s in files), default=0), len(files)]
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, 1]


def inbox_tick(inbox_id: str) -> dict[str, int]:
    """One look at the inbox: note new slides, process the settled ones. Counts by outcome."""
    folder, settings = load_inbox(inbox_id)
    ledger = read_ledger(inbox_id)
    ready: list[str] = []
    for slide_path in expand_slide_arguments([os.fspath(folder)]):
        slide = os.fspath(slide_path)
        try:
            fingerprint = _fingerprint(Path(slide))
        except FileNotFoundError:
            continue  # removed between listing and looking
        entry = ledger.get(slide)
        if entry is None or entry["fingerprint"] != fingerprint:
            ledger[slide] = {"fingerprint": fingerprint, "status": "settling"}
        elif entry["status"] == "settling":
            ready.append(slide)
    counts = {"ready": len(ready), "processed": 0, "failed": 0}
    if ready:
        batch_id = save_batch(settings, identify_jobs(ready, site_secret()))
        state = batch_flow(batch_id, return_state=True)
        rows = state.result(raise_on_failure=False)
        for row in rows if isinstance(rows, list) else []:
            slide = ready[row["index"]]
            failed = row["status"] == "failed"
            ledger[slide].update({
                "status": "failed" if failed else "processed",
                "slide_id": row["slide_id"],
                "result": row.get("result_dir"),
                "error": row["error"],
            })
            counts["failed" if failed else "processed"] += 1
    _write_ledger(inbox_id, ledger)
    return counts


def _build_flow() -> Any:
    from prefect import flow

    @flow(name="wsiflow-inbox", flow_run_name="inbox-{inbox_id}", log_prints=False)
    def inbox_flow(inbox_id: str) -> dict[str, int]:
        return inbox_tick(inbox_id)

    return inbox_flow


inbox_flow = _build_flow()
