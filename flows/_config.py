"""The wsiflow config: YAML (file or ``WSIFLOW_CONFIG``) parsed once into typed objects."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from models import AcceptanceThresholds
from pipeline import (
    BACKEND_NAMES,
    ConfigError,
    GridSpec,
    MppOverride,
    TissueParams,
)

__all__ = ["WsiflowConfig", "load_config", "parse_config", "default_config_text"]

_TOP_KEYS = {"backend", "tissue", "grid", "mpp_overrides", "models", "dask"}
_MODELS_KEYS = {"registry_dir", "acceptance"}
_OVERRIDE_KEYS = {"label", "vendor", "folder", "mpp", "mpp_x", "mpp_y", "only_if_missing"}


@dataclass(frozen=True)
class WsiflowConfig:
    """Everything a run is configured with, validated."""

    backend: str = "auto"
    tissue: TissueParams = field(default_factory=TissueParams)
    grid: GridSpec = field(default_factory=GridSpec)
    mpp_overrides: tuple[MppOverride, ...] = ()
    models_dir: Path | None = None
    """Site model registry; None: $WSIFLOW_MODELS_DIR or the site directory's models/."""
    acceptance: AcceptanceThresholds = field(default_factory=AcceptanceThresholds)
    dask_address: str | None = None
    """An existing Dask scheduler (``tcp://host:port``) that runs chunks; None: in-process."""


def default_config_text() -> str:
    """The shipped ``configs/default.yaml`` (every key, documented)."""
    return resources.files("configs").joinpath("default.yaml").read_text(encoding="utf-8")


def _check_keys(section: str, data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} in {section}",
            hint=f"allowed keys: {', '.join(sorted(allowed))}",
        )


def _section(cls: type, name: str, data: object, base: object) -> Any:
    if data is None:
        return base
    if not isinstance(data, dict):
        raise ConfigError(f"'{name}' must be a mapping, got {type(data).__name__}")
    _check_keys(f"'{name}'", data, {f.name for f in fields(cls)})
    try:
        return replace(base, **data)  # type: ignore[type-var]
    except TypeError as exc:
        raise ConfigError(f"bad value in '{name}': {exc}") from exc


def _override(index: int, data: object) -> MppOverride:
    where = f"mpp_overrides[{index}]"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping")
    _check_keys(where, data, _OVERRIDE_KEYS)
    if "mpp" in data and ("mpp_x" in data or "mpp_y" in data):
        raise ConfigError(f"{where} gives both mpp and mpp_x/mpp_y", hint="give one form")
    try:
        mpp_x = float(data.get("mpp_x", data.get("mpp")))
        mpp_y = float(data.get("mpp_y", data.get("mpp")))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{where} needs a numeric mpp (or mpp_x and mpp_y)", hint="e.g. mpp: 0.25"
        ) from exc
    folder = data.get("folder")
    return MppOverride(
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        label=str(data.get("label") or f"#{index}"),
        vendor=str(data["vendor"]) if data.get("vendor") is not None else None,
        folder=Path(folder).expanduser() if folder is not None else None,
        only_if_missing=bool(data.get("only_if_missing", False)),
    )


def parse_config(data: object) -> WsiflowConfig:
    """Validate a parsed YAML document into a :class:`WsiflowConfig`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping at the top level")
    _check_keys("the config", data, _TOP_KEYS)
    base = WsiflowConfig()
    backend = str(data.get("backend", base.backend))
    if backend not in BACKEND_NAMES:
        raise ConfigError(
            f"backend = {backend!r} is unknown", hint=f"use one of {', '.join(BACKEND_NAMES)}"
        )
    overrides = data.get("mpp_overrides") or []
    if not isinstance(overrides, list):
        raise ConfigError("mpp_overrides must be a list")
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise ConfigError("'models' must be a mapping")
    _check_keys("'models'", models, _MODELS_KEYS)
    registry_dir = models.get("registry_dir")
    dask = data.get("dask") or {}
    if not isinstance(dask, dict):
        raise ConfigError("'dask' must be a mapping")
    _check_keys("'dask'", dask, {"address"})
    return WsiflowConfig(
        dask_address=str(dask["address"]) if dask.get("address") else None,
        backend=backend,
        models_dir=Path(registry_dir).expanduser() if registry_dir else None,
        acceptance=_section(AcceptanceThresholds, "models.acceptance", models.get("acceptance"), base.acceptance),
        tissue=_section(TissueParams, "tissue", data.get("tissue"), base.tissue),
        grid=_section(GridSpec, "grid", data.get("grid"), base.grid),
        mpp_overrides=tuple(_override(i, o) for i, o in enumerate(overrides)),
    )


def load_config(path: str | os.PathLike[str] | None = None) -> WsiflowConfig:
    """Read the config from ``path``, else ``$WSIFLOW_CONFIG``, else the built-in defaults."""
    chosen = path if path is not None else os.environ.get("WSIFLOW_CONFIG")
    if chosen is None:
        return WsiflowConfig()
    config_path = Path(chosen)
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError("the config file does not exist", hint="check the --config path") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the config is not valid YAML ({exc})") from exc
    return parse_config(data)
