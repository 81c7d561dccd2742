"""Train the bundled ``tissue-qc`` model: one command, fixed seeds, minutes on 2 CPU cores.

    python -m models.train_tissue_qc [--data ../shared/data] [--out models/bundled/tissue-qc/1]

Writes the safetensors weights, manifest.json, the validation report on the held-out
source images and MODEL_CARD.md. See the model card for data and limits.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pipeline import WsiflowError

from ._errors import TrainingDataError
from ._loading import LoadedModel, build_module
from ._manifest import ClassInfo, Lineage, ModelManifest, Validation, now_iso, write_manifest
from ._metrics import classification_metrics
from ._qc_data import QC_CLASSES, SourceSpec, load_source, make_qc_patches, sources_digest
from ._report import write_validation_report
from ._train import TrainSettings, train_module
from ._weights import sha256_bytes, state_dict_to_safetensors

_log = logging.getLogger("models.train_tissue_qc")

ARCH = "mobilenetv3_small_100"
TILE_PX = 224
TARGET_MPP = 1.0
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
COLOURS = {"background": "#c8c8c8", "tissue": "#2ca02c", "pen": "#1f3fbf", "blur": "#ff7f0e"}
SEED = 20261127
TRAIN_PER_CLASS = 500
HELD_OUT_PER_CLASS = 150

TRAIN_SOURCES = (
    SourceSpec("slides/CMU-1-Small-Region.svs", None, "H&E skin, Aperio, 0.499 µm/px (metadata)"),
    SourceSpec("images/he-tumour-1000px.png", 0.5, "H&E tumour, 0.5 µm/px (estimated from nuclear size)"),
    SourceSpec("images/ihc-colon-512px.png", 0.5, "IHC colon (DAB + haematoxylin), 0.5 µm/px (estimated)"),
)
HELD_OUT_SOURCES = (
    SourceSpec(
        "slides/TCGA-CR-7395-crop-jp2k-no-mpp.svs", 1.0,
        "H&E frozen section (TCGA), JPEG 2000; ~1 µm/px (no metadata; estimated from nuclear size)",
    ),
)
INTENDED_USE = (
    "Quality control of H&E (and IHC) whole-slide images at 1 µm/px: flags glass/background, "
    "tissue, pen ink and out-of-focus regions. Not a diagnostic model."
)


def _manifest(weights_sha: str, data_digest: str, validation: Validation) -> ModelManifest:
    return ModelManifest(
        name="tissue-qc",
        version=1,
        timm_name=ARCH,
        classes=tuple(ClassInfo(c, COLOURS[c]) for c in QC_CLASSES),
        tile_size_px=TILE_PX,
        target_mpp=TARGET_MPP,
        mean=MEAN,
        std=STD,
        weights_file="weights.safetensors",
        weights_sha256=weights_sha,
        intended_use=INTENDED_USE,
        created_at=now_iso(),
        lineage=Lineage(training_data_digest=data_digest),
        validation=validation,
    )


def _model_card(
    manifest: ModelManifest, metrics: dict, history: list, seconds: float, n_train: int, n_held: int
) -> str:
    per_class = "\n".join(
        f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
        for name, c in metrics["per_class"].items()
    )
    sources = "\n".join(f"- `{s.relative_path}`: {s.note}" for s in TRAIN_SOURCES)
    held = "\n".join(f"- `{s.relative_path}`: {s.note}" for s in HELD_OUT_SOURCES)
    return f"""# Model card: tissue-qc v1

**Intended use.** {INTENDED_USE}

**Architecture.** timm `{ARCH}` trained from scratch (no pretrained weights: nothing is
downloaded), {TILE_PX} px tiles at {TARGET_MPP} µm/px, ImageNet mean/std normalisation.
Classes: {', '.join(QC_CLASSES)}. Weights sha256 `{manifest.weights_sha256}`.

**Training data.** Real tissue from these open images (CC0 / Apache-2.0 / BSD-3; see
`../shared/data/README.md`), rendered at {TARGET_MPP} µm/px:
{sources}

Patches per class: {n_train // len(QC_CLASSES)} (total {n_train}). `background`: real glass crops and synthetic
glass (tint, uneven light, dust, fibres, debris, bubble rims); `tissue`: sharp real tissue
crops (>= 70 % tissue); `pen`: real tissue or glass under synthetic marker strokes (green,
blue, black, red; opacity 0.45-0.95; 4-32 px wide; >= 8 % coverage); `blur`: real tissue
defocused (disk + Gaussian, sigma 1.6-4.5 px). All JPEG-compressed (quality 70-95).
Training data digest `{manifest.lineage.training_data_digest}`.
Augmentation: flips, 90° rotations, brightness/contrast/saturation jitter (±12 %).
Seed {SEED}; {len(history)} epochs; {seconds / 60:.1f} min on the machine that trained it (2 CPU cores).

**Validation (held out by source image, never seen in training).**
{held}

{n_held} patches ({n_held // len(QC_CLASSES)} per class, artefacts generated with another seed).

| metric | value |
|---|---|
| accuracy | {metrics['accuracy']:.3f} |
| balanced accuracy | {metrics['balanced_accuracy']:.3f} |
| macro F1 | {metrics['macro_f1']:.3f} |
| ECE | {metrics['ece']:.3f} |

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{per_class}

Full report: `validation/validation.html` (confusion matrix and reliability diagram).

**Limits.** Trained on very few real source images (one whole-slide crop dominates); pen,
blur and most glass are synthetic. The held-out slide's µm/px is estimated. Folds,
bubbles, tissue tears, over-/under-staining and scanner stitching artefacts are not
classes. Validate on your own slides (`wsiflow validate`) before relying on it, and
fine-tune (`wsiflow train`) on your scanner's artefacts.
"""


def check_training_data(data_dir: Path) -> None:
    """Every source image is in ``data_dir``, checked before anything is loaded (else
    :class:`TrainingDataError` naming the missing sources)."""
    sources = (*TRAIN_SOURCES, *HELD_OUT_SOURCES)
    missing = [s.relative_path for s in sources if not (data_dir / s.relative_path).is_file()]
    if missing:
        raise TrainingDataError(
            f"{len(missing)} of {len(sources)} training sources are missing from "
            f"the data folder ({', '.join(missing)})",
            hint="point --data (make model: SHARED_DATA=...) at the shared test data folder; see its README.md",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.train_tissue_qc", description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--data", type=Path, default=root.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "bundled" / "tissue-qc" / "1")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=TRAIN_PER_CLASS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        check_training_data(args.data)
        return _train(args)
    except WsiflowError as exc:
        # One line like the wsiflow CLI's; bad training data is a bad argument (exit 2).
        _log.error("wsiflow: error %s", exc.one_line())
        return 2 if isinstance(exc, TrainingDataError) else 1


def _train(args: argparse.Namespace) -> int:
    import torch

    torch.use_deterministic_algorithms(True)

    start = time.perf_counter()
    train_sources = [load_source(args.data, s, TARGET_MPP) for s in TRAIN_SOURCES]
    held_sources = [load_source(args.data, s, TARGET_MPP) for s in HELD_OUT_SOURCES]
    x_train, y_train = make_qc_patches(train_sources, args.per_class, TILE_PX, SEED)
    x_held, y_held = make_qc_patches(held_sources, HELD_OUT_PER_CLASS, TILE_PX, SEED + 1)
    _log.info("patches: %d train, %d held out (%.0f s)", len(x_train), len(x_held), time.perf_counter() - start)

    draft = _manifest("0" * 64, "", Validation("", "", None, {}))
    torch.manual_seed(SEED)
    module = build_module(draft)
    settings = TrainSettings(epochs=args.epochs, seed=SEED)
    history = train_module(module, x_train, y_train, draft.preprocessing, settings)

    from pipeline import classify_tiles

    probabilities = classify_tiles(LoadedModel(draft, module), x_held)
    metrics = classification_metrics(y_held, probabilities, QC_CLASSES)
    weights = state_dict_to_safetensors(module.state_dict())
    data_digest = sources_digest(
        train_sources, f"seed={SEED};per_class={args.per_class};tile={TILE_PX};mpp={TARGET_MPP}"
    )
    held_digest = sources_digest(held_sources, f"seed={SEED + 1};per_class={HELD_OUT_PER_CLASS}")
    validation = Validation(
        date=now_iso(),
        dataset="held-out source: TCGA-CR-7395 frozen section (real tissue) + synthetic artefacts",
        dataset_digest=held_digest,
        metrics={k: metrics[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "ece")},
    )
    manifest = _manifest(sha256_bytes(weights), data_digest, validation)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / manifest.weights_file).write_bytes(weights)
    write_manifest(manifest, args.out / "manifest.json")
    seconds = time.perf_counter() - start
    write_validation_report(
        metrics, args.out / "validation", title="tissue-qc v1: held-out validation",
        context={"model": manifest.ref, "weights_sha256": manifest.weights_sha256, "dataset": validation.dataset},
    )
    (args.out / "MODEL_CARD.md").write_text(
        _model_card(manifest, metrics, history, seconds, len(x_train), len(x_held)), encoding="utf-8"
    )
    _log.info(
        "held-out accuracy %.3f, balanced %.3f, ECE %.3f; %.1f MB weights; %.1f min",
        metrics["accuracy"], metrics["balanced_accuracy"], metrics["ece"], len(weights) / 1e6, seconds / 60,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
