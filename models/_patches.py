"""Patch images (PNG/JPEG) as model input: read, rescale to the model's µm/px, crop/pad."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline import Preprocessing, UnsupportedSlideError

from ._errors import TrainingDataError

__all__ = ["IMAGE_SUFFIXES", "load_patch", "labelled_patch_folder"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})


def load_patch(path: Path, preprocessing: Preprocessing, image_mpp: float | None = None) -> np.ndarray:
    """An RGB uint8 (tile, tile, 3) model input from an image file.

    The image is taken to be at the model's µm/px unless ``image_mpp`` says otherwise (then
    it is resized by ``image_mpp / target_mpp``); it is then centre-cropped, or padded with
    white, to the model's tile size.
    """
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UnsupportedSlideError("the file is not a readable PNG/JPEG/TIFF image", hint="give patch images") from exc
    if image_mpp is not None and abs(image_mpp - preprocessing.target_mpp) > 1e-9:
        scale = image_mpp / preprocessing.target_mpp
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
        )
    tile = preprocessing.tile_size_px
    pixels = np.asarray(image)
    out = np.full((tile, tile, 3), 255, np.uint8)
    h, w = pixels.shape[:2]
    sy, sx = max(0, (h - tile) // 2), max(0, (w - tile) // 2)
    crop = pixels[sy : sy + tile, sx : sx + tile]
    oy, ox = (tile - crop.shape[0]) // 2, (tile - crop.shape[1]) // 2
    out[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] = crop
    return out


def labelled_patch_folder(
    folder: Path, class_names: tuple[str, ...], preprocessing: Preprocessing, image_mpp: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images from ``folder/CLASS/*.png|jpg``: (images, labels). Unknown class folders are refused."""
    if not folder.is_dir():
        raise TrainingDataError(
            "the labelled patch folder does not exist", hint="give a folder with one sub-folder per class"
        )
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in subfolders if p.name not in class_names]
    if unknown:
        raise TrainingDataError(
            f"sub-folder(s) {', '.join(unknown)} are not classes of the model ({', '.join(class_names)})",
            hint="name each sub-folder after one of the model's classes",
        )
    images, labels = [], []
    for sub in subfolders:
        for path in sorted(sub.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(load_patch(path, preprocessing, image_mpp))
                labels.append(class_names.index(sub.name))
    if not images:
        raise TrainingDataError("no labelled images found", hint="put PNG/JPEG patches in FOLDER/CLASS/")
    return np.stack(images), np.array(labels, dtype=np.int64)
