"""``deidentify_slide``: send a slide to the TIFF or the DICOM-WSI de-identifier.

The TIFF side lives in :mod:`._tiff` (planning, writing and checking in ``_tiff_*``,
``_codestream`` and ``_verify``), the DICOM side in :mod:`._dicom`.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline import SlideNotFoundError

from ._dicom import deidentify_dicom
from ._input import detect_format
from ._output import check_destination
from ._report import DeidReport
from ._tiff import deidentify_tiff

__all__ = ["deidentify_slide"]


def deidentify_slide(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False
) -> DeidReport:
    """Write a de-identified copy of slide ``src`` to ``dst`` and verify it.

    Aperio SVS and generic tiled TIFF become one TIFF file; a DICOM-WSI folder (or one
    of its instances) becomes a folder of ``<n>.dcm``. Anything else raises
    :class:`UnsupportedSlideError`; anything the copy cannot safely remove or verify
    raises :class:`DeidentificationError`. Either way nothing is left at ``dst``.
    """
    src_path, dst_path = Path(src), Path(dst)
    if not src_path.exists():
        raise SlideNotFoundError("the slide does not exist")
    check_destination(src_path, dst_path, overwrite=overwrite)
    if src_path.is_dir() or src_path.suffix.lower() == ".dcm" or detect_format(src_path) == "dicom":
        return deidentify_dicom(src_path, dst_path, overwrite=overwrite)
    return deidentify_tiff(src_path, dst_path, overwrite=overwrite)
