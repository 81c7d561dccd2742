"""The hospital loop on a real Orthanc: a DICOM-WSI slide stored in the archive comes back
with wsiflow's DICOM results (fractional SEG heatmap, Bulk Simple Annotations) in its study,
at the right place with the right values; ``wsiflow export --dicom`` writes the same objects.

Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) runs once per session on 127.0.0.1
(tests/_orthanc.py); the tests skip with the reason when it is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
import zarr

from pipeline import ResultFolder, read_source_level0
from privacy import audit_log_path
from tests._orthanc import Orthanc, orthanc_or_skip, running_orthanc
from tests._sentinel_slide import SENTINEL
from tests.conftest import shared_file

pytestmark = pytest.mark.slow

_LOSSLESS = "dicom/cmu-1-small-region-lossless"
_HALF_STEP = 0.5 / 255 + 1e-6
"""A fractional SEG stores round(p x 255): at most half a step from the heatmap's value."""
_PRIVATE_SITE_FILES = ("slide-index.json", "batches/", "inboxes/")


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> object:
    orthanc_or_skip()
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def archive(orthanc: Orthanc) -> Orthanc:
    """The session's Orthanc, emptied for this test."""
    orthanc.delete_all()
    return orthanc


def _cli(cli: list[str], *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, timeout=900, env=env)


def _watch(cli: list[str], archive: Orthanc, out: Path, env: dict[str, str] | None = None,
           *extra: str) -> tuple[dict, subprocess.CompletedProcess[str]]:
    done = _cli(cli, *extra, "pacs", "watch", "--dicomweb", archive.dicomweb, "--once", "--settle-s", "0",
                "--out", out, "--json", env=env)
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done


def _client(archive: Orthanc):
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.trust_env = False
    return DICOMwebClient(url=archive.dicomweb, session=session)


def _stored_results(archive: Orthanc, study: str) -> tuple[object, object]:
    """The SEG and ANN found by QIDO-RS under ``study``, read with highdicom."""
    import highdicom as hd

    client = _client(archive)
    found = {}
    for modality in ("SEG", "ANN"):
        series = client.search_for_series(study, search_filters={"Modality": modality})
        assert len(series) == 1, f"{len(series)} {modality} series in the study"
        uid = series[0]["0020000E"]["Value"][0]
        instances = client.retrieve_series(study, uid)
        assert len(instances) == 1
        found[modality] = instances[0]
    seg = hd.seg.Segmentation.from_dataset(found["SEG"])
    ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(found["ANN"])
    return seg, ann


def _slide_index(source: pydicom.Dataset, position: list[float]) -> np.ndarray:
    """(col, row) level-0 pixel index (pixel centres at integers) of a slide position (mm)."""
    origin = source.TotalPixelMatrixOriginSequence[0]
    start = np.array([float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem)])
    cosines = np.array([float(v) for v in source.ImageOrientationSlide]).reshape(2, 3)[:, :2]
    row_mm, col_mm = (float(v) for v in source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing)
    step = np.column_stack([cosines[0] * col_mm, cosines[1] * row_mm])
    return np.linalg.solve(step, np.asarray(position[:2], dtype=np.float64) - start)


def _check_results(seg, ann, source: pydicom.Dataset, folder: ResultFolder) -> None:
    """Geometry, references and values of the DICOM results against the result folder."""
    summary = folder.read_summary()
    tiles = pq.read_table(folder.tiles).to_pydict()
    classes = [c for c in tiles if c.startswith("prob_")]
    # Filed with the slide: same patient, study, frame of reference and container; refers to its series.
    for dataset in (seg, ann):
        assert dataset.StudyInstanceUID == source.StudyInstanceUID
        assert dataset.PatientID == source.PatientID and dataset.PatientName == source.PatientName
        assert dataset.ContainerIdentifier == source.ContainerIdentifier
        assert dataset.SeriesInstanceUID != source.SeriesInstanceUID
        assert [s.SeriesInstanceUID for s in dataset.ReferencedSeriesSequence] == [source.SeriesInstanceUID]
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    # ANN coordinates are 2D pixel coordinates of the slide's level 0 (the instance it names).
    assert ann.AnnotationCoordinateType == "2D"
    assert ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # SEG geometry: one pixel per heatmap cell, the cell's centre over its tile's centre.
    heatmap = np.asarray(zarr.open_array(str(folder.heatmap / "0"), mode="r")[...])
    assert seg.SegmentationType == "FRACTIONAL"
    assert (seg.TotalPixelMatrixRows, seg.TotalPixelMatrixColumns) == heatmap.shape[1:]
    spacing_um = summary.data["grid"]["stride_um"]
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    np.testing.assert_allclose([float(v) for v in measures.PixelSpacing], [spacing_um / 1000] * 2, rtol=1e-9)
    assert list(seg.ImageOrientationSlide) == list(source.ImageOrientationSlide)
    origin = seg.TotalPixelMatrixOriginSequence[0]
    first = _slide_index(source, [float(origin.XOffsetInSlideCoordinateSystem),
                                  float(origin.YOffsetInSlideCoordinateSystem)])
    tile_centre = np.array([tiles["width"][0] / 2 - 0.5, tiles["height"][0] / 2 - 0.5])
    np.testing.assert_allclose(first, tile_centre, atol=1e-3)
    # SEG values: the Zarr heatmap, within the 8-bit fraction's half step.
    values = seg.get_total_pixel_matrix(combine_segments=False, rescale_fractional=True)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == [c.removeprefix("prob_") for c in classes]
    assert np.abs(np.moveaxis(values, -1, 0) - heatmap).max() <= _HALF_STEP
    # ANN: each tile as the rectangle tiles.parquet gives, with one probability per class.
    group = ann.get_annotation_groups(label="tiles")[0]
    polygons = group.get_graphic_data(coordinate_type="2D")
    assert len(polygons) == len(tiles["x"]) == summary.tiles
    corners = np.array([p[0] for p in polygons])
    far = np.array([p[2] for p in polygons])
    np.testing.assert_allclose(corners, np.column_stack([tiles["x"], tiles["y"]]), atol=1e-3)
    np.testing.assert_allclose(far - corners, np.column_stack([tiles["width"], tiles["height"]]), atol=1e-3)
    names, measured, _ = group.get_measurements()
    assert [n.meaning for n in names] == [f"probability of {c.removeprefix('prob_')}" for c in classes]
    np.testing.assert_array_equal(measured, np.column_stack([tiles[c] for c in classes]).astype(np.float32))
    regions = [g.label for g in ann.get_annotation_groups()][1:]
    assert len(regions) == sum(1 for c in summary.data["classes"].values() if c["region_area_mm2"] > 0)


def test_export_dicom_writes_seg_and_annotations_on_the_source_geometry(wsiflow_cli, tmp_path):
    import highdicom as hd

    slide = shared_file(_LOSSLESS)
    out = tmp_path / "out"
    done = _cli(wsiflow_cli, "run", slide, "--out", out, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["slides"][0]["result_dir"]
    exported = _cli(wsiflow_cli, "export", result, "--dicom", "--source", slide, "--out", tmp_path / "dicom", "--json")
    assert exported.returncode == 0, exported.stderr
    files = json.loads(exported.stdout)["files"]
    assert sorted(f.rsplit("-", 1)[1] for f in files) == ["ann.dcm", "seg.dcm"]
    seg = hd.seg.segread(tmp_path / "dicom" / next(f for f in files if f.endswith("seg.dcm")))
    ann = hd.ann.annread(tmp_path / "dicom" / next(f for f in files if f.endswith("ann.dcm")))
    folder = ResultFolder.find(Path(result))
    assert folder is not None
    _check_results(seg, ann, read_source_level0(slide), folder)
    # Without --source it is a usage error, not a traceback.
    refused = _cli(wsiflow_cli, "export", result, "--dicom", "--out", tmp_path / "dicom2")
    assert refused.returncode == 2 and "--source" in refused.stderr and "Traceback" not in refused.stderr


def test_a_slide_in_the_archive_comes_back_with_its_results_in_its_study(wsiflow_cli, archive, tmp_path):
    slide = shared_file(_LOSSLESS)
    damaged = shared_file("bad/incomplete-dicom-frames.dcm")
    source = read_source_level0(slide)
    assert archive.upload(slide) == 8
    archive.upload_file(damaged)
    out = tmp_path / "out"
    look, done = _watch(wsiflow_cli, archive, out)
    assert look["found"] == 2 and look["already_done"] == 0, look
    by_status = {s["status"]: s for s in look["slides"]}
    assert set(by_status) == {"processed", "failed"}, look
    assert by_status["processed"]["stored"] == 2
    # The damaged series fails alone, with its kind; the loop went on with the good one.
    assert by_status["failed"]["error"]["kind"] in ("corrupt", "unsupported"), by_status["failed"]
    assert done.returncode == 1 and "Traceback" not in done.stderr
    slide_id = by_status["processed"]["slide_id"]
    folder = ResultFolder.find(out / slide_id / "tissue-qc")
    assert folder is not None
    seg, ann = _stored_results(archive, source.StudyInstanceUID)
    _check_results(seg, ann, source, folder)
    # A second look reprocesses nothing, and the archive holds no second copy.
    again, second = _watch(wsiflow_cli, archive, out)
    assert again == {"found": 2, "already_done": 2, "busy": False, "slides": []}, again
    assert second.returncode == 0
    _stored_results(archive, source.StudyInstanceUID)
    # The ledger and cache keep no UID of the patient's series; the retrieved copy is gone.
    site = Path(os.environ["WSIFLOW_HOME"])
    ledgers = list((site / "pacs").glob("a-*/ledger.json"))
    assert ledgers and source.SeriesInstanceUID not in "".join(p.read_text() for p in ledgers)
    assert not any(p.is_file() for p in (site / "pacs").glob("a-*/cache/**/*"))


def _sentinel_copy(source: Path, target: Path) -> Path:
    """The shared DICOM slide with the sentinel in patient name, ID, accession number and the
    free-text descriptions, and new UIDs (a study of its own)."""
    target.mkdir(parents=True)
    uids = {}
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        ds.PatientName = f"{SENTINEL}^Patient"
        ds.PatientID = SENTINEL
        ds.AccessionNumber = SENTINEL
        ds.StudyDescription = f"biopsy of {SENTINEL}"
        ds.SeriesDescription = f"slide of {SENTINEL}"
        ds.ImageComments = f"scanned for {SENTINEL}"
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            old = str(getattr(ds, keyword))
            setattr(ds, keyword, uids.setdefault(old, pydicom.uid.generate_uid()))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(target / path.name, enforce_file_format=True)
    return target


def _sentinel_hits(root: Path) -> list[str]:
    needles = [form.encode(enc) for form in (SENTINEL, SENTINEL.lower()) for enc in ("utf-8", "utf-16-le")]
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if SENTINEL.lower() in relative.lower():
            found.append(f"{relative} (name)")
        if not path.is_file() or any(relative.startswith(s) for s in _PRIVATE_SITE_FILES):
            continue
        views = [path.read_bytes()]
        if path.suffix == ".parquet":
            views.append(json.dumps(pq.read_table(path).to_pylist(), default=str).encode())
        if any(n in view for n in needles for view in views):
            found.append(relative)
    return found


def test_the_sentinel_reaches_the_archive_and_nothing_wsiflow_keeps(wsiflow_cli, archive, tmp_path):
    slide = _sentinel_copy(shared_file(_LOSSLESS), tmp_path / "incoming")
    source = read_source_level0(slide)
    archive.upload(slide)
    written = tmp_path / "written"
    site = written / "site"
    env = {**os.environ, "WSIFLOW_HOME": str(site)}
    look, done = _watch(wsiflow_cli, archive, written / "out", env, "-v")
    assert [s["status"] for s in look["slides"]] == ["processed"], done.stderr
    (written / "stdout.txt").write_text(done.stdout)
    (written / "stderr.txt").write_text(done.stderr)
    # In the archive the results carry the slide's patient and study: that files them with it.
    seg, ann = _stored_results(archive, source.StudyInstanceUID)
    for dataset in (seg, ann):
        assert str(dataset.PatientName).startswith(SENTINEL) and dataset.PatientID == SENTINEL
        assert dataset.AccessionNumber == SENTINEL and SENTINEL in dataset.StudyDescription
        assert SENTINEL not in dataset.SeriesDescription  # the results' own series say what they are
    # wsiflow's own outputs (results, logs, ledger, audit log, site files) hold none of it.
    os.environ["WSIFLOW_HOME"], saved = str(site), os.environ["WSIFLOW_HOME"]
    try:
        assert audit_log_path().is_file() and audit_log_path().is_relative_to(written)
    finally:
        os.environ["WSIFLOW_HOME"] = saved
    assert _sentinel_hits(written) == []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_lines(path: Path, count: int, timeout_s: float, process: subprocess.Popen) -> list[dict]:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
        if len(lines) >= count:
            return lines
        assert process.poll() is None, f"the listener ended: {process.returncode}"
        time.sleep(0.5)
    pytest.fail(f"the listener reported fewer than {count} series within {timeout_s} s")


def test_a_slide_pushed_by_the_archive_is_analysed_once_and_sent_back(wsiflow_cli, archive, tmp_path):
    import signal
    import time

    slide = shared_file(_LOSSLESS)
    source = read_source_level0(slide)
    archive.upload(slide)
    port = _free_port()
    stdout, stderr = tmp_path / "listen.out", tmp_path / "listen.err"
    out = tmp_path / "out"
    with stdout.open("w") as fo, stderr.open("w") as fe:
        process = subprocess.Popen(
            [*wsiflow_cli, "pacs", "listen", "--ae-title", "WSIFLOWTEST", "--port", str(port),
             "--store-to", f"{archive.ae_title}@127.0.0.1:{archive.dicom_port}", "--settle-s", "2",
             "--out", str(out), "--json"], stdout=fo, stderr=fe)
    try:
        time.sleep(1)
        deadline = time.monotonic() + 120  # the listener imports torch and loads the model first
        while True:
            try:
                assert archive.push_series("SM", "WSIFLOWTEST", port) == 1
                break
            except OSError:
                # urllib's HTTPError is an OSError: Orthanc could not reach the node yet.
                assert process.poll() is None, stderr.read_text()
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        (line,) = _wait_for_lines(stdout, 1, 300, process)
        assert line["status"] == "processed" and line["stored"] == 2, line
        folder = ResultFolder.find(out / line["slide_id"] / "tissue-qc")
        assert folder is not None
        seg, ann = _stored_results(archive, source.StudyInstanceUID)
        _check_results(seg, ann, source, folder)
        # Pushed again (a routing rule firing twice): dropped, not analysed again.
        assert archive.push_series("SM", "WSIFLOWTEST", port) == 1
        time.sleep(6)
        assert len(_wait_for_lines(stdout, 1, 1, process)) == 1
        _stored_results(archive, source.StudyInstanceUID)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert "Traceback" not in stderr.read_text(), stderr.read_text()
    site = Path(os.environ["WSIFLOW_HOME"])
    assert not any(p.is_file() for p in (site / "pacs").glob("l-*/spool/**/*"))


def test_an_unreachable_archive_or_a_bad_node_is_one_clear_line(wsiflow_cli, tmp_path):
    port = _free_port()  # nothing listens there
    done = _cli(wsiflow_cli, "pacs", "watch", "--dicomweb", f"http://127.0.0.1:{port}/dicom-web", "--once",
                "--out", tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert "searching the archive failed" in done.stderr and "Traceback" not in done.stderr
    assert str(port) not in done.stderr  # the URL is not echoed
    bad = _cli(wsiflow_cli, "pacs", "listen", "--port", "11112", "--store-to", "nonsense", "--out", tmp_path / "out")
    assert bad.returncode == 2 and "AE_TITLE@HOST:PORT" in bad.stderr, bad.stderr


def _api(prefect_server, path: str, body: dict | None = None):
    import time
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{prefect_server['url']}{path}", data=json.dumps(body or {}).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    for attempt in range(10):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == 9:  # a busy server's SQLite answers 503 for a moment
                raise
            time.sleep(2)


def _wait_for_run(prefect_server, run_id: str, timeout_s: float = 600) -> dict:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        [run] = _api(prefect_server, "/flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
            return run
        time.sleep(1)


def test_pacs_watch_is_a_scheduled_deployment_whose_only_parameter_is_a_checked_id(
        archive, prefect_server, wsiflow_cli, tmp_path):  # archive first: no Orthanc skips before the server
    import re
    import signal
    import time

    from flows._pacs import check_watch_id
    from pipeline import ConfigError

    for bad in ("../../elsewhere", "a-0123456789ab/..", "http://127.0.0.1:8042/dicom-web", "A-0123456789AB", 7):
        with pytest.raises(ConfigError, match="is not a PACS watch ID"):
            check_watch_id(bad)
    slide = shared_file(_LOSSLESS)
    source = read_source_level0(slide)
    archive.upload(slide)
    # A site directory of its own: the session's ledger already holds this series (other tests).
    site = tmp_path / "site"
    env = {**os.environ, "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": str(prefect_server["home"]),
           "WSIFLOW_HOME": str(site)}
    stdout, stderr = tmp_path / "watch.out", tmp_path / "watch.err"
    out = tmp_path / "out"
    with stdout.open("w") as fo, stderr.open("w") as fe:
        process = subprocess.Popen(
            [*wsiflow_cli, "pacs", "watch", "--dicomweb", archive.dicomweb, "--out", str(out),
             "--interval-s", "3600", "--settle-s", "0"], env=env, stdout=fo, stderr=fe)
    try:
        deadline = time.monotonic() + 120
        while not stdout.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        started = stdout.read_text()
        match = re.match(r"watching archive (a-[0-9a-f]{12}) as deployment wsiflow-pacs-watch/\1, "
                         r"looking every 3600 s", started)
        assert match, started + stderr.read_text()[-3000:]
        watch_id = match.group(1)
        deployments: list = []
        while not deployments and time.monotonic() < deadline + 120:
            deployments = [d for d in _api(prefect_server, "/deployments/filter", {"limit": 50})
                           if d["name"] == watch_id]
            time.sleep(1)
        [deployment] = deployments
        assert deployment["parameters"] == {"watch_id": watch_id}
        assert deployment["entrypoint"] == "flows._pacs.pacs_watch_flow"
        assert watch_id in deployment["description"] and "every 3600 s" in deployment["description"]
        assert "tissue-qc" in deployment["description"] and "STOW-RS" in deployment["description"]
        schema = deployment["parameter_openapi_schema"]["properties"]
        assert list(schema) == ["watch_id"] and schema["watch_id"]["type"] == "string"

        def look(parameters: dict | None = None) -> dict:
            created = _api(prefect_server, f"/deployments/{deployment['id']}/create_flow_run",
                           {"parameters": parameters} if parameters else {})
            return _wait_for_run(prefect_server, created["id"])

        analysed = look()
        refused = look({"watch_id": "../../elsewhere"})
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    printed = stderr.read_text()
    assert process.returncode == 130 and "Traceback" not in printed, printed[-3000:]
    assert f"deployment wsiflow-pacs-watch/{watch_id} is paused" in printed
    # The scheduled look: named by watch ID and UTC time, it stored the results in the slide's study.
    assert re.fullmatch(rf"pacs-{watch_id}-\d{{8}}T\d{{6}}Z", analysed["name"]), analysed["name"]
    assert analysed["state"]["type"] == "COMPLETED", analysed["state"]
    assert "processed 1" in analysed["state"]["message"] and "failed 0" in analysed["state"]["message"]
    seg, ann = _stored_results(archive, source.StudyInstanceUID)
    [slide_id] = [p.name for p in out.iterdir() if p.name.startswith("s-")]
    folder = ResultFolder.find(out / slide_id / "tissue-qc")
    assert folder is not None
    _check_results(seg, ann, source, folder)
    # A path or URL as the parameter fails the run before any path is built.
    assert refused["name"].startswith("pacs-invalid-id-") and refused["state"]["type"] in ("FAILED", "CRASHED")
    assert "is not a PACS watch ID" in (refused["state"]["message"] or "")
    assert not (site.parent / "elsewhere").exists() and not (site / "elsewhere").exists()
    assert json.loads((site / "pacs" / watch_id / "watch.json").read_text())["settle_s"] == 0
    # Neither the archive's address nor a path reached the Prefect server.
    shown = json.dumps([deployment, analysed, refused])
    assert archive.url.removeprefix("http://") not in shown and str(tmp_path) not in shown
