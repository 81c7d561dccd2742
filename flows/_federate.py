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
import re
import secrets
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from models import (
    FederationAuthError,
    FederationError,
    LoadedModel,
    ModelEntry,
    PrivacySettings,
    Registry,
    SecAggParams,
    SiteAllowList,
    TrainSettings,
    check_payload,
    check_properties,
    clipped_update,
    dequantise,
    federated_candidate,
    load_parameter_arrays,
    mask_key_pair,
    mask_update,
    pair_seed,
    parameter_arrays,
    parameter_shapes,
    proximal_hooks,
    quantise,
    sign_challenge,
    site_auth_message,
    site_fingerprint,
    site_public_key,
    train_module,
    unmask_sum,
    verify_site,
)
from pipeline import site_dir
from privacy import audit_event

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

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

AUDIT_ACTION = "model-federate"
"""Every federation step in a site's and the coordinator's audit log."""
_ASK_TIMEOUT_S = 60.0
"""How long the coordinator waits for a site's answer to a challenge or a seed request."""
_NOTICE_TIMEOUT_S = 10.0
_SITE_ID_RE = re.compile(r"^[0-9a-f]{32}$")


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
    """After a round's challenges: how long to wait for more sites when fewer than min_sites passed."""
    secure_aggregation: bool = False
    secagg: SecAggParams = field(default_factory=SecAggParams)

    def __post_init__(self) -> None:
        if min(self.rounds, self.min_sites, self.local_epochs, self.batch_size) < 1:
            raise FederationError(f"rounds {self.rounds}, min sites {self.min_sites}, local epochs "
                                  f"{self.local_epochs} and batch size {self.batch_size} must each be at least 1")
        if self.strategy not in STRATEGIES:
            raise FederationError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise FederationError("FedProx needs a proximal term mu > 0", hint="e.g. --proximal-mu 0.01")
        if self.secure_aggregation and not 2 <= self.min_sites <= self.secagg.max_sites:
            raise FederationError(f"secure aggregation needs 2 to {self.secagg.max_sites} sites a round, not "
                                  f"--min-sites {self.min_sites}",
                                  hint="one site's aggregate is its own update: use --min-sites 2 or more")


@dataclass(frozen=True)
class RoundStats:
    round: int
    sites: int
    failures: int
    aggregated: bool
    bytes_per_site: tuple[int, ...]
    round_time_s: float
    loss: float | None
    refused: tuple[str, ...] = ()
    """Fingerprints (short) of the site keys refused in this round."""
    recovered: int = 0
    """Sites that dropped after the mask keys were exchanged and whose masks were removed."""


def _to_parameters(arrays: Sequence[np.ndarray]) -> Any:
    from flwr.common import ndarrays_to_parameters

    return ndarrays_to_parameters(list(arrays))


def _from_parameters(parameters: Any) -> list[np.ndarray]:
    from flwr.common import parameters_to_ndarrays

    return list(parameters_to_ndarrays(parameters))


# -- coordinator ---------------------------------------------------------------------------


def _ask(questions: Sequence[tuple[Any, dict[str, Any]]], timeout_s: float, round_: int) -> list[tuple[Any, Any]]:
    """Send each proxy its ``get_properties`` question at once; (proxy, answer or the exception)."""
    from flwr.common import GetPropertiesIns

    if not questions:
        return []
    with ThreadPoolExecutor(max_workers=len(questions)) as pool:
        futures = [(proxy, pool.submit(proxy.get_properties, GetPropertiesIns(config=config), timeout_s, round_))
                   for proxy, config in questions]
    out: list[tuple[Any, Any]] = []
    for proxy, future in futures:
        error = future.exception()
        out.append((proxy, error if error is not None else future.result()))
    return out


def _answered(answer: Any) -> Mapping[str, Any] | None:
    """The properties of a site's answer; None when it failed or answered with an error status."""
    from flwr.common import Code

    if isinstance(answer, BaseException) or answer.status.code != Code.OK:
        return None
    return dict(answer.properties)


@dataclass(frozen=True)
class _Admitted:
    proxy: Any
    fingerprint: str
    mask_key: bytes


def _make_strategy(base: LoadedModel, settings: FederationSettings, rounds_out: list[RoundStats],
                   keep_rounds: list[list[np.ndarray]] | None, allowed: SiteAllowList | None) -> Any:
    _flower_env()
    from flwr.common import EvaluateIns, FitIns, FitRes
    from flwr.server.strategy import FedAvg, FedProx

    base_cls: Any = FedProx if settings.strategy == "fedprox" else FedAvg
    initial = parameter_arrays(base.module)
    shapes = parameter_shapes(base.module)
    secure = settings.secure_aggregation
    digest = base.manifest.weights_sha256

    class _Strategy(base_cls):
        """FedAvg/FedProx with wsiflow's rules: sites authenticated before every round, the
        min-sites rule, payload checks, secure aggregation, the final global model sent to
        every authenticated site with its lineage."""

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
            self.authenticated: dict[str, str] = {}  # Flower cid -> key fingerprint
            self.refused_ids: set[str] = set()
            self.round_refused: list[str] = []
            self.participants: dict[str, bytes] = {}  # this round's cid -> mask key
            self.round_global: list[np.ndarray] = []

        def _fit_config(self, server_round: int) -> dict[str, Any]:
            self.started = time.perf_counter()
            return {"round": server_round, "base_sha256": digest,
                    "local_epochs": settings.local_epochs, "learning_rate": settings.learning_rate,
                    "batch_size": settings.batch_size, "seed": settings.seed,
                    "dp_clip": settings.privacy.clip_norm or 0.0,
                    "dp_noise": settings.privacy.noise_multiplier}

        # -- node authentication ----------------------------------------------------------
        def _authenticate(self, server_round: int, proxies: Sequence[Any], admitted: dict[str, _Admitted]) -> None:
            """Challenge ``proxies``; add those whose key is allowed and whose signature verifies."""
            challenges = {proxy.cid: secrets.token_bytes(32) for proxy in proxies}
            questions = [(proxy, {"wsiflow": "authenticate", "round": server_round, "site_id": proxy.cid,
                                  "challenge": challenges[proxy.cid], "secure_aggregation": secure,
                                  "key_required": allowed is not None}) for proxy in proxies]
            refused = []
            for proxy, answer in _ask(questions, _ASK_TIMEOUT_S, server_round):
                properties = _answered(answer)
                if properties is None:
                    _log.warning("round %d: a site did not answer its challenge (%s)", server_round,
                                 type(answer).__name__)
                    continue
                public = properties.get("site_key", b"")
                try:
                    check_properties(properties)
                    mask_key = properties.get("mask_key", b"")
                    if secure and not mask_key:
                        raise FederationAuthError("a site answered without a mask key (secure aggregation)")
                    message = site_auth_message(server_round, proxy.cid, challenges[proxy.cid], mask_key)
                    if allowed is None and not public:
                        fingerprint = "unauthenticated"  # --allow-any-site: a site without a key
                    else:
                        fingerprint = verify_site(allowed, public, properties.get("signature", b""), message)
                        if any(a.fingerprint == fingerprint for a in admitted.values()):
                            raise FederationAuthError(f"site key {fingerprint[:23]} answered twice in one round")
                except FederationError as exc:
                    shown = site_fingerprint(public if isinstance(public, bytes) else b"")[:23]
                    _log.warning("round %d: site key %s refused: %s", server_round, shown, exc.one_line())
                    self.refused_ids.add(proxy.cid)
                    self.round_refused.append(shown)
                    refused.append(proxy)
                    audit_event(AUDIT_ACTION, model_digest=digest,
                                params={"federation": "site-refused", "round": server_round, "site_key": shown},
                                outcome=f"refused:{exc.kind}")
                    continue
                admitted[proxy.cid] = _Admitted(proxy, fingerprint, mask_key)
                self.authenticated[proxy.cid] = fingerprint
            # Tell a refused site, so its operator sees why (it ends its process; no answer expected).
            _ask([(proxy, {"wsiflow": "refused", "round": server_round}) for proxy in refused], _NOTICE_TIMEOUT_S,
                 server_round)

        def _admit(self, server_round: int, proxies: Sequence[Any], client_manager: Any) -> dict[str, _Admitted]:
            """The sites that pass this round's challenge; waits (``wait_for_sites_s``) for more
            connections while fewer than ``min_sites`` passed."""
            admitted: dict[str, _Admitted] = {}
            asked = {proxy.cid for proxy in proxies}
            self._authenticate(server_round, [p for p in proxies if p.cid not in self.refused_ids], admitted)
            deadline = time.monotonic() + settings.wait_for_sites_s
            while len(admitted) < settings.min_sites and time.monotonic() < deadline:
                time.sleep(0.5)
                fresh = [p for cid, p in client_manager.all().items() if cid not in asked | self.refused_ids]
                asked.update(p.cid for p in fresh)
                self._authenticate(server_round, fresh, admitted)
            return admitted

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
            instructions = super().configure_fit(server_round, parameters, client_manager)
            self.round_refused = []
            self.participants = {}
            if not instructions:
                return []
            template = instructions[0][1]
            admitted = self._admit(server_round, [proxy for proxy, _ in instructions], client_manager)
            if len(admitted) < settings.min_sites:
                _log.warning("round %d: %d site(s) passed the challenge, fewer than the minimum %d: the global "
                             "model is unchanged", server_round, len(admitted), settings.min_sites)
                rounds_out.append(RoundStats(server_round, 0, 0, False, (), time.perf_counter() - self.started,
                                             None, tuple(self.round_refused)))
                return []
            self.round_global = _from_parameters(parameters)
            self.participants = {cid: a.mask_key for cid, a in admitted.items()}
            out = []
            for cid, site in sorted(admitted.items()):
                config = dict(template.config)
                if secure:
                    p = settings.secagg
                    config.update({"secagg": True, "secagg_self": cid, "secagg_scale_bits": p.scale_bits,
                                   "secagg_max_sites": p.max_sites, "secagg_max_examples": p.max_examples,
                                   "secagg_element_range": p.element_range})
                    config.update({f"secagg_key:{peer}": key for peer, key in self.participants.items()})
                out.append((site.proxy, FitIns(template.parameters, config)))
            return out

        # -- aggregation ---------------------------------------------------------------------
        def _secure_aggregate(self, server_round: int, valid: list[tuple[Any, FitRes]]) -> tuple[Any, int]:
            """The new global parameters from the masked updates (None if a dropped site's masks
            cannot be removed) and the number of dropped sites whose masks were."""
            survivors = {proxy.cid for proxy, _ in valid}
            dropped = sorted(set(self.participants) - survivors)
            revealed: list[tuple[str, str, bytes]] = []
            if dropped:
                _log.info("round %d: %d site(s) dropped after the key exchange; asking %d survivor(s) for their "
                          "seeds with them", server_round, len(dropped), len(valid))
                questions = [(proxy, {"wsiflow": "reveal", "round": server_round, "dropped": ",".join(dropped)})
                             for proxy, _ in valid]
                for proxy, answer in _ask(questions, _ASK_TIMEOUT_S, server_round):
                    properties = _answered(answer) or {}
                    seeds = [seed for cid in dropped if isinstance(seed := properties.get(f"seed:{cid}"), bytes)]
                    try:
                        check_properties(properties)
                    except FederationError:
                        seeds = []
                    if len(seeds) != len(dropped):
                        _log.warning("round %d: a survivor did not reveal its seeds with the dropped site(s): the "
                                     "round cannot be unmasked; the global model is unchanged", server_round)
                        return None, 0
                    revealed.extend((proxy.cid, cid, seed) for cid, seed in zip(dropped, seeds, strict=True))
            examples = sum(res.num_examples for _, res in valid)
            total = unmask_sum([_from_parameters(res.parameters) for _, res in valid], revealed, shapes)
            mean = dequantise(total, examples, settings.secagg)
            arrays = [(np.asarray(g, np.float64) + m).astype(np.float32) for g, m in zip(self.round_global, mean,
                                                                                         strict=True)]
            return _to_parameters(arrays), len(dropped)

        def aggregate_fit(self, server_round: int, results: list[tuple[Any, FitRes]],
                          failures: list[Any]) -> tuple[Any, dict[str, Any]]:
            valid = []
            for proxy, res in results:
                try:
                    if secure and proxy.cid not in self.participants:
                        raise FederationError("an update came from a site outside this round's key exchange")
                    if secure and not 1 <= res.num_examples <= settings.secagg.max_examples:
                        raise FederationError(f"an update claims {res.num_examples} examples")
                    check_payload(_from_parameters(res.parameters), res.metrics, shapes, masked=secure)
                except FederationError as exc:
                    _log.warning("round %d: an update was refused: %s", server_round, exc.one_line())
                    failures.append(exc)
                    continue
                valid.append((proxy, res))
            sizes = tuple(sum(len(t) for t in res.parameters.tensors) for _, res in valid)
            aggregated: Any = None
            metrics: dict[str, Any] = {}
            recovered = 0
            if len(valid) >= settings.min_sites:
                if secure:
                    aggregated, recovered = self._secure_aggregate(server_round, valid)
                    if aggregated is not None:
                        metrics = _weighted_loss([(res.num_examples, res.metrics) for _, res in valid])
                else:
                    aggregated, metrics = super().aggregate_fit(server_round, valid, failures)
            else:
                _log.warning("round %d: %d site update(s), fewer than the minimum %d: the global model is "
                             "unchanged", server_round, len(valid), settings.min_sites)
            if aggregated is not None:
                self.completed += 1
                self.contributors.update(proxy.cid for proxy, _ in valid)
            loss = metrics.get("loss")
            rounds_out.append(RoundStats(server_round, len(valid), len(failures), aggregated is not None, sizes,
                                         time.perf_counter() - self.started,
                                         float(loss) if isinstance(loss, (int, float)) else None,
                                         tuple(self.round_refused), recovered))
            if keep_rounds is not None and aggregated is not None:
                keep_rounds.append(_from_parameters(aggregated))
            return aggregated, metrics

        def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
            if server_round != settings.rounds or self.completed == 0:
                return []
            config: dict[str, Any] = {"final": True, "base_sha256": digest,
                      "rounds_planned": settings.rounds, "rounds_completed": self.completed,
                      "sites": len(self.contributors), "strategy": settings.strategy,
                      "proximal_mu": settings.proximal_mu, "local_epochs": settings.local_epochs,
                      "learning_rate": settings.learning_rate, "dp_clip": settings.privacy.clip_norm or 0.0,
                      "dp_noise": settings.privacy.noise_multiplier, "secure_aggregation": secure,
                      "site_authentication": allowed is not None}
            if secure:
                config.update({f"secagg_{k}": v for k, v in settings.secagg.to_json().items()})
            # Only to sites that passed a challenge on their connection, never to a refused one.
            return [(proxy, EvaluateIns(parameters, config)) for cid, proxy in client_manager.all().items()
                    if cid in self.authenticated and cid not in self.refused_ids]

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
    allowed: SiteAllowList | None,
    keep_round_models: bool = False,
) -> tuple[list[RoundStats], list[list[np.ndarray]]]:
    """Run the coordinator until ``settings.rounds`` rounds are done; the per-round stats and
    (with ``keep_round_models``) the global arrays after each aggregated round.

    ``allowed``: the site keys admitted (None: any site, still challenged; a site with a key
    must sign correctly)."""
    _flower_env()
    from flwr.server import ServerConfig, start_server

    rounds: list[RoundStats] = []
    kept: list[list[np.ndarray]] | None = [] if keep_round_models else None
    strategy = _make_strategy(base, settings, rounds, kept, allowed)
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
    (kind, round, array shapes and dtypes, metric keys and values, property keys, bytes) and,
    with ``keep_payloads``, the exact serialised protobuf the transport sends."""

    def __init__(self, directory: Path, keep_payloads: bool) -> None:
        self.directory = directory
        self.keep_payloads = keep_payloads
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.count = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def record(self, kind: str, round_: int, message: Any, arrays: Sequence[np.ndarray],
               metrics: Mapping[str, Any], num_examples: int | None, properties: Sequence[str] = ()) -> None:
        data = message.SerializeToString()
        with self._lock:
            self.count += 1
            self.bytes += len(data)
            entry = {"seq": self.count, "kind": kind, "round": round_, "bytes": len(data),
                     "shapes": [list(a.shape) for a in arrays], "dtypes": sorted({str(a.dtype) for a in arrays}),
                     "metrics": dict(metrics), "num_examples": num_examples, "properties": sorted(properties),
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


def _config_bytes(config: Mapping[str, Any], key: str, length: int) -> bytes:
    value = config.get(key)
    if not isinstance(value, bytes) or len(value) != length:
        raise FederationError(f"the coordinator sent no {length}-byte value for {key!r}")
    return value


def _site_id(value: object) -> str:
    if not isinstance(value, str) or not _SITE_ID_RE.match(value):
        raise FederationError("the coordinator sent a malformed site id")
    return value


class _Site:
    """The training and registration a site does for the coordinator's messages."""

    def __init__(self, base: LoadedModel, registry: Registry, name: str, images: np.ndarray, labels: np.ndarray,
                 log: _OutgoingLog, site_key: Ed25519PrivateKey | None = None) -> None:
        self.base = base
        self.registry = registry
        self.name = name
        self.images = images
        self.labels = labels
        self.log = log
        self.site_key = site_key
        self.shapes = parameter_shapes(base.module)
        self.rounds_trained = 0
        self.entry: ModelEntry | None = None
        self.rng = np.random.default_rng(secrets.randbits(64))
        # Secure aggregation: this round's ephemeral key, then its seeds with every peer.
        self.site_id = ""
        self.mask_round = 0
        self.mask_key: X25519PrivateKey | None = None
        self.mask_public = b""
        self.seeds: dict[str, bytes] = {}
        self.last_sent_round = 0
        self.revealed_round = 0

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

    # -- the coordinator's questions (get_properties) -------------------------------------------
    def properties(self, config: Mapping[str, Any]) -> dict[str, bytes]:
        question = config.get("wsiflow")
        if question == "authenticate":
            return self._answer_challenge(config)
        if question == "reveal":
            return self._reveal(config)
        if question == "refused":
            shown = "(none)"
            if self.site_key is not None:
                shown = site_fingerprint(site_public_key(self.site_key))[:23]
            raise FederationAuthError(f"the coordinator refused this site's key {shown}",
                                      hint="send the fingerprint `wsiflow federate keygen` printed to the "
                                           "coordinator's operator, to be added to its --site-keys list")
        return {}

    def _answer_challenge(self, config: Mapping[str, Any]) -> dict[str, bytes]:
        round_ = int(_config_number(config, "round"))
        site_id = _site_id(config.get("site_id"))
        challenge = _config_bytes(config, "challenge", 32)
        if round_ <= self.last_sent_round:
            _log.warning("the coordinator asked again about round %d, already sent: not answered", round_)
            return {}
        mask_public = b""
        if config.get("secure_aggregation") is True:
            self.mask_key, mask_public = mask_key_pair()
            self.mask_public, self.mask_round, self.site_id, self.seeds = mask_public, round_, site_id, {}
        if self.site_key is None:
            if config.get("key_required") is True:
                raise FederationAuthError("the coordinator admits only listed sites and this site has no key",
                                          hint="join with --site-key KEY.pem (`wsiflow federate keygen`) and have "
                                               "its fingerprint listed at the coordinator")
            return {"mask_key": mask_public} if mask_public else {}
        public, signature = sign_challenge(self.site_key, site_auth_message(round_, site_id, challenge, mask_public))
        answer = {"site_key": public, "signature": signature}
        if mask_public:
            answer["mask_key"] = mask_public
        return answer

    def _reveal(self, config: Mapping[str, Any]) -> dict[str, bytes]:
        """This round's seeds with the sites that dropped: once a round, only with peers of the
        round, and never so many that fewer than two updates would remain in the sum."""
        round_ = int(_config_number(config, "round"))
        dropped = sorted(set(str(config.get("dropped", "")).split(",")))
        remaining = len(self.seeds) + 1 - len(dropped)
        if (round_ != self.mask_round or self.revealed_round == round_ or not self.seeds
                or not set(dropped) <= set(self.seeds) or remaining < 2):
            _log.warning("round %d: the coordinator asked for mask seeds this site does not reveal", round_)
            return {}
        self.revealed_round = round_
        _log.info("round %d: revealed the seeds with %d dropped site(s)", round_, len(dropped))
        return {f"seed:{cid}": self.seeds[cid] for cid in dropped}

    def _masked(self, deltas: list[np.ndarray], round_: int, config: Mapping[str, Any]) -> list[np.ndarray]:
        own = _site_id(config.get("secagg_self"))
        if self.mask_key is None or round_ != self.mask_round or own != self.site_id:
            raise FederationError(f"round {round_}: the coordinator asks for secure aggregation without this round's "
                                  "key exchange")
        keys = {k.removeprefix("secagg_key:"): v for k, v in config.items() if k.startswith("secagg_key:")}
        if keys.get(own) != self.mask_public:
            raise FederationError("the coordinator did not pass on this site's own mask key unchanged")
        params = SecAggParams(int(_config_number(config, "secagg_max_sites")),
                              int(_config_number(config, "secagg_max_examples")),
                              _config_number(config, "secagg_element_range"))
        if params.scale_bits != int(_config_number(config, "secagg_scale_bits")):
            raise FederationError("the coordinator's fixed-point scale does not follow from its limits")
        if not 2 <= len(keys) <= params.max_sites:
            raise FederationError(f"secure aggregation over {len(keys)} site(s): needs 2 to {params.max_sites}")
        self.seeds = {_site_id(cid): pair_seed(self.mask_key, key, round_, own, cid)
                      for cid, key in keys.items() if cid != own}
        quantised, clipped = quantise(deltas, len(self.images), params)
        if clipped:
            _log.warning("round %d: %d update element(s) beyond +-%g were clipped for secure aggregation", round_,
                         clipped, params.element_range)
        return mask_update(quantised, own, self.seeds)

    # -- training and registration -------------------------------------------------------------
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
        deltas, norm = clipped_update(global_arrays, parameter_arrays(module), privacy, self.rng)
        _log.info("round %d: trained on %d patches, update norm %.3f", round_, len(self.images), norm)
        metrics: dict[str, Any] = {"loss": float(history[-1].loss)}
        masked = config.get("secagg") is True
        if masked:
            arrays = self._masked(deltas, round_, config)
        else:
            arrays = [(np.asarray(g, np.float64) + d).astype(np.float32) for g, d in zip(global_arrays, deltas,
                                                                                         strict=True)]
        check_payload(arrays, metrics, self.shapes, masked=masked)
        self.rounds_trained += 1
        self.last_sent_round = round_
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
        secure = config.get("secure_aggregation") is True
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
            "secure_aggregation": secure,
            "site_authentication": config.get("site_authentication") is True,
        }
        if secure:
            record["secure_aggregation_parameters"] = {
                "protocol": str(config.get("secagg_protocol")),
                **{k: _config_number(config, f"secagg_{k}") for k in ("modulus_bits", "scale_bits", "max_sites",
                                                                      "max_examples", "element_range")},
            }
        manifest, weights, full = federated_candidate(
            self.base, arrays, name=self.name, version=self.registry.next_version(self.name), record=record
        )
        lineage_file = (json.dumps(full, indent=2, sort_keys=True) + "\n").encode()
        entry = self.registry.add(manifest, weights, extra_files={"federation.json": lineage_file})
        self.registry.record_install(entry, {"source": "federation",
                                             "lineage_sha256": manifest.lineage.training_data_digest})
        self.entry = entry
        audit_event(AUDIT_ACTION, model_digest=manifest.weights_sha256,
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
            properties = site.properties(ins.config)
            check_properties(properties)
            res = GetPropertiesRes(status=ok, properties=dict(properties))
            round_ = ins.config.get("round", 0)
            site.log.record("properties", int(round_) if isinstance(round_, int) else 0,
                            serde.get_properties_res_to_proto(res), [], {}, None, properties=list(properties))
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


def _wait_for_coordinator(server: str, max_wait_s: float) -> None:
    """Return once ``server`` (HOST:PORT) accepts TCP connections; :class:`FederationError`
    after ``max_wait_s``. Flower's legacy client gives up on a refused first connection."""
    host, _, port = server.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    deadline = time.monotonic() + max_wait_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise FederationError(
                    f"the coordinator at {server} accepted no connection within {max_wait_s:.0f} s "
                    f"({exc.strerror or type(exc).__name__})",
                    hint="start `wsiflow federate serve` there first; check --server (HOST:PORT) and the firewall",
                ) from None
        time.sleep(0.25)


def _grpc_status(exc: BaseException) -> str:
    """The status name of a failed gRPC call."""
    code = getattr(exc, "code", None)
    status = code() if callable(code) else None
    return str(getattr(status, "name", "UNKNOWN"))


def join_federation(
    base: LoadedModel,
    registry: Registry,
    *,
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    server: str,
    tls: TlsFiles,
    site_key: Ed25519PrivateKey | None = None,
    keep_payloads: bool = False,
    max_wait_s: float = 120.0,
) -> SiteOutcome:
    """Take part in a federation until the coordinator ends it; the candidate registered here.

    ``images``/``labels`` are this site's training patches (from its reviewed annotations);
    they never leave the process. ``site_key`` answers the coordinator's challenges. The
    coordinator may start later: this waits up to ``max_wait_s`` for it to accept connections.
    """
    _flower_env()
    import grpc  # type: ignore[import-untyped]  # grpcio ships no type stubs (types-grpcio is not installed)
    from flwr.client import start_client

    if len(images) == 0 or len(images) != len(labels):
        raise FederationError(f"{len(images)} training patches and {len(labels)} labels",
                              hint="give reviewed annotations that cover the slides")
    log = _OutgoingLog(_record_dir(), keep_payloads)
    site = _Site(base, registry, name, images, labels, log, site_key)
    audit_event(AUDIT_ACTION, model_digest=base.manifest.weights_sha256,
                params={"federation": "join", "base": base.manifest.ref, "name": name, "patches": len(images),
                        "site_key": None if site_key is None else site_fingerprint(site_public_key(site_key))},
                outcome="federation-joined")
    log.status("connecting", 0)
    client = _flower_client(site)
    root_certificates = tls._read(tls.ca)
    deadline = time.monotonic() + max_wait_s
    try:
        while True:
            _wait_for_coordinator(server, max(1.0, deadline - time.monotonic()))
            try:
                start_client(server_address=server, client_fn=lambda _context: client,
                             root_certificates=root_certificates)
                break
            except grpc.RpcError as exc:  # only a refusal before the first message is retried
                failure = _grpc_status(exc)
                if failure == "UNAVAILABLE" and log.count == 0 and time.monotonic() < deadline:
                    _log.info("the coordinator's port is open but it refused the connection; retrying")
                    time.sleep(1.0)
                    continue
                raise FederationError(f"the connection to the coordinator at {server} failed ({failure})",
                                      hint="check --server and --tls-ca, and that the coordinator still runs") \
                    from None
    except BaseException as exc:
        audit_event(AUDIT_ACTION, model_digest=base.manifest.weights_sha256, params={"federation": "left"},
                    outcome=f"failed:{getattr(exc, 'kind', type(exc).__name__)}")
        raise
    entry = site.entry
    if entry is None:
        audit_event(AUDIT_ACTION, model_digest=base.manifest.weights_sha256, params={"federation": "ended"},
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
    out["secagg"] = settings.secagg.to_json() if settings.secure_aggregation else None
    return out
