"""One settings path (defaults < config < command line) for run, batch and serve.

Each drift the restructure (issue 11) fixed has a test here that failed before it:
the config's grid stride ignored by run, serve dropping mpp_overrides, batch's
--no-isolate ignored, "tissue-qc" hard-coded, --mpp overriding valid metadata, and a
rerun with other parameters replacing the earlier result.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from flows import parse_config
from flows.cli import build_parser
from flows.cli._options import settings_from_options
from models import Registry
from pipeline import (
    ConfigError,
    GridSettings,
    MppOverride,
    MppPolicy,
    ResultFolder,
    RunSettings,
)
from privacy import read_audit_log
from tests._models import add_tiny_model

_CONFIG = {
    "grid": {"stride_px": 48, "min_tissue_fraction": 0.1},
    "engine": {"batch_size": 7, "readers": 3},
    "analysis": {"chunk_cells": 5},
    "isolate": True,
    "mpp_overrides": [{"label": "scanner-x", "vendor": "aperio", "mpp": 0.5}],
    "models": {"default": "tiny"},
    "dask": {"address": "tcp://127.0.0.1:1"},
}


def _settings(*argv: str, config: dict | None = None) -> RunSettings:
    args = build_parser().parse_args(list(argv))
    return settings_from_options(parse_config(config if config is not None else _CONFIG), args)


@pytest.mark.parametrize("command", [
    ["run", "s.svs", "--out", "o"],
    ["batch", "s.svs", "--out", "o"],
    ["serve", "--inbox", "i", "--out", "o"],
])
def test_every_command_takes_its_settings_from_the_config(command):
    settings = _settings(*command)
    assert settings.model == "tiny"  # the default model comes from the config, not a constant
    assert settings.analysis.grid.stride_px == 48 and settings.analysis.grid.min_tissue_fraction == 0.1
    assert (settings.engine.batch_size, settings.engine.readers) == (7, 3)
    assert settings.analysis.chunk_cells == 5
    assert [o.label for o in settings.mpp.overrides] == ["scanner-x"]  # serve used to drop these
    assert settings.dask_address == "tcp://127.0.0.1:1"
    assert settings.isolate


@pytest.mark.parametrize("command", [["run", "s.svs", "--out", "o"], ["batch", "s.svs", "--out", "o"],
                                     ["serve", "--inbox", "i", "--out", "o"]])
def test_the_command_line_overrides_the_config(command):
    settings = _settings(*command, "--stride", "32", "--batch-size", "9", "--readers", "1", "--chunk-cells", "2",
                         "--model", "other@2", "--mpp", "0.3", "--mpp-force", "--no-isolate", "--device", "cpu",
                         "--dask-address", "tcp://127.0.0.1:2", "--edge", "drop")
    assert settings.model == "other@2"
    assert settings.analysis.grid.stride_px == 32 and settings.analysis.grid.edge == "drop"
    assert settings.analysis.grid.min_tissue_fraction == 0.1  # not given: the config's
    assert (settings.engine.batch_size, settings.engine.readers, settings.engine.device) == (9, 1, "cpu")
    assert settings.analysis.chunk_cells == 2
    assert settings.mpp.cli_mpp == (0.3, 0.3) and settings.mpp.force
    assert not settings.isolate  # batch used to accept --no-isolate and ignore it
    assert settings.dask_address == "tcp://127.0.0.1:2"


def test_built_in_defaults_when_there_is_no_config():
    settings = _settings("run", "s.svs", "--out", "o", config={})
    assert settings.model == "tissue-qc"
    assert settings.analysis.grid == GridSettings()
    assert settings.isolate and settings.dask_address is None and not settings.mpp.force


def test_run_settings_survive_json():
    settings = _settings("run", "s.svs", "--out", "o", "--mpp", "0.3,0.31", "--overview-class", "pen")
    settings = RunSettings(**{**settings.__dict__, "mpp": MppPolicy(
        cli_mpp=(0.3, 0.31), overrides=(MppOverride(0.5, 0.5, "f", folder=Path("/data/old"), force=True),))})
    data = json.loads(json.dumps(settings.to_json()))
    assert RunSettings.from_json(data) == settings


@pytest.mark.parametrize(("change", "match"), [
    ({"engine": {"device": "tpu"}}, "tpu"),
    ({"analysis": {"chunk_cells": 0}}, "chunk_cells"),
    ({"grid": {"stride_px": "112"}}, "stride_px"),
    ({"grid": {"edge": "crop"}}, "crop"),
])
def test_bad_settings_in_json_or_config_name_the_key(change, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(change)


def test_mpp_force_without_mpp_is_refused():
    with pytest.raises(ConfigError, match="--mpp-force"):
        _settings("run", "s.svs", "--out", "o", "--mpp-force")


def test_a_config_tile_size_that_is_not_the_models_is_refused():
    from pipeline import Preprocessing

    prep = Preprocessing(224, 1.0, (0.5,) * 3, (0.25,) * 3)
    assert GridSettings(stride_px=112).spec(prep).tile_size_px == 224
    with pytest.raises(ConfigError, match="takes 224 px tiles"):
        GridSettings(tile_size_px=256).spec(prep, "tissue-qc@1")
    with pytest.raises(ConfigError, match="µm/px"):
        GridSettings(target_mpp=0.5).spec(prep, "tissue-qc@1")


# --- end to end, with a tiny model so each run takes seconds ----------------------------

@pytest.fixture
def tiny_site(tmp_path):
    root = tmp_path / "site-models"
    add_tiny_model(Registry(site_root=root))
    config = tmp_path / "site.yaml"
    config.write_text(f"models: {{registry_dir: {root}, default: tiny}}\ngrid: {{stride_px: 32}}\n")
    return config


def _run(cli: list[str], *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, timeout=600, env=os.environ.copy())


def _document(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_run_uses_the_configs_stride_and_default_model(wsiflow_cli, cmu_svs, tiny_site, tmp_path):
    row = _document(_run(wsiflow_cli, "--config", tiny_site, "run", cmu_svs, "--out", tmp_path / "o",
                         "--json", "--no-isolate"))["slides"][0]
    assert row["model"] == "tiny@1"
    summary = ResultFolder(Path(row["result_dir"])).read_summary()
    assert summary.data["provenance"]["parameters"]["grid"]["stride_px"] == 32
    assert summary.data["grid"]["stride_um"] == 32 * 4.0  # the tiny model reads at 4 µm/px


@pytest.mark.slow
def test_mpp_never_overrides_valid_metadata_unless_forced(wsiflow_cli, cmu_svs, tiny_site, tmp_path):
    out = tmp_path / "o"
    common = ("--config", tiny_site, "run", cmu_svs, "--out", out, "--no-isolate")
    plain = _document(_run(wsiflow_cli, *common, "--json"))["slides"][0]
    asked = _run(wsiflow_cli, *common, "--mpp", "0.25")
    assert asked.returncode == 0, asked.stderr
    assert "--mpp not applied" in asked.stdout and "--mpp-force" in asked.stdout
    asked_row = _document(_run(wsiflow_cli, *common, "--mpp", "0.25", "--json"))["slides"][0]
    assert asked_row["mpp"]["source"] == "metadata" and asked_row["mpp"]["mpp_x"] == 0.499
    assert asked_row["mpp"]["declined"] == "--mpp"
    assert asked_row["result_dir"] == plain["result_dir"] and asked_row["status"] == "reused"

    forced = _document(_run(wsiflow_cli, *common, "--mpp", "0.25", "--mpp-force", "--json"))["slides"][0]
    assert forced["mpp"] == {"mpp_x": 0.25, "mpp_y": 0.25, "source": "cli", "metadata_mpp_x": 0.499,
                             "metadata_mpp_y": 0.499, "override": "--mpp-force", "declined": None}
    # A forced scale is another result, beside the first: nothing is replaced.
    assert forced["result_dir"] != plain["result_dir"]
    assert ResultFolder(Path(plain["result_dir"])).is_complete()
    assert ResultFolder(Path(forced["result_dir"])).read_summary().mpp.override == "--mpp-force"
    latest = ResultFolder.latest(out, forced["slide_id"], "tiny")
    assert latest.path.resolve() == Path(forced["result_dir"]).resolve()
    overrides = [r for r in read_audit_log() if r["action"] == "mpp-override" and r["slide_id"] == forced["slide_id"]]
    assert [r["outcome"] for r in overrides] == ["--mpp-force"]  # the declined --mpp is no override


@pytest.mark.slow
def test_two_strides_keep_both_results(wsiflow_cli, cmu_svs, tiny_site, tmp_path):
    out = tmp_path / "o"
    first = _document(_run(wsiflow_cli, "--config", tiny_site, "run", cmu_svs, "--out", out, "--json",
                           "--no-isolate"))["slides"][0]
    second = _document(_run(wsiflow_cli, "--config", tiny_site, "run", cmu_svs, "--out", out, "--stride", "64",
                            "--json", "--no-isolate"))["slides"][0]
    assert first["status"] == second["status"] == "done"
    assert first["result_dir"] != second["result_dir"]
    strides = {ResultFolder(Path(r["result_dir"])).read_summary().data["grid"]["stride_um"] for r in (first, second)}
    assert strides == {32 * 4.0, 64 * 4.0}
    again = _document(_run(wsiflow_cli, "--config", tiny_site, "run", cmu_svs, "--out", out, "--json",
                           "--no-isolate"))["slides"][0]
    assert again["status"] == "reused" and again["result_dir"] == first["result_dir"]


@pytest.mark.slow
def test_bad_grid_options_are_refused_before_any_slide(wsiflow_cli, cmu_svs, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("grid: {tile_size_px: 256}\n")
    result = _run(wsiflow_cli, "--config", config, "run", cmu_svs, "--out", tmp_path / "o")
    assert result.returncode == 2 and "tile_size_px = 256" in result.stderr
    assert not (tmp_path / "o").exists()
    zero = _run(wsiflow_cli, "run", cmu_svs, "--out", tmp_path / "o", "--stride", "0")
    assert zero.returncode == 2 and "--stride" in zero.stderr


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_out_must_be_a_folder(tmp_path, where):
    existing = tmp_path / "results.txt"
    existing.write_text("x")
    out = existing if where == "file" else existing / "sub"
    with pytest.raises(ConfigError, match="--out"):
        _settings("run", "s.svs", "--out", str(out), config={})


@pytest.mark.parametrize("address", ["localhost:8786", "http://127.0.0.1:8786", "not a url"])
def test_a_dask_address_must_be_a_scheduler_url(address):
    with pytest.raises(ConfigError, match="scheduler URL"):
        _settings("run", "s.svs", "--out", "o", "--dask-address", address, config={})
    with pytest.raises(ConfigError, match="scheduler URL"):
        _settings("run", "s.svs", "--out", "o", config={"dask": {"address": address}})
    assert _settings("run", "s.svs", "--out", "o", "--dask-address", "tcp://10.0.0.5:8786",
                     config={}).dask_address == "tcp://10.0.0.5:8786"


def test_a_binary_config_file_is_a_config_error(tmp_path):
    from flows import load_config

    binary = tmp_path / "c.yaml"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="not text"):
        load_config(binary)


@pytest.mark.slow
def test_bad_out_and_config_exit_2_without_a_traceback(wsiflow_cli, cmu_svs, tmp_path):
    existing = tmp_path / "file"
    existing.write_text("x")
    binary = tmp_path / "c.yaml"
    binary.write_bytes(bytes(range(256)))
    for args in (("run", cmu_svs, "--out", existing), ("--config", binary, "run", cmu_svs, "--out", tmp_path / "o"),
                 ("run", cmu_svs, "--out", tmp_path / "o", "--dask-address", "localhost:1")):
        result = _run(wsiflow_cli, *args)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.startswith("wsiflow: error config:")
