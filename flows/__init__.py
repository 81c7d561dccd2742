"""Adapters that run the pipeline: the ``wsiflow`` CLI and config loading (Prefect flows later)."""

from ._cli import main
from ._config import WsiflowConfig, default_config_text, load_config, parse_config

__all__ = ["WsiflowConfig", "default_config_text", "load_config", "main", "parse_config"]
