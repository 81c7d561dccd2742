"""Every example config in configs/ parses into a valid WsiflowConfig."""

from pathlib import Path

import pytest

from flows import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_is_valid(path):
    config = load_config(path)
    assert config.grid.tile_size_px > 0


def test_cluster_examples_name_a_scheduler():
    by_name = {p.name: load_config(p) for p in CONFIGS}
    for name in ("gpu-server.yaml", "slurm.yaml", "kubernetes.yaml"):
        assert by_name[name].dask_address.startswith("tcp://")
    assert by_name["local.yaml"].dask_address is None
