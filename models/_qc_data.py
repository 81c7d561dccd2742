"""Training/validation patches for the tissue-QC model, from REAL tissue plus artefacts.

Sources are rendered at the model's µm/px with a tissue mask. Classes:
``background`` (real glass crops and synthetic glass with dust/debris), ``tissue`` (sharp
real tissue crops), ``pen`` (real tissue or glass under synthetic marker ink) and ``blur``
(real tissue crops defocused). Held-out sets use different source images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import MppPolicy, detect_tissue, open_slide

from ._artefacts import add_ink, defocus, jpeg_roundtrip, synthetic_glass
from ._errors import TrainingDataError

__all__ = ["QC_CLASSES", "SourceSpec", "Source", "load_source", "make_qc_patches", "sources_digest"]

QC_CLASSES = ("background", "tissue", "pen", "blur")


@dataclass(frozen=True)
class SourceSpec:
    """A real image in the shared data folder and its µm/px (measured or estimated)."""

    relative_path: str
    mpp: float | None
    """None: take it from the slide metadata."""
    note: str


@dataclass(frozen=True, eq=False)
class Source:
    spec: SourceSpec
    image: np.ndarray
    """RGB at the target µm/px."""
    tissue: np.ndarray
    """Boolean tissue mask, same shape as the image."""
    digest: str


def load_source(data_dir: Path, spec: SourceSpec, target_mpp: float) -> Source:
    path = data_dir / spec.relative_path
    if not path.exists():
        raise TrainingDataError(
            f"training source {spec.relative_path} is missing", hint="looked in the data folder given"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if path.suffix.lower() in (".svs", ".tif", ".tiff", ".ndpi"):
        policy = MppPolicy.fixed(spec.mpp, spec.mpp) if spec.mpp else MppPolicy()
        with open_slide(path, mpp_policy=policy) as slide:
            image = slide.read_thumbnail(target_mpp)
    else:
        if spec.mpp is None:
            raise TrainingDataError(f"image source {spec.relative_path} needs an mpp")
        pil = Image.open(path).convert("RGB")
        scale = spec.mpp / target_mpp
        size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        image = np.asarray(pil.resize(size, Image.Resampling.LANCZOS))
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
    return Source(spec, image, tissue, digest)


def _crop(
    source: Source, rng: np.random.Generator, size: int, want_tissue: bool, tries: int = 200
) -> np.ndarray | None:
    h, w = source.tissue.shape
    if h < size or w < size:
        return None
    for _ in range(tries):
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        fraction = source.tissue[y : y + size, x : x + size].mean()
        if (want_tissue and fraction >= 0.7) or (not want_tissue and fraction <= 0.005):
            return source.image[y : y + size, x : x + size].copy()
    return None


def _tissue_crop(sources: list[Source], rng: np.random.Generator, size: int) -> np.ndarray:
    # Weight sources by tissue area so the big slide dominates but every source appears.
    weights = np.array([max(s.tissue.sum(), 1) for s in sources], float) ** 0.5
    for _ in range(100):
        source = sources[rng.choice(len(sources), p=weights / weights.sum())]
        crop = _crop(source, rng, size, want_tissue=True)
        if crop is not None:
            return crop
    raise TrainingDataError("no source has a tissue region as large as one tile")


def _glass(sources: list[Source], rng: np.random.Generator, size: int) -> np.ndarray:
    if rng.random() < 0.4:
        source = sources[int(rng.integers(len(sources)))]
        crop = _crop(source, rng, size, want_tissue=False, tries=50)
        if crop is not None:
            return crop
    return synthetic_glass(rng, size)


def make_qc_patches(
    sources: list[Source], per_class: int, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` patches of each QC class: (images uint8 (n, size, size, 3), labels)."""
    rng = np.random.default_rng(seed)
    images = np.empty((per_class * len(QC_CLASSES), size, size, 3), np.uint8)
    labels = np.repeat(np.arange(len(QC_CLASSES)), per_class)
    for i, label in enumerate(labels):
        name = QC_CLASSES[label]
        if name == "background":
            patch = _glass(sources, rng, size)
        elif name == "tissue":
            patch = _tissue_crop(sources, rng, size)
        elif name == "pen":
            base = _tissue_crop(sources, rng, size) if rng.random() < 0.6 else _glass(sources, rng, size)
            patch, _ = add_ink(base, rng)
        else:
            patch = defocus(_tissue_crop(sources, rng, size), rng)
        images[i] = jpeg_roundtrip(patch, rng)
    return images, labels


def sources_digest(sources: list[Source], extra: str) -> str:
    """One digest for the training data: the sources' content digests plus the recipe."""
    joined = "\n".join(sorted(s.digest for s in sources)) + "\n" + extra
    return hashlib.sha256(joined.encode()).hexdigest()
