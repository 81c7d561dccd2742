"""A result folder as DICOM objects filed with its source slide (highdicom).

From a complete :class:`ResultFolder` and the DICOM-WSI series it was computed from:

- one **Segmentation** (SEG, ``FRACTIONAL``/``PROBABILITY``, 8 bits: probability x 255) with one
  segment per class: the heatmap on the source's frame of reference, one SEG pixel per heatmap
  cell, placed by Image Position (Slide) and Pixel Spacing so that it overlays the slide;
- one **Microscopy Bulk Simple Annotations** (ANN, 2D pixel coordinates of the source's total
  pixel matrix, in doubles) with a group ``tiles`` (each tile the model saw as a polygon, one
  measurement per class probability) and one group per class with its threshold regions.

A Segmentation rather than a Parametric Map: a SEG's segments carry the class names, codes and
display colours, and SEG is what whole-slide viewers overlay (Slim shows fractional SEG
segments with their colours; Parametric Maps of slides are read by fewer tools); the 8-bit
fraction (steps of 1/255) is finer than anything a threshold or a reader's eye uses.

Both objects carry the source's patient, study and specimen modules (highdicom copies them)
and reference its series: inside the hospital that is what files them with the slide. They
are the only wsiflow outputs that hold patient data; nothing here logs or returns any of it.
UIDs of new series and instances are derived from the source series and the result's run
key, so storing the same result twice replaces rather than duplicates it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import NotAResultError, UnsupportedSlideError
from ._omezarr import read_heatmap_level0
from ._result import ResultFolder

__all__ = ["DicomResults", "build_dicom_results", "read_source_level0", "write_dicom_results",
           "DICOM_RESULT_MANUFACTURER"]

_log = logging.getLogger(__name__)

DICOM_RESULT_MANUFACTURER = "wsiflow"
_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_PRIVATE_SCHEME = "99WSIFLOW"
_SEG_SERIES_NUMBER = 9901
_ANN_SERIES_NUMBER = 9902
_SEG_TILE_PX = 256


@dataclass(frozen=True, eq=False)
class DicomResults:
    """The DICOM objects of one result: ``seg`` (heatmap) and ``ann`` (tiles and regions)."""

    seg: Any
    ann: Any

    @property
    def datasets(self) -> tuple[Any, ...]:
        return (self.seg, self.ann)


def read_source_level0(source: Path) -> Any:
    """The level-0 (largest VOLUME) instance of a DICOM-WSI folder, pixel data not loaded."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    best: Any = None
    files = sorted(p for p in Path(source).iterdir() if p.is_file()) if Path(source).is_dir() else [Path(source)]
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # not a DICOM file (a stray README, a half copy): not part of the slide
        if str(ds.get("SOPClassUID", "")) != _WSI_SOP_CLASS or "VOLUME" not in list(ds.get("ImageType", [])):
            continue
        if best is None or int(ds.TotalPixelMatrixColumns) > int(best.TotalPixelMatrixColumns):
            best = ds
    if best is None:
        raise UnsupportedSlideError(
            "the DICOM source holds no whole-slide VOLUME instance",
            hint="give the DICOM-WSI folder (or series) the result was computed from",
        )
    for keyword in ("FrameOfReferenceUID", "ImageOrientationSlide", "TotalPixelMatrixOriginSequence"):
        if keyword not in best:
            raise UnsupportedSlideError(
                f"the DICOM source's level 0 lacks {keyword}",
                hint="the slide's DICOM is incomplete; convert it again with a DICOM-WSI writer",
            )
    return best


def _source_spacing_mm(source: Any) -> tuple[float, float]:
    """(row spacing, column spacing) of the source's total pixel matrix, in mm."""
    spacing = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    return float(spacing[0]), float(spacing[1])


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["wsiflow", *parts]))


def _class_concept(name: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=name[:16], scheme_designator=_PRIVATE_SCHEME, meaning=name)


def _category() -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value="85756007", scheme_designator="SCT", meaning="Tissue")


def _colour(hex_colour: str) -> Any:
    from highdicom.color import CIELabColor

    text = hex_colour.lstrip("#")
    return CIELabColor.from_rgb(*(int(text[i:i + 2], 16) for i in (0, 2, 4)))


def _heatmap(folder: ResultFolder) -> tuple[np.ndarray, list[str], list[str], float, float]:
    """(classes, rows, cols) level 0, class names, colours, spacing and origin in µm."""
    import zarr

    group = zarr.open_group(str(folder.heatmap), mode="r")
    attrs: dict[str, Any] = dict(group.attrs)
    classes = attrs["wsiflow"]["classes"]
    transforms = attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    scale = next(t["scale"] for t in transforms if t["type"] == "scale")
    translation = next(t["translation"] for t in transforms if t["type"] == "translation")
    if abs(scale[1] - scale[2]) > 1e-9 or abs(translation[1] - translation[2]) > 1e-9:
        raise NotAResultError("the result's heatmap cells are not square", hint="run the slide again")
    array = read_heatmap_level0(folder.heatmap).astype(np.float32)
    return (array, [c["name"] for c in classes], [c["color"] for c in classes],
            float(scale[1]), float(translation[1]))


def _algorithm(model: str, version: int) -> Any:
    from highdicom import AlgorithmIdentificationSequence
    from pydicom.sr.codedict import codes

    return AlgorithmIdentificationSequence(
        name=model, family=codes.cid7162.ArtificialIntelligence, version=str(version)
    )


def _software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wsiflow")
    except PackageNotFoundError:
        return "unknown"


def _slide_position(source: Any, index: tuple[float, float], spacing_mm: tuple[float, float]) -> list[float]:
    """Slide coordinates (mm) of level-0 pixel index ``(col, row)`` (fractional allowed):
    the total pixel matrix origin (the first pixel's centre) plus the steps along the row and
    column directions of Image Orientation (Slide)."""
    origin = source.TotalPixelMatrixOriginSequence[0]
    start = np.array([float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem),
                      float(origin.get("ZOffsetInSlideCoordinateSystem", 0.0) or 0.0)])
    cosines = np.array([float(v) for v in source.ImageOrientationSlide]).reshape(2, 3)
    col, row = index
    position = start + col * spacing_mm[1] * cosines[0] + row * spacing_mm[0] * cosines[1]
    return [float(v) for v in position]


def _build_seg(folder: ResultFolder, source: Any, summary: Any, key: str) -> Any:
    import highdicom as hd

    heatmap, names, _, spacing_um, origin_um = _heatmap(folder)
    mpp_x, mpp_y = summary.mpp.mpp_x, summary.mpp.mpp_y
    row_mm, col_mm = _source_spacing_mm(source)
    # Heatmap cell (0, 0)'s centre is at ``origin_um`` (µm along x and y from the slide's
    # top-left corner). As a level-0 pixel index (pixel i's centre at i) that is µm / mpp - 0.5.
    centre_px = (origin_um / mpp_x - 0.5, origin_um / mpp_y - 0.5)
    position = _slide_position(source, centre_px, (row_mm, col_mm))
    pixel_spacing = (spacing_um / mpp_y * row_mm, spacing_um / mpp_x * col_mm)
    model = summary.model
    segments = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=name,
            segmented_property_category=_category(),
            segmented_property_type=_class_concept(name),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(model.name, model.version),
            tracking_uid=_uid(str(source.SeriesInstanceUID), key, "segment", name),
            tracking_id=f"{model.name} {name}",
        )
        for i, name in enumerate(names)
    ]
    pixels = np.clip(np.moveaxis(heatmap, 0, -1)[np.newaxis], 0.0, 1.0)
    tile = max(1, min(_SEG_TILE_PX, max(pixels.shape[1:3])))
    return hd.seg.Segmentation(
        source_images=[source],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        segment_descriptions=segments,
        series_instance_uid=_uid(str(source.SeriesInstanceUID), key, "seg-series"),
        series_number=_SEG_SERIES_NUMBER,
        sop_instance_uid=_uid(str(source.SeriesInstanceUID), key, "seg"),
        instance_number=1,
        manufacturer=DICOM_RESULT_MANUFACTURER,
        manufacturer_model_name=model.ref,
        software_versions=_software_version(),
        device_serial_number=model.sha256[:16],
        content_label="HEATMAP",
        content_description=f"{model.ref} class probabilities"[:64],
        series_description=f"wsiflow {model.ref} heatmap"[:64],
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=pixel_spacing, slice_thickness=float(
            source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].get("SliceThickness", 1.0) or 1.0)),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system="SLIDE", image_orientation=[float(v) for v in source.ImageOrientationSlide]),
        plane_positions=[hd.PlanePositionSequence("SLIDE", image_position=[float(v) for v in position],
                                                  pixel_matrix_position=(1, 1))],
        tile_pixel_array=True,
        tile_size=(tile, tile),
        omit_empty_frames=False,
    )


def _region_polygons(folder: ResultFolder) -> dict[str, list[np.ndarray]]:
    """Threshold-region outlines (shells; level-0 px, open rings) per class from the GeoJSON."""
    try:
        document = json.loads(folder.geojson.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NotAResultError(f"the result's GeoJSON is unreadable ({type(exc).__name__})") from None
    regions: dict[str, list[np.ndarray]] = {}
    for feature in document.get("features", []):
        props = feature.get("properties") or {}
        if props.get("objectType") != "annotation":
            continue
        shell = np.asarray(feature["geometry"]["coordinates"][0], dtype=np.float64)
        regions.setdefault(props["classification"]["name"], []).append(shell[:-1])
    return regions


def _build_ann(folder: ResultFolder, source: Any, summary: Any, key: str, names: Sequence[str],
               colours: Sequence[str]) -> Any:
    import highdicom as hd
    import pyarrow.parquet as pq
    from pydicom.sr.codedict import codes

    table = pq.read_table(folder.tiles).to_pydict()
    x, y = np.asarray(table["x"], np.float64), np.asarray(table["y"], np.float64)
    w, h = np.asarray(table["width"], np.float64), np.asarray(table["height"], np.float64)
    polygons = [np.array([[a, b], [a + c, b], [a + c, b + d], [a, b + d]], dtype=np.float64)
                for a, b, c, d in zip(x, y, w, h, strict=True)]
    model = summary.model
    algorithm = _algorithm(model.name, model.version)
    unit = codes.UCUM.NoUnits
    measurements = [
        hd.ann.Measurements(
            name=hd.sr.CodedConcept(value=f"P-{name}"[:16], scheme_designator=_PRIVATE_SCHEME,
                                    meaning=f"probability of {name}"),
            values=np.asarray(table[f"prob_{name}"], dtype=np.float32),
            unit=unit,
        )
        for name in names
    ]
    series = str(source.SeriesInstanceUID)
    groups = []
    if polygons:
        groups.append(hd.ann.AnnotationGroup(
            number=1, uid=_uid(series, key, "group", "tiles"), label="tiles",
            annotated_property_category=_category(), annotated_property_type=_class_concept("tile"),
            graphic_type=hd.ann.GraphicTypeValues.POLYGON, graphic_data=polygons,
            algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, measurements=measurements,
            description=f"tiles classified by {model.ref}; one probability per class"[:64],
        ))
    threshold = summary.data.get("provenance", {}).get("parameters", {}).get("region_threshold")
    for name, colour in zip(names, colours, strict=False):
        shells = _region_polygons(folder).get(name, [])
        if not shells:
            continue
        groups.append(hd.ann.AnnotationGroup(
            number=len(groups) + 1, uid=_uid(series, key, "group", "region", name),
            label=f"{name} >= {threshold}"[:64],
            annotated_property_category=_category(), annotated_property_type=_class_concept(name),
            graphic_type=hd.ann.GraphicTypeValues.POLYGON, graphic_data=shells,
            algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            description=f"{name} regions, probability >= {threshold}"[:64],
            display_color=_colour(colour),
        ))
    if not groups:
        raise NotAResultError("the result has no tiles to annotate", hint="nothing to store for this slide")
    return hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[source],
        annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=groups,
        series_instance_uid=_uid(series, key, "ann-series"),
        series_number=_ANN_SERIES_NUMBER,
        sop_instance_uid=_uid(series, key, "ann"),
        instance_number=1,
        manufacturer=DICOM_RESULT_MANUFACTURER,
        manufacturer_model_name=model.ref,
        software_versions=_software_version(),
        device_serial_number=model.sha256[:16],
        content_label="TILES",
        content_description=f"{model.ref} tiles and regions"[:64],
        series_description=f"wsiflow {model.ref} tiles and regions"[:64],
    )


def build_dicom_results(result: ResultFolder, source: Any) -> DicomResults:
    """The SEG and ANN of a complete result, on the frame of reference of ``source`` (the
    level-0 dataset from :func:`read_source_level0`)."""
    if not result.is_complete():
        raise NotAResultError("not a complete wsiflow result folder", hint="finish the run first")
    summary = result.read_summary()
    key = result.read_manifest().key
    width = summary.data.get("provenance", {}).get("slide", {}).get("width")
    if width is not None and int(width) != int(source.TotalPixelMatrixColumns):
        raise UnsupportedSlideError(
            f"the result is {width} px wide, the DICOM source's level 0 {int(source.TotalPixelMatrixColumns)} px",
            hint="give the DICOM-WSI series this result was computed from",
        )
    seg = _build_seg(result, source, summary, key)
    _, names, colours, _, _ = _heatmap(result)
    ann = _build_ann(result, source, summary, key, names, colours)
    _log.info("DICOM results of slide %s built", summary.slide_id)
    return DicomResults(seg, ann)


def write_dicom_results(result: ResultFolder, source: Path, out_dir: Path) -> list[Path]:
    """Write the SEG and ANN of ``result`` (computed from the DICOM-WSI ``source``) into
    ``out_dir`` as ``<slide id>-<model>-seg.dcm`` and ``-ann.dcm``; their paths."""
    objects = build_dicom_results(result, read_source_level0(source))
    summary = result.read_summary()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, dataset in (("seg", objects.seg), ("ann", objects.ann)):
        path = out_dir / f"{summary.slide_id}-{summary.model.name}-{suffix}.dcm"
        tmp = path.with_name(f".{path.name}.tmp")
        dataset.save_as(tmp, enforce_file_format=True)
        tmp.replace(path)
        paths.append(path)
    return paths
