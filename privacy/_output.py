"""Where the de-identified copy goes: checking the destination and moving the copy into place.

The copy is written next to the destination under a hidden temporary name and only moved
into place once verified; an existing output is never clobbered without ``overwrite``.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from pipeline import DeidentificationError, OutputError

__all__ = ["check_destination", "move_file_into_place", "move_folder_into_place", "safe_to_replace"]


def check_destination(src: Path, dst: Path, *, overwrite: bool) -> None:
    """Refuse an output that replaces or sits inside the input, exists, or has no folder."""
    src_real, dst_real = src.resolve(), dst.resolve()
    if src_real == dst_real or (src.is_dir() and src_real in dst_real.parents):
        raise DeidentificationError(
            "the output would replace or sit inside the input", hint="choose an output outside the input slide"
        )
    if dst.exists() and not overwrite:
        raise OutputError("the output already exists", hint="choose a new output or pass --overwrite")
    if not dst_real.parent.is_dir():
        raise OutputError("the output's folder does not exist", hint="create the folder first")


def move_file_into_place(tmp: Path, dst: Path, *, overwrite: bool) -> None:
    """Move the verified file ``tmp`` to ``dst`` (replacing it only with ``overwrite``)."""
    try:
        if overwrite:
            os.replace(tmp, dst)
        else:
            # link() never clobbers: an OUT created meanwhile by someone else survives.
            os.link(tmp, dst)
            tmp.unlink()
    except FileExistsError:
        raise OutputError("the output already exists", hint="choose a new output or pass --overwrite") from None
    except OSError as exc:
        raise OutputError(f"moving the copy into place failed: {exc.strerror or type(exc).__name__}") from None


def safe_to_replace(dst: Path) -> None:
    """Refuse to replace an output folder that has subfolders (it is not a previous copy)."""
    if dst.is_dir() and any(not p.is_file() for p in dst.iterdir()):
        raise OutputError("the existing output folder has subfolders; refusing to replace it",
                          hint="remove it yourself or choose a new output")


def move_folder_into_place(tmp: Path, dst: Path, *, overwrite: bool) -> None:
    """Move the verified folder ``tmp`` to ``dst``; an old ``dst`` is removed only after the move."""
    old: Path | None = None
    try:
        if dst.exists() or dst.is_symlink():
            if not overwrite:
                raise OutputError("the output already exists", hint="choose a new output or pass --overwrite")
            old = dst.with_name(f".wsiflow-deid-old-{secrets.token_hex(8)}")
            os.rename(dst, old)
        os.rename(tmp, dst)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"moving the copy into place failed: {exc.strerror or type(exc).__name__}") from None
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
