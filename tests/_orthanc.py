"""A real Orthanc PACS for tests: Debian's ``orthanc`` + ``orthanc-dicomweb``, started on
127.0.0.1 with a temporary configuration and storage on free ports, stopped afterwards.

``make system-deps`` installs the packages when root; without them (and without root to
install them) :func:`orthanc_or_skip` skips with the reason.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Orthanc", "orthanc_missing", "orthanc_or_skip", "running_orthanc", "DICOMWEB_PLUGIN"]

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Orthanc:
    """One running Orthanc: its REST base URL, DICOMweb root, DICOM port and AE title."""

    url: str
    dicomweb: str
    dicom_port: int
    ae_title: str
    home: Path

    def get_json(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def upload(self, folder: Path) -> int:
        """POST every file of ``folder`` to ``/instances`` (Orthanc's REST upload); how many."""
        paths = sorted(p for p in Path(folder).iterdir() if p.is_file())
        for path in paths:
            self.upload_file(path)
        return len(paths)

    def upload_file(self, path: Path) -> None:
        request = urllib.request.Request(self.url + "/instances", data=Path(path).read_bytes(), method="POST",
                                         headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()

    def _send(self, method: str, path: str, body: object) -> object:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            text = response.read()
        return json.loads(text) if text.strip() else None

    def push_series(self, modality: str, ae_title: str, port: int) -> int:
        """Send every series of ``modality`` by C-STORE to the node ``ae_title`` at 127.0.0.1:``port``
        (what a PACS routing rule does); how many series."""
        self._send("PUT", "/modalities/wsiflow", {"AET": ae_title, "Host": "127.0.0.1", "Port": port})
        series = [s["ID"] for s in self.get_json("/series?expand")  # type: ignore[union-attr]
                  if s["MainDicomTags"].get("Modality") == modality]
        for orthanc_id in series:
            self._send("POST", "/modalities/wsiflow/store", orthanc_id)
        return len(series)

    def delete_all(self) -> None:
        """Empty the archive (between tests sharing the session's Orthanc)."""
        for study in self.get_json("/studies"):  # type: ignore[union-attr]
            request = urllib.request.Request(f"{self.url}/studies/{study}", method="DELETE")
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _executable() -> str | None:
    # Debian installs it in /usr/sbin, which a non-root user's PATH often lacks.
    return shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")


def orthanc_missing() -> str | None:
    """Why Orthanc cannot be started here (None: it can)."""
    if _executable() is None or not DICOMWEB_PLUGIN.is_file():
        return ("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb; "
                "`make system-deps` does it when root)")
    return None


def orthanc_or_skip() -> str:
    """The Orthanc executable, or skip saying why (packages absent; ``make system-deps`` installs them)."""
    reason = orthanc_missing()
    exe = _executable()
    if reason is not None or exe is None:
        pytest.skip(reason or "Orthanc is not installed")
    return exe


@contextmanager
def running_orthanc(home: Path) -> Iterator[Orthanc]:
    """Start Orthanc with storage and configuration under ``home``; stop it on exit."""
    exe = orthanc_or_skip()
    home.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = _free_port(), _free_port()
    config = {
        "Name": "wsiflow-test",
        "StorageDirectory": str(home / "storage"),
        "IndexDirectory": str(home / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANCTEST",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "OverwriteInstances": True,
        "StorageCompression": False,
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 8,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }
    config_path = home / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    log = (home / "orthanc.log").open("wb")
    process = subprocess.Popen([exe, str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=home)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail("Orthanc exited at start:\n" + (home / "orthanc.log").read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(url + "/dicom-web/studies", timeout=2) as response:
                    response.read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail("Orthanc did not answer within a minute")
                time.sleep(0.2)
        yield Orthanc(url, url + "/dicom-web", dicom_port, "ORTHANCTEST", home)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()
