"""A site's process in a federation: answers the coordinator's challenges, trains on its own
patches, masks or clips its update, records every outgoing message, registers the candidate."""

from __future__ import annotations

import copy
import json
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models import (
    FederationAuthError,
    FederationError,
    LoadedModel,
    ModelEntry,
    PrivacySettings,
    Registry,
    SecAggParams,
    TrainSettings,
    check_payload,
    check_properties,
    clipped_update,
    federated_candidate,
    load_parameter_arrays,
    mask_key_pair,
    mask_update,
    pair_seed,
    parameter_arrays,
    parameter_shapes,
    proximal_hooks,
    quantise,
    short_fingerprint,
    sign_challenge,
    site_auth_message,
    site_fingerprint,
    site_public_key,
    train_module,
)
from pipeline import site_dir
from privacy import audit_event

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ._federate import AUDIT_ACTION, STRATEGIES, TlsFiles, apply_flower_offline_env, from_parameters, to_parameters

__all__ = ["SiteOutcome", "join_federation"]

_log = logging.getLogger(__name__)

_SITE_ID_RE = re.compile(r"^[0-9a-f]{32}$")


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
                shown = short_fingerprint(site_fingerprint(site_public_key(self.site_key)))
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
    apply_flower_offline_env()
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
                                   parameters=to_parameters([]))
            site.log.record("parameters", 0, serde.get_parameters_res_to_proto(res), [], {}, None)
            return res

        def fit(self, ins: FitIns) -> FitRes:
            arrays, count, metrics = site.fit(from_parameters(ins.parameters), ins.config)
            res = FitRes(status=ok, parameters=to_parameters(arrays), num_examples=count, metrics=metrics)
            site.log.record("fit", int(ins.config.get("round", 0)), serde.fit_res_to_proto(res), arrays, metrics,
                            count)
            return res

        def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
            if not ins.config.get("final"):
                res = EvaluateRes(status=ok, loss=0.0, num_examples=0, metrics={})
            else:
                loss, count = site.register(from_parameters(ins.parameters), ins.config)
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
    apply_flower_offline_env()
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
