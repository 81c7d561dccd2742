"""``wsiflow models``: list, show, verify, import, remove, promote, rollback, predict, and signed
bundles: keygen and pack (publisher), trust and install (site)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from models import (
    ModelEntry,
    Registry,
    import_model,
    install_bundle,
    keygen,
    load_patch,
    pack_bundle,
    trust_key,
    trusted_keys,
    untrust_key,
)
from pipeline import WsiflowError, classify_tiles
from privacy import audit_event

from .._config import WsiflowConfig
from ._common import EXIT_FAILED, EXIT_OK

__all__ = ["add_models_parser", "run_models", "registry_for", "audit_model_step"]

_AUDIT_ACTION_OF_STEP = {
    "install": "model-install",
    "trust-add": "model-trust",
    "trust-remove": "model-trust",
    "rollback": "model-rollback",
    "validate-record": "model-validate",
    "pack": "model-pack",
    "train": "model-train",
}
"""The audit action of each model step; where the action does not spell the step
(``model-trust`` for trust-add and trust-remove), the outcome names it (``ok;step=trust-add``)."""


def audit_model_step(step: str, *, model_digest: str | None = None, params: dict[str, Any] | None = None,
                     error: WsiflowError | None = None) -> None:
    """One audit event for a model step; ``error``: the step failed with it."""
    action = _AUDIT_ACTION_OF_STEP[step]
    outcome = "ok" if error is None else f"failed:{error.kind}"
    if action.removeprefix("model-") != step:
        outcome += f";step={step}"
    audit_event(action, model_digest=model_digest, params=params, outcome=outcome)


def registry_for(config: WsiflowConfig) -> Registry:
    return Registry(site_root=config.models.registry_dir) if config.models.registry_dir else Registry()


def add_models_parser(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser(
        "models",
        help="the local model registry",
        description="Manage the local model registry (bundled and site models).",
    )
    sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="every model version")
    ls.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="one model's manifest")
    show.add_argument("model", metavar="NAME[@VERSION]")
    show.add_argument("--json", action="store_true")
    verify = sub.add_parser("verify", help="check weights against their pinned sha256 (all models by default)")
    verify.add_argument("model", nargs="*", metavar="NAME[@VERSION]")
    verify.add_argument("--json", action="store_true")
    verify.add_argument(
        "--build", action="store_true",
        help="also build each architecture and load its weights strictly (imports torch and timm: seconds "
             "a model; the digest, registry records and safetensors format are checked either way)",
    )
    imp = sub.add_parser(
        "import", help="add a model folder, .safetensors, or (converted) checkpoint to the site registry"
    )
    imp.add_argument("source", type=Path, metavar="SOURCE")
    imp.add_argument("--manifest", type=Path, help="manifest JSON describing bare weights")
    imp.add_argument(
        "--allow-pickle-conversion", action="store_true",
        help="convert a .pt/.pth/.ckpt state_dict to safetensors (loaded with weights_only=True)",
    )
    imp.add_argument("--json", action="store_true")
    rm = sub.add_parser("remove", help="delete a site model version")
    rm.add_argument("model", metavar="NAME@VERSION")
    rm.add_argument("--yes", action="store_true", help="confirm removing the last site version of a model")
    promote = sub.add_parser(
        "promote", help="make a version validated on this site the default (acceptance thresholds from the config)"
    )
    promote.add_argument("model", metavar="NAME@VERSION")
    promote.add_argument("--json", action="store_true")
    rollback = sub.add_parser("rollback", help="make the version promoted before the current default the default")
    rollback.add_argument("name", metavar="NAME")
    rollback.add_argument("--json", action="store_true")
    kg = sub.add_parser("keygen", help="publisher: make an Ed25519 signing key (offline) and its .pub")
    kg.add_argument("--out", type=Path, required=True, metavar="KEY.pem",
                    help="private key file (owner-only; encrypted when $WSIFLOW_KEY_PASSPHRASE is set)")
    pack = sub.add_parser("pack", help="publisher: sign a model into one .wsimodel bundle")
    pack.add_argument("model", metavar="NAME@VERSION")
    pack.add_argument("--key", type=Path, required=True, metavar="KEY.pem", help="the publisher's Ed25519 key")
    pack.add_argument("--out", type=Path, required=True, metavar="FILE.wsimodel")
    pack.add_argument("--card", type=Path, help="model card (default: the model's MODEL_CARD.md)")
    pack.add_argument("--report", type=Path,
                      help="validation report JSON (default: the model's validation/validation.json, if any)")
    pack.add_argument("--json", action="store_true")
    trust = sub.add_parser("trust", help="the publisher keys this site trusts for `models install`")
    trust_sub = trust.add_subparsers(dest="trust_command", required=True, metavar="ACTION")
    trust_add = trust_sub.add_parser("add", help="trust a publisher's Ed25519 public key")
    trust_add.add_argument("key", type=Path, metavar="KEY.pub")
    trust_add.add_argument("--name", required=True, help="the publisher's name, as the site knows them")
    trust_list = trust_sub.add_parser("list", help="the trusted keys and their fingerprints")
    trust_list.add_argument("--json", action="store_true")
    trust_rm = trust_sub.add_parser("remove", help="stop trusting a publisher (installed models stay)")
    trust_rm.add_argument("name", metavar="NAME")
    install = sub.add_parser(
        "install", help="verify a signed .wsimodel and add it as a candidate (validate and promote it to use it)"
    )
    install.add_argument("bundle", type=Path, metavar="FILE.wsimodel")
    install.add_argument("--json", action="store_true")
    predict = sub.add_parser("predict", help="classify a few patch images (PNG/JPEG)")
    predict.add_argument("model", metavar="NAME[@VERSION]")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--mpp", type=float, help="µm/px of the images (default: the model's)")
    predict.add_argument("--json", action="store_true")


def _summary(entry: ModelEntry, default_version: int | None, registry: Registry | None = None) -> dict[str, Any]:
    m = entry.manifest
    install = registry.install_record(entry) if registry is not None and entry.source == "site" else None
    return {
        "name": m.name,
        "version": m.version,
        "ref": m.ref,
        "sha256": m.weights_sha256,
        "classes": list(m.class_names),
        "target_mpp": m.target_mpp,
        "tile_size_px": m.tile_size_px,
        "architecture": m.timm_name,
        "source": entry.source,
        "default": m.version == default_version,
        "validated": m.validation is not None,
        "created_at": m.created_at,
        "candidate": registry.is_candidate(entry) if registry is not None else False,
        "publisher": install.get("publisher_name") if install else None,
        "broken": None,
    }


def _defaults(registry: Registry, names: set[str]) -> dict[str, int | None]:
    """Each name's default; a name whose default cannot be determined is listed without one (and said why)."""
    found: dict[str, int | None] = {}
    for name in sorted(names):
        try:
            found[name] = registry.default_version(name)
        except WsiflowError as exc:
            found[name] = None
            print(f"{name}: error {exc.one_line()}", file=sys.stderr)
    return found


def _list(registry: Registry, args: argparse.Namespace) -> int:
    entries = registry.entries()
    defaults = _defaults(registry, {e.manifest.name for e in entries})
    rows = []
    for e in entries:
        try:
            rows.append(_summary(e, defaults[e.manifest.name], registry))
        except WsiflowError as exc:  # the state file cannot be read: still list what is there
            broken = {"kind": exc.kind, "message": exc.message}
            rows.append({**_summary(e, defaults[e.manifest.name]), "broken": broken})
    for bad in registry.broken():
        rows.append({"name": bad.name, "version": bad.version, "ref": bad.ref, "source": bad.source,
                     "default": False, "broken": {"kind": bad.error.kind, "message": bad.error.message}})
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no models (the bundled ones are missing: reinstall wsiflow)")
    for row in rows:
        if "sha256" not in row:
            print(f"! {row['ref']:<24} {row['source']:<8} BROKEN {row['broken']['kind']}: {row['broken']['message']}")
            continue
        mark = "*" if row["default"] else "c" if row["candidate"] else " "
        print(
            f"{mark} {row['ref']:<24} {row['source']:<8} {row['architecture']:<24} {row['tile_size_px']} px @ "
            f"{row['target_mpp']:g} µm/px  classes {','.join(row['classes'])}  sha256 {row['sha256'][:12]}"
            + (f"  publisher {row['publisher']}" if row["publisher"] else "")
        )
    if rows:
        print("(* = default version of its name; c = candidate: validate --record and promote to use it; "
              "! = broken, unusable)")
    return EXIT_OK


def _show(registry: Registry, args: argparse.Namespace) -> int:
    entry = registry.resolve(args.model)
    install = registry.install_record(entry) if entry.source == "site" else None
    candidate = registry.is_candidate(entry)
    data = {**entry.manifest.to_json(), "source": entry.source, "candidate": candidate, "installed_from": install}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        m = entry.manifest
        print(f"{m.ref} ({entry.source})")
        print(f"  architecture  timm {m.timm_name} {m.timm_kwargs or ''}")
        print(f"  input         {m.tile_size_px} px at {m.target_mpp:g} µm/px, mean {m.mean}, std {m.std}")
        print("  classes       " + ", ".join(f"{c.name} ({c.color})" for c in m.classes))
        print(f"  weights       {m.weights_file} sha256 {m.weights_sha256}")
        print(f"  intended use  {m.intended_use}")
        print(f"  created       {m.created_at}")
        if m.lineage.parent:
            print(f"  parent        {m.lineage.parent} (sha256 {m.lineage.parent_sha256})")
        if m.lineage.training_data_digest:
            print(f"  training data {m.lineage.training_data_digest}")
        if install is not None and install.get("publisher_name"):
            print(f"  installed     from publisher {install['publisher_name']!r} ({install['publisher'][:23]}...), "
                  f"{install['installed_at']}" + (" -- a candidate: validate --record, then promote" if candidate
                                                   else ""))
        if m.validation:
            v = m.validation
            metrics = ", ".join(f"{k} {val:.3f}" for k, val in v.metrics.items() if isinstance(val, float))
            print(f"  validation    {v.date}: {metrics} ({v.dataset})")
        else:
            print("  validation    none recorded (run `wsiflow validate ... --record`)")
    return EXIT_OK


def _verify(registry: Registry, args: argparse.Namespace) -> int:
    entries = [registry.resolve(r) for r in args.model] if args.model else registry.entries()
    results: list[dict[str, Any]] = []
    failed = 0
    for bad in [] if args.model else registry.broken():
        audit_event("model-verify", params={"ref": bad.ref}, outcome=f"failed:{bad.error.kind}")
        failed += 1
        results.append({"ref": bad.ref, "ok": False, "sha256": None,
                        "error": {"kind": bad.error.kind, "message": bad.error.message}})
        print(f"{bad.ref}: error {bad.error.one_line()}", file=sys.stderr)
    for entry in entries:
        try:
            # Registry records, links, sha256, safetensors format; the strict load only when
            # asked: the manifest (so its architecture) and the weights are pinned by digest.
            registry.load_entry(entry, build=args.build)
            results.append(
                {"ref": entry.manifest.ref, "ok": True, "sha256": entry.manifest.weights_sha256, "error": None}
            )
            audit_event("model-verify", model_digest=entry.manifest.weights_sha256, params={"ref": entry.manifest.ref})
        except WsiflowError as exc:
            audit_event("model-verify", model_digest=entry.manifest.weights_sha256, params={"ref": entry.manifest.ref},
                        outcome=f"failed:{exc.kind}")
            failed += 1
            results.append({"ref": entry.manifest.ref, "ok": False, "sha256": entry.manifest.weights_sha256,
                            "error": {"kind": exc.kind, "message": exc.message}})
            print(f"{entry.manifest.ref}: error {exc.one_line()}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if r["ok"]:
                print(f"{r['ref']}: ok (sha256 {r['sha256'][:12]}...)")
    return EXIT_FAILED if failed else EXIT_OK


def _import(registry: Registry, args: argparse.Namespace) -> int:
    try:
        entry = import_model(
            registry, args.source, manifest_path=args.manifest, allow_pickle_conversion=args.allow_pickle_conversion
        )
    except WsiflowError as exc:
        audit_event("model-import", params={"allow_pickle_conversion": args.allow_pickle_conversion},
                    outcome=f"failed:{exc.kind}")
        raise
    audit_event("model-import", model_digest=entry.manifest.weights_sha256,
                params={"ref": entry.manifest.ref, "allow_pickle_conversion": args.allow_pickle_conversion})
    if args.json:
        print(json.dumps(_summary(entry, registry.default_version(entry.manifest.name), registry), indent=2))
    else:
        print(f"imported {entry.manifest.ref} into the site registry (sha256 {entry.manifest.weights_sha256[:12]}...)")
    return EXIT_OK


def _remove(registry: Registry, args: argparse.Namespace) -> int:
    try:
        removed = registry.remove(args.model, confirm_last=args.yes)
    except WsiflowError as exc:
        audit_event("model-remove", params={"ref": args.model}, outcome=f"failed:{exc.kind}")
        raise
    # A broken version has no manifest to take a digest from.
    ref, digest = (removed.manifest.ref, removed.manifest.weights_sha256) if isinstance(removed, ModelEntry) else (
        removed.ref, None)
    audit_event("model-remove", model_digest=digest, params={"ref": ref})
    print(f"removed {ref}")
    return EXIT_OK


def _promote(registry: Registry, args: argparse.Namespace, config: WsiflowConfig) -> int:
    try:
        entry, previous = registry.promote(args.model, config.models.acceptance)
    except WsiflowError as exc:
        audit_event("model-promote", params={"ref": args.model}, outcome=f"failed:{exc.kind}")
        raise
    name = entry.manifest.name
    audit_event("model-promote", model_digest=entry.manifest.weights_sha256,
                params={"ref": entry.manifest.ref, "previous_default": previous})
    if args.json:
        print(json.dumps({"ref": entry.manifest.ref, "previous_default": previous}, indent=2))
    elif previous is None:
        print(f"{entry.manifest.ref} is now the default of {name} (it was already)")
    else:
        print(f"{entry.manifest.ref} is now the default of {name} (previous default: {name}@{previous}; "
              f"`wsiflow models rollback {name}` restores it)")
    return EXIT_OK


def _rollback(registry: Registry, args: argparse.Namespace) -> int:
    try:
        before, now = registry.rollback(args.name)
    except WsiflowError as exc:
        audit_model_step("rollback", params={"name": args.name}, error=exc)
        raise
    entry = registry.resolve(f"{args.name}@{now}")
    audit_model_step("rollback", model_digest=entry.manifest.weights_sha256,
                     params={"name": args.name, "from": before, "to": now})
    if args.json:
        print(json.dumps({"name": args.name, "previous_default": before, "default": now}, indent=2))
    else:
        print(f"{args.name}@{now} is the default of {args.name} again ({args.name}@{before} stays installed)")
    return EXIT_OK


def _keygen(args: argparse.Namespace) -> int:
    public, fp = keygen(args.out)
    print(f"wrote the private key (keep it offline, owner-only) and its public key {public.name}")
    print(f"fingerprint {fp}")
    print(f"sites trust it with: wsiflow models trust add {public.name} --name PUBLISHER")
    return EXIT_OK


def _pack(registry: Registry, args: argparse.Namespace) -> int:
    try:
        entry = registry.resolve(args.model)
        packed = pack_bundle(entry, args.key, args.out, card=args.card, report=args.report)
    except WsiflowError as exc:
        audit_model_step("pack", params={"ref": args.model}, error=exc)
        raise
    audit_model_step("pack", model_digest=entry.manifest.weights_sha256,
                     params={"ref": packed.ref, "publisher": packed.publisher, "bundle_sha256": packed.sha256})
    if args.json:
        print(json.dumps({"ref": packed.ref, "publisher": packed.publisher, "sha256": packed.sha256,
                          "members": list(packed.members)}, indent=2))
    else:
        print(f"packed {packed.ref} signed by {packed.publisher[:23]}... (bundle sha256 {packed.sha256[:16]}...)")
    return EXIT_OK


def _trust(registry: Registry, args: argparse.Namespace) -> int:
    if args.trust_command == "list":
        keys = trusted_keys(registry)
        if args.json:
            print(json.dumps([{"name": k.name, "fingerprint": k.fingerprint, "added_at": k.added_at} for k in keys],
                             indent=2))
        elif not keys:
            print("no trusted publishers (add one with `wsiflow models trust add KEY.pub --name NAME`)")
        for k in [] if args.json else keys:
            print(f"{k.name:<24} {k.fingerprint}  added {k.added_at}")
        return EXIT_OK
    step = f"trust-{args.trust_command}"
    try:
        key = trust_key(registry, args.key, args.name) if args.trust_command == "add" else untrust_key(
            registry, args.name)
    except WsiflowError as exc:
        audit_model_step(step, params={"name": args.name}, error=exc)
        raise
    audit_model_step(step, params={"name": key.name, "fingerprint": key.fingerprint})
    verb = "trusts" if args.trust_command == "add" else "no longer trusts"
    print(f"this site {verb} publisher {key.name!r} ({key.fingerprint})")
    return EXIT_OK


def _install(registry: Registry, args: argparse.Namespace) -> int:
    try:
        entry, bundle = install_bundle(registry, args.bundle)
    except WsiflowError as exc:
        audit_model_step("install", error=exc)
        raise
    audit_model_step("install", model_digest=entry.manifest.weights_sha256,
                     params={"ref": entry.manifest.ref, "publisher": bundle.publisher.fingerprint,
                             "bundle_sha256": bundle.sha256})
    if args.json:
        print(json.dumps({**_summary(entry, registry.default_version(entry.manifest.name), registry),
                          "bundle_sha256": bundle.sha256}, indent=2))
    else:
        ref = entry.manifest.ref
        print(f"installed {ref} from {bundle.publisher.name!r} ({bundle.publisher.fingerprint[:23]}...) "
              "as a candidate")
        print(f"to use it: wsiflow validate {ref} --patches DIR --record, then wsiflow models promote {ref}")
    return EXIT_OK


def _predict(registry: Registry, args: argparse.Namespace) -> int:
    model = registry.load(args.model)
    rows: list[dict[str, Any]] = []
    failed = 0
    tiles, names = [], []
    for image in args.images:
        try:
            tiles.append(load_patch(image, model.preprocessing, args.mpp))
            names.append(str(image))
        except WsiflowError as exc:
            failed += 1
            rows.append({"image": str(image), "class": None, "probabilities": None,
                         "error": {"kind": exc.kind, "message": exc.message}})
            print(f"{image}: error {exc.one_line()}", file=sys.stderr)
    if tiles:
        probabilities = classify_tiles(model, tiles)
        for name, p in zip(names, probabilities, strict=True):
            rows.append({
                "image": name,
                "class": model.class_names[int(p.argmax())],
                "probabilities": {c: round(float(v), 6) for c, v in zip(model.class_names, p, strict=True)},
                "error": None,
            })
    order = {str(p): i for i, p in enumerate(args.images)}
    rows.sort(key=lambda r: order[r["image"]])
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            if r["class"] is not None:
                detail = "  ".join(f"{c} {v:.2f}" for c, v in r["probabilities"].items())
                print(f"{r['image']}: {r['class']}  ({detail})")
    return EXIT_FAILED if failed else EXIT_OK


def run_models(args: argparse.Namespace, config: WsiflowConfig) -> int:
    registry = registry_for(config)
    action = args.models_command
    if action == "list":
        return _list(registry, args)
    if action == "show":
        return _show(registry, args)
    if action == "verify":
        return _verify(registry, args)
    if action == "import":
        return _import(registry, args)
    if action == "remove":
        return _remove(registry, args)
    if action == "promote":
        return _promote(registry, args, config)
    if action == "rollback":
        return _rollback(registry, args)
    if action == "keygen":
        return _keygen(args)
    if action == "pack":
        return _pack(registry, args)
    if action == "trust":
        return _trust(registry, args)
    if action == "install":
        return _install(registry, args)
    return _predict(registry, args)
