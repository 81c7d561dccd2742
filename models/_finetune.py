"""Fine-tune a registry model on a site's annotated slides into a new registry version."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol, cast

import numpy as np

from pipeline import MppPolicy, content_digest

from ._annotations import file_digest, read_annotations, sample_annotated_patches
from ._errors import TrainingDataError
from ._loading import LoadedModel
from ._manifest import ClassInfo, Lineage, ModelManifest, now_iso
from ._train import EpochStats, TrainSettings, train_module
from ._weights import sha256_bytes, state_dict_to_safetensors

__all__ = ["annotated_dataset", "check_training_inputs", "finetune"]

class _TimmClassifier(Protocol):
    """What every timm model has beyond ``torch.nn.Module``: a replaceable classifier head."""

    def reset_classifier(self, num_classes: int) -> None: ...


_FALLBACK_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#999999")


def check_training_inputs(slides: Sequence[Path], annotations: Sequence[Path]) -> None:
    """One annotation file per slide, each a file: checked before a model loads or a slide
    is sampled (minutes), else :class:`TrainingDataError`."""
    if len(slides) != len(annotations) or not slides:
        raise TrainingDataError(
            f"got {len(slides)} slide(s) and {len(annotations)} annotation file(s)",
            hint="give one annotation file per slide, in the same order",
        )
    unreadable = [str(i) for i, a in enumerate(annotations, start=1) if not Path(a).is_file()]
    if unreadable:
        raise TrainingDataError(
            f"annotation file(s) {', '.join(unreadable)} of {len(annotations)} do not exist or are not files",
            hint="give one GeoJSON file per slide, in the same order",
        )


def annotated_dataset(
    slides: Sequence[Path],
    annotations: Sequence[Path],
    class_names: tuple[str, ...],
    model: LoadedModel,
    per_class: int,
    seed: int,
    mpp_policy: MppPolicy | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Patches sampled inside the polygons of each (slide, annotation file) pair."""
    check_training_inputs(slides, annotations)
    rng = np.random.default_rng(seed)
    per_slide = max(1, int(np.ceil(per_class / len(slides))))
    images, labels = [], []
    for slide, geojson in zip(slides, annotations, strict=True):
        x, y = sample_annotated_patches(
            slide, read_annotations(geojson), class_names, model.preprocessing, per_slide, rng, mpp_policy
        )
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def finetune(
    base: LoadedModel,
    *,
    name: str,
    version: int,
    slides: Sequence[Path],
    annotations: Sequence[Path],
    classes: tuple[str, ...] | None,
    settings: TrainSettings,
    per_class: int = 200,
    mpp_policy: MppPolicy | None = None,
) -> tuple[ModelManifest, bytes, list[EpochStats]]:
    """Train ``base`` further on annotated patches; the new manifest and safetensors bytes.

    With ``classes`` different from the base model's, the classifier head is replaced.
    The lineage records digests of the parent, the slides and the annotations, never names.
    """
    import copy

    class_names = classes or base.class_names
    module = copy.deepcopy(base.module)
    if class_names != base.class_names:
        cast(_TimmClassifier, module).reset_classifier(len(class_names))
    images, labels = annotated_dataset(
        slides, annotations, class_names, base, per_class, settings.seed, mpp_policy
    )
    history = train_module(module, images, labels, base.preprocessing, settings)
    weights = state_dict_to_safetensors(module.state_dict())
    slide_digests = tuple(content_digest(s) for s in slides)
    annotation_digests = tuple(file_digest(a) for a in annotations)
    recipe = f"per_class={per_class};epochs={settings.epochs};seed={settings.seed};lr={settings.learning_rate}"
    data_digest = hashlib.sha256("\n".join((*slide_digests, *annotation_digests, recipe)).encode()).hexdigest()
    colours = {c.name: c.color for c in base.manifest.classes}
    manifest = replace(
        base.manifest,
        name=name,
        version=version,
        classes=tuple(
            ClassInfo(c, colours.get(c, _FALLBACK_COLOURS[i % len(_FALLBACK_COLOURS)]))
            for i, c in enumerate(class_names)
        ),
        weights_file="weights.safetensors",
        weights_sha256=sha256_bytes(weights),
        created_at=now_iso(),
        lineage=Lineage(
            parent=base.manifest.ref,
            parent_sha256=base.manifest.weights_sha256,
            training_data_digest=data_digest,
            slide_digests=slide_digests,
            annotation_digests=annotation_digests,
        ),
        validation=None,
    )
    return manifest, weights, history
