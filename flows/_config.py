"""The wsiflow config: YAML (file or ``WSIFLOW_CONFIG``) parsed once into typed objects.

Every section is checked against its dataclass (unknown keys and wrong types are
refused with the key's name); ``configs/default.yaml`` lists every key with its default.
The command line overrides the file (see ``flows.cli``'s settings builder).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, SupportsFloat, SupportsIndex

import yaml

from models import DEFAULT_MODEL, AcceptanceThresholds
from pipeline import (
    AnalysisParams,
    BackendName,
    ConfigError,
    EngineSettings,
    GridSettings,
    MppOverride,
    TissueParams,
    from_data,
)

from ._federate import FederationSettings, Strategy

__all__ = [
    "WsiflowConfig",
    "ModelsConfig",
    "AnalysisConfig",
    "DaskConfig",
    "FederationConfig",
    "FederationServeConfig",
    "FederationJoinConfig",
    "check_host_port",
    "load_config",
    "parse_config",
    "default_config_text",
    "check_dask_address",
]

_OVERRIDE_KEYS = {"label", "vendor", "folder", "mpp", "mpp_x", "mpp_y", "force"}


@dataclass(frozen=True)
class ModelsConfig:
    """The model registry, the default model and the promotion thresholds."""

    registry_dir: Path | None = None
    """Site model registry; None: $WSIFLOW_MODELS_DIR or the site directory's models/."""
    default: str = DEFAULT_MODEL
    """The model ``run``, ``batch`` and ``serve`` use without ``--model``."""
    acceptance: AcceptanceThresholds = field(default_factory=AcceptanceThresholds)


@dataclass(frozen=True)
class AnalysisConfig:
    """Result parameters beyond grid and tissue (see ``pipeline.AnalysisParams``)."""

    chunk_cells: int | None = None
    """Heatmap block edge in tiles; None: chosen per slide (see ``pipeline.choose_chunk_cells``)."""
    region_threshold: float = 0.5
    hotspots: int = 10
    overview_class: str | None = None

    def __post_init__(self) -> None:
        AnalysisParams(chunk_cells=self.chunk_cells, region_threshold=self.region_threshold,
                       hotspots=self.hotspots)  # the same range checks, at parse time


def check_dask_address(address: str, where: str = "dask address") -> str:
    """``address`` if it is a scheduler URL (``tcp://HOST:PORT``, ``tls://HOST:PORT``), else :class:`ConfigError`."""
    if not re.fullmatch(r"(tcp|tls|inproc|ucx)://[^\s/]+(:\d+)?/?", address):
        raise ConfigError(f"{where} {address!r} is not a scheduler URL",
                          hint="use tcp://HOST:PORT on this machine, or tls://HOST:PORT with the dask.tls_* "
                               "certificates beyond it")
    return address


@dataclass(frozen=True)
class DaskConfig:
    """The Dask scheduler chunks run on, and the TLS certificates of wsiflow's client.

    Beyond loopback use ``tls://`` with certificates: over ``tcp://`` anyone who reaches
    the scheduler can read the chunk descriptors (slide paths) and run code on the workers.
    """

    address: str | None = None
    """An existing Dask scheduler (``tcp://host:port`` or ``tls://host:port``) that runs chunks; None: local."""
    tls_ca_file: Path | None = None
    """The certificate authority that signed the scheduler's and workers' certificates (PEM)."""
    tls_client_cert: Path | None = None
    """wsiflow's client certificate (PEM), signed by that authority: Dask's TLS is mutual."""
    tls_client_key: Path | None = None
    """The client certificate's private key (PEM); None: it is in ``tls_client_cert``."""

    def __post_init__(self) -> None:
        if self.address is not None:
            check_dask_address(self.address, "dask.address")  # refused when the config loads
        given = [name for name in ("tls_ca_file", "tls_client_cert", "tls_client_key") if getattr(self, name)]
        if not given:
            return  # a tls:// address may take its certificates from Dask's own config
        if self.address is None or not self.address.startswith("tls://"):
            raise ConfigError(
                f"dask.{given[0]} is set, but dask.address is not a tls:// scheduler address",
                hint="set dask.address: tls://HOST:PORT (the scheduler started with --tls-ca-file, --tls-cert and "
                     "--tls-key), or remove the dask.tls_* keys",
            )
        missing = [name for name in ("tls_ca_file", "tls_client_cert") if not getattr(self, name)]
        if missing:
            raise ConfigError(
                f"dask.{missing[0]} is missing: Dask's TLS needs the certificate authority and a client certificate",
                hint="set dask.tls_ca_file and dask.tls_client_cert (and dask.tls_client_key unless the key is in "
                     "the certificate file)",
            )


def check_host_port(value: str, where: str) -> str:
    """``value`` if it is ``HOST:PORT`` (``[IPv6]:PORT`` too, port 1-65535), else :class:`ConfigError`."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]@]+):(\d{1,5})", value)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ConfigError(f"{where} {value!r} is not HOST:PORT",
                          hint="e.g. 127.0.0.1:9092, coordinator.example:9092 or [::]:9092")
    return value


_FED = FederationSettings()


@dataclass(frozen=True)
class FederationServeConfig:
    """Defaults of ``wsiflow federate serve`` (the coordinator); each option overrides its key."""

    model: str | None = None
    """The base model every site has, NAME@VERSION (--model); None: the option is needed."""
    address: str = "127.0.0.1:8080"
    """HOST:PORT the coordinator listens on (--address)."""
    rounds: int = _FED.rounds
    min_sites: int = _FED.min_sites
    """Sites a round needs: fewer updates leave the global model unchanged (--min-sites)."""
    strategy: Strategy = _FED.strategy
    proximal_mu: float = _FED.proximal_mu
    """FedProx proximal term; must be > 0 with strategy fedprox (--proximal-mu)."""
    local_epochs: int = _FED.local_epochs
    learning_rate: float = _FED.learning_rate
    batch_size: int = _FED.batch_size
    seed: int = _FED.seed
    dp_clip: float | None = None
    """Clip each site's update to this L2 norm (differential privacy); None: no DP (--dp-clip)."""
    dp_noise: float = 0.0
    """Gaussian noise std in units of dp_clip (--dp-noise)."""
    round_timeout_s: float = _FED.round_timeout_s
    tls_ca_file: Path | None = None
    """The CA that signed the coordinator's certificate (PEM; --tls-ca)."""
    tls_cert_file: Path | None = None
    """The coordinator's certificate (PEM; --tls-cert)."""
    tls_key_file: Path | None = None
    """Its private key (PEM; --tls-key)."""
    site_keys_file: Path | None = None
    """The sites admitted: SHA256 fingerprints or .pub PEM blocks (--site-keys); None: needs allow_any_site."""
    allow_any_site: bool = False
    """Admit any site that reaches the port, without a key list (--allow-any-site)."""
    secure_aggregation: bool = False
    """Sites send pairwise-masked updates; the coordinator sees only their sum (--secure-aggregation)."""

    def __post_init__(self) -> None:
        where = "federation.serve"
        if self.site_keys_file is not None and self.allow_any_site:
            raise ConfigError(f"{where}.site_keys_file and {where}.allow_any_site contradict each other",
                              hint="list the sites (site_keys_file) or admit any (allow_any_site: true), not both")
        if self.secure_aggregation and self.min_sites < 2:
            raise ConfigError(f"{where}.secure_aggregation needs {where}.min_sites >= 2",
                              hint="one site's aggregate is its own update")
        if self.model is not None and "@" not in self.model:
            raise ConfigError(f"{where}.model {self.model!r} must name a version (NAME@VERSION)",
                              hint="every site needs the same version, e.g. tissue-qc@3")
        check_host_port(self.address, f"{where}.address")
        for key in ("rounds", "min_sites", "local_epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} = {getattr(self, key)} must be at least 1")
        for key in ("learning_rate", "round_timeout_s"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ConfigError(f"{where}.{key} = {getattr(self, key)} must be a positive number")
        for key in ("proximal_mu", "dp_noise"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise ConfigError(f"{where}.{key} = {getattr(self, key)} must be 0 or a positive number")
        if self.dp_clip is not None and not (math.isfinite(self.dp_clip) and self.dp_clip > 0):
            raise ConfigError(f"{where}.dp_clip = {self.dp_clip} must be a positive number",
                              hint="e.g. dp_clip: 1.0, or null for no differential privacy")
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ConfigError(f"{where}.strategy is fedprox but {where}.proximal_mu is {self.proximal_mu}",
                              hint="FedProx needs proximal_mu > 0, e.g. 0.01 (or strategy: fedavg)")
        if self.dp_noise > 0 and self.dp_clip is None:
            raise ConfigError(f"{where}.dp_noise = {self.dp_noise} needs {where}.dp_clip (noise is scaled by it)",
                              hint="set dp_clip, e.g. 1.0, or dp_noise: 0")


@dataclass(frozen=True)
class FederationJoinConfig:
    """Defaults of ``wsiflow federate join`` (one site); each option overrides its key."""

    server: str | None = None
    """The coordinator, HOST:PORT (--server); None: the option is needed."""
    model: str | None = None
    """The base model in this site's registry (--model); None: the option is needed."""
    name: str | None = None
    """Registry name of the federated candidate (--name); None: the option is needed."""
    tls_ca_file: Path | None = None
    """The CA that signed the coordinator's certificate (PEM; --tls-ca)."""
    per_class: int = 200
    """Training patches sampled per class from the reviewed annotations (--per-class)."""
    seed: int = 0
    keep_payloads: bool = False
    """Keep every outgoing message's exact bytes in the site dir, for a payload audit (--keep-payloads)."""
    site_key_file: Path | None = None
    """This site's Ed25519 identity key, PEM (--site-key; `wsiflow federate keygen`)."""

    def __post_init__(self) -> None:
        where = "federation.join"
        if self.server is not None:
            check_host_port(self.server, f"{where}.server")
        if self.per_class < 1:
            raise ConfigError(f"{where}.per_class = {self.per_class} must be at least 1")
        for key in ("model", "name"):
            if getattr(self, key) == "":
                raise ConfigError(f"{where}.{key} is empty", hint="give a value, or null to require the option")


@dataclass(frozen=True)
class FederationConfig:
    """``wsiflow federate``: the coordinator's and a site's defaults (a machine usually has one)."""

    serve: FederationServeConfig = field(default_factory=FederationServeConfig)
    join: FederationJoinConfig = field(default_factory=FederationJoinConfig)


@dataclass(frozen=True)
class WsiflowConfig:
    """Everything a site configures, validated."""

    backend: BackendName = "auto"
    tissue: TissueParams = field(default_factory=TissueParams)
    grid: GridSettings = field(default_factory=GridSettings)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    engine: EngineSettings = field(default_factory=EngineSettings)
    mpp_overrides: tuple[MppOverride, ...] = ()
    models: ModelsConfig = field(default_factory=ModelsConfig)
    dask: DaskConfig = field(default_factory=DaskConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    isolate: bool = True
    """Analyse each slide of ``run`` in a child process (a native crash fails one slide)."""


def default_config_text() -> str:
    """The shipped ``configs/default.yaml`` (every key, documented)."""
    return resources.files("configs").joinpath("default.yaml").read_text(encoding="utf-8")


def _number(value: object) -> float:
    """``float(value)``; TypeError for None and anything else float() does not take."""
    if not isinstance(value, (str, bytes, SupportsFloat, SupportsIndex)):
        raise TypeError(f"{type(value).__name__} is not a number")
    return float(value)


def _override(index: int, data: object) -> MppOverride:
    where = f"mpp_overrides[{index}]"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping")
    if "only_if_missing" in data:
        raise ConfigError(
            f"{where}: only_if_missing is gone: overrides now apply only to slides without µm/px",
            hint="remove only_if_missing; add 'force: true' to replace valid metadata too",
        )
    unknown = sorted(set(data) - _OVERRIDE_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}",
                          hint=f"allowed keys: {', '.join(sorted(_OVERRIDE_KEYS))}")
    if "mpp" in data and ("mpp_x" in data or "mpp_y" in data):
        raise ConfigError(f"{where} gives both mpp and mpp_x/mpp_y", hint="give one form")
    try:
        mpp_x = _number(data.get("mpp_x", data.get("mpp")))
        mpp_y = _number(data.get("mpp_y", data.get("mpp")))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} needs a numeric mpp (or mpp_x and mpp_y)", hint="e.g. mpp: 0.25") from exc
    force = data.get("force", False)
    if not isinstance(force, bool):
        raise ConfigError(f"{where}.force = {force!r} must be true or false")
    folder = data.get("folder")
    return MppOverride(
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        label=str(data.get("label") or f"#{index}"),
        vendor=str(data["vendor"]) if data.get("vendor") is not None else None,
        folder=Path(str(folder)).expanduser() if folder is not None else None,
        force=force,
    )


def parse_config(data: object) -> WsiflowConfig:
    """Validate a parsed YAML document into a :class:`WsiflowConfig`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping at the top level")
    sections: dict[str, Any] = {k: v for k, v in data.items() if v is not None}
    overrides = sections.pop("mpp_overrides", [])
    if not isinstance(overrides, list):
        raise ConfigError("mpp_overrides must be a list")
    config = from_data(WsiflowConfig, sections, where="the config")
    if overrides:
        from dataclasses import replace

        config = replace(config, mpp_overrides=tuple(_override(i, o) for i, o in enumerate(overrides)))
    return config


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
    except IsADirectoryError as exc:
        raise ConfigError("the config path is a folder", hint="give the YAML file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("the config file is not text (UTF-8 YAML)", hint="check the --config path") from exc
    except PermissionError as exc:
        raise ConfigError("the config file cannot be read: permission denied") from exc
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the config is not valid YAML ({exc})") from exc
    return parse_config(parsed)
