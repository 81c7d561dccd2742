"""``wsiflow inspect`` as a user runs it: a real subprocess of the installed script."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import shared_file

JSON_KEYS = {"width", "height", "mpp_x", "mpp_y", "levels", "backend", "tissue_fraction", "tissue_area_mm2", "error"}
# Free-text fields of the CMU slide's ImageDescription that could carry patient data.
PHI_SNIPPETS = ["CMU-1", "b414003d", "12/29/09", "09:59:15", "CPAPERIOCS", "Filename", "ScanScope"]


def _run(cli, *args, env=None):
    return subprocess.run(
        [*cli, *map(str, args)], capture_output=True, text=True, timeout=120, env=env
    )


def test_json_contract_on_the_real_slide(wsiflow_cli, cmu_svs):
    result = _run(wsiflow_cli, "inspect", "--json", cmu_svs)
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads(result.stdout)
    assert JSON_KEYS <= entry.keys()
    assert (entry["width"], entry["height"], entry["levels"]) == (2220, 2967, 1)
    assert entry["mpp_x"] == pytest.approx(0.499) and entry["mpp_y"] == pytest.approx(0.499)
    assert entry["backend"] == "openslide" and entry["vendor"] == "aperio"
    assert entry["objective_power"] == 20
    assert 0.25 < entry["tissue_fraction"] < 0.6
    assert 0.3 < entry["tissue_area_mm2"] < 1.0
    assert entry["error"] is None and entry["mpp_source"] == "metadata"
    assert entry["tiles"] > 0 and entry["tile_size_px"] == 224
    for snippet in PHI_SNIPPETS + [cmu_svs.name, str(cmu_svs.parent)]:
        assert snippet not in result.stdout + result.stderr, snippet


@pytest.mark.slow
def test_human_output_lists_every_fact(wsiflow_cli, cmu_svs):
    result = _run(wsiflow_cli, "inspect", cmu_svs, "--tile-size", "112", "--target-mpp", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ["2220 x 2967 px", "1 level", "0.499 x 0.499 µm/px (slide metadata)", "objective 20x", "vendor aperio", "backend openslide", "stored tiles 240x240", "mm²", "112 px at 2 µm/px", "tiles kept"]:
        assert expected in out, expected
    assert cmu_svs.name not in out
    shown = _run(wsiflow_cli, "inspect", "--show-paths", cmu_svs)
    assert str(cmu_svs) in shown.stdout


@pytest.mark.slow
def test_missing_mpp_then_override(wsiflow_cli):
    path = shared_file("slides/TCGA-CR-7395-crop-jp2k-no-mpp.svs")
    refused = _run(wsiflow_cli, "inspect", "--json", path)
    assert refused.returncode == 1
    (entry,) = json.loads(refused.stdout)
    assert entry["error"]["kind"] == "missing-mpp"
    assert (entry["width"], entry["height"]) == (4443, 3567)  # geometry is still reported
    assert refused.stderr.count("\n") == 1 and "missing-mpp" in refused.stderr and "--mpp" in refused.stderr
    assert "Traceback" not in refused.stderr
    accepted = _run(wsiflow_cli, "inspect", "--json", "--mpp", "0.25", path)
    assert accepted.returncode == 0, accepted.stderr
    (entry,) = json.loads(accepted.stdout)
    assert (entry["mpp_x"], entry["mpp_source"], entry["mpp_override"], entry["metadata_mpp_x"]) == (0.25, "cli", "--mpp", None)
    human = _run(wsiflow_cli, "inspect", "--mpp", "0.25", path)
    assert "OVERRIDE --mpp" in human.stdout


def test_mpp_is_not_applied_to_a_slide_with_valid_metadata_unless_forced(wsiflow_cli, cmu_svs):
    kept = _run(wsiflow_cli, "inspect", "--json", "--mpp", "0.25", cmu_svs)
    assert kept.returncode == 0, kept.stderr
    (entry,) = json.loads(kept.stdout)
    assert entry["mpp_x"] == pytest.approx(0.499) and entry["mpp_source"] == "metadata"
    assert entry["mpp_override"] is None and entry["mpp_declined"] == "--mpp"
    human = _run(wsiflow_cli, "inspect", "--mpp", "0.25", cmu_svs)
    assert "(slide metadata)" in human.stdout and "--mpp not applied" in human.stdout
    forced = _run(wsiflow_cli, "inspect", "--json", "--mpp", "0.25", "--mpp-force", cmu_svs)
    assert forced.returncode == 0, forced.stderr
    (entry,) = json.loads(forced.stdout)
    assert (entry["mpp_x"], entry["mpp_source"], entry["mpp_override"]) == (0.25, "cli", "--mpp-force")
    assert entry["metadata_mpp_x"] == pytest.approx(0.499)
    alone = _run(wsiflow_cli, "inspect", "--mpp-force", cmu_svs)
    assert alone.returncode == 2 and "--mpp-force" in alone.stderr


@pytest.mark.slow
def test_one_line_per_bad_file_and_the_good_one_still_reported(wsiflow_cli, cmu_svs):
    bad = [shared_file(f"bad/{name}") for name in ("not-a-tiff.svs", "unopenable-unknown-compression.tiff", "unreadable-corrupt-tile.svs", "incomplete-dicom-frames.dcm")]
    result = _run(wsiflow_cli, "inspect", "--json", *bad, "/nonexistent/slide.svs", cmu_svs)
    assert result.returncode == 1
    entries = json.loads(result.stdout)
    kinds = [e["error"]["kind"] if e["error"] else None for e in entries]
    assert kinds == ["unsupported", "unsupported", "corrupt", "unsupported", "not-found", None]
    assert [e["input_index"] for e in entries] == list(range(6))
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 5 and all(" error " in line for line in lines)
    assert "Traceback" not in result.stderr
    for path in bad:
        assert path.name not in result.stdout + result.stderr


@pytest.mark.slow
def test_debug_shows_the_traceback(wsiflow_cli):
    result = _run(wsiflow_cli, "--debug", "inspect", shared_file("bad/not-a-tiff.svs"))
    assert result.returncode == 1 and "Traceback" in result.stderr


@pytest.mark.slow
def test_bad_config_and_bad_arguments_exit_2(wsiflow_cli, tmp_path, cmu_svs):
    config = tmp_path / "c.yaml"
    config.write_text("grid: {tile_size_px: 0}\n")
    result = _run(wsiflow_cli, "--config", config, "inspect", cmu_svs)
    assert result.returncode == 2 and "config" in result.stderr and "tile_size_px" in result.stderr
    result = _run(wsiflow_cli, "inspect", "--mpp", "abc", cmu_svs)
    assert result.returncode == 2
    result = _run(wsiflow_cli, "inspect", "--mpp", "500", cmu_svs)
    assert result.returncode == 2 and "plausible" in result.stderr


def _without_file_read_override() -> list[str]:
    """A command prefix under which even root obeys file permissions (or skip)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop CAP_DAC_OVERRIDE")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_permission_denied(wsiflow_cli, cmu_svs, tmp_path):
    locked = tmp_path / "locked.svs"
    shutil.copy(cmu_svs, locked)
    os.chmod(locked, 0)
    try:
        result = _run([*_without_file_read_override(), *wsiflow_cli], "inspect", "--json", locked)
        (entry,) = json.loads(result.stdout)
        assert entry["error"]["kind"] == "permission-denied", result.stderr
        assert result.returncode == 1
        assert "permission-denied" in result.stderr and "read access" in result.stderr
    finally:
        os.chmod(locked, 0o600)


@pytest.mark.slow
def test_dicom_folder_and_site_secret_is_private(wsiflow_cli, cmu_svs):
    folder = shared_file("dicom/cmu-1-small-region-lossless")
    result = _run(wsiflow_cli, "inspect", "--json", folder, cmu_svs)
    assert result.returncode == 0, result.stderr
    dicom, svs = json.loads(result.stdout)
    assert (dicom["width"], dicom["height"], dicom["mpp_x"]) == (svs["width"], svs["height"], svs["mpp_x"])
    assert dicom["tissue_fraction"] == pytest.approx(svs["tissue_fraction"], abs=0.01)
    assert dicom["slide_id"] != svs["slide_id"]  # different bytes, different pseudonym
    key = Path(os.environ["WSIFLOW_HOME"]) / "site.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
