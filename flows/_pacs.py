"""The PACS loop over DICOMweb: find new slide series (QIDO-RS), analyse them, store the
results back into their study (STOW-RS).

One look (:func:`pacs_look`): search the archive for series of modality ``SM``; each series
not yet in the ledger is retrieved (WADO-RS, original transfer syntax) into a private cache
folder in the site directory, analysed like any DICOM-WSI folder, and its results are built
with :func:`pipeline.build_dicom_results` (a fractional Segmentation and Microscopy Bulk
Simple Annotations, carrying the source's patient and study) and stored into the same study.
The cache folder is removed when the series is done, whatever the outcome.

Exactly once: a look holds an flock on the archive's ``look.lock`` (a second look at the
same time does nothing); the ledger remembers each series by an HMAC of its Series Instance
UID with the site secret (never the UID itself), with its pseudonymous slide ID and status.
A series is taken once its instance count has not changed for ``settle_s`` seconds (a
series still arriving is not analysed half-stored). Processed and failed series are not
looked at again. Stored objects have UIDs derived from the source series and the run key,
so a store repeated after a crash replaces, never duplicates.

Nothing of the patient reaches logs, the ledger or the audit log: only slide IDs, counts
and error kinds.

The deployment (``wsiflow pacs watch`` without ``--once``): the watch (the archive's URL,
the run settings, the settle rule) is stored in the archive's folder in the site directory
(``watch.json``, owner-only); its ID is the archive's folder name (``a-`` + 12 hex digits,
checked before any path is built: it arrives as a flow parameter) and is the flow's only
parameter, so no URL or path is taken from the Prefect API. Each scheduled run
(:func:`watch_tick`) loads the model, looks once and ends.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import (
    ConfigError,
    CorruptSlideError,
    ModelInfo,
    OutputError,
    ResultFolder,
    RunSettings,
    WsiflowError,
    build_dicom_results,
    read_source_level0,
    site_dir,
    site_secret,
)
from privacy import audit_event, check_audit_log

from ._looks import look_run_name, look_state
from ._model_ref import resolve_model
from ._runs import SlideRunner
from ._slide_job import identify_job

__all__ = ["PacsLook", "PacsSlide", "DicomWebArchive", "pacs_look", "read_pacs_ledger", "archive_key",
           "analyse_series_folder", "series_key", "write_private_json", "read_pacs_ledger_at",
           "check_dicomweb", "check_watch_id", "save_watch", "load_watch", "watch_tick"]

_log = logging.getLogger(__name__)

_SERIES_UID = "0020000E"
_STUDY_UID = "0020000D"
_INSTANCES = "00201209"  # Number of Series Related Instances
_SM = "SM"
_WATCH_ID = re.compile(r"a-[0-9a-f]{12}")

LogTarget = logging.Logger | logging.LoggerAdapter[Any]


@dataclass(frozen=True)
class PacsSlide:
    """What one look did with one series: pseudonymous ID, status and error kind only."""

    slide_id: str | None
    status: str
    """processed, reused (results existed and were stored again), failed or settling."""
    stored: int = 0
    error_kind: str | None = None
    error_message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"slide_id": self.slide_id, "status": self.status, "stored": self.stored,
                "error": {"kind": self.error_kind, "message": self.error_message} if self.error_kind else None}


@dataclass(frozen=True)
class PacsLook:
    """One look at the archive."""

    found: int
    already_done: int
    slides: tuple[PacsSlide, ...] = field(default_factory=tuple)
    busy: bool = False
    """Another look held the lock: this one did nothing."""

    def to_json(self) -> dict[str, Any]:
        return {"found": self.found, "already_done": self.already_done, "busy": self.busy,
                "slides": [s.to_json() for s in self.slides]}

    def count(self, status: str) -> int:
        return sum(1 for s in self.slides if s.status == status)

    def describe(self, watch_id: str) -> str:
        """One line for the run log and state message (counts and slide IDs only)."""
        if self.busy:
            return f"archive {watch_id} look: another look at this archive is running; this one did nothing"
        text = (f"archive {watch_id} look: {self.found} slide series found, {self.already_done} done before, "
                f"processed {self.count('processed')}, reused {self.count('reused')}, "
                f"failed {self.count('failed')}, settling {self.count('settling')}")
        failed = [f"{s.slide_id or '?'}: {s.error_kind}" for s in self.slides if s.status == "failed"]
        return text + (f" ({'; '.join(failed)})" if failed else "")


def archive_key(url: str, secret: bytes) -> str:
    """The archive's folder name in the site directory (``a-`` + 12 hex digits)."""
    return "a-" + hmac.new(secret, url.rstrip("/").encode(), hashlib.sha256).hexdigest()[:12]


def series_key(series_uid: str, secret: bytes) -> str:
    return hmac.new(secret, b"series:" + series_uid.encode(), hashlib.sha256).hexdigest()[:32]


def _archive_dir(url: str, secret: bytes) -> Path:
    directory = site_dir() / "pacs" / archive_key(url, secret)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def read_pacs_ledger(url: str) -> dict[str, dict[str, Any]]:
    """The ledger of an archive: series key -> ``status``, ``slide_id``, ``error`` ..."""
    return read_pacs_ledger_at(_archive_dir(url, site_secret()))


def read_pacs_ledger_at(directory: Path) -> dict[str, dict[str, Any]]:
    """The ledger in ``directory`` (an archive's or a listener's folder in the site directory)."""
    path = directory / "ledger.json"
    data: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    return data


def write_private_json(path: Path, ledger: object) -> None:
    """Write JSON readable by the owner only, atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(ledger, fh, indent=1)
    tmp.replace(path)


@contextmanager
def _look_lock(directory: Path) -> Iterator[bool]:
    with open(directory / "look.lock", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _value(item: dict[str, Any], tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


class DicomWebArchive:
    """A DICOMweb archive (QIDO-RS, WADO-RS, STOW-RS) on a session that ignores proxy
    variables: the archive is on the hospital network, never reached through a proxy."""

    def __init__(self, url: str) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        session.trust_env = False
        self.url = url.rstrip("/")
        self._client = DICOMwebClient(url=self.url, session=session)

    def slide_series(self) -> list[tuple[str, str, int]]:
        """(study UID, series UID, instance count) of every slide microscopy series."""
        found = self._client.search_for_series(
            search_filters={"Modality": _SM},
            fields=["StudyInstanceUID", "SeriesInstanceUID", "NumberOfSeriesRelatedInstances"],
        )
        series = []
        for item in found:
            study, uid = _value(item, _STUDY_UID), _value(item, _SERIES_UID)
            if study and uid:
                series.append((study, uid, int(_value(item, _INSTANCES) or 0)))
        return series

    def retrieve(self, study: str, series: str, folder: Path) -> int:
        """Write the series' instances (as stored) into ``folder``; how many."""
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        count = 0
        for dataset in self._client.iter_series(study, series, media_types=(("application/dicom", "*"),)):
            name = hashlib.sha256(str(dataset.SOPInstanceUID).encode()).hexdigest()[:24]
            dataset.save_as(folder / f"{name}.dcm", enforce_file_format=True)
            count += 1
        return count

    def store(self, datasets: list[Any], study: str) -> None:
        self._client.store_instances(datasets=datasets, study_instance_uid=study)


def _http_failure(exc: Exception, what: str) -> WsiflowError:
    """A request error as a wsiflow error naming the status, never the URL (it may name a study)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    reason = f"HTTP {status}" if status else type(exc).__name__
    return OutputError(f"{what} failed ({reason})", hint="check that the archive is up and accepts DICOMweb requests")


def _request_errors() -> tuple[type[Exception], ...]:
    import requests

    return (requests.RequestException, OSError)


def _damaged_errors() -> tuple[type[Exception], ...]:
    """What dicomweb-client and pydicom raise on a series that is not valid DICOM."""
    from pydicom.errors import InvalidDicomError

    return (ValueError, InvalidDicomError, KeyError, AttributeError)


def _settled(entry: dict[str, Any] | None, count: int, settle_s: float, now: float) -> bool:
    if settle_s <= 0:
        return True
    return entry is not None and entry.get("instances") == count and now - float(entry.get("since", now)) >= settle_s


def analyse_series_folder(folder: Path, runner: SlideRunner, info: ModelInfo,
                          store: Callable[[list[Any]], None], via: str) -> tuple[PacsSlide, dict[str, Any]]:
    """Analyse one series held in ``folder``, build its DICOM results and ``store`` them;
    the outcome and the ledger entry. Failures (wsiflow errors) are the slide's outcome."""
    sid: str | None = None
    try:
        job = identify_job(os.fspath(folder), site_secret())
        outcome = runner.run(job, via="pacs")
        sid = outcome.slide_id
        if outcome.error is not None or outcome.result_dir is None:
            error = outcome.error or CorruptSlideError("the analysis gave no result")
            return (PacsSlide(outcome.slide_id, "failed", 0, error.kind, error.message),
                    {"status": "failed", "slide_id": outcome.slide_id, "error": error.kind})
        objects = build_dicom_results(ResultFolder(outcome.result_dir), read_source_level0(folder))
        store(list(objects.datasets))
        # Results leaving wsiflow for the archive: an export, like `wsiflow export --dicom`.
        audit_event("export", slide_id=outcome.slide_id, model_digest=info.sha256,
                    params={"format": "dicom", "to": "pacs", "via": via, "objects": ["SEG", "ANN"]},
                    outcome="stored")
        _log.info("slide %s: results stored in its study", outcome.slide_id)
        status = "processed" if outcome.status == "done" else "reused"
        return (PacsSlide(outcome.slide_id, status, len(objects.datasets)),
                {"status": "processed", "slide_id": outcome.slide_id})
    except WsiflowError as exc:
        _log.info("slide %s failed: %s", sid, exc.kind)
        return (PacsSlide(sid, "failed", 0, exc.kind, exc.message),
                {"status": "failed", "slide_id": sid, "error": exc.kind})


def _not_valid_dicom(exc: Exception) -> CorruptSlideError:
    # Only the type: the text of these errors quotes the offending UID or value.
    return CorruptSlideError(
        f"the series in the archive is not valid DICOM ({type(exc).__name__})",
        hint="check the series in the archive (e.g. UIDs longer than 64 characters); it is not retried "
             "until its ledger entry is removed",
    )


def _process(archive: DicomWebArchive, study: str, series: str, cache: Path, runner: SlideRunner,
             info: ModelInfo) -> tuple[PacsSlide, dict[str, Any]]:
    """Retrieve, analyse and store one series; its outcome and ledger entry."""
    def store(datasets: list[Any]) -> None:
        try:
            archive.store(datasets, study)
        except _request_errors() as exc:
            raise _http_failure(exc, "storing the results") from None

    try:
        try:
            archive.retrieve(study, series, cache)
        except _request_errors() as exc:
            error: WsiflowError = _http_failure(exc, "retrieving the series")
        except _damaged_errors() as exc:
            error = _not_valid_dicom(exc)
        else:
            return analyse_series_folder(cache, runner, info, store, "dicomweb")
        return PacsSlide(None, "failed", 0, error.kind, error.message), {"status": "failed", "error": error.kind}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _search(archive: DicomWebArchive) -> list[tuple[str, str, int]]:
    try:
        return archive.slide_series()
    except _request_errors() as exc:
        raise ConfigError(
            f"searching the archive failed ({_http_failure(exc, 'QIDO-RS').message})",
            hint="check --dicomweb (the archive's DICOMweb root, e.g. http://pacs:8042/dicom-web)",
        ) from None
    except ValueError:
        raise ConfigError(
            "the archive's QIDO-RS answer is not DICOM JSON",
            hint="check --dicomweb: it must be the DICOMweb root, e.g. http://pacs:8042/dicom-web",
        ) from None


def check_dicomweb(url: str) -> None:
    """Refuse an archive that does not answer a QIDO-RS search (before a model is loaded)."""
    _search(DicomWebArchive(url))


def pacs_look(url: str, settings: RunSettings, runner: SlideRunner, info: ModelInfo, *,
              settle_s: float = 30.0) -> PacsLook:
    """One look at the DICOMweb archive at ``url`` (see the module's docstring)."""
    del settings  # the runner carries them; kept in the signature for the deployment's parameters
    secret = site_secret()
    directory = _archive_dir(url, secret)
    archive = DicomWebArchive(url)
    with _look_lock(directory) as holds:
        if not holds:
            _log.info("another look at this archive is running; this one does nothing")
            return PacsLook(0, 0, busy=True)
        found = _search(archive)
        ledger = read_pacs_ledger_at(directory)
        now = time.time()
        done = 0
        slides = []
        for study, series, count in found:
            key = series_key(series, secret)
            entry = ledger.get(key)
            if entry is not None and entry.get("status") in ("processed", "failed"):
                done += 1
                continue
            if not _settled(entry, count, settle_s, now):
                if entry is None or entry.get("instances") != count:
                    ledger[key] = {"status": "settling", "instances": count, "since": now}
                slides.append(PacsSlide(None, "settling"))
                continue
            slide, ledger_entry = _process(archive, study, series, directory / "cache" / key, runner, info)
            ledger[key] = {**ledger_entry, "instances": count, "at": time.time()}
            write_private_json(directory / "ledger.json", ledger)
            slides.append(slide)
        write_private_json(directory / "ledger.json", ledger)
    return PacsLook(len(found), done, tuple(slides))


def check_watch_id(watch_id: object) -> str:
    """``watch_id`` when it is a watch ID (``a-`` + 12 hex digits), else a ConfigError: it
    arrives as a free-form flow parameter and becomes part of a path."""
    if isinstance(watch_id, str) and _WATCH_ID.fullmatch(watch_id):
        return watch_id
    shown = repr(watch_id) if len(repr(watch_id)) <= 40 else repr(watch_id)[:37] + "..."
    raise ConfigError(f"{shown} is not a PACS watch ID",
                      hint="a watch ID is a- and 12 hex digits (e.g. a-0a1b2c3d4e5f), as `wsiflow pacs watch` "
                           "prints it")


def save_watch(url: str, settings: RunSettings, *, settle_s: float, options: dict[str, Any] | None = None,
               config_file: str | None = None) -> tuple[str, bool]:
    """Store the watch of the archive at ``url`` (the settings its looks apply, and what they
    were built from); its ID and whether it replaces an earlier one (the ledger is kept)."""
    secret = site_secret()
    directory = _archive_dir(url, secret)
    resumed = (directory / "watch.json").is_file()
    write_private_json(directory / "watch.json", {
        "dicomweb": url.rstrip("/"), "settings": settings.to_json(), "settle_s": settle_s,
        "options": options, "config": config_file,
    })
    return archive_key(url, secret), resumed


def load_watch(watch_id: str) -> tuple[str, RunSettings, float]:
    """The archive's URL, the settings and the settle time of a stored watch."""
    record = site_dir() / "pacs" / check_watch_id(watch_id) / "watch.json"
    if not record.is_file():
        raise ConfigError(f"there is no PACS watch {watch_id} in this site directory",
                          hint="use the ID `wsiflow pacs watch` printed, with the same WSIFLOW_HOME")
    data = json.loads(record.read_text(encoding="utf-8"))
    return str(data["dicomweb"]), RunSettings.from_json(data["settings"]), float(data["settle_s"])


def watch_tick(watch_id: str, *, log: LogTarget | None = None) -> PacsLook:
    """One look of a stored watch: load its model, look once, log the outcome."""
    log = log or _log
    url, settings, settle_s = load_watch(watch_id)
    check_audit_log()  # nothing runs that the audit log cannot record
    model, info, _ = resolve_model(settings.model, settings.models_dir)
    runner = SlideRunner(settings, model, info)
    try:
        look = pacs_look(url, settings, runner, info, settle_s=settle_s)
    finally:
        runner.close()
    if look.count("failed"):
        log.warning("%s", look.describe(watch_id))
    else:
        log.info("%s", look.describe(watch_id))
    return look


def _run_name() -> str:
    return look_run_name("pacs", "watch_id", _WATCH_ID)


def _build_flow() -> Any:
    from prefect import flow, get_run_logger
    from prefect.states import Failed

    @flow(name="wsiflow-pacs-watch", flow_run_name=_run_name, log_prints=False, validate_parameters=True,
          description="One look at a PACS over DICOMweb (wsiflow pacs watch): analyses the new slide "
                      "microscopy series and stores their DICOM results (SEG, ANN) into their studies.")
    def pacs_watch_flow(watch_id: str) -> Any:
        try:
            look = watch_tick(watch_id, log=get_run_logger())
        except WsiflowError as exc:  # a bad ID, record or archive: the run fails with the one line
            get_run_logger().error("%s", exc.one_line())
            return Failed(message=exc.one_line())
        attempted = len([s for s in look.slides if s.status != "settling"])
        return look_state(look.count("failed"), attempted, look.describe(watch_id), look.to_json())

    return pacs_watch_flow


_FLOW: Any = None


def __getattr__(name: str) -> Any:
    # The flow is built on first use: importing Prefect costs seconds, and the CLI imports
    # this module for every command. The deployment's entrypoint names it as an attribute.
    global _FLOW
    if name == "pacs_watch_flow":
        if _FLOW is None:
            _FLOW = _build_flow()
        return _FLOW
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
