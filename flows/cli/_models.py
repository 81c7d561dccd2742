"""``wsiflow models``: list, show, verify, import, remove, promote and predict."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from models import ModelEntry, Registry, import_model, load_model_from_dir, load_patch
from pipeline import WsiflowError, classify_tiles
from privacy import audit_event

from .._config import WsiflowConfig
from ._common import EXIT_FAILED, EXIT_OK

__all__ = ["add_models_parser", "run_models", "registry_for"]


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
    promote = sub.add_parser(
        "promote", help="make a validated version the default (acceptance thresholds from the config)"
    )
    promote.add_argument("model", metavar="NAME@VERSION")
    promote.add_argument("--json", action="store_true")
    predict = sub.add_parser("predict", help="classify a few patch images (PNG/JPEG)")
    predict.add_argument("model", metavar="NAME[@VERSION]")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--mpp", type=float, help="µm/px of the images (default: the model's)")
    predict.add_argument("--json", action="store_true")


def _summary(entry: ModelEntry, default_version: int | None) -> dict[str, Any]:
    m = entry.manifest
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
    }


def _list(registry: Registry, args: argparse.Namespace) -> int:
    entries = registry.entries()
    defaults = {name: registry.default_version(name) for name in {e.manifest.name for e in entries}}
    rows = [_summary(e, defaults[e.manifest.name]) for e in entries]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no models (the bundled ones are missing: reinstall wsiflow)")
    for row in rows:
        mark = "*" if row["default"] else " "
        print(
            f"{mark} {row['ref']:<24} {row['source']:<8} {row['architecture']:<24} {row['tile_size_px']} px @ "
            f"{row['target_mpp']:g} µm/px  classes {','.join(row['classes'])}  sha256 {row['sha256'][:12]}"
        )
    if rows:
        print("(* = default version of its name)")
    return EXIT_OK


def _show(registry: Registry, args: argparse.Namespace) -> int:
    entry = registry.resolve(args.model)
    data = {**entry.manifest.to_json(), "source": entry.source}
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
    for entry in entries:
        try:
            load_model_from_dir(entry.manifest, entry.directory)  # sha256 first, then a strict load
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
        print(json.dumps(_summary(entry, registry.default_version(entry.manifest.name)), indent=2))
    else:
        print(f"imported {entry.manifest.ref} into the site registry (sha256 {entry.manifest.weights_sha256[:12]}...)")
    return EXIT_OK


def _remove(registry: Registry, args: argparse.Namespace) -> int:
    entry = registry.remove(args.model)
    audit_event("model-remove", model_digest=entry.manifest.weights_sha256, params={"ref": entry.manifest.ref})
    print(f"removed {entry.manifest.ref}")
    return EXIT_OK


def _promote(registry: Registry, args: argparse.Namespace, config: WsiflowConfig) -> int:
    try:
        entry, previous = registry.promote(args.model, config.models.acceptance)
    except WsiflowError as exc:
        audit_event("model-promote", params={"ref": args.model}, outcome=f"failed:{exc.kind}")
        raise
    audit_event("model-promote", model_digest=entry.manifest.weights_sha256,
                params={"ref": entry.manifest.ref, "previous_default": previous})
    if args.json:
        print(json.dumps({"ref": entry.manifest.ref, "previous_default": previous}, indent=2))
    else:
        print(f"{entry.manifest.ref} is now the default of {entry.manifest.name}"
              + (f" (previous default: version {previous}, still available for rollback)" if previous else ""))
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
    return _predict(registry, args)
