"""Adapters that run the pipeline: the ``wsiflow`` CLI (``flows.cli``), config loading,
the Prefect batch flow and inbox deployment, Dask chunk execution, per-slide isolation."""

from ._config import WsiflowConfig, default_config_text, load_config, parse_config

__all__ = ["WsiflowConfig", "default_config_text", "load_config", "parse_config"]
