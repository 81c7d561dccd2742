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
        "mpp_overrides:\n"
        "  - {label: scanner-b, vendor: hamamatsu, mpp: 0.23, only_if_missing: true}\n"
        "  - {label: old, folder: /archive, mpp_x: 0.5, mpp_y: 0.52}\n"
    )
    monkeypatch.setenv("WSIFLOW_CONFIG", str(path))
    config = load_config()
    assert config.backend == "tiffslide"
    assert (config.grid.tile_size_px, config.grid.target_mpp, config.grid.effective_stride_px) == (256, 0.5, 128)
    assert config.tissue.mask_mpp == 4
    first, second = config.mpp_overrides
    assert (first.label, first.vendor, first.mpp_x, first.only_if_missing) == ("scanner-b", "hamamatsu", 0.23, True)
    assert (second.folder, second.mpp_x, second.mpp_y) == (Path("/archive"), 0.5, 0.52)


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
