"""Training/validation patches for the tissue-QC model, from REAL tissue plus artefacts.

Sources are rendered at the model's µm/px with a tissue mask (slides from a chosen pyramid
level, so different resampling paths are seen). Classes: ``background`` (real glass crops
and synthetic glass with dust/debris/bubbles), ``tissue`` (sharp real tissue crops, some
with folds, bubbles or slight optical softness as negatives for the artefact classes),
``pen`` (real tissue or glass under translucent marker ink) and ``blur`` (real tissue
defocused with a disc PSF sized in µm). Every crop is scale-jittered around the model's
µm/px. Held-out sets use other source images (kept apart by source, not by tile).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import MppPolicy, content_digest, detect_tissue, open_slide

from ._artefacts import add_bubble, add_fold, add_ink, defocus, jpeg_roundtrip, soften, synthetic_glass
from ._errors import TrainingDataError

__all__ = [
    "QC_CLASSES", "SourceSpec", "Source", "PatchRecipe", "load_source", "make_qc_patches", "real_tiles",
    "sources_digest",
]

QC_CLASSES = ("background", "tissue", "pen", "blur")


@dataclass(frozen=True)
class SourceSpec:
    """A real image (or slide, or DICOM-WSI folder) in the shared data folder and its µm/px."""

    relative_path: str
    mpp: float | None
    """None: take it from the slide metadata."""
    note: str
    level: int | None = None
    """Slides only: render from this pyramid level (None: the level the reader picks)."""
    licence: str = ""


@dataclass(frozen=True, eq=False)
class Source:
    spec: SourceSpec
    image: np.ndarray
    """RGB at the target µm/px."""
    tissue: np.ndarray
    """Boolean tissue mask, same shape as the image."""
    digest: str


@dataclass(frozen=True)
class PatchRecipe:
    """How patches are drawn; the defaults are the bundled model's recipe."""

    scale_jitter: tuple[float, float] = (0.8, 1.25)
    """Crops span this many times the tile's µm (log-uniform), then are resized to the tile:
    the model sees tissue at about 0.8-1.25 x its µm/px (scanners' and estimates' spread)."""
    min_tissue_fraction: float = 0.5
    fold_p: float = 0.12
    bubble_p: float = 0.08
    soften_p: float = 0.25
    ink_on_tissue_p: float = 0.65


def _render(path: Path, spec: SourceSpec, target_mpp: float) -> np.ndarray:
    policy = MppPolicy.fixed(spec.mpp, spec.mpp) if spec.mpp else MppPolicy()
    with open_slide(path, mpp_policy=policy) as slide:
        if spec.level is None:
            return slide.read_thumbnail(target_mpp)
        if spec.level >= len(slide.info.level_downsamples):
            raise TrainingDataError(f"training source {spec.relative_path} has no pyramid level {spec.level}")
        width, height = slide.info.level_dimensions[spec.level]
        tile = slide.info.native_tile_size
        if tile and spec.level > 0:
            # Some writers store partial edge tiles of reduced levels that readers refuse: whole tiles only.
            width, height = max(tile[0], width // tile[0] * tile[0]), max(tile[1], height // tile[1] * tile[1])
        pixels = slide.read_region(0, 0, spec.level, width, height)
        level_mpp = slide.level_mpp(spec.level)[0]
    scale = level_mpp / target_mpp
    if abs(scale - 1) < 0.01:
        return pixels
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))


def load_source(data_dir: Path, spec: SourceSpec, target_mpp: float, *, min_size_px: int = 0) -> Source:
    """A source rendered at ``target_mpp``; images smaller than ``min_size_px`` are
    mirror-padded (tissue stays tissue; used for small external images only)."""
    path = data_dir / spec.relative_path
    if not path.exists():
        raise TrainingDataError(
            f"training source {spec.relative_path} is missing", hint="looked in the data folder given"
        )
    digest = content_digest(path)  # the slide digest lineage and validation use
    if path.is_dir() or path.suffix.lower() in (".svs", ".tif", ".tiff", ".ndpi", ".dcm"):
        image = _render(path, spec, target_mpp)
    else:
        if spec.mpp is None:
            raise TrainingDataError(f"image source {spec.relative_path} needs an mpp")
        pil = Image.open(path).convert("RGB")
        scale = spec.mpp / target_mpp
        size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        image = np.asarray(pil.resize(size, Image.Resampling.LANCZOS))
    pad_y, pad_x = max(0, min_size_px - image.shape[0]), max(0, min_size_px - image.shape[1])
    if pad_y or pad_x:
        image = np.pad(image, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)),
                       mode="symmetric")
    mask_mpp = 8.0
    small = np.asarray(
        Image.fromarray(image).resize(
            (
                max(1, round(image.shape[1] * target_mpp / mask_mpp)),
                max(1, round(image.shape[0] * target_mpp / mask_mpp)),
            ),
            Image.Resampling.BOX,
        )
    )
    mask = detect_tissue(small, mask_mpp).mask
    tissue = np.asarray(Image.fromarray(mask).resize((image.shape[1], image.shape[0]), Image.Resampling.NEAREST))
    return Source(spec, image, tissue.astype(bool), digest)


def _crop(
    source: Source,
    rng: np.random.Generator,
    size: int,
    want_tissue: bool,
    recipe: PatchRecipe,
    tries: int = 200,
) -> np.ndarray | None:
    h, w = source.tissue.shape
    lo, hi = recipe.scale_jitter
    if min(h, w) < round(size * lo):
        return None
    for _ in range(tries):
        span = min(round(size * float(np.exp(rng.uniform(np.log(lo), np.log(hi))))), h, w)
        y, x = int(rng.integers(0, h - span + 1)), int(rng.integers(0, w - span + 1))
        fraction = source.tissue[y : y + span, x : x + span].mean()
        if (want_tissue and fraction >= recipe.min_tissue_fraction) or (not want_tissue and fraction <= 0.005):
            crop = source.image[y : y + span, x : x + span]
            if span == size:
                return crop.copy()
            resample = Image.Resampling.LANCZOS if span > size else Image.Resampling.BICUBIC
            return np.asarray(Image.fromarray(crop).resize((size, size), resample))
    return None


def _tissue_crop(sources: list[Source], rng: np.random.Generator, size: int, recipe: PatchRecipe) -> np.ndarray:
    # Weight sources by the fourth root of their tissue area: bigger slides give more, every source appears.
    weights = np.array([max(s.tissue.sum(), 1) for s in sources], float) ** 0.25
    for _ in range(100):
        source = sources[rng.choice(len(sources), p=weights / weights.sum())]
        crop = _crop(source, rng, size, True, recipe)
        if crop is not None:
            return crop
    raise TrainingDataError("no source has a tissue region as large as one tile")


def _glass(sources: list[Source], rng: np.random.Generator, size: int, recipe: PatchRecipe) -> np.ndarray:
    if rng.random() < 0.45:
        source = sources[int(rng.integers(len(sources)))]
        crop = _crop(source, rng, size, False, recipe, tries=50)
        if crop is not None:
            return crop if rng.random() > 0.1 else add_bubble(crop, rng)
    return synthetic_glass(rng, size)


def make_qc_patches(
    sources: list[Source],
    per_class: int,
    size: int,
    seed: int,
    *,
    mpp: float = 1.0,
    recipe: PatchRecipe | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` patches of each QC class at ``mpp`` µm/px: (images uint8 (n, size, size, 3), labels)."""
    recipe = recipe or PatchRecipe()
    rng = np.random.default_rng(seed)
    images = np.empty((per_class * len(QC_CLASSES), size, size, 3), np.uint8)
    labels = np.repeat(np.arange(len(QC_CLASSES)), per_class)
    for i, label in enumerate(labels):
        name = QC_CLASSES[label]
        if name == "background":
            patch = _glass(sources, rng, size, recipe)
        elif name == "tissue":
            patch = _tissue_crop(sources, rng, size, recipe)
            if rng.random() < recipe.fold_p:
                patch = add_fold(patch, rng)
            if rng.random() < recipe.bubble_p:
                patch = add_bubble(patch, rng)
            if rng.random() < recipe.soften_p:
                patch = soften(patch, rng, mpp=mpp)
        elif name == "pen":
            if rng.random() < recipe.ink_on_tissue_p:
                base = _tissue_crop(sources, rng, size, recipe)
            else:
                base = _glass(sources, rng, size, recipe)
            patch, _ = add_ink(base, rng, mpp=mpp)
        else:
            patch = defocus(_tissue_crop(sources, rng, size, recipe), rng, mpp=mpp)
        images[i] = jpeg_roundtrip(patch, rng)
    return images, labels


def real_tiles(source: Source, size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ``size`` tile of a real source on a ``stride`` grid, unaltered, with its label
    from the tissue mask (tissue >= 50 %: ``tissue``; <= 0.5 %: ``background``; else skipped)."""
    h, w = source.tissue.shape
    images, labels = [], []
    for y in range(0, max(1, h - size + 1), stride):
        for x in range(0, max(1, w - size + 1), stride):
            tile = source.image[y : y + size, x : x + size]
            if tile.shape[:2] != (size, size):
                continue
            fraction = source.tissue[y : y + size, x : x + size].mean()
            if fraction >= 0.5 or fraction <= 0.005:
                images.append(tile)
                labels.append(QC_CLASSES.index("tissue" if fraction >= 0.5 else "background"))
    if not images:
        return np.empty((0, size, size, 3), np.uint8), np.empty(0, np.int64)
    return np.stack(images), np.array(labels, np.int64)


def sources_digest(sources: list[Source], extra: str) -> str:
    """One digest for the training data: the sources' content digests plus the recipe."""
    joined = "\n".join(sorted(s.digest for s in sources)) + "\n" + extra
    return hashlib.sha256(joined.encode()).hexdigest()
