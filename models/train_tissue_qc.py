"""Train the bundled ``tissue-qc`` model: one command, fixed seeds, minutes on 2 CPU cores.

    python -m models.train_tissue_qc [--data ../shared/data] [--out models/bundled/tissue-qc/2]

Writes the safetensors weights (temperature-calibrated), manifest.json, the external
validation report (sources never used in training, kept apart by source) and MODEL_CARD.md.
See the model card for data and limits.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import WsiflowError

from ._errors import TrainingDataError
from ._loading import LoadedModel, build_module
from ._manifest import ClassInfo, Lineage, ModelManifest, Validation, now_iso, write_manifest
from ._metrics import apply_temperature, classification_metrics, fit_temperature
from ._qc_data import (
    QC_CLASSES,
    PatchRecipe,
    Source,
    SourceSpec,
    load_source,
    make_qc_patches,
    real_tiles,
    sources_digest,
)
from ._report import write_validation_report
from ._train import TrainSettings, train_module
from ._weights import sha256_bytes, state_dict_to_safetensors

__all__ = [
    "VERSION", "ARCH", "TILE_PX", "TARGET_MPP", "SEED", "TRAIN_SOURCES", "EXTERNAL_SOURCES", "SHIFT_SOURCES",
    "ACCEPTANCE", "external_set", "main",
]

_log = logging.getLogger("models.train_tissue_qc")

VERSION = 2
ARCH = "mobilenetv3_small_100"
TILE_PX = 224
TARGET_MPP = 1.0
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
COLOURS = {"background": "#c8c8c8", "tissue": "#2ca02c", "pen": "#1f3fbf", "blur": "#ff7f0e"}
SEED = 20261201
TRAIN_PER_CLASS = 400
CALIBRATION_PER_CLASS = 100
EXTERNAL_PER_CLASS = 100
EPOCHS = 6
HED_JITTER = 0.08
COLOUR_JITTER = 0.2

TRAIN_SOURCES = (
    SourceSpec("slides/CMU-1-Small-Region.svs", None,
               "H&E skin (CMU-1), Aperio SVS, 0.499 µm/px (metadata), level 0 resampled to 1 µm/px",
               licence="CC0 (OpenSlide test data)"),
    SourceSpec("slides/TCGA-CR-7395-crop-jp2k-no-mpp.svs", 1.0,
               "H&E frozen section (TCGA-CR-7395), Aperio JPEG 2000, level 0; ~1 µm/px estimated from "
               "lymphocyte nuclei (no metadata)", level=0, licence="TCGA open access, via histolab (Apache-2.0)"),
)
EXTERNAL_SOURCES = (
    SourceSpec("images/he-tumour-1000px.png", 0.27,
               "H&E carcinoma region (tiatoolbox target_image.png), ~0.27 µm/px estimated from lymphocyte "
               "nuclei (~7 µm); another lab and scanner", licence="BSD-3 (tiatoolbox wheel)"),
    SourceSpec("images/he-500x300.jpg", 0.5,
               "H&E tumour (stardist histo.jpg), ~0.5 µm/px estimated; 250 x 150 px at 1 µm/px, mirror-padded "
               "to one tile", licence="BSD-3 (stardist wheel)"),
)
SHIFT_SOURCES = (
    SourceSpec("dicom/cmu-1-small-region-reencoded", None,
               "CMU-1 tissue re-encoded (lossy JPEG) by another DICOM writer (napari-wsi tests): the TISSUE "
               "is the training slide's, so this tests the writer/codec shift only", licence="Apache-2.0"),
    SourceSpec("images/he-tile-240px.png", 0.5,
               "H&E skin tile (wsidicom-data test_tile.png), ~0.5 µm/px; probably from CMU-1 (wsidicom's test "
               "slide), so not counted as external", licence="Apache-2.0 (wsidicom-data wheel)"),
    SourceSpec("images/ihc-colon-512px.png", 0.5,
               "IHC colon, DAB + haematoxylin (scikit-image ihc.png), ~0.5 µm/px: OUT OF SCOPE (not H&E)",
               licence="BSD-3 (scikit-image)"),
)
ACCEPTANCE = {"balanced_accuracy": 0.85, "ece": 0.10, "tissue_recall": 0.90, "pen_precision": 0.90,
              "real_tissue_called_artefact": 0.05}
"""What a site should demand on its own slides before making this model (or any QC model) the default."""
INTENDED_USE = (
    "Quality control of H&E whole-slide images at 1 µm/px: flags glass/background, tissue, pen ink and "
    "out-of-focus regions. Not a diagnostic model; not validated for IHC or special stains."
)
RECIPE = PatchRecipe()


def _manifest(
    weights_sha: str, data_digest: str, slide_digests: tuple[str, ...], validation: Validation
) -> ModelManifest:
    return ModelManifest(
        name="tissue-qc",
        version=VERSION,
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
        lineage=Lineage(training_data_digest=data_digest, slide_digests=slide_digests),
        validation=validation,
    )


def check_training_data(data_dir: Path) -> None:
    """Every source is in ``data_dir``, checked before anything is loaded (else
    :class:`TrainingDataError` naming the missing sources)."""
    sources = (*TRAIN_SOURCES, *EXTERNAL_SOURCES, *SHIFT_SOURCES)
    missing = [s.relative_path for s in sources if not (data_dir / s.relative_path).exists()]
    if missing:
        raise TrainingDataError(
            f"{len(missing)} of {len(sources)} training sources are missing from "
            f"the data folder ({', '.join(missing)})",
            hint="point --data (make model: SHARED_DATA=...) at the shared test data folder; see its README.md",
        )


def external_set(data_dir: Path) -> tuple[np.ndarray, np.ndarray, list[Source]]:
    """The external validation set: real tissue from :data:`EXTERNAL_SOURCES` only (never in
    training) as ``tissue``, with ink and defocus drawn on it (another seed), and synthetic
    glass as ``background`` (these sources have no glass)."""
    sources = [load_source(data_dir, s, TARGET_MPP, min_size_px=TILE_PX) for s in EXTERNAL_SOURCES]
    # No scale jitter: the external tissue is rendered at the model's µm/px, as `wsiflow run` does.
    recipe = PatchRecipe(scale_jitter=(1.0, 1.0), fold_p=0.0, bubble_p=0.0, soften_p=0.0)
    images, labels = make_qc_patches(sources, EXTERNAL_PER_CLASS, TILE_PX, SEED + 1, mpp=TARGET_MPP, recipe=recipe)
    return images, labels, sources


def _real_tile_rows(model: LoadedModel, data_dir: Path, specs: tuple[SourceSpec, ...]) -> list[dict[str, Any]]:
    """Unaltered real tiles of each source: what share the model calls each class."""
    from pipeline import classify_tiles

    rows = []
    for spec in specs:
        source = load_source(data_dir, spec, TARGET_MPP, min_size_px=TILE_PX)
        images, labels = real_tiles(source, TILE_PX, TILE_PX // 4)
        if not len(images):
            continue
        predicted = classify_tiles(model, images).argmax(1)
        for label in np.unique(labels):
            chosen = predicted[labels == label]
            row: dict[str, Any] = {"source": spec.relative_path.split("/")[-1], "truth": QC_CLASSES[label],
                                   "tiles": len(chosen)}
            row.update({f"called {c}": float((chosen == i).mean()) for i, c in enumerate(QC_CLASSES)})
            rows.append(row)
    return rows


def _fold_temperature(module: Any, temperature: float) -> None:
    """Divide the classifier's weights and bias by T: the saved model outputs logits / T."""
    import torch

    head = module.get_classifier()
    with torch.no_grad():
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    return head + "\n".join(
        "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |" for row in rows
    )


def _model_card(
    manifest: ModelManifest, metrics: dict[str, Any], calibration: dict[str, Any], real_rows: list[dict[str, Any]],
    temperature: float, seconds: float, n_train: int, history_len: int,
) -> str:
    per_class = "\n".join(
        f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
        for name, c in metrics["per_class"].items()
    )
    matrix = "\n".join(
        f"| {QC_CLASSES[i]} | " + " | ".join(str(v) for v in row) + " |"
        for i, row in enumerate(metrics["confusion_matrix"])
    )

    a = ACCEPTANCE
    acceptance = (
        f"balanced accuracy >= {a['balanced_accuracy']}, ECE <= {a['ece']}, tissue recall >= {a['tissue_recall']}\n"
        f"(healthy tissue must not be flagged), pen precision >= {a['pen_precision']}, and under\n"
        f"{a['real_tissue_called_artefact']:.0%} of clean tissue tiles called `pen` or `blur`."
    )

    def listing(specs: tuple[SourceSpec, ...]) -> str:
        return "\n".join(f"- `{s.relative_path}`: {s.note}. Licence: {s.licence}." for s in specs)

    return f"""# Model card: tissue-qc v{VERSION}

**Intended use.** {INTENDED_USE}

**Architecture.** timm `{ARCH}` trained from scratch (no pretrained weights: nothing is
downloaded), {TILE_PX} px tiles at {TARGET_MPP} µm/px, ImageNet mean/std normalisation, temperature
T = {temperature:.3f} folded into the classifier (the weights output calibrated logits).
Classes: {', '.join(QC_CLASSES)}. Weights sha256 `{manifest.weights_sha256}`.
Rollback: v1 stays bundled (`--model tissue-qc@1`).

**Training data** (see `../shared/data/README.md`), rendered at {TARGET_MPP} µm/px:
{listing(TRAIN_SOURCES)}

Only two independent tissue sources (CMU-1 skin, TCGA frozen section). Their other pyramid
levels are not used: TCGA's level 1 is 2 µm/px (coarser than the model's), and the CMU-1
DICOM-WSI's reduced levels are refused by wsiflow's level check (colour-swapped by their
writer); the lossless DICOM's level 0 is pixel-identical to the SVS. {n_train} patches ({n_train // len(QC_CLASSES)}
per class), each crop scale-jittered to {RECIPE.scale_jitter[0]}-{RECIPE.scale_jitter[1]} x the tile's µm:
- `background`: real glass crops (some with an air-bubble rim) and synthetic glass (tint, uneven
  light, dust, fibres, debris);
- `tissue`: real tissue crops (>= {RECIPE.min_tissue_fraction:.0%} tissue); as negatives for the artefact classes
  {RECIPE.fold_p:.0%} get a tissue fold (doubled optical density and a crease), {RECIPE.bubble_p:.0%} a bubble,
  {RECIPE.soften_p:.0%} slight optical softness (Gaussian 0.2-0.6 µm);
- `pen`: real tissue ({RECIPE.ink_on_tissue_p:.0%}) or glass under translucent marker ink (green, blue,
  black, red; strokes 60-1500 µm wide so a tile shows a stroke's edge or lies inside it;
  opacity 0.5-0.95 with streaky density and a darker dried rim; >= 12 % coverage);
- `blur`: real tissue convolved with a defocus PSF (a disc of radius 2-6 µm softened by a
  Gaussian, sized in µm at the model's µm/px) plus sensor noise.

All JPEG-compressed (quality 70-95). Training-time augmentation: flips, 90° rotations, HED
stain jitter (each stain's optical density x U(1 ± {HED_JITTER}), bias ± {HED_JITTER / 4:.2f}, 80 % of tiles),
brightness/contrast/saturation jitter (± {COLOUR_JITTER:.0%}). Training data digest
`{manifest.lineage.training_data_digest}`; the training slides' content digests are in the
manifest's lineage (`slide_digests`). Seed {SEED}; {history_len} epochs; {seconds / 60:.1f} min in all
on the machine that trained it (1 torch thread on a 2-core machine).

**Calibration.** T fitted by NLL on {calibration['n']} patches drawn afresh (another seed) from the
training sources; there ECE {calibration['ece_uncalibrated']:.3f} -> {calibration['ece']:.3f}.

## External validation (sources never used in training, kept apart by source)
{listing(EXTERNAL_SOURCES)}

{metrics['n']} patches ({EXTERNAL_PER_CLASS} per class; seed {SEED + 1}): `tissue` = unaltered crops of the external
images at 1 µm/px; `pen` and `blur` = the same external tissue under synthetic ink / defocus;
`background` = synthetic glass (these images have no glass). The external tissue is only two
images (~0.1 mm² each), so crops overlap heavily: read the numbers as a check that the model
transfers to other labs' H&E, not as a precise estimate.

| metric | value |
|---|---|
| accuracy | {metrics['accuracy']:.3f} |
| balanced accuracy | {metrics['balanced_accuracy']:.3f} |
| macro F1 | {metrics['macro_f1']:.3f} |
| ECE | {metrics['ece']:.3f} |
| ECE before temperature scaling | {metrics['ece_uncalibrated']:.3f} |

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{per_class}

Confusion matrix (rows: true, columns: predicted):

| true \\ predicted | {' | '.join(QC_CLASSES)} |
|---|{'---|' * len(QC_CLASSES)}
{matrix}

Full report with the reliability diagram: `validation/validation.html` / `validation.png`.

**Unaltered real tiles** (every 224 px tile on a 56 px grid; truth from the tissue mask):
the share of tiles the model gives each class. The CMU-1 rows are NOT external (same tissue
as training) and IHC is out of scope; they show the writer/codec shift and a failure mode.
The three small images hold one tile each at 1 µm/px (on an 8 px grid: 36 tiles of the tiatoolbox
image, 4 of the stardist image and 25 of the IHC image, all called `tissue` by v2).

{_table(real_rows)}

## Acceptance thresholds a site should demand
Validate on >= 20 of your own slides (`wsiflow validate --slides ... --annotations ...`), from
your scanners and stains, never slides from the model's lineage, with every class annotated:
{acceptance} Anything less: keep the previous default (`wsiflow models promote` refuses
models below `models.acceptance` in the config) and fine-tune on your slides.

## Known failure modes and limits
- IHC (DAB brown) is out of scope, and the model does not say so: every IHC tile is called
  `tissue`, so passing QC does not mean a slide is H&E. Check the stain before running it.
- Pen recall on the external set is 0.87 (v2 as trained): the missed tiles have ink on a corner
  or an edge only (12-20 % of the tile), or translucent red ink over eosin; they are called
  `tissue` (9) or `blur` (4). Pen precision is 1.00: healthy tissue was not called pen.
- Pen, blur, folds and bubbles in training and in the external set are synthetic; real ink
  (e.g. faded or very thin strokes) and real focus gradients were not available to validate.
- Translucent blue ink lighter than ~50 % opacity over eosin looks like haematoxylin and is
  not called pen by design; dense haematoxylin-rich tissue is the closest confusion with pen.
- Folds, bubbles, tears, over-/under-staining and stitching artefacts are not classes (folds
  and bubbles are trained as `tissue`, so they are not flagged at all).
- µm/px of the TCGA and external images is estimated from nuclear size (± 20 %); the scale
  jitter covers 0.8-1.25 x. Slides scanned far from 1 µm/px resampling were not tested.
- Small data: two independent training tissues, two external images. Validate locally.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.train_tissue_qc", description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--data", type=Path, default=root.parent / "shared" / "data")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "bundled" / "tissue-qc" / str(VERSION)
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--per-class", type=int, default=TRAIN_PER_CLASS)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: the same floating-point order on every machine, and no "
             "OpenMP spin-waiting when other jobs share the cores)",
    )
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

    from pipeline import classify_tiles

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(max(1, args.threads))
    start = time.perf_counter()
    train_sources = [load_source(args.data, s, TARGET_MPP) for s in TRAIN_SOURCES]
    x_train, y_train = make_qc_patches(train_sources, args.per_class, TILE_PX, SEED, mpp=TARGET_MPP, recipe=RECIPE)
    x_cal, y_cal = make_qc_patches(
        train_sources, CALIBRATION_PER_CLASS, TILE_PX, SEED + 2, mpp=TARGET_MPP, recipe=RECIPE
    )
    x_ext, y_ext, ext_sources = external_set(args.data)
    _log.info("patches: %d train, %d calibration, %d external (%.0f s)",
              len(x_train), len(x_cal), len(x_ext), time.perf_counter() - start)

    draft = _manifest("0" * 64, "", (), Validation("", "", None, {}))
    torch.manual_seed(SEED)
    module = build_module(draft)
    settings = TrainSettings(
        epochs=args.epochs, seed=SEED, colour_jitter=COLOUR_JITTER, hed_jitter=HED_JITTER, hed_p=0.8
    )
    history = train_module(module, x_train, y_train, draft.preprocessing, settings)
    model = LoadedModel(draft, module)

    cal_probabilities = classify_tiles(model, x_cal)
    temperature = fit_temperature(y_cal, cal_probabilities)
    calibration = classification_metrics(y_cal, apply_temperature(cal_probabilities, temperature), QC_CLASSES)
    calibration["ece_uncalibrated"] = classification_metrics(y_cal, cal_probabilities, QC_CLASSES)["ece"]
    raw_external = classification_metrics(y_ext, classify_tiles(model, x_ext), QC_CLASSES)
    _fold_temperature(module, temperature)
    metrics = classification_metrics(y_ext, classify_tiles(model, x_ext), QC_CLASSES)
    metrics["ece_uncalibrated"] = raw_external["ece"]
    metrics["reliability_uncalibrated"] = raw_external["reliability"]
    metrics["temperature"] = temperature
    real_rows = _real_tile_rows(model, args.data, (*EXTERNAL_SOURCES, *SHIFT_SOURCES))

    weights = state_dict_to_safetensors(module.state_dict())
    recipe_text = (f"seed={SEED};per_class={args.per_class};epochs={args.epochs};tile={TILE_PX};mpp={TARGET_MPP};"
                   f"recipe={RECIPE};hed={HED_JITTER};jitter={COLOUR_JITTER}")
    data_digest = sources_digest(train_sources, recipe_text)
    external_digest = sources_digest(ext_sources, f"seed={SEED + 1};per_class={EXTERNAL_PER_CLASS}")
    validation = Validation(
        date=now_iso(),
        dataset="external, kept apart by source: tiatoolbox and stardist H&E images (real tissue, never in "
                "training) + synthetic ink/defocus on them + synthetic glass",
        dataset_digest=external_digest,
        metrics={k: metrics[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "ece")},
    )
    slide_digests = tuple(sorted({s.digest for s in train_sources}))
    manifest = _manifest(sha256_bytes(weights), data_digest, slide_digests, validation)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / manifest.weights_file).write_bytes(weights)
    write_manifest(manifest, args.out / "manifest.json")
    seconds = time.perf_counter() - start
    write_validation_report(
        metrics, args.out / "validation", title=f"tissue-qc v{VERSION}: external validation (held out by source)",
        context={"model": manifest.ref, "weights_sha256": manifest.weights_sha256, "dataset": validation.dataset,
                 "temperature": round(temperature, 4), "acceptance": ACCEPTANCE},
        tables={"Unaltered real tiles: share called each class": real_rows},
    )
    (args.out / "MODEL_CARD.md").write_text(
        _model_card(manifest, metrics, calibration, real_rows, temperature, seconds, len(x_train), len(history)),
        encoding="utf-8",
    )
    _log.info(
        "external accuracy %.3f, balanced %.3f, ECE %.3f (%.3f before T=%.2f); %.1f MB weights; %.1f min",
        metrics["accuracy"], metrics["balanced_accuracy"], metrics["ece"], metrics["ece_uncalibrated"],
        temperature, len(weights) / 1e6, seconds / 60,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
