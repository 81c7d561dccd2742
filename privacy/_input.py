"""Recognising and opening the input slide in OpenSlide, with deid's refusal wording."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import UnsupportedSlideError

from ._report import DEID_SUPPORTED, DEID_UNSUPPORTED_HINT

__all__ = ["detect_format", "open_openslide"]


def detect_format(path: Path) -> str | None:
    """OpenSlide's name for the slide's format, or None when it knows none."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError):
        return None


def open_openslide(path: Path, what: str) -> Any:
    """An OpenSlide handle; :class:`UnsupportedSlideError` (naming ``what``) when it cannot open."""
    import openslide

    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise UnsupportedSlideError(
            f"OpenSlide cannot open {what}; {DEID_SUPPORTED}", hint=DEID_UNSUPPORTED_HINT
        ) from None
    except openslide.OpenSlideError as exc:
        raise UnsupportedSlideError(
            f"OpenSlide cannot open {what} ({type(exc).__name__}); {DEID_SUPPORTED}", hint=DEID_UNSUPPORTED_HINT
        ) from None
