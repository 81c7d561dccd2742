"""``wsiflow federate serve`` (the coordinator) and ``wsiflow federate join`` (one site)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from models import PrivacySettings, annotated_dataset, check_training_inputs
from pipeline import ConfigError, MppPolicy
from privacy import audit_event, check_audit_log

from .._config import WsiflowConfig
from .._federate import FederationSettings, TlsFiles, join_federation, serve_federation, settings_json
from ._common import EXIT_OK, mpp_arg
from ._models import registry_for

__all__ = ["add_federate_parser", "run_federate"]


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
    serve = actions.add_parser("serve", help="coordinate the rounds (holds the base model, never data)")
    serve.add_argument("--model", required=True, metavar="NAME@VERSION", help="the base model every site has")
    serve.add_argument("--address", default="127.0.0.1:8080", metavar="HOST:PORT")
    serve.add_argument("--rounds", type=int, default=3)
    serve.add_argument("--min-sites", type=int, default=2,
                       help="sites a round needs: fewer updates leave the global model unchanged")
    serve.add_argument("--strategy", choices=("fedavg", "fedprox"), default="fedavg")
    serve.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx proximal term (e.g. 0.01)")
    serve.add_argument("--local-epochs", type=int, default=2)
    serve.add_argument("--learning-rate", type=float, default=2e-3)
    serve.add_argument("--batch-size", type=int, default=32, help="local training batch size")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--dp-clip", type=float, help="clip each site's update to this L2 norm (DP)")
    serve.add_argument("--dp-noise", type=float, default=0.0, help="Gaussian noise std, in units of --dp-clip")
    serve.add_argument("--round-timeout", type=float, default=600.0, metavar="S")
    serve.add_argument("--tls-ca", type=Path, required=True, metavar="PEM")
    serve.add_argument("--tls-cert", type=Path, required=True, metavar="PEM")
    serve.add_argument("--tls-key", type=Path, required=True, metavar="PEM")
    serve.add_argument("--report", type=Path, metavar="JSON", help="write per-round statistics here")
    serve.add_argument("--keep-round-models", type=Path, metavar="DIR",
                       help="save the global arrays after each round (round-N.npz), for benchmarks")
    serve.add_argument("--json", action="store_true")
    join = actions.add_parser("join", help="train this site's part of each round")
    join.add_argument("--server", required=True, metavar="HOST:PORT")
    join.add_argument("--tls-ca", type=Path, required=True, metavar="PEM", help="the CA that signed the coordinator")
    join.add_argument("--model", required=True, metavar="NAME@VERSION",
                      help="the base model, from this site's registry (its weights must match the coordinator's)")
    join.add_argument("--name", required=True, help="registry name of the federated candidate (a new version)")
    join.add_argument("--slides", nargs="+", type=Path, required=True, metavar="SLIDE")
    join.add_argument("--annotations", nargs="+", type=Path, required=True, metavar="GEOJSON",
                      help="reviewed annotations (review.geojson), one per slide, same order")
    join.add_argument("--per-class", type=int, default=200, help="patches sampled per class (default 200)")
    join.add_argument("--seed", type=int, default=0)
    join.add_argument("--mpp", type=mpp_arg, metavar="X[,Y]", help="µm/px of the slides, overriding metadata")
    join.add_argument("--keep-payloads", action="store_true",
                      help="keep every outgoing message's exact bytes in the site dir (for a payload audit)")
    join.add_argument("--json", action="store_true")


def run_federate(args: argparse.Namespace, config: WsiflowConfig) -> int:
    check_audit_log()  # fail closed: every step is audited
    if args.federate_command == "serve":
        return _serve(args, config)
    return _join(args, config)


def _serve(args: argparse.Namespace, config: WsiflowConfig) -> int:
    if "@" not in args.model:
        raise ConfigError(f"--model {args.model!r} must name a version (NAME@VERSION): every site needs the same one")
    settings = FederationSettings(
        rounds=args.rounds, min_sites=args.min_sites, strategy=args.strategy, proximal_mu=args.proximal_mu,
        local_epochs=args.local_epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
        seed=args.seed,
        privacy=PrivacySettings(args.dp_clip, args.dp_noise), round_timeout_s=args.round_timeout,
    )
    tls = TlsFiles(args.tls_ca, args.tls_cert, args.tls_key)
    tls.server_tuple()  # readable before the model loads
    base = registry_for(config).load(args.model)
    audit_event("model-train", model_digest=base.manifest.weights_sha256,
                params={"federation": "serve", **settings_json(settings)}, outcome="federation-started")
    rounds, kept = serve_federation(base, settings, address=args.address, tls=tls,
                                    keep_round_models=args.keep_round_models is not None)
    completed = sum(r.aggregated for r in rounds)
    audit_event("model-train", model_digest=base.manifest.weights_sha256,
                params={"federation": "served", "rounds_completed": completed},
                outcome="ok" if completed else "failed:no-round-completed")
    report = {"model": base.manifest.ref, "settings": settings_json(settings), "rounds_completed": completed,
              "rounds": [{"round": r.round, "sites": r.sites, "failures": r.failures, "aggregated": r.aggregated,
                          "bytes_per_site": list(r.bytes_per_site), "round_time_s": round(r.round_time_s, 3),
                          "loss": r.loss} for r in rounds]}
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
            print(f"  round {r.round}: {r.sites} site(s), {r.failures} failure(s), loss {loss}, "
                  f"{r.round_time_s:.1f} s{'' if r.aggregated else ' (not aggregated)'}")
    return EXIT_OK


def _join(args: argparse.Namespace, config: WsiflowConfig) -> int:
    check_training_inputs(args.slides, args.annotations)  # before the base model loads
    registry = registry_for(config)
    base = registry.load(args.model)
    policy = MppPolicy(cli_mpp=args.mpp, overrides=config.mpp_overrides)
    images, labels = annotated_dataset(args.slides, args.annotations, base.class_names, base, args.per_class,
                                       args.seed, policy)
    outcome = join_federation(base, registry, name=args.name, images=images, labels=labels, server=args.server,
                              tls=TlsFiles(args.tls_ca), keep_payloads=args.keep_payloads)
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
