"""Library error text is scrubbed before it reaches a wsiflow message (issue 14, item 6):
the slide's path and name, its DICOM folder's instance names, other paths, DICOM UIDs."""

from __future__ import annotations

from pipeline._backend import _scrub

SENTINEL = "ZQXSENTINEL7"


def test_instance_names_paths_and_uids_are_removed(tmp_path):
    folder = tmp_path / f"case-{SENTINEL}"
    folder.mkdir()
    for name in (f"{SENTINEL}-6.dcm", "a1.dcm"):
        (folder / name).write_bytes(b"")
    message = (f"Reading {folder}/{SENTINEL}-6.dcm: Slide contains unexpected image "
               "(1.2.840.113619.2.55.3.604688119 vs 1.2.826.0.1.3680043.8.498.1)")
    for given in (folder, folder / "a1.dcm"):
        scrubbed = _scrub(message, given)
        assert SENTINEL not in scrubbed and str(tmp_path) not in scrubbed
        assert "1.2.840" not in scrubbed and "<uid>" in scrubbed
    # A sibling's name alone, as OpenSlide quotes it relative to the folder.
    assert SENTINEL not in _scrub(f"cannot read {SENTINEL}-6.dcm", folder)


def test_ordinary_library_text_is_kept():
    assert _scrub("TIFFReadDirectory: Bogus marker length", __import__("pathlib").Path("/x/y.svs")) == (
        "TIFFReadDirectory: Bogus marker length")
