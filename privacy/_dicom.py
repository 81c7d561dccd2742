"""De-identified copies of DICOM-WSI slides: PS3.15 Annex E Basic Profile, failing closed.

Only VOLUME instances (pyramid levels) are copied; LABEL, OVERVIEW and THUMBNAIL instances
are dropped, and any other kind of instance stops the run. Each kept instance gets the
profile of :mod:`._dicom_profile` (the same input UID always maps to the same new UID at
this site, so the instances stay one series). Pixel data is copied untouched, in the
same transfer syntax, and the copy is verified before it is moved into place.
"""

from __future__ import annotations

import io
import logging
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import (
    DeidentificationError,
    OutputError,
    SlideNotFoundError,
    UnsupportedSlideError,
    WsiflowError,
    site_secret,
)

from ._dicom_profile import Cleaner, walk_strings
from ._output import move_folder_into_place, safe_to_replace
from ._report import DEID_SUPPORTED, DEID_UNSUPPORTED_HINT, DeidReport
from ._verify import compare_slides

__all__ = ["DEID_METHOD", "deidentify_dicom"]

_log = logging.getLogger(__name__)

_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_DROPPED_TYPES = {"LABEL": "label", "OVERVIEW": "overview", "THUMBNAIL": "thumbnail"}
DEID_METHOD = "wsiflow deid: PS3.15 Basic Profile; no dates, free text, labels"
"""DeidentificationMethod (LO, at most 64 characters); the code sequence names the profile."""


@dataclass
class _Instance:
    path: Path
    ds: Any
    kind: str  # "volume" or the dropped kind


def _series_files(src: Path) -> tuple[list[Path], str | None]:
    """The instance files to consider and, for a single-file input, its series."""
    import pydicom

    if src.is_dir():
        files = sorted(p for p in src.iterdir() if not p.name.startswith("."))
        if any(not p.is_file() for p in files):
            raise DeidentificationError("the DICOM folder has a subfolder; give a folder of one series' instances")
        return files, None
    try:
        head = pydicom.dcmread(src, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except (pydicom.errors.InvalidDicomError, OSError, ValueError):
        raise UnsupportedSlideError(f"the file is not DICOM; {DEID_SUPPORTED}", hint=DEID_UNSUPPORTED_HINT) from None
    files = sorted(p for p in src.parent.iterdir() if p.is_file() and not p.name.startswith("."))
    return files, str(head.get("SeriesInstanceUID", ""))


def _load(src: Path) -> list[_Instance]:
    import pydicom

    files, series = _series_files(src)
    if not files:
        raise UnsupportedSlideError("the folder is empty; give a DICOM-WSI folder or one of its files")
    instances: list[_Instance] = []
    seen_series: set[str] = set()
    for path in files:
        try:
            # Headers only: each kept level's pixel data is read when it is written.
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError):
            if series is not None:
                continue  # a stray file next to the given instance is not part of it
            raise DeidentificationError("a file in the DICOM folder is not DICOM; refusing to guess") from None
        this_series = str(ds.get("SeriesInstanceUID", ""))
        if series is not None and this_series != series:
            continue
        seen_series.add(this_series)
        if str(ds.get("SOPClassUID", "")) != _WSI_SOP_CLASS:
            raise DeidentificationError(
                "the series holds an instance that is not a whole-slide image (annotation, report, ...)"
            )
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        kind = "volume" if "VOLUME" in image_type else next(
            (name for key, name in _DROPPED_TYPES.items() if key in image_type), None
        )
        if kind is None:
            raise DeidentificationError("an instance is neither VOLUME nor LABEL, OVERVIEW or THUMBNAIL")
        instances.append(_Instance(path, ds, kind))
    if len(seen_series) > 1:
        raise DeidentificationError("the folder holds more than one series; give one instance of the series to copy")
    if not any(i.kind == "volume" for i in instances):
        raise DeidentificationError("the series has no VOLUME (pyramid level) instance")
    return instances


def _check_pixels_are_clean(ds: Any) -> None:
    """Fail when the scanner says the kept pixels show the label or burned-in text."""
    if str(ds.get("BurnedInAnnotation", "NO")).upper() == "YES":
        raise DeidentificationError("a pyramid level is marked as having burned-in annotation")
    if str(ds.get("SpecimenLabelInImage", "NO")).upper() == "YES":
        raise DeidentificationError("a pyramid level is marked as showing the slide label")


def _deidentified(instance: _Instance, cleaner: Cleaner) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence

    ds = instance.ds
    _check_pixels_are_clean(ds)
    transfer_syntax = ds.file_meta.TransferSyntaxUID
    cleaner.clean(ds)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEID_METHOD
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    ds.LongitudinalTemporalInformationModified = "REMOVED"
    ds.BurnedInAnnotation = "NO"
    # A fresh file meta: the old one names the writing application and, maybe, a source AE.
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    return ds


def _header_bytes(ds: Any) -> bytes:
    """The dataset without pixel data, serialised: what the removed-text check searches."""
    import pydicom

    copy = pydicom.Dataset(ds)
    copy.file_meta = ds.file_meta
    if "PixelData" in copy:
        del copy["PixelData"]
    buffer = io.BytesIO()
    copy.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _check_removed(header: bytes, ds: Any, removed: set[str]) -> None:
    kept = [s for s in walk_strings(ds)]
    for text in removed:
        if any(text in k for k in kept):
            continue  # the same value is deliberately kept elsewhere (e.g. "Unknown" maker)
        if text.encode("utf-8", "replace") in header:
            raise DeidentificationError("removed DICOM metadata was found in the copy")


def _volume_file(folder: Path) -> Path:
    """The largest file of a folder: OpenSlide opens a DICOM-WSI series from any of its instances."""
    return max((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)


def _verify(src: Path, out: Path) -> tuple[tuple[tuple[int, int], ...], int, int]:
    reference = src if src.is_file() else _volume_file(src)
    return compare_slides(reference, _volume_file(out), vendor="dicom", fail=DeidentificationError)


def _check_pixel_data(original: bytes, written: Path) -> None:
    """The written PixelData element must equal the input's, byte for byte."""
    import pydicom

    if pydicom.dcmread(written).get("PixelData") != original:
        raise DeidentificationError("the copy's pixel data differs from the input's")


def deidentify_dicom(src: Path, dst: Path, *, overwrite: bool = False) -> DeidReport:
    """De-identify a DICOM-WSI series into a new folder of ``<n>.dcm`` (see ``deidentify_slide``)."""
    import pydicom

    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise SlideNotFoundError("the slide does not exist")
    if overwrite and dst.exists():
        safe_to_replace(dst)
    instances = _load(src)
    volumes = sorted(
        (i for i in instances if i.kind == "volume"),
        key=lambda i: -int(i.ds.get("TotalPixelMatrixColumns", 0)) * int(i.ds.get("TotalPixelMatrixRows", 0)),
    )
    dropped = tuple(sorted(i.kind for i in instances if i.kind != "volume"))
    cleaner = Cleaner(site_secret())
    tmp = dst.with_name(f".wsiflow-deid-{secrets.token_hex(8)}.tmp")
    try:
        tmp.mkdir(mode=0o700)
        for index, instance in enumerate(volumes):
            try:
                instance.ds = pydicom.dcmread(instance.path)
            except (pydicom.errors.InvalidDicomError, ValueError) as exc:
                raise DeidentificationError(f"a pyramid level cannot be read ({type(exc).__name__})") from None
            pixel_data = instance.ds.get("PixelData")
            if pixel_data is None:
                raise DeidentificationError("a pyramid level has no pixel data")
            ds = _deidentified(instance, cleaner)
            try:
                ds.save_as(tmp / f"{index}.dcm", enforce_file_format=True)
            except (ValueError, TypeError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
                raise DeidentificationError(f"writing a de-identified instance failed ({type(exc).__name__})") from None
            instance.ds = None  # free the pixel data of this level before the next one
            _check_pixel_data(pixel_data, tmp / f"{index}.dcm")
            del pixel_data, ds
        for index in range(len(volumes)):
            written = pydicom.dcmread(tmp / f"{index}.dcm", stop_before_pixels=True)
            _check_removed(_header_bytes(written), written, cleaner.removed_values)
        dims, regions, undecodable = _verify(src, tmp)
        move_folder_into_place(tmp, dst, overwrite=overwrite)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, WsiflowError):
            raise OutputError(f"writing the copy failed: {exc.strerror or type(exc).__name__}") from None
        raise
    _log.info("de-identified a DICOM-WSI series: %d level(s) kept", len(volumes))
    return DeidReport(
        format="dicom",
        levels_kept=len(volumes),
        level_dimensions=dims,
        dropped=dropped,
        fields_removed=cleaner.fields_removed,
        regions_verified=regions,
        regions_undecodable=undecodable,
    )
