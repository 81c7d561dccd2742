"""``wsiflow train`` (fine-tune on annotated slides) and ``wsiflow validate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models import (
    ModelEntry,
    Registry,
    TrainSettings,
    ValidationOverlapError,
    annotated_dataset,
    check_training_inputs,
    finetune,
    labelled_patch_folder,
    validate_arrays,
)
from pipeline import ConfigError, MppPolicy, WsiflowError, content_digest

from .._config import WsiflowConfig
from ._common import EXIT_OK, mpp_arg
from ._models import audit_model_step, registry_for

__all__ = ["add_train_parser", "add_validate_parser", "run_train", "run_validate"]


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="fine-tune a model on annotated slides into a new registry version",
        description=(
            "Sample patches inside annotated polygons (QuPath GeoJSON: properties.classification.name; "
            "level-0 pixel coordinates) at the base model's µm/px, train with augmentation, and store "
            "the result as a new version in the site registry with its lineage."
        ),
    )
    train.add_argument("--slides", nargs="+", type=Path, required=True, metavar="SLIDE")
    train.add_argument("--annotations", nargs="+", type=Path, required=True, metavar="GEOJSON",
                       help="one per slide, same order")
    train.add_argument("--base", metavar="MODEL", help="model to start from (default: the config's models.default)")
    train.add_argument("--name", required=True, help="name of the new model (a new version if it exists)")
    train.add_argument("--classes", help="comma-separated classes for a new head (default: the base model's)")
    train.add_argument("--epochs", type=int, default=5)
    train.add_argument("--per-class", type=int, default=200, help="patches sampled per class (default 200)")
    train.add_argument("--learning-rate", type=float, default=5e-4)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--mpp", type=mpp_arg, metavar="X[,Y]", help="µm/px of the slides, overriding metadata")
    train.add_argument("--json", action="store_true")


def add_validate_parser(commands: argparse._SubParsersAction) -> None:
    validate = commands.add_parser(
        "validate",
        help="measure a model on labelled patches or annotated slides; write a report",
        description=(
            "Accuracy, balanced accuracy, per-class precision/recall/F1, confusion matrix and calibration (ECE)."
        ),
    )
    validate.add_argument("model", metavar="NAME[@VERSION]")
    source = validate.add_mutually_exclusive_group(required=True)
    source.add_argument("--patches", type=Path, metavar="DIR", help="folder with one sub-folder of images per class")
    source.add_argument("--slides", nargs="+", type=Path, metavar="SLIDE")
    validate.add_argument("--annotations", nargs="+", type=Path, metavar="GEOJSON", help="with --slides: one per slide")
    validate.add_argument("--per-class", type=int, default=200, help="with --slides: patches sampled per class")
    validate.add_argument("--mpp", type=float,
                          help="µm/px of the patch images, or of the slides (default: model's / metadata)")
    validate.add_argument("--seed", type=int, default=0)
    validate.add_argument("--out", type=Path, help="report folder (default: ./validation-NAME-VERSION)")
    validate.add_argument("--record", action="store_true",
                          help="store the metrics in the (site) model's manifest, for promote")
    validate.add_argument("--json", action="store_true")


def run_train(args: argparse.Namespace, config: WsiflowConfig) -> int:
    try:
        return _train(args, config)
    except WsiflowError as exc:
        audit_model_step("train", params={"name": args.name, "base": args.base or config.models.default}, error=exc)
        raise


def _train(args: argparse.Namespace, config: WsiflowConfig) -> int:
    check_training_inputs(args.slides, args.annotations)  # before the base model loads
    registry = registry_for(config)
    base = registry.load(args.base or config.models.default)
    classes = tuple(c.strip() for c in args.classes.split(",")) if args.classes else None
    if classes is not None and (len(classes) < 2 or len(set(classes)) != len(classes) or not all(classes)):
        raise ConfigError(f"--classes {args.classes!r} must name at least two distinct classes")
    policy = MppPolicy(cli_mpp=args.mpp, overrides=config.mpp_overrides)
    settings = TrainSettings(
        epochs=args.epochs, learning_rate=args.learning_rate, seed=args.seed, progress=not args.json
    )
    version = registry.next_version(args.name)
    manifest, weights, history = finetune(
        base, name=args.name, version=version, slides=args.slides, annotations=args.annotations,
        classes=classes, settings=settings, per_class=args.per_class, mpp_policy=policy,
    )
    entry = registry.add(manifest, weights)
    audit_model_step("train", model_digest=manifest.weights_sha256,
                     params={"ref": entry.manifest.ref, "parent": manifest.lineage.parent,
                             "training_data": manifest.lineage.training_data_digest})
    result = {
        "ref": entry.manifest.ref,
        "parent": manifest.lineage.parent,
        "sha256": manifest.weights_sha256,
        "epochs": [
            {"epoch": h.epoch, "loss": round(h.loss, 4), "accuracy": round(h.accuracy, 4),
             "tiles_per_s": round(h.tiles_per_s, 1)}
            for h in history
        ],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        last = history[-1]
        print(f"trained {entry.manifest.ref} from {manifest.lineage.parent}: final loss {last.loss:.3f}, "
              f"training accuracy {last.accuracy:.3f}, {last.tiles_per_s:.0f} tiles/s")
        print(f"validate it before use: wsiflow validate {entry.manifest.ref} --patches DIR --record")
    return EXIT_OK


def _training_slides(registry: Registry, entry: ModelEntry) -> set[str]:
    """The content digests of the slides ``entry`` and its ancestors (as far as the registry
    still has them) were trained on."""
    digests: set[str] = set()
    seen: set[str] = set()
    current: ModelEntry | None = entry
    while current is not None and current.manifest.ref not in seen:
        seen.add(current.manifest.ref)
        digests.update(current.manifest.lineage.slide_digests)
        parent = current.manifest.lineage.parent
        try:
            current = registry.resolve(parent) if parent else None
        except WsiflowError:  # an ancestor removed or broken: its own lineage is gone
            current = None
    return digests


def _check_overlap(registry: Registry, entry: ModelEntry, slides: list[Path], record: bool) -> None:
    """Warn (and refuse to record) when validation slides are in the model's training lineage."""
    trained = _training_slides(registry, entry)
    overlap = sum(1 for slide in slides if content_digest(slide) in trained)
    if not overlap:
        return
    message = (f"{overlap} of the {len(slides)} validation slide(s) were used to train {entry.manifest.ref} "
               "or its ancestors: the metrics would be optimistic")
    if record:
        raise ValidationOverlapError(message + "; not recording them")
    print(f"wsiflow: warning {message} (not usable with --record)", file=sys.stderr)


def run_validate(args: argparse.Namespace, config: WsiflowConfig) -> int:
    if not args.record:
        return _validate(args, config)
    try:
        return _validate(args, config)
    except WsiflowError as exc:
        audit_model_step("validate-record", params={"ref": args.model}, error=exc)
        raise


def _validate(args: argparse.Namespace, config: WsiflowConfig) -> int:
    if args.slides is not None:
        if not args.annotations:
            raise ConfigError("--slides needs --annotations (one GeoJSON per slide)")
        check_training_inputs(args.slides, args.annotations)  # before the model loads
    registry = registry_for(config)
    entry = registry.resolve(args.model)
    if args.slides is not None:
        _check_overlap(registry, entry, args.slides, args.record)
    model = registry.load(entry.manifest.ref)
    if args.patches is not None:
        images, labels = labelled_patch_folder(args.patches, model.class_names, model.preprocessing, args.mpp)
        dataset = f"labelled patch folder ({len(images)} images)"
    else:
        policy = MppPolicy(cli_mpp=(args.mpp, args.mpp) if args.mpp else None, overrides=config.mpp_overrides)
        images, labels = annotated_dataset(
            args.slides, args.annotations, model.class_names, model, args.per_class, args.seed, policy
        )
        dataset = f"annotated slides ({len(args.slides)} slide(s), {len(images)} patches)"
    out = args.out or Path(f"validation-{entry.manifest.name}-{entry.manifest.version}")
    metrics, validation, paths = validate_arrays(model, images, labels, dataset=dataset, out_dir=out)
    if args.record:
        registry.record_validation(entry, validation)
        audit_model_step("validate-record", model_digest=entry.manifest.weights_sha256,
                         params={"ref": entry.manifest.ref, "dataset_digest": validation.dataset_digest,
                                 "metrics": validation.metrics})
    if args.json:
        print(json.dumps({"ref": entry.manifest.ref, "metrics": metrics,
                          "report": {k: str(v) for k, v in paths.items()}, "recorded": args.record}, indent=2))
    else:
        print(f"{entry.manifest.ref} on {dataset}:")
        print(f"  accuracy {metrics['accuracy']:.3f}, balanced accuracy {metrics['balanced_accuracy']:.3f}, "
              f"macro F1 {metrics['macro_f1']:.3f}, ECE {metrics['ece']:.3f}")
        for name, c in metrics["per_class"].items():
            print(f"  {name:<12} precision {c['precision']:.3f} recall {c['recall']:.3f} F1 {c['f1']:.3f} "
                  f"(n={c['support']})")
        print(f"  report: {paths['html']}" + ("  (recorded in the manifest)" if args.record else ""))
    return EXIT_OK
