"""``wsiflow deid`` on DICOM-WSI: an allow-list, so no identifier survives anywhere, and it fails closed.

The input is the shared lossless CMU DICOM with the sentinel in every attribute of PS3.15
Table E.1-1 that has a D, Z, X or U action, in the sequences the copy keeps (specimen,
optical path, functional groups), in private tags at every depth, curves, overlays,
trailing padding, file meta and file names.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.encaps import encapsulate, generate_frames

from pipeline import DeidentificationError, WsiflowError
from privacy import deidentify_slide
from tests._sentinel_slide import (
    E11_ATTRIBUTES,
    SENTINEL,
    SENTINEL_DICOM_DATE,
    SENTINEL_NUMBERS,
    SENTINEL_UID_ROOT,
    write_sentinel_dicom,
)
from tests.conftest import shared_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the sentinel's long values

_SOURCE = "dicom/cmu-1-small-region-lossless"
_E11 = set().union(*E11_ATTRIBUTES.values())


@pytest.fixture(scope="module")
def sentinel_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sentinel_dicom(shared_file(_SOURCE), tmp_path_factory.mktemp("sentinel-dicom"))


@pytest.fixture(scope="module")
def clean_copy(sentinel_dicom: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    out = tmp_path_factory.mktemp("deid") / "out"
    return deidentify_slide(sentinel_dicom, out), out


def _variants(text: str) -> list[bytes]:
    forms = {text, text.lower(), text.upper()}
    return [f.encode(codec) for f in forms for codec in ("utf-8", "utf-16-le", "utf-16-be")]


def _all_elements(ds: Any) -> list[Any]:
    """Every element at every depth, the file meta included."""
    elements = list(ds.file_meta.iterall()) if hasattr(ds, "file_meta") else []
    return elements + list(ds.iterall())


def _texts(elem: Any) -> list[str]:
    if elem.VR == "SQ" or elem.value is None:
        return []
    values = elem.value if elem.VM > 1 and not isinstance(elem.value, (str, bytes)) else [elem.value]
    return [v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in values]


def _volume(folder: Path) -> Path:
    return max(folder.iterdir(), key=lambda p: p.stat().st_size)


def test_the_sentinel_dicom_carries_identifiers_everywhere(sentinel_dicom):
    """The input really holds what must go: otherwise the next test proves nothing."""
    assert len(_E11) > 600
    ds = pydicom.dcmread(_volume(sentinel_dicom))
    present = {kw for kw in _E11 if kw in ds}
    assert len(present) >= len(_E11) - 1  # all but ConcatenationUID
    for keyword in ("AdmissionID", "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
                    "CurrentPatientLocation", "PatientState", "MedicalAlerts", "Allergies", "ServiceEpisodeID",
                    "ReferringPhysicianTelephoneNumbers", "ProtocolName", "StationAETitle"):
        assert SENTINEL in str(ds[keyword].value), keyword
    step_texts = [str(i.get("TextValue", "")) for i in
                  ds.SpecimenDescriptionSequence[0].SpecimenPreparationSequence[0].SpecimenPreparationStepContentItemSequence]
    assert any(SENTINEL in t and "Dr" in t for t in step_texts)
    assert any(e.tag.is_private for e in ds.SpecimenDescriptionSequence[0])
    assert ds[0x60004000].value.startswith(SENTINEL) and 0xFFFCFFFC in ds
    assert all(SENTINEL in p.name for p in sentinel_dicom.iterdir()) and SENTINEL in sentinel_dicom.name
    with openslide.OpenSlide(_volume(sentinel_dicom)) as slide:
        assert slide.level_count == 5 and set(slide.associated_images) == {"label", "macro", "thumbnail"}
        assert sum(SENTINEL in v for v in slide.properties.values()) > 500


def test_no_identifier_survives_dicom_deid(sentinel_dicom, clean_copy):
    report, out = clean_copy
    assert report.format == "dicom" and report.levels_kept == 5
    assert sorted(report.dropped) == ["label", "overview", "thumbnail"]
    inputs = [pydicom.dcmread(path, stop_before_pixels=True) for path in sentinel_dicom.iterdir()]
    input_uids = {
        v for ds in inputs for e in _all_elements(ds)
        if e.VR == "UI" and e.keyword != "ImplementationClassUID"  # pydicom's, the writer of both
        for v in _texts(e) if not v.startswith("1.2.840.10008.")
    }
    files = sorted(out.iterdir())
    assert [p.name for p in files] == [f"{i}.dcm" for i in range(5)]
    for path in files:
        data = path.read_bytes()  # every byte: header, pixel data, padding
        assert not [v for v in _variants(SENTINEL) if v in data], path.name
        ds = pydicom.dcmread(path)
        for elem in _all_elements(ds):
            assert not elem.tag.is_private and elem.tag.group not in (0x5000, 0x6000, 0xFFFC), elem
            texts = _texts(elem) if elem.tag != 0x7FE00010 else []
            assert not [t for t in texts if SENTINEL.lower() in t.lower()], elem
            if elem.VR in ("DA", "DT", "TM"):
                assert not [t for t in texts if SENTINEL_DICOM_DATE in t or "070707" in t], elem
            if elem.VR in ("DS", "IS", "AS"):
                assert not set(texts) & set(SENTINEL_NUMBERS), elem
            if elem.VR == "UI":
                assert not [t for t in texts if t in input_uids or t.startswith(SENTINEL_UID_ROOT)], elem
            if elem.keyword in _E11:
                # Only Type 1/2 attributes the IOD needs stay, emptied or replaced.
                vr = dictionary_VR(elem.keyword)
                assert vr not in ("US", "UL", "SS", "SL", "FL", "FD", "OB", "OW", "UN"), elem
        assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "REMOVED"
        codes = [(c.CodingSchemeDesignator, c.CodeValue) for c in ds.DeidentificationMethodCodeSequence]
        assert codes == [("DCM", "113100"), ("DCM", "113104")]
        assert "AdmissionID" not in ds and "OtherPatientIDsSequence" not in ds
    assert report.profile == ("113100", "113104") and report.fields_removed > 3000
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    specimen = ds.SpecimenDescriptionSequence[0]
    steps = specimen.SpecimenPreparationSequence[0].SpecimenPreparationStepContentItemSequence
    assert [s.ValueType for s in steps] == ["TEXT", "CODE", "CODE"]  # free text, date and unknown code gone
    assert steps[0].TextValue == specimen.SpecimenIdentifier  # the same keyed pseudonym
    assert steps[1].ConceptCodeSequence[0].CodeMeaning == "Staining method (procedure)"
    assert ds.OpticalPathSequence[0].IlluminationTypeCodeSequence[0].CodeMeaning == "Brightfield illumination"


def test_the_dicom_copy_opens_and_reads_the_same_pixels(clean_copy):
    _, out = clean_copy
    original = _volume(shared_file(_SOURCE))
    with openslide.OpenSlide(original) as a, openslide.OpenSlide(out / "0.dcm") as b:
        assert b.properties["openslide.vendor"] == "dicom" and dict(b.associated_images) == {}
        assert b.level_dimensions == a.level_dimensions
        for key in ("openslide.mpp-x", "openslide.mpp-y"):
            assert b.properties[key] == a.properties[key]
        assert not [k for k, v in b.properties.items() if SENTINEL.lower() in v.lower()]
        for level in range(a.level_count):
            down = a.level_downsamples[level]
            w, h = a.level_dimensions[level]
            # Edge tiles of levels 1-3 cannot be decoded in the input either (see test_deid).
            for col, row in [(0, 0), (1, 1)] if level < 3 else [(0, 0)]:
                loc, size = (int(col * 240 * down), int(row * 240 * down)), (min(240, w), min(120, h))
                assert np.array_equal(np.asarray(a.read_region(loc, level, size)),
                                      np.asarray(b.read_region(loc, level, size))), level
    for index, path in enumerate(sorted(out.iterdir())):
        frames = pydicom.dcmread(path).PixelData
        assert frames == pydicom.dcmread(_sorted_volumes(original.parent)[index]).PixelData


def _sorted_volumes(folder: Path) -> list[Path]:
    volumes = [p for p in folder.iterdir() if "VOLUME" in pydicom.dcmread(p, stop_before_pixels=True).ImageType]
    return sorted(volumes, key=lambda p: -int(pydicom.dcmread(p, stop_before_pixels=True).TotalPixelMatrixColumns))


# ------------------------------------------------------------------------------ fail closed


def _copy_with(tmp_path: Path, change) -> Path:
    """The shared DICOM with ``change(ds)`` applied to its VOLUME instances, named with the sentinel."""
    folder = tmp_path / f"in-{SENTINEL}"
    folder.mkdir()
    for index, path in enumerate(sorted(shared_file(_SOURCE).iterdir())):
        ds = pydicom.dcmread(path)
        if "VOLUME" in ds.ImageType:
            change(ds)
        ds.save_as(folder / f"{SENTINEL}-{index}.dcm", enforce_file_format=True)
    return folder


def _refused(src: Path, tmp_path: Path, match: str, error: type[WsiflowError] = DeidentificationError) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error, match=match) as info:
        deidentify_slide(src, tmp_path / "out")
    line = info.value.one_line()
    assert SENTINEL.lower() not in line.lower() and str(tmp_path) not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp folder


def _frames_with_comment(ds: Any) -> None:
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    comment = b"\xff\xfe" + (len(SENTINEL) + 2).to_bytes(2, "big") + SENTINEL.encode()
    frames[0] = frames[0][:2] + comment + frames[0][2:]
    ds.PixelData = encapsulate(frames)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "VOLUME", SENTINEL]), "ImageType"),
        (lambda ds: setattr(ds, "Modality", "OT"), "Modality"),
        (lambda ds: setattr(ds.OpticalPathSequence[0].IlluminationTypeCodeSequence[0], "CodeValue", SENTINEL),
         "IlluminationTypeCodeSequence"),
        (lambda ds: ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].add_new(0x00280030, "LO", SENTINEL),
         "PixelSpacing"),
        (_frames_with_comment, "comment"),
        (lambda ds: setattr(ds, "BurnedInAnnotation", "YES"), "burned-in"),
    ],
    ids=["image-type", "modality", "illumination-code", "pixel-spacing-as-text", "jpeg-comment", "burned-in"],
)
def test_dicom_fails_closed_on_what_it_cannot_classify(tmp_path, change, match):
    _refused(_copy_with(tmp_path, change), tmp_path, match)


def test_dicom_errors_never_name_an_instance_file(tmp_path):
    """Messages from every refusal on the way in say what is wrong, never which file."""
    folder = _copy_with(tmp_path, lambda ds: None)
    stray = folder / f"{SENTINEL}-notes.txt"
    stray.write_text("patient notes")
    _refused(folder, tmp_path, "not DICOM")
    stray.unlink()
    other = pydicom.dcmread(next(folder.iterdir()))
    other.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # a secondary capture in the series
    other.save_as(folder / f"{SENTINEL}-other.dcm", enforce_file_format=True)
    _refused(folder, tmp_path, "not a whole-slide image")
    (folder / f"{SENTINEL}-other.dcm").unlink()
    broken = _volume(folder)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # cut inside the pixel data
    with pytest.raises(WsiflowError) as info:
        deidentify_slide(folder, tmp_path / "out")
    assert SENTINEL.lower() not in info.value.one_line().lower()
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_deid_of_the_sentinel_dicom_prints_no_identifier(wsiflow_cli, sentinel_dicom, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([*wsiflow_cli, "--verbose", "deid", str(sentinel_dicom), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "113100, 113104" in done.stdout
    assert SENTINEL.lower() not in (done.stdout + done.stderr).lower()
    shutil.rmtree(out)
    bad = tmp_path / f"bad-{SENTINEL}"
    shutil.copytree(sentinel_dicom, bad)
    (bad / f"{SENTINEL}-stray.txt").write_text("x")
    failed = subprocess.run([*wsiflow_cli, "--verbose", "deid", str(bad), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "not DICOM" in failed.stderr
    assert SENTINEL.lower() not in (failed.stdout + failed.stderr).lower()
