"""De-identified copies of Aperio SVS and generic tiled TIFF slides, failing closed.

A TIFF/SVS slide is *rewritten*, not edited in place: the new file holds only the proven
pyramid levels of level 0 (tiled, same kind, shape following level 0), each level's
compressed tiles copied byte for byte (so pixels are identical), and only tags from an
explicit structural allow-list. Label, macro, thumbnail and any other page are never
copied, the Aperio ImageDescription is rebuilt from a neutral header plus the
allow-listed numeric fields, and every other tag is either on a known blank-list (text
metadata, not written) or makes the whole run fail. The copy is checked (it reopens in
OpenSlide with the kept levels and byte-identical regions, and none of the removed text
is in it) before it is moved into place; on any failure nothing is left behind.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from pipeline import DeidentificationError, SlideNotFoundError, UnsupportedSlideError

from ._input import detect_format, open_openslide
from ._output import check_destination, move_file_into_place
from ._report import DEID_SUPPORTED, DEID_UNSUPPORTED_HINT, DeidReport
from ._tiff_plan import kept_text, plan_tiff
from ._tiff_write import write_tiff
from ._verify import check_removed_text, compare_slides

__all__ = ["deidentify_tiff"]

_log = logging.getLogger(__name__)


def deidentify_tiff(src: Path, dst: Path, *, overwrite: bool = False) -> DeidReport:
    """De-identify an Aperio SVS or generic tiled TIFF (see :func:`deidentify_slide`)."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise SlideNotFoundError("the slide does not exist")
    check_destination(src, dst, overwrite=overwrite)
    fmt = detect_format(src)
    if fmt not in ("aperio", "generic-tiff"):
        raise UnsupportedSlideError(
            f"OpenSlide reads this slide as {fmt or 'no known format'}; {DEID_SUPPORTED}",
            hint=DEID_UNSUPPORTED_HINT,
        )
    open_openslide(src, "the input")  # fails early (unsupported) when OpenSlide cannot open it
    plan = plan_tiff(src, fmt)
    tmp = dst.with_name(f".wsiflow-deid-{secrets.token_hex(8)}.tmp{dst.suffix}")
    try:
        meta = write_tiff(src, tmp, plan)
        check_removed_text(meta, plan.removed_text, kept_text(plan))
        dims, regions, undecodable = compare_slides(
            src, tmp, vendor=fmt, fail=DeidentificationError, kept=tuple(p.size for p in plan.pages)
        )
        move_file_into_place(tmp, dst, overwrite=overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _log.info("de-identified a %s slide: %d level(s) kept", fmt, len(plan.pages))
    return DeidReport(
        format=fmt,
        levels_kept=len(plan.pages),
        level_dimensions=dims,
        dropped=tuple(plan.dropped),
        fields_removed=plan.fields_removed,
        regions_verified=regions,
        regions_undecodable=undecodable,
        kept_fields=plan.kept_fields,
    )

