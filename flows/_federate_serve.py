"""The federation's coordinator: challenges sites every round, aggregates (FedAvg/FedProx, or
the masked sum with secure aggregation) and sends the final model to the admitted sites."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from models import (
    FederationAuthError,
    FederationError,
    LoadedModel,
    SiteAllowList,
    check_payload,
    check_properties,
    dequantise,
    parameter_arrays,
    parameter_shapes,
    short_fingerprint,
    site_auth_message,
    site_fingerprint,
    unmask_sum,
    verify_site,
)
from privacy import audit_event

if TYPE_CHECKING:
    pass

from ._federate import (
    AUDIT_ACTION,
    FederationSettings,
    RoundStats,
    TlsFiles,
    apply_flower_offline_env,
    from_parameters,
    to_parameters,
)

__all__ = ["serve_federation"]

_log = logging.getLogger(__name__)

_ASK_TIMEOUT_S = 60.0
"""How long the coordinator waits for a site's answer to a challenge or a seed request."""
_NOTICE_TIMEOUT_S = 10.0


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
    apply_flower_offline_env()
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
                "accept_failures": True, "initial_parameters": to_parameters(initial),
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
                            raise FederationAuthError(
                                f"site key {short_fingerprint(fingerprint)} answered twice in one round")
                except FederationError as exc:
                    shown = short_fingerprint(site_fingerprint(public if isinstance(public, bytes) else b""))
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
            self.round_global = from_parameters(parameters)
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
            total = unmask_sum([from_parameters(res.parameters) for _, res in valid], revealed, shapes)
            mean = dequantise(total, examples, settings.secagg)
            arrays = [(np.asarray(g, np.float64) + m).astype(np.float32) for g, m in zip(self.round_global, mean,
                                                                                         strict=True)]
            return to_parameters(arrays), len(dropped)

        def aggregate_fit(self, server_round: int, results: list[tuple[Any, FitRes]],
                          failures: list[Any]) -> tuple[Any, dict[str, Any]]:
            valid = []
            for proxy, res in results:
                try:
                    if secure and proxy.cid not in self.participants:
                        raise FederationError("an update came from a site outside this round's key exchange")
                    if secure and not 1 <= res.num_examples <= settings.secagg.max_examples:
                        raise FederationError(f"an update claims {res.num_examples} examples")
                    check_payload(from_parameters(res.parameters), res.metrics, shapes, masked=secure)
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
                keep_rounds.append(from_parameters(aggregated))
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
    apply_flower_offline_env()
    from flwr.server import ServerConfig, start_server

    rounds: list[RoundStats] = []
    kept: list[list[np.ndarray]] | None = [] if keep_round_models else None
    strategy = _make_strategy(base, settings, rounds, kept, allowed)
    start_server(server_address=address, config=ServerConfig(num_rounds=settings.rounds,
                                                              round_timeout=settings.round_timeout_s),
                 strategy=strategy, certificates=tls.server_tuple())
    return rounds, kept or []
