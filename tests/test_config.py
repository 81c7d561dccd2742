from pathlib import Path

import pytest
import yaml

from flows import WsiflowConfig, default_config_text, load_config, parse_config
from pipeline import ConfigError


def test_shipped_default_yaml_equals_built_in_defaults():
    assert parse_config(yaml.safe_load(default_config_text())) == WsiflowConfig()


def test_no_config_gives_defaults(monkeypatch):
    monkeypatch.delenv("WSIFLOW_CONFIG", raising=False)
    assert load_config() == WsiflowConfig()


def test_env_var_and_overrides(tmp_path, monkeypatch):
    path = tmp_path / "site.yaml"
    path.write_text(
        "backend: tiffslide\n"
        "grid: {tile_size_px: 256, target_mpp: 0.5, stride_px: 128}\n"
        "tissue: {mask_mpp: 4}\n"
        "analysis: {chunk_cells: 16, hotspots: 3}\n"
        "engine: {batch_size: 8}\n"
        "models: {default: other-model@2, registry_dir: /srv/models}\n"
        "dask: {address: 'tcp://10.0.0.1:8786'}\n"
        "isolate: false\n"
        "mpp_overrides:\n"
        "  - {label: scanner-b, vendor: hamamatsu, mpp: 0.23, force: true}\n"
        "  - {label: old, folder: /archive, mpp_x: 0.5, mpp_y: 0.52}\n"
    )
    monkeypatch.setenv("WSIFLOW_CONFIG", str(path))
    config = load_config()
    assert config.backend == "tiffslide"
    assert (config.grid.tile_size_px, config.grid.target_mpp, config.grid.stride_px) == (256, 0.5, 128)
    assert config.tissue.mask_mpp == 4
    assert (config.analysis.chunk_cells, config.analysis.hotspots) == (16, 3)
    assert config.engine.batch_size == 8
    assert (config.models.default, config.models.registry_dir) == ("other-model@2", Path("/srv/models"))
    assert config.dask.address == "tcp://10.0.0.1:8786" and config.isolate is False
    first, second = config.mpp_overrides
    assert (first.label, first.vendor, first.mpp_x, first.force) == ("scanner-b", "hamamatsu", 0.23, True)
    assert (second.folder, second.mpp_x, second.mpp_y, second.force) == (Path("/archive"), 0.5, 0.52, False)


def test_only_if_missing_is_refused_by_name():
    """The old key had the opposite default; silently ignoring it would change which slides it hits."""
    for value in ("true", "false"):
        with pytest.raises(ConfigError, match="only_if_missing") as info:
            parse_config(yaml.safe_load(f"mpp_overrides: [{{label: a, vendor: aperio, mpp: 0.25, only_if_missing: {value}}}]"))
        assert "force" in info.value.one_line()


def test_override_force_must_be_a_boolean():
    with pytest.raises(ConfigError, match="force"):
        parse_config(yaml.safe_load("mpp_overrides: [{label: a, vendor: aperio, mpp: 0.25, force: maybe}]"))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("grid: {tile_sise_px: 3}", "tile_sise_px"),
        ("colour: red", "colour"),
        ("backend: pillow", "pillow"),
        ("grid: {tile_size_px: -4}", "tile_size_px"),
        ("mpp_overrides: [{label: x, vendor: aperio}]", "numeric mpp"),
        ("mpp_overrides: [{label: x, mpp: 0.25}]", "matches nothing"),
        ("mpp_overrides: [{label: x, vendor: a, mpp: 900}]", "plausible"),
        ("mpp_overrides: [{label: x, vendor: a, mpp: 0.25, only_if_missing: true}]", "only_if_missing"),
        ("mpp_overrides: [{label: x, vendor: a, mpp: 0.25, colour: red}]", "colour"),
        ("analysis: {chunk_cells: 0}", "chunk_cells"),
        ("engine: {device: tpu}", "tpu"),
        ("- just a list", "mapping"),
        ("grid: [1, 2]", "mapping"),
        ("grid: {tile_size_px: 224", "YAML"),
    ],
)
def test_bad_configs_name_the_bad_value(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/wsiflow.yaml")
