"""The one exception tree of wsiflow.

Every error wsiflow raises on purpose derives from :class:`WsiflowError`. Leaves also
inherit the builtin that fits, so ``except FileNotFoundError`` keeps working for callers
that do not know wsiflow. Messages never contain a file path or file name (they may end
up in results, logs or the Prefect UI); the caller knows which input it passed.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = [
    "WsiflowError",
    "SlideNotFoundError",
    "SlidePermissionError",
    "UnsupportedSlideError",
    "CorruptSlideError",
    "MissingMppError",
    "ConfigError",
    "OutputError",
    "WorkerError",
    "DeidentificationError",
    "NotAResultError",
]


class WsiflowError(Exception):
    """Base class of every error wsiflow raises on purpose.

    ``kind`` is a short stable name for the error (used in CLI lines and JSON), and
    ``hint`` says what the user can do about it.
    """

    kind: str = "error"
    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return self.message

    def one_line(self) -> str:
        """``kind: message (hint)`` on one line, for the CLI and tables."""
        text = f"{self.kind}: {self.message}"
        if self.hint:
            text += f" -- {self.hint}"
        return " ".join(text.split())


class SlideNotFoundError(WsiflowError, FileNotFoundError):
    """The slide path does not exist."""

    kind = "not-found"
    hint = "check the path; for DICOM give the folder of instances or one of its files"

    @classmethod
    def at(cls, path: os.PathLike[str] | str) -> SlideNotFoundError:
        """The error for a path that cannot be found, saying whether it is a broken link or
        a link loop (the commonest cause in slide folders), never naming the path."""
        link = Path(path)
        if link.is_symlink():
            try:
                link.stat()
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    return cls("the path is a loop of symbolic links", hint="fix or remove the link")
            return cls("the path is a broken symbolic link (its target is gone)",
                       hint="fix or remove the link, or restore the file it points to")
        return cls("no file or folder at the given path")


class SlidePermissionError(WsiflowError, PermissionError):
    """The slide exists but this process may not read it."""

    kind = "permission-denied"
    hint = "give the user running wsiflow read access to the file (and the folder for DICOM)"


class UnsupportedSlideError(WsiflowError, ValueError):
    """The file is not a slide, or in a format neither backend reads."""

    kind = "unsupported"
    hint = (
        "wsiflow reads what OpenSlide 4 and tiffslide read (SVS, NDPI, MIRAX, SCN, BIF, "
        "Philips TIFF, tiled TIFF, DICOM-WSI); convert the slide to one of these"
    )


class CorruptSlideError(WsiflowError, OSError):
    """The slide opens but its pixel data cannot be decoded."""

    kind = "corrupt"
    hint = "the file is damaged or truncated; copy it again from the scanner or rescan"


class MissingMppError(WsiflowError, ValueError):
    """The slide's physical pixel size (µm/px) is absent or implausible."""

    kind = "missing-mpp"
    hint = (
        "supply it with --mpp X (µm/px) on the command line, or add a per-scanner or "
        "per-folder entry under mpp_overrides in the config"
    )


class ConfigError(WsiflowError, ValueError):
    """A configuration value is invalid."""

    kind = "config"
    hint = "fix the value in the config file or on the command line"


class OutputError(WsiflowError, OSError):
    """Results could not be written (disk full, no permission on the output folder)."""

    kind = "output"
    hint = "free disk space or fix the output folder's permissions, then run again: finished chunks are kept"


class WorkerError(WsiflowError, RuntimeError):
    """A chunk kept failing on the cluster for a reason that is not the slide (lost workers)."""

    kind = "worker"
    hint = "check the cluster's workers (memory, shared storage), then run again: finished chunks are kept"

    def __init__(self, message: str, *, hint: str | None = None, transient: bool = True) -> None:
        super().__init__(message, hint=hint)
        self.transient = transient
        """False when the slide itself is the likely cause (a process died decoding it):
        retrying would only crash more processes."""


class DeidentificationError(WsiflowError, ValueError):
    """A de-identified copy could not be made safely, so none was written (fail closed)."""

    kind = "deid"
    hint = (
        "nothing was written; the slide holds something wsiflow cannot remove safely "
        "(see the message); de-identify it with the scanner vendor's tools instead"
    )


class NotAResultError(WsiflowError, FileNotFoundError):
    """A folder given as a wsiflow result is not a complete one."""

    kind = "not-a-result"
    hint = (
        "give a result folder of a finished run: OUT/<slide id>/<model>/ (its latest result) "
        "or OUT/<slide id>/<model>/v<version>-<digest>/"
    )
