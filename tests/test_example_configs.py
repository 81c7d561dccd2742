"""Every example config in configs/ parses into a valid WsiflowConfig."""

from pathlib import Path

import pytest

from flows import WsiflowConfig, load_config
from models import Registry

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_examples_are_there():
    assert {"default.yaml", "local.yaml", "gpu-server.yaml", "slurm.yaml", "kubernetes.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_is_valid(path):
    config = load_config(path)
    assert isinstance(config, WsiflowConfig)
    # Its grid fits its default model (the bundled registry's; tile size and µm/px are the
    # model's unless the config names them): the grid a run would use is a real one.
    preprocessing = Registry().resolve(config.models.default).manifest.preprocessing
    spec = config.grid.spec(preprocessing, config.models.default)
    assert spec.tile_size_px == preprocessing.tile_size_px > 0
    assert spec.target_mpp == preprocessing.target_mpp > 0


def test_cluster_examples_name_a_scheduler():
    by_name = {p.name: load_config(p) for p in CONFIGS}
    for name in ("gpu-server.yaml", "slurm.yaml", "kubernetes.yaml"):
        assert by_name[name].dask.address.startswith("tcp://")
    assert by_name["local.yaml"].dask.address is None
