"""``wsiflow federate serve`` (the coordinator) and ``wsiflow federate join`` (one site)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from models import (
    FederationError,
    PrivacySettings,
    annotated_dataset,
    check_training_inputs,
    keygen,
    load_site_key,
    read_site_keys,
)
from pipeline import ConfigError, MppPolicy
from privacy import audit_event, check_audit_log

from .._config import WsiflowConfig, check_host_port
from .._federate import (
    AUDIT_ACTION,
    STRATEGIES,
    FederationSettings,
    TlsFiles,
    settings_json,
)
from .._federate_serve import serve_federation
from .._federate_site import join_federation
from ._common import EXIT_OK, mpp_arg, positive_int
from ._models import registry_for

__all__ = ["JoinPlan", "ServePlan", "add_federate_parser", "join_plan", "run_federate", "serve_plan"]

T = TypeVar("T")


def add_federate_parser(commands: argparse._SubParsersAction) -> None:
    federate = commands.add_parser(
        "federate",
        help="fine-tune one model across sites without moving slides (Flower, TLS)",
        description=(
            "A coordinator (serve) and one process per site (join). Sites train on their own reviewed "
            "annotations and send only parameter arrays, a sample count and their loss; the global model "
            "lands in every site's registry as a candidate, the default only after validate and promote."
        ),
    )
    actions = federate.add_subparsers(dest="federate_command", required=True, metavar="ACTION")
    # Every option but the per-run ones has a config key (federation.serve.* / federation.join.*):
    # defaults here are None, so a value given on the command line is told apart from the config's.
    serve = actions.add_parser("serve", help="coordinate the rounds (holds the base model, never data)",
                               description="Options default to the config's federation.serve section.")
    serve.add_argument("--model", metavar="NAME@VERSION", help="the base model every site has (needed)")
    serve.add_argument("--address", metavar="HOST:PORT", help="listen here (default 127.0.0.1:8080)")
    serve.add_argument("--rounds", type=positive_int, help="default 3")
    serve.add_argument("--min-sites", type=positive_int,
                       help="sites a round needs: fewer updates leave the global model unchanged (default 2)")
    serve.add_argument("--strategy", choices=STRATEGIES, help="default fedavg")
    serve.add_argument("--proximal-mu", type=float, help="FedProx proximal term (e.g. 0.01)")
    serve.add_argument("--local-epochs", type=positive_int, help="default 2")
    serve.add_argument("--learning-rate", type=float, help="default 0.002")
    serve.add_argument("--batch-size", type=positive_int, help="local training batch size (default 32)")
    serve.add_argument("--seed", type=int)
    serve.add_argument("--dp-clip", type=float,
                       help="clip each site's update to this L2 norm (DP); 0: no DP, whatever the config says")
    serve.add_argument("--dp-noise", type=float, help="Gaussian noise std, in units of --dp-clip (default 0)")
    serve.add_argument("--round-timeout", type=float, metavar="S", help="default 600")
    serve.add_argument("--site-keys", type=Path, metavar="FILE",
                       help="the sites admitted: one SHA256:<hex> fingerprint (from `federate keygen`) or .pub PEM "
                            "block per site; every round, each site signs a fresh challenge with its key")
    serve.add_argument("--allow-any-site", action="store_true", default=None,
                       help="admit any site that reaches the port (no --site-keys); for tests and closed networks")
    serve.add_argument("--secure-aggregation", action=argparse.BooleanOptionalAction, default=None,
                       help="sites send pairwise-masked updates: the coordinator sees only their sum")
    serve.add_argument("--tls-ca", type=Path, metavar="PEM", help="the CA of the coordinator's certificate (needed)")
    serve.add_argument("--tls-cert", type=Path, metavar="PEM", help="the coordinator's certificate (needed)")
    serve.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key (needed)")
    serve.add_argument("--report", type=Path, metavar="JSON", help="write per-round statistics here")
    serve.add_argument("--keep-round-models", type=Path, metavar="DIR",
                       help="save the global arrays after each round (round-N.npz), for benchmarks")
    serve.add_argument("--json", action="store_true")
    join = actions.add_parser("join", help="train this site's part of each round",
                              description="Options default to the config's federation.join section.")
    join.add_argument("--server", metavar="HOST:PORT", help="the coordinator (needed)")
    join.add_argument("--tls-ca", type=Path, metavar="PEM", help="the CA that signed the coordinator (needed)")
    join.add_argument("--site-key", type=Path, metavar="PEM",
                      help="this site's Ed25519 identity key (`wsiflow federate keygen`); needed when the "
                           "coordinator lists its sites")
    join.add_argument("--model", metavar="NAME@VERSION",
                      help="the base model, from this site's registry (its weights must match the coordinator's; "
                           "needed)")
    join.add_argument("--name", help="registry name of the federated candidate, a new version (needed)")
    join.add_argument("--slides", nargs="+", type=Path, required=True, metavar="SLIDE")
    join.add_argument("--annotations", nargs="+", type=Path, required=True, metavar="GEOJSON",
                      help="reviewed annotations (review.geojson), one per slide, same order")
    join.add_argument("--per-class", type=positive_int, help="patches sampled per class (default 200)")
    join.add_argument("--seed", type=int)
    join.add_argument("--mpp", type=mpp_arg, metavar="X[,Y]", help="µm/px of the slides, overriding metadata")
    join.add_argument("--keep-payloads", action=argparse.BooleanOptionalAction, default=None,
                      help="keep every outgoing message's exact bytes in the site dir (for a payload audit)")
    join.add_argument("--json", action="store_true")
    keys = actions.add_parser("keygen", help="make a site's identity key (Ed25519) and print its fingerprint",
                              description="Writes KEY.pem (owner-only; encrypted when $WSIFLOW_KEY_PASSPHRASE is "
                                          "set) and KEY.pub. Give the site --site-key KEY.pem; give the coordinator's "
                                          "operator the fingerprint (or KEY.pub) for its --site-keys list.")
    keys.add_argument("--out", type=Path, required=True, metavar="KEY.pem")


@dataclass(frozen=True)
class ServePlan:
    """What ``federate serve`` runs: the command line over the config's federation.serve."""

    model: str
    address: str
    settings: FederationSettings
    tls: TlsFiles
    site_keys: Path | None = None
    allow_any_site: bool = False


@dataclass(frozen=True)
class JoinPlan:
    """What ``federate join`` runs: the command line over the config's federation.join."""

    server: str
    model: str
    name: str
    tls: TlsFiles
    per_class: int
    seed: int
    keep_payloads: bool
    site_key: Path | None = None


def _pick(option: T | None, configured: T | None, flag: str, key: str) -> T:
    """The option if given, else the config's value; a needed value missing in both is refused."""
    value = configured if option is None else option
    if value is None:
        raise ConfigError(f"{flag} is needed", hint=f"pass {flag} or set {key} in the config")
    return value


def serve_plan(args: argparse.Namespace, config: WsiflowConfig) -> ServePlan:
    """The coordinator's settings: built-in defaults < config federation.serve < options."""
    c = config.federation.serve
    model = _pick(args.model, c.model, "--model", "federation.serve.model")
    if "@" not in model:
        raise ConfigError(f"--model {model!r} must name a version (NAME@VERSION): every site needs the same one")
    address = check_host_port(_pick(args.address, c.address, "--address", "federation.serve.address"), "--address")
    # --dp-clip 0 turns off the config's DP for this run (a clip norm of 0 means nothing else).
    dp_clip = c.dp_clip if args.dp_clip is None else (args.dp_clip or None)
    try:
        settings = FederationSettings(
            rounds=_given(args.rounds, c.rounds), min_sites=_given(args.min_sites, c.min_sites),
            strategy=_given(args.strategy, c.strategy), proximal_mu=_given(args.proximal_mu, c.proximal_mu),
            local_epochs=_given(args.local_epochs, c.local_epochs),
            learning_rate=_given(args.learning_rate, c.learning_rate),
            batch_size=_given(args.batch_size, c.batch_size), seed=_given(args.seed, c.seed),
            privacy=PrivacySettings(dp_clip, _given(args.dp_noise, c.dp_noise)),
            round_timeout_s=_given(args.round_timeout, c.round_timeout_s),
            secure_aggregation=_given(args.secure_aggregation, c.secure_aggregation),
        )
    except FederationError as exc:  # the options and the config's keys together do not fit
        raise ConfigError(exc.message, hint=f"{exc.hint} (or the config's federation.serve keys)") from None
    tls = TlsFiles(_pick(args.tls_ca, c.tls_ca_file, "--tls-ca", "federation.serve.tls_ca_file"),
                   _pick(args.tls_cert, c.tls_cert_file, "--tls-cert", "federation.serve.tls_cert_file"),
                   _pick(args.tls_key, c.tls_key_file, "--tls-key", "federation.serve.tls_key_file"))
    site_keys = _given(args.site_keys, c.site_keys_file)
    allow_any_site = _given(args.allow_any_site, c.allow_any_site)
    if site_keys is not None and allow_any_site:
        raise ConfigError("--site-keys and --allow-any-site contradict each other",
                          hint="give one (or the config's federation.serve.site_keys_file / allow_any_site)")
    return ServePlan(model, address, settings, tls, site_keys, allow_any_site)


def join_plan(args: argparse.Namespace, config: WsiflowConfig) -> JoinPlan:
    """A site's settings: built-in defaults < config federation.join < options."""
    c = config.federation.join
    server = check_host_port(_pick(args.server, c.server, "--server", "federation.join.server"), "--server")
    return JoinPlan(
        server=server,
        model=_pick(args.model, c.model, "--model", "federation.join.model"),
        name=_pick(args.name, c.name, "--name", "federation.join.name"),
        tls=TlsFiles(_pick(args.tls_ca, c.tls_ca_file, "--tls-ca", "federation.join.tls_ca_file")),
        per_class=_given(args.per_class, c.per_class),
        seed=_given(args.seed, c.seed),
        keep_payloads=_given(args.keep_payloads, c.keep_payloads),
        site_key=_given(args.site_key, c.site_key_file),
    )


def _given(option: T | None, configured: T) -> T:
    return configured if option is None else option


def run_federate(args: argparse.Namespace, config: WsiflowConfig) -> int:
    check_audit_log()  # fail closed: every step is audited
    if args.federate_command == "keygen":
        public_path, fingerprint = keygen(args.out)
        audit_event(AUDIT_ACTION, params={"federation": "keygen", "site_key": fingerprint}, outcome="ok")
        print(f"site key written; public key {public_path.name}; fingerprint (for the coordinator's --site-keys):")
        print(fingerprint)
        return EXIT_OK
    if args.federate_command == "serve":
        return _serve(args, config)
    return _join(args, config)


def _serve(args: argparse.Namespace, config: WsiflowConfig) -> int:
    plan = serve_plan(args, config)
    settings, tls = plan.settings, plan.tls
    if plan.site_keys is None and not plan.allow_any_site:
        raise ConfigError("the coordinator needs the list of sites it admits",
                          hint="pass --site-keys FILE (fingerprints from `wsiflow federate keygen`) or set "
                               "federation.serve.site_keys_file; --allow-any-site admits any site that reaches the "
                               "port")
    allowed = None if plan.site_keys is None else read_site_keys(plan.site_keys)
    tls.server_tuple()  # readable before the model loads
    base = registry_for(config).load(plan.model)
    audit_event(AUDIT_ACTION, model_digest=base.manifest.weights_sha256,
                params={"federation": "serve", **settings_json(settings),
                        "site_keys": None if allowed is None else sorted(allowed.fingerprints)},
                outcome="federation-started")
    rounds, kept = serve_federation(base, settings, address=plan.address, tls=tls, allowed=allowed,
                                    keep_round_models=args.keep_round_models is not None)
    completed = sum(r.aggregated for r in rounds)
    audit_event(AUDIT_ACTION, model_digest=base.manifest.weights_sha256,
                params={"federation": "served", "rounds_completed": completed},
                outcome="ok" if completed else "failed:no-round-completed")
    report = {"model": base.manifest.ref, "settings": settings_json(settings), "rounds_completed": completed,
              "rounds": [{"round": r.round, "sites": r.sites, "failures": r.failures, "aggregated": r.aggregated,
                          "bytes_per_site": list(r.bytes_per_site), "round_time_s": round(r.round_time_s, 3),
                          "loss": r.loss, "refused": list(r.refused), "recovered": r.recovered} for r in rounds]}
    if args.keep_round_models is not None:
        args.keep_round_models.mkdir(parents=True, exist_ok=True)
        for i, arrays in enumerate(kept, start=1):
            np.savez(args.keep_round_models / f"round-{i}.npz", *arrays)
    if args.report is not None:
        args.report.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"federation of {base.manifest.ref}: {completed}/{settings.rounds} round(s) aggregated")
        for r in rounds:
            loss = "-" if r.loss is None else f"{r.loss:.3f}"
            extra = (f", {len(r.refused)} refused" if r.refused else "") + (
                f", masks of {r.recovered} dropped site(s) removed" if r.recovered else "")
            print(f"  round {r.round}: {r.sites} site(s), {r.failures} failure(s){extra}, loss {loss}, "
                  f"{r.round_time_s:.1f} s{'' if r.aggregated else ' (not aggregated)'}")
    return EXIT_OK


def _join(args: argparse.Namespace, config: WsiflowConfig) -> int:
    plan = join_plan(args, config)
    site_key = None if plan.site_key is None else load_site_key(plan.site_key)
    check_training_inputs(args.slides, args.annotations)  # before the base model loads
    registry = registry_for(config)
    base = registry.load(plan.model)
    policy = MppPolicy(cli_mpp=args.mpp, overrides=config.mpp_overrides)
    images, labels = annotated_dataset(args.slides, args.annotations, base.class_names, base, plan.per_class,
                                       plan.seed, policy)
    outcome = join_federation(base, registry, name=plan.name, images=images, labels=labels, server=plan.server,
                              tls=plan.tls, site_key=site_key, keep_payloads=plan.keep_payloads)
    result = {"ref": outcome.ref, "sha256": outcome.weights_sha256, "rounds_trained": outcome.rounds_trained,
              "messages_sent": outcome.messages_sent, "bytes_sent": outcome.bytes_sent,
              "candidate": True}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"federated candidate {outcome.ref} from {base.manifest.ref}: trained {outcome.rounds_trained} "
              f"round(s) here, sent {outcome.messages_sent} message(s), {outcome.bytes_sent} bytes")
        print(f"validate it before use: wsiflow validate {outcome.ref} --patches DIR --record; then "
              f"wsiflow models promote {outcome.ref}")
    return EXIT_OK
