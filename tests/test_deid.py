"""``wsiflow deid``: de-identified copies are pixel-identical, hold no PHI, and fail closed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import openslide
import pydicom
import pytest
import tifffile

from pipeline import (
    DeidentificationError,
    OutputError,
    UnsupportedSlideError,
    content_digest,
    site_secret,
    slide_id,
)
from privacy import deidentify_slide
from tests._sentinel_slide import SENTINEL, SENTINEL_DATE, SENTINEL_TIME, tissue_image, write_sentinel_svs
from tests.conftest import shared_file

CMU_PHI = ["CMU-1", "b414003d", "12/29/09", "09:59:15", "CPAPERIOCS", "Filename", "ScanScope", "42673,5576"]


@pytest.fixture(scope="module")
def sentinel_svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sentinel_svs(tmp_path_factory.mktemp("sentinel"))


def _run(cli: list[str], *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, timeout=120)


def _assert_same_pixels(src: Path, dst: Path, *, vendor: str, places: int = 5) -> None:
    """Open both in OpenSlide: same geometry, no associated images, identical regions at every level."""
    with openslide.OpenSlide(src) as a, openslide.OpenSlide(dst) as b:
        assert b.properties["openslide.vendor"] == vendor
        assert b.level_dimensions == a.level_dimensions and b.level_count == a.level_count
        for key in ("openslide.mpp-x", "openslide.mpp-y", "openslide.objective-power"):
            assert b.properties.get(key) == a.properties.get(key), key
        assert dict(b.associated_images) == {}
        rng = np.random.default_rng(1)
        for level, (w, h) in enumerate(a.level_dimensions):
            down = a.level_downsamples[level]
            size = (min(300, w), min(300, h))
            spots = [(0, 0), (w - size[0], h - size[1])]
            spots += [(int(rng.integers(0, w - size[0] + 1)), int(rng.integers(0, h - size[1] + 1))) for _ in range(places)]
            for x, y in spots:
                loc = (int(x * down), int(y * down))
                assert np.array_equal(np.asarray(a.read_region(loc, level, size)), np.asarray(b.read_region(loc, level, size))), (level, x, y)


# ------------------------------------------------------------------------ sentinel slide


def test_the_sentinel_slide_carries_phi_everywhere(sentinel_svs):
    assert SENTINEL in sentinel_svs.name and SENTINEL in sentinel_svs.parent.name
    with openslide.OpenSlide(sentinel_svs) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert {"label", "macro", "thumbnail"} <= set(slide.associated_images)
        assert slide.level_count == 3 and slide.dimensions == (2048, 1536)
        label = np.asarray(slide.associated_images["label"].convert("L"))
        assert (label < 100).sum() > 200  # the sentinel is drawn in the label's pixels
        assert any(SENTINEL in v for k, v in slide.properties.items() if k.startswith("aperio."))
    data = sentinel_svs.read_bytes()
    assert data.count(SENTINEL.encode()) > 20
    with tifffile.TiffFile(sentinel_svs) as tif:
        assert {269, 271, 272, 285, 305, 306, 315, 316, 33432} <= set(tif.pages[0].tags.keys())


def test_sentinel_copy_is_pixel_identical_and_clean(sentinel_svs, tmp_path):
    out = tmp_path / "clean.svs"
    report = deidentify_slide(sentinel_svs, out)
    assert report.format == "aperio" and report.levels_kept == 3
    assert set(report.dropped) == {"thumbnail", "label", "macro"}
    assert report.kept_fields == ("AppMag", "MPP")
    assert report.fields_removed > 20 and report.regions_verified > 0
    _assert_same_pixels(sentinel_svs, out, vendor="aperio")
    data = out.read_bytes()
    for leak in [SENTINEL, SENTINEL_DATE, SENTINEL_TIME, "2026:11:27", "Left =", "Top =", "OriginalWidth", "v12.0.0"]:
        assert leak.encode() not in data, leak
    with tifffile.TiffFile(out) as tif:
        assert all(page.is_tiled for page in tif.pages)
        for page in tif.pages:
            assert not {269, 271, 272, 285, 305, 306, 315, 316, 33432} & set(page.tags.keys())
    assert [p.name for p in tmp_path.iterdir()] == ["clean.svs"]  # no temp file left
    assert report.summary().count("\n") == 0 and json.dumps(report.to_json())


def test_cmu_copy_is_pixel_identical_and_clean(cmu_svs, tmp_path):
    out = tmp_path / "cmu.svs"
    report = deidentify_slide(cmu_svs, out)
    assert set(report.dropped) == {"thumbnail", "label", "macro"}
    _assert_same_pixels(cmu_svs, out, vendor="aperio")
    with openslide.OpenSlide(out) as slide:
        assert slide.properties["openslide.mpp-x"] == "0.499"
        assert slide.properties["openslide.objective-power"] == "20"
        assert {k for k in slide.properties if k.startswith("aperio.")} == {"aperio.AppMag", "aperio.MPP"}
    data = out.read_bytes()
    for leak in CMU_PHI:
        assert leak.encode() not in data, leak


def test_generic_tiled_tiff_loses_its_description_and_text_tags(tmp_path):
    src = tmp_path / f"{SENTINEL}.tiff"
    image = tissue_image(1024, 768)
    with tifffile.TiffWriter(src) as tif:
        for factor in (1, 2):
            tif.write(
                image[::factor, ::factor], tile=(256, 256), compression="deflate", photometric="rgb",
                resolution=(20000, 20000), resolutionunit="CENTIMETER", metadata=None,
                description=f"patient {SENTINEL}", software=f"{SENTINEL} sw", extratags=[(315, "s", 0, SENTINEL, True)],
                subfiletype=0 if factor == 1 else 1,
            )
    assert openslide.OpenSlide.detect_format(src) == "generic-tiff"
    out = tmp_path / "clean.tiff"
    report = deidentify_slide(src, out)
    assert report.format == "generic-tiff" and report.levels_kept == 2
    _assert_same_pixels(src, out, vendor="generic-tiff")
    assert SENTINEL.encode() not in out.read_bytes()
    with tifffile.TiffFile(out) as tif:
        assert 270 not in tif.pages[0].tags and 282 in tif.pages[0].tags


# ------------------------------------------------------------------------------ fail closed


def _tiled_tiff(path: Path, extratags: list[tuple]) -> Path:
    tifffile.imwrite(
        path, tissue_image(512, 512), tile=(256, 256), compression="deflate", photometric="rgb",
        metadata=None, extratags=extratags,
    )
    return path


def test_an_unknown_tag_fails_closed_and_writes_nothing(tmp_path):
    src = _tiled_tiff(tmp_path / "in.tiff", [(50001, "s", 0, "who knows", True)])
    with pytest.raises(DeidentificationError, match="50001") as info:
        deidentify_slide(src, tmp_path / "out.tiff")
    assert str(tmp_path) not in str(info.value) and "in.tiff" not in info.value.one_line()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tiff"]


def test_sub_ifds_fail_closed(tmp_path):
    src = tmp_path / "in.tiff"
    image = tissue_image(512, 512)
    with tifffile.TiffWriter(src) as tif:
        tif.write(image, subifds=1, tile=(256, 256), compression="deflate", photometric="rgb", metadata=None)
        tif.write(image[::2, ::2], subfiletype=1, tile=(256, 256), compression="deflate", photometric="rgb")
    with pytest.raises(DeidentificationError, match="SubIFDs"):
        deidentify_slide(src, tmp_path / "out.tiff")
    assert not (tmp_path / "out.tiff").exists()


@pytest.mark.parametrize(
    "relative", ["bad/unopenable-unknown-compression.tiff", "bad/not-a-tiff.svs"],
)
def test_unsupported_shared_files_are_refused(relative, tmp_path):
    with pytest.raises(UnsupportedSlideError) as info:
        deidentify_slide(shared_file(relative), tmp_path / "out.svs")
    assert "deid supports" in info.value.one_line()
    assert list(tmp_path.iterdir()) == []


def test_ndpi_like_and_stripped_tiffs_are_refused(tmp_path):
    ndpi = tmp_path / "fake.ndpi"
    tifffile.imwrite(ndpi, tissue_image(256, 256), photometric="rgb", metadata=None, extratags=[(65420, "I", 1, 1, True)])
    stripped = tmp_path / "stripped.tif"
    tifffile.imwrite(stripped, tissue_image(256, 256), photometric="rgb", metadata=None)
    for src in (ndpi, stripped):
        with pytest.raises(UnsupportedSlideError):
            deidentify_slide(src, tmp_path / "out.tif")
    assert not (tmp_path / "out.tif").exists()


def test_existing_output_and_in_equals_out(sentinel_svs, tmp_path):
    out = tmp_path / "out.svs"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError):
        deidentify_slide(sentinel_svs, out)
    assert out.read_bytes() == b"keep me"
    deidentify_slide(sentinel_svs, out, overwrite=True)
    assert SENTINEL.encode() not in out.read_bytes() and out.stat().st_size > 100_000
    with pytest.raises(DeidentificationError):
        deidentify_slide(out, out, overwrite=True)


# ------------------------------------------------------------------------------------ DICOM


def _dicom_with_phi(tmp_path: Path) -> Path:
    """The lossless CMU DICOM with the sentinel in patient, study, specimen and private fields."""
    src = shared_file("dicom/cmu-1-small-region-lossless")
    folder = tmp_path / f"dicom-{SENTINEL}"
    folder.mkdir()
    for path in sorted(src.iterdir()):
        ds = pydicom.dcmread(path)
        ds.PatientName = f"{SENTINEL}^PATIENT"
        ds.PatientID = f"{SENTINEL}-ID"
        ds.AccessionNumber = f"{SENTINEL}A"
        ds.StudyID = f"{SENTINEL}S"
        ds.StudyDate = "20261127"
        ds.InstitutionName = f"{SENTINEL} hospital"
        ds.OperatorsName = f"{SENTINEL}^OPERATOR"
        ds.StudyDescription = f"{SENTINEL} study"
        ds.ContainerIdentifier = f"{SENTINEL}-SLIDE"
        ds.DeviceSerialNumber = f"{SENTINEL}-SN"
        item = ds.SpecimenDescriptionSequence[0]
        item.SpecimenIdentifier = f"{SENTINEL}-SPEC"
        item.SpecimenShortDescription = f"{SENTINEL} biopsy"
        block = ds.private_block(0x0099, "SCANNER VENDOR", create=True)
        block.add_new(0x01, "LO", f"{SENTINEL} private")
        ds.save_as(folder / path.name, enforce_file_format=True)
    return folder


def test_dicom_copy_has_only_volumes_and_the_basic_profile(tmp_path):
    src = _dicom_with_phi(tmp_path)
    originals = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in src.iterdir()}
    out = tmp_path / "out"
    report = deidentify_slide(src, out)
    assert report.format == "dicom" and report.levels_kept == 5
    assert sorted(report.dropped) == ["label", "overview", "thumbnail"]
    files = sorted(out.iterdir())
    assert [p.name for p in files] == [f"{i}.dcm" for i in range(5)]
    series, studies, sop = set(), set(), set()
    for path in files:
        assert SENTINEL.encode() not in path.read_bytes()
        assert b"20261127" not in path.read_bytes()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert "VOLUME" in ds.ImageType
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.DeidentificationMethodCodeSequence[0].CodingSchemeDesignator == "DCM"
        assert str(ds.PatientName) == "" and ds.PatientID == "" and ds.AccessionNumber == ""
        assert ds.ContainerIdentifier != f"{SENTINEL}-SLIDE"
        assert "InstitutionName" not in ds and "StudyDescription" not in ds and "OperatorsName" not in ds
        assert not any(elem.tag.is_private for elem in ds.iterall())
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        series.add(ds.SeriesInstanceUID)
        studies.add(ds.StudyInstanceUID)
        sop.add(ds.SOPInstanceUID)
        assert ds.SeriesInstanceUID.startswith("2.25.")
    assert len(series) == 1 and not series & originals and len(studies) == 1 and len(sop) == 5
    # Pixel identity at every level; levels 1-3 of this DICOM have edge tiles that OpenSlide
    # cannot decode in the input either, so compare the tiles it can.
    volume = max(shared_file("dicom/cmu-1-small-region-lossless").iterdir(), key=lambda p: p.stat().st_size)
    with openslide.OpenSlide(volume) as a, openslide.OpenSlide(files[0]) as b:
        assert b.properties["openslide.vendor"] == "dicom"
        assert b.level_dimensions == a.level_dimensions and b.level_count == 5
        assert b.properties["openslide.mpp-x"] == a.properties["openslide.mpp-x"]
        assert dict(b.associated_images) == {}
        for level in range(a.level_count):
            down = a.level_downsamples[level]
            for col, row in [(0, 0), (1, 1)] if level < 3 else [(0, 0)]:
                loc, size = (int(col * 240 * down), int(row * 240 * down)), (min(240, a.level_dimensions[level][0]), 120)
                assert np.array_equal(np.asarray(a.read_region(loc, level, size)), np.asarray(b.read_region(loc, level, size)))


@pytest.mark.slow
def test_dicom_uid_remap_is_consistent_and_a_single_instance_selects_its_series(tmp_path):
    src = shared_file("dicom/cmu-1-small-region-lossless")
    first = deidentify_slide(src, tmp_path / "a")
    volume = max(src.iterdir(), key=lambda p: p.stat().st_size)
    second = deidentify_slide(volume, tmp_path / "b")
    assert first.levels_kept == second.levels_kept == 5
    uid_a = pydicom.dcmread(tmp_path / "a" / "0.dcm", stop_before_pixels=True).SeriesInstanceUID
    uid_b = pydicom.dcmread(tmp_path / "b" / "0.dcm", stop_before_pixels=True).SeriesInstanceUID
    assert uid_a == uid_b  # same site secret, same input UID -> same pseudonymous UID


def test_dicom_fails_closed_on_stray_files_and_label_in_image(tmp_path):
    src = shared_file("dicom/cmu-1-small-region-lossless")
    folder = tmp_path / "in"
    shutil.copytree(src, folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    (folder / "notes.txt").write_text("patient notes")
    with pytest.raises(DeidentificationError, match="not DICOM"):
        deidentify_slide(folder, tmp_path / "out")
    (folder / "notes.txt").unlink()
    volume = max(folder.iterdir(), key=lambda p: p.stat().st_size)
    ds = pydicom.dcmread(volume)
    ds.SpecimenLabelInImage = "YES"
    ds.save_as(volume, enforce_file_format=True)
    with pytest.raises(DeidentificationError, match="label"):
        deidentify_slide(folder, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# ---------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_deid_prints_one_line_without_paths_and_audits(wsiflow_cli, sentinel_svs, tmp_path):
    from privacy import read_audit_log

    out = tmp_path / f"{SENTINEL}-out.svs"
    result = _run(wsiflow_cli, "deid", sentinel_svs, out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "dropped thumbnail, label, macro" in result.stdout
    assert SENTINEL not in result.stdout + result.stderr
    assert SENTINEL.encode() not in out.read_bytes()
    expected_id = slide_id(content_digest(sentinel_svs), site_secret())
    assert expected_id in result.stdout
    record = read_audit_log()[-1]
    assert record["action"] == "deid" and record["slide_id"] == expected_id and record["outcome"] == "ok"

    again = _run(wsiflow_cli, "deid", "--json", sentinel_svs, out)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.count("\n") == 1 and "already exists" in again.stderr and SENTINEL not in again.stderr
    replaced = _run(wsiflow_cli, "deid", "--json", "--overwrite", sentinel_svs, out)
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(replaced.stdout)["levels_kept"] == 3


def test_cli_deid_refuses_an_unsupported_format_in_one_line(wsiflow_cli, tmp_path):
    src = shared_file("bad/unopenable-unknown-compression.tiff")
    result = _run(wsiflow_cli, "deid", src, tmp_path / "out.tiff")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "unsupported" in result.stderr and "deid supports" in result.stderr
    assert src.name not in result.stderr and str(tmp_path) not in result.stderr
    assert list(tmp_path.iterdir()) == []
