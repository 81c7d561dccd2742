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
        ("federation: {serve: {rounds: 0}}", "federation.serve.rounds"),
        ("federation: {serve: {strategy: fedsgd}}", "fedsgd"),
        ("federation: {serve: {strategy: fedprox}}", "federation.serve.proximal_mu"),
        ("federation: {serve: {dp_noise: 0.5}}", "federation.serve.dp_clip"),
        ("federation: {serve: {model: fedbase}}", "NAME@VERSION"),
        ("federation: {serve: {address: 'https://x:80'}}", "HOST:PORT"),
        ("federation: {join: {server: 'coordinator'}}", "federation.join.server"),
        ("federation: {join: {per_class: 0}}", "federation.join.per_class"),
        ("federation: {join: {keep_payloads: yes please}}", "keep_payloads"),
        ("federation: {rounds: 3}", "rounds"),
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


def test_federation_config_reaches_serve_and_join(tmp_path):
    """Built-in defaults < config federation.* < command line, without starting Flower."""
    from flows.cli import build_parser
    from flows.cli._federate import join_plan, serve_plan

    path = tmp_path / "site.yaml"
    path.write_text(
        "federation:\n"
        "  serve: {model: fedbase@2, address: '0.0.0.0:9092', rounds: 5, min_sites: 3, strategy: fedprox,\n"
        "          proximal_mu: 0.01, dp_clip: 1.5, dp_noise: 0.1, tls_ca_file: ca.pem, tls_cert_file: s.pem,\n"
        "          tls_key_file: s.key}\n"
        "  join: {server: 'coordinator.example:9092', model: fedbase@2, name: fedqc, tls_ca_file: ca.pem,\n"
        "         per_class: 50, keep_payloads: true}\n"
    )
    config = load_config(path)
    parser = build_parser()
    serve = serve_plan(parser.parse_args(["federate", "serve", "--rounds", "2", "--tls-key", "k.pem"]), config)
    assert (serve.model, serve.address) == ("fedbase@2", "0.0.0.0:9092")
    s = serve.settings
    assert (s.rounds, s.min_sites, s.strategy, s.proximal_mu, s.local_epochs) == (2, 3, "fedprox", 0.01, 2)
    assert (s.privacy.clip_norm, s.privacy.noise_multiplier) == (1.5, 0.1)
    assert (serve.tls.ca, serve.tls.certificate, serve.tls.key) == (Path("ca.pem"), Path("s.pem"), Path("k.pem"))
    no_dp = serve_plan(parser.parse_args(["federate", "serve", "--dp-clip", "0", "--dp-noise", "0"]), config)
    assert not no_dp.settings.privacy.enabled
    join = join_plan(parser.parse_args(["federate", "join", "--slides", "a.tiff", "--annotations", "a.geojson",
                                        "--no-keep-payloads", "--name", "other"]), config)
    assert (join.server, join.model, join.name, join.tls.ca) == ("coordinator.example:9092", "fedbase@2", "other",
                                                                 Path("ca.pem"))
    assert (join.per_class, join.seed, join.keep_payloads) == (50, 0, False)
    # Options and config together must still fit, and a needed value names both places.
    with pytest.raises(ConfigError, match="FedProx"):
        serve_plan(parser.parse_args(["federate", "serve", "--proximal-mu", "0"]), config)
    with pytest.raises(ConfigError, match="--server") as info:
        join_plan(parser.parse_args(["federate", "join", "--slides", "a", "--annotations", "b"]), WsiflowConfig())
    assert "federation.join.server" in info.value.one_line()
