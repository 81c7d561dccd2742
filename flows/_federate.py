"""Federated fine-tuning across sites with Flower: the coordinator and a site's process.

Transport: Flower's gRPC (bidirectional stream) server and client (``start_server`` /
``start_client``): one long-lived process per role that an operator starts and stops, TLS
from certificate files, no SuperLink/SuperNode/SuperExec and no app bundles to install at
the sites. The coordinator holds only the base model; each site trains on its own reviewed
annotations through :func:`models.train_module` and sends back only what
:func:`models.check_payload` allows, recording every outgoing message in its site dir.
The global model comes to every site in a final evaluate message and lands in the site's
registry as a candidate (never the default until validated there and promoted).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models import (
    FederationError,
    LoadedModel,
    ModelEntry,
    PrivacySettings,
    Registry,
    TrainSettings,
    check_payload,
    clip_and_noise,
    federated_candidate,
    load_parameter_arrays,
    parameter_arrays,
    parameter_shapes,
    proximal_hooks,
    train_module,
)
from pipeline import site_dir
from privacy import audit_event

__all__ = [
    "FLOWER_OFFLINE_ENV",
    "STRATEGIES",
    "FederationSettings",
    "RoundStats",
    "SiteOutcome",
    "Strategy",
    "TlsFiles",
    "join_federation",
    "serve_federation",
]

_log = logging.getLogger(__name__)

FLOWER_OFFLINE_ENV: dict[str, str] = {
    # Read when flwr is imported: no usage events to telemetry.flower.ai.
    "FLWR_TELEMETRY_ENABLED": "0",
    # The flwr CLI's release check (not used by wsiflow; off in case a process imports it).
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
"""Flower's own switches off the network; applied before flwr is first imported."""

Strategy = Literal["fedavg", "fedprox"]
STRATEGIES: tuple[Strategy, ...] = ("fedavg", "fedprox")


def _flower_env() -> None:
    for key, value in FLOWER_OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA every party trusts; the coordinator's certificate and key."""

    ca: Path
    certificate: Path | None = None
    key: Path | None = None

    def server_tuple(self) -> tuple[bytes, bytes, bytes]:
        if self.certificate is None or self.key is None:
            raise FederationError("the coordinator needs its TLS certificate and key",
                                  hint="pass --tls-cert and --tls-key (and --tls-ca), or set federation.serve.tls_* "
                                       "in the config")
        return (self._read(self.ca), self._read(self.certificate), self._read(self.key))

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise FederationError(f"a TLS file cannot be read ({exc.strerror or type(exc).__name__})",
                                  hint="check the --tls-* paths (or the config's federation.*.tls_* keys)") from None


@dataclass(frozen=True)
class FederationSettings:
    """What the coordinator decides for every site (sent in each round's configuration)."""

    rounds: int = 3
    min_sites: int = 2
    strategy: Strategy = "fedavg"
    proximal_mu: float = 0.0
    local_epochs: int = 2
    learning_rate: float = 2e-3
    batch_size: int = 32
    seed: int = 0
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    round_timeout_s: float = 600.0
    wait_for_sites_s: float = 600.0

    def __post_init__(self) -> None:
        if min(self.rounds, self.min_sites, self.local_epochs, self.batch_size) < 1:
            raise FederationError(f"rounds {self.rounds}, min sites {self.min_sites}, local epochs "
                                  f"{self.local_epochs} and batch size {self.batch_size} must each be at least 1")
        if self.strategy not in STRATEGIES:
            raise FederationError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise FederationError("FedProx needs a proximal term mu > 0", hint="e.g. --proximal-mu 0.01")


@dataclass(frozen=True)
class RoundStats:
    round: int
    sites: int
    failures: int
    aggregated: bool
    bytes_per_site: tuple[int, ...]
    round_time_s: float
    loss: float | None


def _to_parameters(arrays: Sequence[np.ndarray]) -> Any:
    from flwr.common import ndarrays_to_parameters

    return ndarrays_to_parameters(list(arrays))


def _from_parameters(parameters: Any) -> list[np.ndarray]:
    from flwr.common import parameters_to_ndarrays

    return list(parameters_to_ndarrays(parameters))


# -- coordinator ---------------------------------------------------------------------------


def _make_strategy(base: LoadedModel, settings: FederationSettings, rounds_out: list[RoundStats],
                   keep_rounds: list[list[np.ndarray]] | None) -> Any:
    _flower_env()
    from flwr.common import EvaluateIns, FitRes
    from flwr.server.strategy import FedAvg, FedProx

    base_cls: Any = FedProx if settings.strategy == "fedprox" else FedAvg
    initial = parameter_arrays(base.module)
    shapes = parameter_shapes(base.module)

    class _Strategy(base_cls):
        """FedAvg/FedProx with wsiflow's rules: the min-sites rule, payload checks, the final
        global model sent to every site with its lineage."""

        def __init__(self) -> None:
            kwargs: dict[str, Any] = {
                "fraction_fit": 1.0, "fraction_evaluate": 0.0, "min_fit_clients": settings.min_sites,
                "min_evaluate_clients": settings.min_sites, "min_available_clients": settings.min_sites,
                "accept_failures": True, "initial_parameters": _to_parameters(initial),
                "on_fit_config_fn": self._fit_config,
                "fit_metrics_aggregation_fn": _weighted_loss,
            }
            if settings.strategy == "fedprox":
                kwargs["proximal_mu"] = settings.proximal_mu
            super().__init__(**kwargs)
            self.started = 0.0
            self.completed = 0
            self.contributors: set[str] = set()

        def _fit_config(self, server_round: int) -> dict[str, Any]:
            self.started = time.perf_counter()
            return {"round": server_round, "base_sha256": base.manifest.weights_sha256,
                    "local_epochs": settings.local_epochs, "learning_rate": settings.learning_rate,
                    "batch_size": settings.batch_size, "seed": settings.seed,
                    "dp_clip": settings.privacy.clip_norm or 0.0,
                    "dp_noise": settings.privacy.noise_multiplier}

        def aggregate_fit(self, server_round: int, results: list[tuple[Any, FitRes]],
                          failures: list[Any]) -> tuple[Any, dict[str, Any]]:
            valid = []
            for proxy, res in results:
                try:
                    check_payload(_from_parameters(res.parameters), res.metrics, shapes)
                except FederationError as exc:
                    _log.warning("round %d: an update was refused: %s", server_round, exc.one_line())
                    failures.append(exc)
                    continue
                valid.append((proxy, res))
            sizes = tuple(sum(len(t) for t in res.parameters.tensors) for _, res in valid)
            aggregated: Any = None
            metrics: dict[str, Any] = {}
            if len(valid) >= settings.min_sites:
                aggregated, metrics = super().aggregate_fit(server_round, valid, failures)
                self.completed += 1
                self.contributors.update(proxy.cid for proxy, _ in valid)
            else:
                _log.warning("round %d: %d site update(s), fewer than the minimum %d: the global model is "
                             "unchanged", server_round, len(valid), settings.min_sites)
            loss = metrics.get("loss")
            rounds_out.append(RoundStats(server_round, len(valid), len(failures), aggregated is not None, sizes,
                                         time.perf_counter() - self.started,
                                         float(loss) if isinstance(loss, (int, float)) else None))
            if keep_rounds is not None and aggregated is not None:
                keep_rounds.append(_from_parameters(aggregated))
            return aggregated, metrics

        def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
            if server_round != settings.rounds or self.completed == 0:
                return []
            config: dict[str, Any] = {"final": True, "base_sha256": base.manifest.weights_sha256,
                      "rounds_planned": settings.rounds, "rounds_completed": self.completed,
                      "sites": len(self.contributors), "strategy": settings.strategy,
                      "proximal_mu": settings.proximal_mu, "local_epochs": settings.local_epochs,
                      "learning_rate": settings.learning_rate, "dp_clip": settings.privacy.clip_norm or 0.0,
                      "dp_noise": settings.privacy.noise_multiplier}
            return [(proxy, EvaluateIns(parameters, config)) for proxy in client_manager.all().values()]

        def aggregate_evaluate(self, server_round: int, results: list[Any],
                               failures: list[Any]) -> tuple[float | None, dict[str, Any]]:
            _log.info("final model delivered to %d site(s), %d failed", len(results), len(failures))
            return None, {"delivered": len(results)}

    return _Strategy()


def _weighted_loss(fit_metrics: list[tuple[int, Mapping[str, Any]]]) -> dict[str, Any]:
    total = sum(n for n, _ in fit_metrics)
    if total == 0:
        return {}
    return {"loss": sum(n * float(m.get("loss", 0.0)) for n, m in fit_metrics) / total}


def serve_federation(
    base: LoadedModel,
    settings: FederationSettings,
    *,
    address: str,
    tls: TlsFiles,
    keep_round_models: bool = False,
) -> tuple[list[RoundStats], list[list[np.ndarray]]]:
    """Run the coordinator until ``settings.rounds`` rounds are done; the per-round stats and
    (with ``keep_round_models``) the global arrays after each aggregated round."""
    _flower_env()
    from flwr.server import ServerConfig, start_server

    rounds: list[RoundStats] = []
    kept: list[list[np.ndarray]] | None = [] if keep_round_models else None
    strategy = _make_strategy(base, settings, rounds, kept)
    start_server(server_address=address, config=ServerConfig(num_rounds=settings.rounds,
                                                              round_timeout=settings.round_timeout_s),
                 strategy=strategy, certificates=tls.server_tuple())
    return rounds, kept or []


# -- a site ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteOutcome:
    """What a site's process did: the candidate it registered (if any) and what it sent."""

    ref: str | None
    weights_sha256: str | None
    rounds_trained: int
    messages_sent: int
    bytes_sent: int
    record_dir: Path


class _OutgoingLog:
    """Every message this site sends, recorded before it leaves: a JSON line per message
    (kind, round, array shapes and dtypes, metric keys and values, bytes) and, with
    ``keep_payloads``, the exact serialised protobuf the transport sends."""

    def __init__(self, directory: Path, keep_payloads: bool) -> None:
        self.directory = directory
        self.keep_payloads = keep_payloads
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.count = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def record(self, kind: str, round_: int, message: Any, arrays: Sequence[np.ndarray],
               metrics: Mapping[str, Any], num_examples: int | None) -> None:
        data = message.SerializeToString()
        with self._lock:
            self.count += 1
            self.bytes += len(data)
            entry = {"seq": self.count, "kind": kind, "round": round_, "bytes": len(data),
                     "shapes": [list(a.shape) for a in arrays], "dtypes": sorted({str(a.dtype) for a in arrays}),
                     "metrics": dict(metrics), "num_examples": num_examples,
                     "time": datetime.now(UTC).isoformat(timespec="seconds")}
            with (self.directory / "outgoing.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, sort_keys=True) + "\n")
            if self.keep_payloads:
                (self.directory / f"message-{self.count:05d}.pb").write_bytes(data)

    def status(self, state: str, round_: int) -> None:
        tmp = self.directory / ".status.json.tmp"
        tmp.write_text(json.dumps({"state": state, "round": round_}), encoding="utf-8")
        tmp.replace(self.directory / "status.json")


def _config_number(config: Mapping[str, Any], key: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FederationError(f"the coordinator sent no number for {key!r}")
    return float(value)


class _Site:
    """The training and registration a site does for the coordinator's messages."""

    def __init__(self, base: LoadedModel, registry: Registry, name: str, images: np.ndarray, labels: np.ndarray,
                 log: _OutgoingLog) -> None:
        self.base = base
        self.registry = registry
        self.name = name
        self.images = images
        self.labels = labels
        self.log = log
        self.shapes = parameter_shapes(base.module)
        self.rounds_trained = 0
        self.entry: ModelEntry | None = None
        self.rng = np.random.default_rng(secrets.randbits(64))

    def _check_base(self, config: Mapping[str, Any]) -> None:
        if config.get("base_sha256") != self.base.manifest.weights_sha256:
            raise FederationError(
                f"the coordinator's base model is not {self.base.manifest.ref} of this site (weights differ)",
                hint="join with the same model version, verified, as the coordinator serves",
            )

    def _module_with(self, arrays: Sequence[np.ndarray]) -> Any:
        module = copy.deepcopy(self.base.module)
        load_parameter_arrays(module, arrays)
        return module

    def fit(self, global_arrays: list[np.ndarray], config: Mapping[str, Any]) -> tuple[list[np.ndarray], int,
                                                                                        dict[str, Any]]:
        self._check_base(config)
        round_ = int(_config_number(config, "round"))
        self.log.status("training", round_)
        module = self._module_with(global_arrays)
        mu = float(config.get("proximal_mu", 0.0) or 0.0)
        removers = proximal_hooks(module, global_arrays, mu)
        settings = TrainSettings(epochs=int(_config_number(config, "local_epochs")),
                                 learning_rate=_config_number(config, "learning_rate"),
                                 batch_size=int(_config_number(config, "batch_size")),
                                 seed=int(_config_number(config, "seed")) + 1000 * round_, progress=False)
        history = train_module(module, self.images, self.labels, self.base.preprocessing, settings)
        for remove in removers:
            remove()
        clip = _config_number(config, "dp_clip")
        privacy = PrivacySettings(clip if clip > 0 else None, _config_number(config, "dp_noise"))
        arrays, norm = clip_and_noise(global_arrays, parameter_arrays(module), privacy, self.rng)
        _log.info("round %d: trained on %d patches, update norm %.3f", round_, len(self.images), norm)
        metrics: dict[str, Any] = {"loss": float(history[-1].loss)}
        check_payload(arrays, metrics, self.shapes)
        self.rounds_trained += 1
        self.log.status("waiting", round_)
        return arrays, len(self.images), metrics

    def register(self, arrays: list[np.ndarray], config: Mapping[str, Any]) -> tuple[float, int]:
        """Store the global model as a candidate with its lineage; its loss on this site's data."""
        from pipeline import classify_tiles

        self._check_base(config)
        clip = _config_number(config, "dp_clip")
        privacy = PrivacySettings(clip if clip > 0 else None, _config_number(config, "dp_noise"))
        strategy = str(config.get("strategy"))
        if strategy not in STRATEGIES:
            raise FederationError(f"the coordinator sent an unknown strategy {strategy!r}")
        record: dict[str, Any] = {
            "kind": "federated-fine-tune",
            "base_model": self.base.manifest.ref,
            "base_sha256": self.base.manifest.weights_sha256,
            "rounds_planned": int(_config_number(config, "rounds_planned")),
            "rounds_completed": int(_config_number(config, "rounds_completed")),
            "sites": int(_config_number(config, "sites")),
            "strategy": strategy,
            "proximal_mu": _config_number(config, "proximal_mu"),
            "local_epochs": int(_config_number(config, "local_epochs")),
            "learning_rate": _config_number(config, "learning_rate"),
            "privacy": privacy.to_json(),
            "secure_aggregation": False,
        }
        manifest, weights, full = federated_candidate(
            self.base, arrays, name=self.name, version=self.registry.next_version(self.name), record=record
        )
        lineage_file = (json.dumps(full, indent=2, sort_keys=True) + "\n").encode()
        entry = self.registry.add(manifest, weights, extra_files={"federation.json": lineage_file})
        self.registry.record_install(entry, {"source": "federation",
                                             "lineage_sha256": manifest.lineage.training_data_digest})
        self.entry = entry
        audit_event("model-train", model_digest=manifest.weights_sha256,
                    params={"federation": "registered", "ref": manifest.ref, **full}, outcome="ok")
        loaded = self.registry.load(manifest.ref)
        probabilities = classify_tiles(loaded, self.images, batch_size=64)
        picked = probabilities[np.arange(len(self.labels)), self.labels]
        loss = float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))
        self.log.status("done", int(record["rounds_completed"]))
        return loss, len(self.images)


def _flower_client(site: _Site) -> Any:
    _flower_env()
    from flwr.client import Client
    from flwr.common import (
        Code,
        EvaluateIns,
        EvaluateRes,
        FitIns,
        FitRes,
        GetParametersIns,
        GetParametersRes,
        GetPropertiesIns,
        GetPropertiesRes,
        Status,
        serde,
    )

    ok = Status(code=Code.OK, message="")

    class _Client(Client):
        def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
            res = GetPropertiesRes(status=ok, properties={})
            site.log.record("properties", 0, serde.get_properties_res_to_proto(res), [], {}, None)
            return res

        def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
            # The coordinator holds the base model; a site never offers its own weights.
            res = GetParametersRes(status=Status(code=Code.GET_PARAMETERS_NOT_IMPLEMENTED, message=""),
                                   parameters=_to_parameters([]))
            site.log.record("parameters", 0, serde.get_parameters_res_to_proto(res), [], {}, None)
            return res

        def fit(self, ins: FitIns) -> FitRes:
            arrays, count, metrics = site.fit(_from_parameters(ins.parameters), ins.config)
            res = FitRes(status=ok, parameters=_to_parameters(arrays), num_examples=count, metrics=metrics)
            site.log.record("fit", int(ins.config.get("round", 0)), serde.fit_res_to_proto(res), arrays, metrics,
                            count)
            return res

        def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
            if not ins.config.get("final"):
                res = EvaluateRes(status=ok, loss=0.0, num_examples=0, metrics={})
            else:
                loss, count = site.register(_from_parameters(ins.parameters), ins.config)
                res = EvaluateRes(status=ok, loss=loss, num_examples=count, metrics={})
            site.log.record("evaluate", int(ins.config.get("rounds_planned", 0)),
                            serde.evaluate_res_to_proto(res), [], {"loss": res.loss}, res.num_examples)
            return res

    return _Client()


def _record_dir() -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return site_dir() / "federation" / f"{stamp}-{secrets.token_hex(3)}"


def join_federation(
    base: LoadedModel,
    registry: Registry,
    *,
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    server: str,
    tls: TlsFiles,
    keep_payloads: bool = False,
    max_retries: int = 30,
    max_wait_s: float = 120.0,
) -> SiteOutcome:
    """Take part in a federation until the coordinator ends it; the candidate registered here.

    ``images``/``labels`` are this site's training patches (from its reviewed annotations);
    they never leave the process.
    """
    _flower_env()
    from flwr.client import start_client

    if len(images) == 0 or len(images) != len(labels):
        raise FederationError(f"{len(images)} training patches and {len(labels)} labels",
                              hint="give reviewed annotations that cover the slides")
    log = _OutgoingLog(_record_dir(), keep_payloads)
    site = _Site(base, registry, name, images, labels, log)
    audit_event("model-train", model_digest=base.manifest.weights_sha256,
                params={"federation": "join", "base": base.manifest.ref, "name": name, "patches": len(images)},
                outcome="federation-joined")
    log.status("connecting", 0)
    client = _flower_client(site)
    try:
        start_client(server_address=server, client_fn=lambda _context: client, root_certificates=tls._read(tls.ca),
                     max_retries=max_retries, max_wait_time=max_wait_s)
    except BaseException as exc:
        audit_event("model-train", model_digest=base.manifest.weights_sha256, params={"federation": "left"},
                    outcome=f"failed:{getattr(exc, 'kind', type(exc).__name__)}")
        raise
    entry = site.entry
    if entry is None:
        audit_event("model-train", model_digest=base.manifest.weights_sha256, params={"federation": "ended"},
                    outcome="failed:no-global-model")
        raise FederationError(
            f"the federation ended after {site.rounds_trained} round(s) trained here without sending a global model",
            hint="too few sites may have joined (the coordinator's --min-sites), or the coordinator stopped",
        )
    return SiteOutcome(entry.manifest.ref, entry.manifest.weights_sha256, site.rounds_trained, log.count, log.bytes,
                       log.directory)


def settings_json(settings: FederationSettings) -> dict[str, Any]:
    """The settings as JSON (the coordinator's report)."""
    out = asdict(settings)
    out["privacy"] = settings.privacy.to_json()
    return out
