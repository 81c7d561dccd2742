"""Slide arguments -> slide paths (``pipeline.expand_slide_arguments``) and DICOM-WSI folders by content."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from pipeline import ConfigError, expand_slide_arguments, is_dicom_folder
from tests.conftest import shared_file

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def _dicom(path: Path, sop_class: str = WSI_SOP_CLASS) -> Path:
    """A tiny DICOM Part 10 file (preamble + DICM, header only) of the given SOP class."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SM" if sop_class == WSI_SOP_CLASS else "CT"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _file(path: Path, data: bytes = b"not opened by discovery") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _expand(*arguments: object) -> list[Path]:
    return expand_slide_arguments([str(a) for a in arguments])


def test_a_slide_file_is_itself_whatever_its_suffix(tmp_path):
    svs = _file(tmp_path / "a.svs")
    odd = _file(tmp_path / "scan.unknown-suffix")
    assert _expand(svs, odd) == [svs, odd]


def test_a_missing_path_is_kept_for_the_analysis_to_report(tmp_path):
    missing = tmp_path / "gone.svs"
    assert _expand(missing) == [missing]
    assert _expand(tmp_path / "gone-folder") == [tmp_path / "gone-folder"]


def test_a_folder_of_slides_gives_its_slides_sorted_one_level(tmp_path):
    folder = tmp_path / "slides"
    b = _file(folder / "b.SVS")
    a = _file(folder / "a.ndpi")
    c = _file(folder / "c.tiff")
    _file(folder / ".hidden.svs")
    _file(folder / "notes.txt")
    _file(folder / "nested" / "deep.svs")  # not a DICOM folder: not searched
    dicom_slide = folder / "d-dicom"
    _dicom(dicom_slide / "level0")  # no suffix: recognised by content
    _dicom(folder / ".hidden-dicom" / "x.dcm")
    assert _expand(folder) == [a, b, c, dicom_slide]


def test_a_dicom_folder_is_one_slide_by_content_without_suffixes(tmp_path):
    folder = tmp_path / "series"
    _dicom(folder / "1")
    _dicom(folder / "2")
    _file(folder / "DICOMDIR.txt")
    assert is_dicom_folder(folder)
    assert _expand(folder) == [folder]


def test_dicom_files_of_another_sop_class_are_not_a_slide(tmp_path):
    folder = tmp_path / "ct"
    _dicom(folder / "1.dcm", CT_SOP_CLASS)
    _file(folder / "2.dcm", b"\0" * 128 + b"DICM" + b"\xff" * 16)  # damaged header
    _file(folder / "3.dcm", b"short")
    assert not is_dicom_folder(folder)
    assert _expand(folder) == []
    assert not is_dicom_folder(tmp_path / "missing")
    assert not is_dicom_folder(_file(tmp_path / "file.dcm"))


def test_a_stray_dcm_among_svs_slides_is_not_taken_as_the_slide(tmp_path, caplog):
    folder = tmp_path / "svs-folder"
    svs = [_file(folder / f"{name}.svs") for name in ("c", "a", "b")]
    _dicom(folder / "stray.dcm")  # even a real WSI instance: the folder holds other slides
    assert not is_dicom_folder(folder)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        found = _expand(folder)
    assert found == sorted(svs)
    assert any("skipped 1 .dcm file" in r.getMessage() for r in caplog.records)
    assert all(str(tmp_path) not in r.getMessage() for r in caplog.records)


def test_a_quoted_glob_is_expanded_sorted_by_the_same_rules(tmp_path):
    one = _file(tmp_path / "run" / "s1.svs")
    two = _file(tmp_path / "run" / "s2.svs")
    _file(tmp_path / "run" / "s2.txt")
    dicom = tmp_path / "run" / "s3"
    _dicom(dicom / "a.dcm")
    sub = tmp_path / "run" / "s4"
    sub_slide = _file(sub / "x.mrxs")
    assert _expand(tmp_path / "run" / "s*.svs") == [one, two]
    assert _expand(tmp_path / "run" / "s?") == [dicom, sub_slide]
    assert _expand(tmp_path / "run" / "*.nothing") == []


def test_a_literal_name_with_glob_characters_is_not_a_pattern(tmp_path):
    odd = _file(tmp_path / "case[1].svs")
    _file(tmp_path / "case1.svs")
    assert _expand(odd) == [odd]


def test_duplicates_are_removed_and_first_appearance_order_kept(tmp_path, monkeypatch):
    folder = tmp_path / "f"
    a, b, c = (_file(folder / f"{n}.svs") for n in "abc")
    monkeypatch.chdir(tmp_path)
    found = expand_slide_arguments(["f/c.svs", str(folder), "f/*.svs", "./f/a.svs", str(b), "f/../f/c.svs"])
    assert found == [Path("f/c.svs"), a, b]
    assert [os.path.abspath(p) for p in found] == [str(c), str(a), str(b)]


def test_one_string_is_refused():
    with pytest.raises(TypeError):
        expand_slide_arguments("a.svs")


def test_the_shared_dicom_wsi_folders_are_slides():
    lossless = shared_file("dicom/cmu-1-small-region-lossless")
    dicom_root = lossless.parent
    folders = sorted(p for p in dicom_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert all(is_dicom_folder(p) for p in folders)
    assert _expand(dicom_root) == folders
    assert _expand(lossless) == [lossless]
    assert _expand(dicom_root / "cmu-*") == [p for p in folders if p.name.startswith("cmu-")]


def test_the_shared_bad_folder_is_a_folder_of_slides_not_one_dicom_slide():
    bad = shared_file("bad/not-a-tiff.svs").parent
    assert not is_dicom_folder(bad)
    assert _expand(bad) == sorted(p for p in bad.iterdir() if p.suffix in {".svs", ".tiff"})


def test_the_shared_svs_with_a_copied_dicom_instance(tmp_path):
    svs = shared_file("slides/CMU-1-Small-Region.svs")
    instance = next(iter(sorted(shared_file("dicom/cmu-1-small-region-lossless").iterdir())))
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(svs, folder / svs.name)
    shutil.copy(instance, folder / "stray.dcm")
    assert not is_dicom_folder(folder)
    assert _expand(folder) == [folder / svs.name]


def _links(folder: Path) -> tuple[Path, Path, Path]:
    """A folder holding a slide, a broken link and a link loop (in that sorted order)."""
    slide = _file(folder / "a-good.svs")
    broken = folder / "b-patient-smith.svs"
    broken.symlink_to(folder / "moved-away.svs")
    loop = folder / "c-patient-jones.svs"
    loop.symlink_to(loop)
    (folder / "d-notes.txt").symlink_to(folder / "gone.txt")  # not a slide by its name: ignored
    return slide, broken, loop


def test_broken_links_in_a_folder_are_reported_by_position_never_silently(tmp_path, caplog):
    slide, _, _ = _links(tmp_path / "scans")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert _expand(tmp_path / "scans") == [slide]  # the inbox cannot fingerprint them: skipped
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "slide argument 1 (a folder), entry 2 of 4: a broken link" in messages[0]
    assert "entry 3 of 4: a link loop" in messages[1]
    assert not any("patient" in m or str(tmp_path) in m for m in messages)


def test_commands_keep_broken_links_in_place_to_report_them_as_failed_slides(tmp_path):
    slide, broken, loop = _links(tmp_path / "scans")
    assert expand_slide_arguments([str(tmp_path / "scans")], keep_broken_links=True) == [slide, broken, loop]


def test_commands_refuse_a_missing_argument_by_position_before_anything_runs(tmp_path):
    slide = _file(tmp_path / "a.svs")
    broken = tmp_path / "patient-smith.svs"
    broken.symlink_to(tmp_path / "gone.svs")
    arguments = [str(slide), str(tmp_path / "patient-jones.svs"), str(tmp_path / "*.nothing"), str(broken)]
    with pytest.raises(ConfigError) as refused:
        expand_slide_arguments(arguments, refuse_missing=True)
    message = str(refused.value)
    assert "slide argument 2 of 4 does not exist; slide argument 4 of 4 is a broken link" in message
    assert "patient" not in message and str(tmp_path) not in message  # a glob that matches nothing is no error
    assert expand_slide_arguments(arguments) == [slide, tmp_path / "patient-jones.svs", broken]  # the default


def _permissions_apply(tmp_path: Path) -> list[str]:
    """A command prefix under which file permissions hold: none for a normal user; for root,
    root without its permission-bypass capabilities (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH).
    User nobody would do too, but cannot start this Python when it lives under /root."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): permission errors cannot be produced")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    locked = _file(tmp_path / "probe" / "locked")
    locked.chmod(0)
    import subprocess

    probe = subprocess.run([*prefix, "cat", str(locked)], capture_output=True, timeout=30)
    if probe.returncode == 0:
        pytest.skip("dropping root's capabilities does not make permissions apply here")
    return prefix


def test_arguments_the_os_refuses_are_one_line_errors_by_position(tmp_path):
    """Issue 14, item 6: a file in a folder this user may not search, a glob into it and
    such a folder as an argument were tracebacks naming the path; now one ConfigError names
    each argument's position and the reason. An unreadable folder stays a slide (the
    command reports it as permission denied)."""
    import json
    import subprocess
    import sys

    prefix = _permissions_apply(tmp_path)
    secret = "ZQXPATIENTSECRET"
    unsearchable = tmp_path / f"{secret}-unsearchable"
    inside = _file(unsearchable / f"{secret}.svs")
    unreadable = tmp_path / f"{secret}-unreadable"
    _file(unreadable / f"{secret}-2.svs")
    readable = _file(tmp_path / "ok" / "a.svs")
    unsearchable.chmod(0o644)  # may be listed, not entered
    unreadable.chmod(0)
    cases = {
        "file": [str(readable), str(inside)],
        "glob": [str(unsearchable / "*.svs")],
        "folder": [str(unsearchable), str(readable)],
        "missing-inside": [str(unsearchable / "other.svs")],
        "unreadable": [str(unreadable)],
    }
    script = (
        "import json, sys\n"
        "from pipeline import ConfigError, expand_slide_arguments\n"
        "out = {}\n"
        "for name, (arguments, refuse) in json.loads(sys.argv[1]).items():\n"
        "    try:\n"
        "        out[name] = [str(p) for p in expand_slide_arguments(arguments, refuse_missing=refuse)]\n"
        "    except ConfigError as exc:\n"
        "        out[name] = exc.one_line()\n"
        "print(json.dumps(out))\n"
    )
    runs = {f"{name}/{refuse}": (arguments, refuse) for name, arguments in cases.items() for refuse in (False, True)}
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", script, json.dumps(runs)], capture_output=True,
                              text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    finally:
        unsearchable.chmod(0o755)
        unreadable.chmod(0o755)
    assert done.returncode == 0, done.stderr[-3000:]
    assert secret not in done.stderr
    out = json.loads(done.stdout)
    reached = "cannot be reached: permission denied (on it or on a folder of its path); nothing was run"
    for refuse in (False, True):
        assert out[f"file/{refuse}"].startswith(f"config: slide argument 2 of 2 {reached}")
        assert out[f"glob/{refuse}"].startswith(f"config: the slide argument {reached}")
        assert out[f"folder/{refuse}"].startswith(f"config: slide argument 1 of 2 {reached}")
        assert out[f"missing-inside/{refuse}"].startswith(f"config: the slide argument {reached}")
        assert "search access" in out[f"file/{refuse}"]
        assert out[f"unreadable/{refuse}"] == [str(unreadable)]  # the command reports it as a failed slide
    for name, value in out.items():
        if isinstance(value, str):
            assert secret not in value and str(tmp_path) not in value, (name, value)


def test_other_os_refusals_of_an_argument_are_one_line_errors(tmp_path):
    """Issue 14, item 6, beyond permissions: a name too long for the file system (as a file,
    inside a folder argument's path and as a glob) is one ConfigError by position, without the
    name; a path through a file is a missing slide, refused or kept like any other."""
    secret = "ZQXPATIENTSECRET"
    readable = _file(tmp_path / "ok" / "a.svs")
    too_long = tmp_path / (secret + "x" * 300)  # ENAMETOOLONG, not ENOENT
    for refuse in (False, True):
        with pytest.raises(ConfigError) as refused:
            expand_slide_arguments([str(readable), str(too_long / "a.svs")], refuse_missing=refuse)
        line = refused.value.one_line()
        assert line.startswith("config: slide argument 2 of 2 cannot be looked at (file name too long)"), line
        assert secret not in line and str(tmp_path) not in line and "\n" not in line
        with pytest.raises(ConfigError, match="cannot be looked at"):
            expand_slide_arguments([str(too_long) + ".svs"], refuse_missing=refuse)
    assert expand_slide_arguments([str(too_long / "*.svs")]) == []  # a glob into nothing matches nothing
    through_a_file = readable / f"{secret}.svs"  # ENOTDIR
    assert expand_slide_arguments([str(through_a_file)]) == [through_a_file]  # the command reports it, by position
    with pytest.raises(ConfigError) as refused:
        expand_slide_arguments([str(through_a_file)], refuse_missing=True)
    assert "does not exist" in str(refused.value) and secret not in refused.value.one_line()
