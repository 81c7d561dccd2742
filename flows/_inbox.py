"""The scanner inbox: a scheduled Prefect deployment that analyses slides as they arrive.

The inbox (its folder, output folder, analysis settings and the options ``serve`` was
given) is stored in the site directory under an inbox ID (``i-`` + 10 hex digits, checked
before any path is built: the ID arrives as a flow parameter); the deployment's only
parameter is that ID. A ledger beside it remembers every slide seen, by path (the site
directory is private): a slide is submitted once its size and modification time are
unchanged since the previous look (the copy has finished), then recorded as processed or
failed (with the error). Neither is looked at again unless the file changes or
``wsiflow retry`` marks a failed slide for another try.

One look at a time per inbox: a look holds an flock on ``look.lock`` for as long as it
runs (its batch included). A look that finds the lock taken notes new slides but submits
nothing, so a slide under analysis is never submitted twice. A slide is recorded as
``submitted`` (batch ID, flow run, pid) before its batch runs; as only the lock holder
submits, a look that holds the lock and still finds ``submitted`` slides knows the look
that submitted them died (the kernel released its lock) and submits them again. The
ledger itself is read, changed and written under a second, short lock (``ledger.lock``),
so that ``wsiflow retry`` and a waiting look can update it while a batch runs.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pipeline import (
    ConfigError,
    RunSettings,
    WorkerError,
    WsiflowError,
    expand_slide_arguments,
    site_dir,
    site_secret,
)
from privacy import check_audit_log

from ._batch import batch_flow, save_batch
from ._looks import look_run_name, look_state
from ._slide_job import identify_jobs

__all__ = [
    "InboxLook",
    "LedgerStatus",
    "check_inbox_id",
    "save_inbox",
    "find_inbox",
    "load_inbox",
    "load_inbox_record",
    "inbox_tick",
    "inbox_flow",
    "read_ledger",
    "update_ledger",
    "look_running",
]

_log = logging.getLogger(__name__)

_INBOX_ID = re.compile(r"i-[0-9a-f]{10}")

LedgerStatus = Literal["settling", "retry", "submitted", "processed", "failed"]
"""settling: seen, copy maybe unfinished; retry: failed, marked by ``wsiflow retry``;
submitted: in a batch; processed / failed: the batch's outcome."""

LogTarget = logging.Logger | logging.LoggerAdapter[Any]


def check_inbox_id(inbox_id: object) -> str:
    """``inbox_id`` when it is an inbox ID (``i-`` + 10 hex digits), else a ConfigError:
    it arrives as a free-form flow parameter and becomes part of a path."""
    if isinstance(inbox_id, str) and _INBOX_ID.fullmatch(inbox_id):
        return inbox_id
    shown = repr(inbox_id) if len(repr(inbox_id)) <= 40 else repr(inbox_id)[:37] + "..."
    raise ConfigError(f"{shown} is not an inbox ID",
                      hint="an inbox ID is i- and 10 hex digits (e.g. i-0a1b2c3d4e), as `wsiflow serve` prints it")


def _inboxes_dir() -> Path:
    return site_dir() / "inboxes"


def _inbox_dir(inbox_id: str, *, create: bool = False) -> Path:
    directory = _inboxes_dir() / check_inbox_id(inbox_id)
    if create:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    elif not (directory / "inbox.json").is_file():
        raise ConfigError(f"there is no inbox {inbox_id} in this site directory",
                          hint="use the ID `wsiflow serve` printed, with the same WSIFLOW_HOME")
    return directory


def _write_private_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
    tmp.replace(path)


def save_inbox(inbox: str, settings: RunSettings, *, inbox_id: str | None = None,
               options: dict[str, Any] | None = None, config_file: str | None = None) -> str:
    """Store an inbox (folder, the run settings to apply, and what they were built from:
    ``serve``'s settings options and config file) and return its ID (``inbox_id``: replace
    that inbox's record, keeping its ledger)."""
    inbox_id = check_inbox_id(inbox_id) if inbox_id is not None else f"i-{secrets.token_hex(5)}"
    data = {"inbox": os.fspath(Path(inbox).resolve()), "settings": settings.to_json(),
            "options": options, "config": config_file}
    _write_private_json(_inbox_dir(inbox_id, create=True) / "inbox.json", data)
    return inbox_id


def find_inbox(inbox: str, out_dir: Path) -> str | None:
    """The ID of the inbox already stored for this folder and output folder, if any (so a
    restarted ``serve`` keeps its ledger and deployment)."""
    folder, out = os.fspath(Path(inbox).resolve()), os.fspath(out_dir.resolve())
    directory = _inboxes_dir()
    for record in sorted(directory.glob("i-*/inbox.json")) if directory.is_dir() else []:
        if not _INBOX_ID.fullmatch(record.parent.name):
            continue
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
            stored_out = RunSettings.from_json(data["settings"]).out_dir
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable or older record is not this inbox
        if data.get("inbox") == folder and os.fspath(stored_out) == out:
            return record.parent.name
    return None


def load_inbox_record(inbox_id: str) -> dict[str, Any]:
    """The stored record: ``inbox`` (folder), ``settings`` (JSON), ``options`` and ``config``
    (what ``serve`` built the settings from; None for inboxes stored by older versions)."""
    data: dict[str, Any] = json.loads((_inbox_dir(inbox_id) / "inbox.json").read_text(encoding="utf-8"))
    if "settings" not in data:
        raise ConfigError(
            f"inbox {inbox_id} was registered by an older wsiflow",
            hint="start it again with `wsiflow serve --inbox ... --out ...` (a new inbox ID)",
        )
    return data


def load_inbox(inbox_id: str) -> tuple[Path, RunSettings]:
    """The inbox folder and the settings its looks apply."""
    data = load_inbox_record(inbox_id)
    return Path(data["inbox"]), RunSettings.from_json(data["settings"])


@contextmanager
def _locked(path: Path, *, wait: bool) -> Iterator[bool]:
    """An exclusive flock on ``path`` for the block; yields False when ``wait`` is off and
    another process (or another open of the file) holds it."""
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True  # closing the file releases the lock, also when the process dies


def look_running(inbox_id: str) -> bool:
    """Whether a look at this inbox is running now (it holds the look lock)."""
    with _locked(_inbox_dir(inbox_id) / "look.lock", wait=False) as free:
        return not free


def _read_ledger_file(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / "ledger.json"
    data: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    return data


def read_ledger(inbox_id: str) -> dict[str, dict[str, Any]]:
    """The ledger: one entry per slide path (``fingerprint``, ``status``, ``slide_id``,
    ``result``, ``error``, ``batch_id``, ...)."""
    return _read_ledger_file(_inbox_dir(inbox_id))


@contextmanager
def update_ledger(inbox_id: str) -> Iterator[dict[str, dict[str, Any]]]:
    """The ledger to change in place; written back when the block ends without an error.
    Held under the ledger lock, so keep the block short."""
    directory = _inbox_dir(inbox_id)
    with _locked(directory / "ledger.lock", wait=True):
        ledger = _read_ledger_file(directory)
        yield ledger
        _write_private_json(directory / "ledger.json", ledger)


def _fingerprint(path: Path) -> list[int]:
    """Size and mtime (ns) of a slide file, or summed over a DICOM folder's files."""
    if path.is_dir():
        files = [p.stat() for p in path.iterdir() if p.is_file()]
        return [sum(s.st_size for s in files), max((s.st_mtime_ns for s in files), default=0), len(files)]
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, 1]


@dataclass(frozen=True)
class InboxLook:
    """What one look found and did (counts of slides; IDs, never paths)."""

    inbox_id: str
    new: int = 0
    """First seen on this look."""
    settling: int = 0
    """Changed since the previous look: still being copied."""
    waiting: int = 0
    """Settled, but an earlier look is still running: a later look submits them."""
    submitted: int = 0
    """In this look's batch."""
    again: int = 0
    """Of ``submitted``: marked by ``wsiflow retry``, or left by a look that stopped."""
    processed: int = 0
    """This look's batch: analysed or reused."""
    failed: int = 0
    """This look's batch: failed."""
    unfinished: int = 0
    """This look's batch did not finish them (interrupted): the next look submits them again."""
    skipped_processed: int = 0
    skipped_failed: int = 0
    """Failed on an earlier look (``wsiflow retry`` marks them for another try)."""
    under_analysis: int = 0
    """Submitted by an earlier look that is still running."""
    batch_id: str | None = None
    running_batches: tuple[str, ...] = ()
    """The batches of the slides under analysis."""
    busy: bool = False
    """An earlier look held the inbox: this look submitted nothing."""
    failed_slides: tuple[str, ...] = ()
    """``slide ID: error kind`` of this look's failures (``input-N`` without an ID)."""
    error: str | None = None
    """The batch's own failure (one line) when it stopped as a whole."""

    @property
    def skipped(self) -> int:
        return self.skipped_processed + self.skipped_failed + self.under_analysis

    def describe(self) -> str:
        """One line for the run log and state message."""
        submitted = f"submitted {self.submitted}"
        if self.batch_id:
            submitted += f" (batch {self.batch_id}" + (f", {self.again} again" if self.again else "") + ")"
        skipped = (f"skipped {self.skipped} ({self.skipped_processed} processed, {self.skipped_failed} failed "
                   f"earlier, {self.under_analysis} under analysis"
                   + (f" in {', '.join(self.running_batches)}" if self.running_batches else "") + ")")
        parts = [f"new {self.new}", f"settling {self.settling}"]
        if self.waiting:
            parts.append(f"waiting {self.waiting}")
        parts += [submitted, skipped, f"processed {self.processed}", f"failed {self.failed}"]
        if self.unfinished:
            parts.append(f"unfinished {self.unfinished} (submitted again at the next look)")
        text = f"inbox {self.inbox_id} look: " + ", ".join(parts)
        if self.busy:
            text += "; an earlier look is still running, so this one submitted nothing"
        if self.error:
            text += f"; the batch stopped: {self.error}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "skipped": self.skipped}


def _scan(inbox_id: str, folder: Path, log: LogTarget) -> dict[str, list[int]]:
    """Each slide in the inbox folder with its fingerprint."""
    if not folder.is_dir():  # e.g. a share that is not mounted: not an empty inbox
        raise ConfigError(f"the folder of inbox {inbox_id} is missing or not a folder",
                          hint="mount or restore it; the next look goes on where the ledger left off")
    fingerprints = {}
    for number, slide_path in enumerate(expand_slide_arguments([os.fspath(folder)]), start=1):
        try:
            fingerprints[os.fspath(slide_path)] = _fingerprint(slide_path)
        except FileNotFoundError:
            continue  # removed between listing and looking
        except OSError as exc:
            log.warning("inbox %s: slide %d of the folder cannot be looked at (%s); it waits until it can",
                        inbox_id, number, type(exc).__name__)
    return fingerprints


def _classify(ledger: dict[str, dict[str, Any]], seen: dict[str, list[int]], *, holds_lock: bool,
              counts: dict[str, Any]) -> list[str]:
    """Note what changed in the ledger and count; the slides to submit now (only when this
    look holds the inbox: a ``submitted`` slide's look is then known to have died)."""
    ready: list[str] = []
    running: set[str] = set()
    for slide, fingerprint in seen.items():
        entry = ledger.get(slide)
        status = entry["status"] if entry else None
        if status == "submitted" and not holds_lock:
            counts["under_analysis"] += 1  # its look runs; even a changed file is left to it
            if entry and entry.get("batch_id"):
                running.add(entry["batch_id"])
            continue
        if entry is None or entry["fingerprint"] != fingerprint:
            counts["new" if entry is None else "settling"] += 1
            ledger[slide] = {"fingerprint": fingerprint, "status": "settling"}
        elif status in ("settling", "retry", "submitted"):
            if not holds_lock:
                counts["waiting"] += 1
                continue
            ready.append(slide)
            counts["again"] += status != "settling"
        else:
            counts["skipped_processed" if status == "processed" else "skipped_failed"] += 1
    counts["running_batches"] = tuple(sorted(running))
    return ready


def _one_line(error: dict[str, str]) -> str:
    return " ".join(f"{error['kind']}: {error['message']}{' -- ' + error['hint'] if error['hint'] else ''}".split())


def _run_batch(ready: list[str], settings: RunSettings, inbox_id: str,
               log: LogTarget) -> tuple[str, dict[str, dict[str, Any]], str | None]:
    """Submit ``ready`` as one batch (recorded in the ledger before it runs). Returns its
    ID, the rows it returned by slide path (a slide without a row was not finished:
    interrupted) and, when the batch stopped as a whole, why (one line)."""
    # Nothing runs that the audit log cannot record (a damaged log stops the look, one line).
    check_audit_log()
    batch_id = save_batch(settings, identify_jobs(ready, site_secret()))
    from prefect.runtime import flow_run

    submitted = {"status": "submitted", "batch_id": batch_id, "flow_run": flow_run.get_id(), "pid": os.getpid(),
                 "submitted_at": datetime.now(UTC).isoformat(timespec="seconds")}
    with update_ledger(inbox_id) as ledger:
        for slide in ready:
            ledger[slide] = {"fingerprint": ledger[slide]["fingerprint"], **submitted}
    log.info("inbox %s: submitting batch %s with %d slide(s)", inbox_id, batch_id, len(ready))
    state = batch_flow(batch_id, return_state=True)
    rows = state.result(raise_on_failure=False)
    if isinstance(rows, WsiflowError):
        # Bad settings or model (the same for every slide): each fails with it, for `wsiflow retry`.
        error = {"kind": rows.kind, "message": rows.message, "hint": rows.hint}
        return batch_id, {slide: {"slide_id": None, "status": "failed", "result_dir": None, "error": error}
                          for slide in ready}, _one_line(error)
    if isinstance(rows, BaseException):
        # A crash or cancellation (its text may hold paths: only its type is kept); the
        # slides are unfinished, and the next look submits them again.
        return batch_id, {}, _one_line({"kind": WorkerError.kind, "hint": WorkerError.hint,
                                        "message": f"the batch flow stopped ({type(rows).__name__})"})
    return batch_id, {ready[row["index"]]: row for row in rows}, None


def inbox_tick(inbox_id: str, *, log: LogTarget | None = None) -> InboxLook:
    """One look at the inbox: note new and changed slides, submit the settled ones as one
    batch unless an earlier look still runs, record the outcomes. Logs what it found."""
    log = log or _log
    directory = _inbox_dir(inbox_id)
    with _locked(directory / "look.lock", wait=False) as holds_lock:
        folder, settings = load_inbox(inbox_id)
        seen = _scan(inbox_id, folder, log)
        counts: dict[str, Any] = {key: 0 for key in (
            "new", "settling", "waiting", "again", "skipped_processed", "skipped_failed", "under_analysis")}
        with update_ledger(inbox_id) as ledger:
            ready = _classify(ledger, seen, holds_lock=holds_lock, counts=counts)
        if not ready:
            look = InboxLook(inbox_id, busy=not holds_lock, **counts)
            log.info("%s", look.describe())
            return look
        log.info("inbox %s: %d slide(s) ready (%d again)", inbox_id, len(ready), counts["again"])
        batch_id, rows, stopped = _run_batch(ready, settings, inbox_id, log)
        failed: list[str] = []
        with update_ledger(inbox_id) as ledger:
            for number, slide in enumerate(ready, start=1):
                entry, row = ledger[slide], rows.get(slide)
                if row is None:  # not finished: settled, so the next look submits it again
                    ledger[slide] = {"fingerprint": entry["fingerprint"], "status": "settling", "batch_id": batch_id}
                    continue
                is_failed = row["status"] == "failed"
                ledger[slide] = {
                    "fingerprint": entry["fingerprint"], "status": "failed" if is_failed else "processed",
                    "slide_id": row["slide_id"], "result": row.get("result_dir"), "error": row["error"],
                    "batch_id": batch_id, "flow_run": entry.get("flow_run"),
                }
                if is_failed:
                    failed.append(f"{row['slide_id'] or f'input-{number}'}: {row['error']['kind']}")
    look = InboxLook(inbox_id, submitted=len(ready), processed=len(rows) - len(failed), failed=len(failed),
                     unfinished=len(ready) - len(rows), batch_id=batch_id, failed_slides=tuple(failed),
                     error=stopped, **counts)
    if failed or stopped or look.unfinished:
        log.warning("%s", look.describe())
    else:
        log.info("%s", look.describe())
    if failed:
        log.warning("inbox %s: failed: %s -- fix the cause, then `wsiflow retry --inbox-id %s --all-failed` "
                    "(or --slide-id ID ...) submits them again at the next look",
                    inbox_id, "; ".join(failed), inbox_id)
    return look


def _run_name() -> str:
    return look_run_name("inbox", "inbox_id", _INBOX_ID)


def _build_flow() -> Any:
    from prefect import flow, get_run_logger
    from prefect.states import Failed

    @flow(name="wsiflow-inbox", flow_run_name=_run_name, log_prints=False, validate_parameters=True,
          description="One look at a scanner inbox (wsiflow serve): submits the slides whose copy has "
                      "finished as a wsiflow-batch subflow and records them in the inbox's ledger.")
    def inbox_flow(inbox_id: str) -> Any:
        try:
            look = inbox_tick(inbox_id, log=get_run_logger())
        except WsiflowError as exc:  # a bad ID or inbox record: the run fails with the one line, no traceback
            get_run_logger().error("%s", exc.one_line())
            return Failed(message=exc.one_line())
        return look_state(look.failed, look.submitted, look.describe(), look.to_json(), broken=bool(look.error))

    return inbox_flow


inbox_flow = _build_flow()
