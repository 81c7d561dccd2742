"""De-identified copies of DICOM-WSI slides: an allow-list, failing closed.

Only VOLUME instances (pyramid levels) are copied; LABEL, OVERVIEW and THUMBNAIL instances
are dropped, and any other kind of instance stops the run. Each kept instance is rebuilt
from the allow-list of :mod:`._dicom_rules` (applied by :mod:`._dicom_profile`): what the
VL Whole Slide Microscopy Image IOD needs to display and measure the image, with UIDs and
identifiers replaced by keyed pseudonyms (the instances stay one series). Pixel data is
copied untouched, in the same transfer syntax, after every frame's header is checked for
embedded text. The copy is checked (allow-list, no removed value, same pixels in OpenSlide)
before it is moved into place. No message names an instance file: DICOM file names are
often UIDs or accession numbers.
"""

from __future__ import annotations

import io
import logging
import secrets
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import (
    DeidentificationError,
    OutputError,
    SlideNotFoundError,
    SlidePermissionError,
    UnsupportedSlideError,
    WsiflowError,
    site_secret,
)

from ._codestream import check_tile
from ._dicom_profile import Cleaner, check_allow_listed, walk_strings
from ._dicom_rules import DEID_METHOD, DEID_OPTIONS, SUPPORTED_TRANSFER_SYNTAXES, WSI_SOP_CLASS
from ._output import move_folder_into_place, safe_to_replace
from ._report import DEID_SUPPORTED, DEID_UNSUPPORTED_HINT, DeidReport
from ._verify import compare_slides

__all__ = ["DEID_METHOD", "deidentify_dicom"]

_log = logging.getLogger(__name__)

_DROPPED_TYPES = {"LABEL": "label", "OVERVIEW": "overview", "THUMBNAIL": "thumbnail"}
_JPEG = "1.2.840.10008.1.2.4.50"
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
_PYDICOM_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, EOFError, OverflowError)


@dataclass
class _Instance:
    path: Path
    ds: Any
    kind: str  # "volume" or the dropped kind


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Read without pydicom's value checks, warnings and log lines: they quote values (PHI).

    Every kept value is checked by the allow-list instead; invalid values in removed
    attributes do not matter.
    """
    from pydicom import config

    settings = config.settings
    reading, writing = settings.reading_validation_mode, settings.writing_validation_mode
    logger = logging.getLogger("pydicom")
    level = logger.level
    settings.reading_validation_mode = config.IGNORE
    settings.writing_validation_mode = config.RAISE
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = reading, writing
        logger.setLevel(level)


def _read_error(exc: OSError) -> WsiflowError:
    """An input read failure, without the file name that ``str(exc)`` would carry."""
    if isinstance(exc, PermissionError):
        return SlidePermissionError("a file of the DICOM slide cannot be read: permission denied")
    return DeidentificationError(f"a file of the DICOM slide cannot be read ({exc.strerror or type(exc).__name__})")


def _dcmread(path: Path, *, pixels: bool) -> Any:
    """The dataset of ``path``; pydicom gets an open file, never the name."""
    import pydicom

    with open(path, "rb") as fh:
        return pydicom.dcmread(fh, stop_before_pixels=not pixels)


def _series_files(src: Path) -> tuple[list[Path], str | None]:
    """The instance files to consider and, for a single-file input, its series."""
    import pydicom

    try:
        if src.is_dir():
            files = sorted(p for p in src.iterdir() if not p.name.startswith("."))
            if any(not p.is_file() for p in files):
                raise DeidentificationError(
                    "the DICOM folder has a subfolder; give a folder of one series' instances"
                )
            return files, None
        try:
            head = _dcmread(src, pixels=False)
        except (pydicom.errors.InvalidDicomError, *_PYDICOM_ERRORS):
            raise UnsupportedSlideError(
                f"the file is not DICOM; {DEID_SUPPORTED}", hint=DEID_UNSUPPORTED_HINT
            ) from None
        files = sorted(p for p in src.parent.iterdir() if p.is_file() and not p.name.startswith("."))
        return files, str(head.get("SeriesInstanceUID", ""))
    except OSError as exc:
        if isinstance(exc, WsiflowError):
            raise
        raise _read_error(exc) from None


def _kind(ds: Any) -> str | None:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "VOLUME" in image_type:
        return "volume"
    return next((name for key, name in _DROPPED_TYPES.items() if key in image_type), None)


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
            ds = _dcmread(path, pixels=False)
            this_series = str(ds.get("SeriesInstanceUID", ""))
            sop_class = str(ds.get("SOPClassUID", ""))
            kind = _kind(ds)
        except OSError as exc:
            raise _read_error(exc) from None
        except (pydicom.errors.InvalidDicomError, *_PYDICOM_ERRORS):
            if series is not None:
                continue  # a stray file next to the given instance is not part of it
            raise DeidentificationError("a file in the DICOM folder is not DICOM; refusing to guess") from None
        if series is not None and this_series != series:
            continue
        seen_series.add(this_series)
        if sop_class != WSI_SOP_CLASS:
            raise DeidentificationError(
                "the series holds an instance that is not a whole-slide image (annotation, report, ...)"
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


def _check_frames(ds: Any, transfer_syntax: str) -> None:
    """Every compressed frame's header must be free of comments and metadata segments."""
    from pydicom.encaps import generate_frames

    if transfer_syntax in _NATIVE:
        return
    compression = 7 if transfer_syntax == _JPEG else 33003  # TIFF's codes for JPEG and JPEG 2000
    try:
        frames = generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))
        while (frame := next(frames, None)) is not None:
            check_tile(frame, compression)
    except WsiflowError:
        raise
    except _PYDICOM_ERRORS as exc:
        raise DeidentificationError(f"the frames of a pyramid level cannot be read ({type(exc).__name__})") from None


def _file_meta(ds: Any, transfer_syntax: str) -> Any:
    """A fresh file meta: the old one names the writing application and, maybe, a source AE."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    return meta


def _deidentified(ds: Any, cleaner: Cleaner) -> Any:
    transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise UnsupportedSlideError(
            "the DICOM pixel data is in a transfer syntax deid cannot check "
            f"(it handles {', '.join(SUPPORTED_TRANSFER_SYNTAXES.values())}); {DEID_SUPPORTED}",
            hint=DEID_UNSUPPORTED_HINT,
        )
    _check_pixels_are_clean(ds)
    _check_frames(ds, transfer_syntax)
    out = cleaner.clean_instance(ds)
    out.file_meta = _file_meta(out, transfer_syntax)
    return out


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


def _check_written(path: Path, removed: set[str]) -> None:
    """The written instance holds only allow-listed elements and none of the removed values."""
    ds = _dcmread(path, pixels=False)
    check_allow_listed(ds)
    header = _header_bytes(ds)
    kept = list(walk_strings(ds))
    for text in removed:
        if any(text in k for k in kept):
            continue  # the same value is deliberately kept elsewhere (a code value, a number)
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
    if _dcmread(written, pixels=True).get("PixelData") != original:
        raise DeidentificationError("the copy's pixel data differs from the input's")


def _write_volume(instance: _Instance, cleaner: Cleaner, target: Path) -> None:
    import pydicom

    try:
        ds = _dcmread(instance.path, pixels=True)
    except OSError as exc:
        raise _read_error(exc) from None
    except (pydicom.errors.InvalidDicomError, *_PYDICOM_ERRORS) as exc:
        raise DeidentificationError(f"a pyramid level cannot be read ({type(exc).__name__})") from None
    pixel_data = ds.get("PixelData")
    if pixel_data is None:
        raise DeidentificationError("a pyramid level has no pixel data")
    out = _deidentified(ds, cleaner)
    del ds
    try:
        out.save_as(target, enforce_file_format=True)
    except (*_PYDICOM_ERRORS, pydicom.errors.InvalidDicomError) as exc:
        raise DeidentificationError(f"writing a de-identified instance failed ({type(exc).__name__})") from None
    del out
    _check_pixel_data(pixel_data, target)


def deidentify_dicom(src: Path, dst: Path, *, overwrite: bool = False) -> DeidReport:
    """De-identify a DICOM-WSI series into a new folder of ``<n>.dcm`` (see ``deidentify_slide``)."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise SlideNotFoundError("the slide does not exist")
    if overwrite and dst.exists():
        safe_to_replace(dst)
    cleaner = Cleaner(site_secret())
    tmp = dst.with_name(f".wsiflow-deid-{secrets.token_hex(8)}.tmp")
    try:
        with _quiet_pydicom():
            instances = _load(src)
            volumes = sorted(
                (i for i in instances if i.kind == "volume"),
                key=lambda i: -int(i.ds.get("TotalPixelMatrixColumns", 0)) * int(i.ds.get("TotalPixelMatrixRows", 0)),
            )
            dropped = tuple(sorted(i.kind for i in instances if i.kind != "volume"))
            tmp.mkdir(mode=0o700)
            for index, instance in enumerate(volumes):
                _write_volume(instance, cleaner, tmp / f"{index}.dcm")
            for index in range(len(volumes)):
                _check_written(tmp / f"{index}.dcm", cleaner.removed_values)
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
        profile=tuple(code for code, _ in DEID_OPTIONS),
    )
