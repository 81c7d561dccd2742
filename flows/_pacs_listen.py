"""The DIMSE path: a DICOM node (C-STORE SCP) that a scanner or a PACS routing rule pushes
slides to; each complete series is analysed once and its results are sent back by C-STORE.

Instances of the VL Whole Slide Microscopy Image SOP class are written to a spool folder per
series in the site directory (owner-only; file names are digests, never UIDs). A series is
complete once no instance of it has arrived for ``settle_s`` seconds (the settle rule: DIMSE
has no "end of series"). Then the main thread analyses it (the same path as ``pacs watch``),
builds the SEG and ANN and sends them to the destination node, records the series in the
ledger (by an HMAC of its UID) and removes its spool folder. A series in the ledger is never
analysed again: instances of it pushed later are dropped.

pynetdicom's own log lines name UIDs and AE details: its logger is kept at WARNING.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline import ConfigError, ModelInfo, OutputError, site_dir, site_secret

from ._pacs import PacsSlide, analyse_series_folder, read_pacs_ledger_at, series_key, write_private_json
from ._runs import SlideRunner

__all__ = ["DicomNode", "PacsListener", "parse_node"]

_log = logging.getLogger(__name__)
_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_SUCCESS = 0x0000
_OUT_OF_RESOURCES = 0xA700


@dataclass(frozen=True)
class DicomNode:
    """A DICOM node: AE title, host and port."""

    ae_title: str
    host: str
    port: int


def parse_node(text: str) -> DicomNode:
    """``AE@HOST:PORT`` as a :class:`DicomNode`, else a ConfigError."""
    ae, _, address = text.partition("@")
    host, _, port = address.rpartition(":")
    if not (ae and 1 <= len(ae) <= 16 and host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"{text!r} is not a DICOM node",
                          hint="write it as AE_TITLE@HOST:PORT, e.g. PACS@10.0.0.5:104")
    return DicomNode(ae, host, int(port))


class PacsListener:
    """A C-STORE SCP that analyses each complete series once (see the module's docstring)."""

    def __init__(self, ae_title: str, host: str, port: int, destination: DicomNode, runner: SlideRunner,
                 info: ModelInfo, *, settle_s: float = 30.0) -> None:
        self.ae_title, self.host, self.port = ae_title, host, port
        self.destination = destination
        self.runner, self.info = runner, info
        self.settle_s = settle_s
        self._secret = site_secret()
        self.directory = site_dir() / "pacs" / ("l-" + hashlib.sha256(
            self._secret + f"{ae_title}:{port}".encode()).hexdigest()[:12])
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._spool = self.directory / "spool"
        self._spool.mkdir(exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._last_arrival: dict[str, float] = {}
        self._server: Any = None

    # -- receiving (pynetdicom's threads) --------------------------------------------------
    def _on_store(self, event: Any) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        key = series_key(str(dataset.SeriesInstanceUID), self._secret)
        with self._lock:
            if read_pacs_ledger_at(self.directory).get(key, {}).get("status") in ("processed", "failed"):
                _log.info("an instance of a series already analysed arrived again; dropped")
                return _SUCCESS
            folder = self._spool / key
            folder.mkdir(exist_ok=True, mode=0o700)
            name = hashlib.sha256(str(dataset.SOPInstanceUID).encode()).hexdigest()[:24]
            try:
                dataset.save_as(folder / f".{name}.part", enforce_file_format=True)
                (folder / f".{name}.part").replace(folder / f"{name}.dcm")
            except OSError:
                return _OUT_OF_RESOURCES
            self._last_arrival[key] = time.monotonic()
        return _SUCCESS

    def start(self) -> None:
        """Listen (in background threads) for C-STORE requests of slide instances."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(_WSI_SOP_CLASS, ALL_TRANSFER_SYNTAXES)
        try:
            self._server = ae.start_server((self.host, self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        except OSError as exc:
            raise ConfigError(f"cannot listen on port {self.port} ({exc.strerror or type(exc).__name__})",
                              hint="choose a free --port (ports below 1024 need root)") from None
        # Series spooled by an earlier run that ended before analysing them settle again.
        now = time.monotonic()
        for folder in self._spool.iterdir():
            self._last_arrival.setdefault(folder.name, now)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- analysing (the main thread) -------------------------------------------------------
    def _settled(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return [key for key, last in self._last_arrival.items() if now - last >= self.settle_s]

    def _send(self, datasets: list[Any]) -> None:
        from pynetdicom import AE

        ae = AE(ae_title=self.ae_title)
        for dataset in datasets:
            ae.add_requested_context(str(dataset.SOPClassUID), str(dataset.file_meta.TransferSyntaxUID))
        assoc = ae.associate(self.destination.host, self.destination.port, ae_title=self.destination.ae_title)
        if not assoc.is_established:
            raise OutputError("the destination node refused the association",
                              hint="add this node's AE title to the archive's known modalities, check --store-to")
        try:
            for dataset in datasets:
                status = assoc.send_c_store(dataset)
                code = getattr(status, "Status", None)
                if code != _SUCCESS:
                    raise OutputError(f"the destination refused a result object (status {code})",
                                      hint="check that the archive accepts Segmentation and Bulk Annotation objects")
        finally:
            assoc.release()

    def process_settled(self) -> list[PacsSlide]:
        """Analyse every settled series once; what happened to each."""
        slides = []
        for key in self._settled():
            folder = self._spool / key
            ledger = read_pacs_ledger_at(self.directory)
            if ledger.get(key, {}).get("status") not in ("processed", "failed"):
                slide, entry = analyse_series_folder(folder, self.runner, self.info, self._send, "dimse")
                with self._lock:
                    ledger = read_pacs_ledger_at(self.directory)
                    ledger[key] = {**entry, "at": time.time()}
                    write_private_json(self.directory / "ledger.json", ledger)
                slides.append(slide)
            with self._lock:
                self._last_arrival.pop(key, None)
                shutil.rmtree(folder, ignore_errors=True)
        return slides

    def serve(self, report: Callable[[PacsSlide], None], stop: threading.Event, poll_s: float = 1.0) -> None:
        """Process settled series until ``stop`` is set."""
        while not stop.is_set():
            for slide in self.process_settled():
                report(slide)
            stop.wait(poll_s)
