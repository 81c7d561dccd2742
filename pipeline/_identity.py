"""A slide's identity: its content digest and pseudonymous ID, computed once per slide.

Hashing a multi-gigabyte slide takes seconds, so the identity is computed once where a
slide enters wsiflow (the CLI, the batch flow, the inbox) and passed along as a small
descriptor to tasks, child processes and the analysis. One error policy: a slide that
cannot be read raises a :class:`WsiflowError` leaf naming why (never the path).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from ._errors import CorruptSlideError, SlideNotFoundError, SlidePermissionError
from ._privacy import content_digest, slide_id

__all__ = ["SlideIdentity", "identify_slide"]


@dataclass(frozen=True)
class SlideIdentity:
    """``digest``: sha256 (hex) of the slide's bytes; ``slide_id``: its site pseudonym."""

    digest: str
    slide_id: str


def identify_slide(path: str | os.PathLike[str], secret: bytes) -> SlideIdentity:
    """Hash the slide at ``path`` (a file or a DICOM-WSI folder) into its identity.

    Raises :class:`SlideNotFoundError`, :class:`SlidePermissionError`, or
    :class:`CorruptSlideError` for other read failures.
    """
    slide_path = Path(path)
    try:
        digest = content_digest(slide_path)
    except FileNotFoundError:
        raise SlideNotFoundError.at(slide_path) from None
    except PermissionError:
        raise SlidePermissionError("the slide cannot be read: permission denied") from None
    except IsADirectoryError:
        raise CorruptSlideError("the slide is a folder that cannot be hashed") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SlideNotFoundError.at(slide_path) from None
        reason = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        raise CorruptSlideError(f"reading the slide's bytes failed ({reason})") from None
    return SlideIdentity(digest, slide_id(digest, secret))
