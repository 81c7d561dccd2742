"""The DICOM allow-list: what a de-identified VL Whole Slide Microscopy Image keeps.

One table per place an attribute can sit (the top level, and each kept sequence's items).
An attribute that is on no table is removed, wherever it is: private tags, free text,
dates, names, references, and anything this module has never heard of. What is kept is
what the VL Whole Slide Microscopy Image IOD needs to display and measure the image
(image pixel, whole slide microscopy image, multi-frame functional groups, dimensions,
optical path, frame of reference, a coded specimen description), plus the identifying
attributes the IOD requires, emptied (Type 2) or replaced (Type 1) as PS3.15 Table
E.1-1's Basic Profile says: UIDs and identifiers by keyed pseudonyms, dates by dummies.

Each :class:`Rule` says how a kept value is checked and what happens when the check
fails: ``fail`` (the attribute is needed to show or measure the image: fail closed),
``empty`` (Type 2: written empty) or ``drop``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DEID_METHOD",
    "DEID_OPTIONS",
    "IMAGE_TYPE_VALUES",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "TOP_LEVEL",
    "WSI_SOP_CLASS",
    "OnBad",
    "Rule",
    "RuleKind",
]

RuleKind = Literal[
    "number", "enum", "image_type", "pattern", "uid", "empty", "dummy", "pseudonym", "binary",
    "sequence", "codes", "content", "fixed",
]
OnBad = Literal["fail", "empty", "drop"]


@dataclass(frozen=True)
class Rule:
    """How one allow-listed attribute is written: its check, its fallback, its items' table."""

    kind: RuleKind
    bad: OnBad = "drop"
    values: frozenset[str] = frozenset()
    pattern: str = ""
    items: Mapping[str, Rule] = field(default_factory=dict)


WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
"""VL Whole Slide Microscopy Image Storage."""

SUPPORTED_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "implicit VR little endian",
    "1.2.840.10008.1.2.1": "explicit VR little endian",
    "1.2.840.10008.1.2.4.50": "JPEG baseline",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
}
"""The encodings whose frames deid can check for embedded text (and OpenSlide can read)."""

DEID_OPTIONS = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113104", "Clean Structured Content Option"),
)
"""PS3.15 profile and option codes (DCM) written to DeidentificationMethodCodeSequence.

Clean Structured Content: the specimen preparation steps keep only coded content items
(codes from DICOM's dictionaries, meanings rewritten from them) and the specimen
identifier, replaced by its pseudonym. No "retain" option is supported.
"""

DEID_METHOD = "wsiflow allow-list: Basic Profile, Clean Structured Content"
"""DeidentificationMethod (LO, at most 64 characters)."""


def _number(bad: OnBad = "drop") -> Rule:
    return Rule("number", bad)


def _enum(*values: str, bad: OnBad = "drop") -> Rule:
    return Rule("enum", bad, values=frozenset(values))


def _uid(bad: OnBad = "drop") -> Rule:
    return Rule("uid", bad)


def _sequence(items: Mapping[str, Rule], bad: OnBad = "drop") -> Rule:
    return Rule("sequence", bad, items=items)


def _codes(bad: OnBad = "drop") -> Rule:
    return Rule("codes", bad)


_EMPTY = Rule("empty")
_DUMMY = Rule("dummy")
_PSEUDONYM = Rule("pseudonym", "fail")
_BINARY = Rule("binary")
_FAIL_NUMBER = _number("fail")

# ImageType / FrameType of a pyramid level: four values from these closed vocabularies.
IMAGE_TYPE_VALUES = (
    frozenset({"ORIGINAL", "DERIVED"}),
    frozenset({"PRIMARY", "SECONDARY"}),
    frozenset({"VOLUME"}),
    frozenset({"NONE", "RESAMPLED"}),
)
_IMAGE_TYPE = Rule("image_type", "fail")

_PIXEL_MEASURES = {"PixelSpacing": _FAIL_NUMBER, "SliceThickness": _number(), "SpacingBetweenSlices": _number()}
_PLANE_POSITION_SLIDE = {
    "XOffsetInSlideCoordinateSystem": _FAIL_NUMBER,
    "YOffsetInSlideCoordinateSystem": _FAIL_NUMBER,
    "ZOffsetInSlideCoordinateSystem": _FAIL_NUMBER,
    "ColumnPositionInTotalImagePixelMatrix": _FAIL_NUMBER,
    "RowPositionInTotalImagePixelMatrix": _FAIL_NUMBER,
}
_FUNCTIONAL_GROUPS: dict[str, Rule] = {
    "PixelMeasuresSequence": _sequence(_PIXEL_MEASURES, "fail"),
    "PlanePositionSlideSequence": _sequence(_PLANE_POSITION_SLIDE, "fail"),
    "WholeSlideMicroscopyImageFrameTypeSequence": _sequence({"FrameType": _IMAGE_TYPE}),
    "OpticalPathIdentificationSequence": _sequence({"OpticalPathIdentifier": _PSEUDONYM}),
    "SpecimenReferenceSequence": _sequence({"SpecimenUID": _uid()}),
    "FrameContentSequence": _sequence({"DimensionIndexValues": _number()}),
}

_OPTICAL_PATH: dict[str, Rule] = {
    "OpticalPathIdentifier": _PSEUDONYM,
    "IlluminationTypeCodeSequence": _codes("fail"),
    "IlluminationColorCodeSequence": _codes(),
    "IlluminatorTypeCodeSequence": _codes(),
    "LensesCodeSequence": _codes(),
    "LightPathFilterTypeStackCodeSequence": _codes(),
    "ImagePathFilterTypeStackCodeSequence": _codes(),
    "ChannelDescriptionCodeSequence": _codes(),
    "IlluminationWaveLength": _number(),
    "LightPathFilterPassThroughWavelength": _number(),
    "LightPathFilterPassBand": _number(),
    "ImagePathFilterPassThroughWavelength": _number(),
    "ImagePathFilterPassBand": _number(),
    "ObjectiveLensPower": _number(),
    "ObjectiveLensNumericalAperture": _number(),
    "CondenserLensPower": _number(),
    "ICCProfile": _BINARY,
}

_SPECIMEN_DESCRIPTION: dict[str, Rule] = {
    "SpecimenIdentifier": _PSEUDONYM,
    "SpecimenUID": _uid("fail"),
    "IssuerOfTheSpecimenIdentifierSequence": _EMPTY,
    "SpecimenTypeCodeSequence": _codes(),
    "PrimaryAnatomicStructureSequence": _codes(),
    "SpecimenPreparationSequence": _sequence(
        {"SpecimenPreparationStepContentItemSequence": Rule("content")}, "empty"
    ),
}

_DUMMY_DATE_TIME = {"ContentDate", "ContentTime", "AcquisitionDateTime"}

TOP_LEVEL: dict[str, Rule] = {
    # SOP Common
    "SpecificCharacterSet": Rule("pattern", pattern=r"(ISO[ _]IR [0-9]{1,3}|ISO 2022 IR [0-9]{1,3}|GB18030|GBK)"),
    "SOPClassUID": _enum(WSI_SOP_CLASS, bad="fail"),
    "SOPInstanceUID": _uid("fail"),
    "ContentQualification": _enum("PRODUCT", "RESEARCH", "SERVICE"),
    # Patient and General Study: Type 2, written empty (PS3.15 E.1-1: Z)
    "PatientName": _EMPTY, "PatientID": _EMPTY, "PatientBirthDate": _EMPTY, "PatientSex": _EMPTY,
    "StudyDate": _EMPTY, "StudyTime": _EMPTY, "ReferringPhysicianName": _EMPTY, "StudyID": _EMPTY,
    "AccessionNumber": _EMPTY,
    "StudyInstanceUID": _uid("fail"),
    # General Series, Frame of Reference
    "Modality": _enum("SM", bad="fail"),
    "SeriesInstanceUID": _uid("fail"),
    "SeriesNumber": _number(),
    "FrameOfReferenceUID": _uid("fail"),
    "PositionReferenceIndicator": _enum("SLIDE_CORNER", bad="empty"),
    # Enhanced General Equipment: Type 1 free text (names a device or site): dummies
    "Manufacturer": _DUMMY, "ManufacturerModelName": _DUMMY, "DeviceSerialNumber": _DUMMY,
    "SoftwareVersions": _DUMMY,
    # General Image / Whole Slide Microscopy Image: Type 1 dates and times get dummies
    **dict.fromkeys(_DUMMY_DATE_TIME, _DUMMY),
    "ImageType": _IMAGE_TYPE,
    "InstanceNumber": _number(),
    "LossyImageCompression": _enum("00", "01"),
    "LossyImageCompressionRatio": _number(),
    "LossyImageCompressionMethod": Rule("pattern", pattern=r"ISO_[0-9_]{1,14}"),
    "RecognizableVisualFeatures": _enum("NO"),
    "VolumetricProperties": _enum("VOLUME", "SAMPLED", "DISTORTED", "MIXED"),
    "ImagedVolumeWidth": _number(), "ImagedVolumeHeight": _number(), "ImagedVolumeDepth": _number(),
    "TotalPixelMatrixColumns": _FAIL_NUMBER, "TotalPixelMatrixRows": _FAIL_NUMBER,
    "TotalPixelMatrixFocalPlanes": _number(),
    "TotalPixelMatrixOriginSequence": _sequence(
        {k: _number() for k in ("XOffsetInSlideCoordinateSystem", "YOffsetInSlideCoordinateSystem",
                                "ZOffsetInSlideCoordinateSystem")}
    ),
    "ImageOrientationSlide": _number(),
    "FocusMethod": _enum("AUTO", "MANUAL"),
    "ExtendedDepthOfField": _enum("YES", "NO"),
    "NumberOfFocalPlanes": _number(),
    "DistanceBetweenFocalPlanes": _number(),
    "RecommendedAbsentPixelCIELabValue": _number(),
    "PyramidUID": _uid(),
    # Image Pixel
    "SamplesPerPixel": _FAIL_NUMBER,
    "PhotometricInterpretation": _enum(
        "RGB", "YBR_FULL_422", "YBR_FULL", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "MONOCHROME2", bad="fail"
    ),
    "PlanarConfiguration": _FAIL_NUMBER,
    "Rows": _FAIL_NUMBER, "Columns": _FAIL_NUMBER,
    "BitsAllocated": _FAIL_NUMBER, "BitsStored": _FAIL_NUMBER, "HighBit": _FAIL_NUMBER,
    "PixelRepresentation": _FAIL_NUMBER,
    "PixelData": Rule("binary", "fail"),
    "ExtendedOffsetTable": _BINARY, "ExtendedOffsetTableLengths": _BINARY,
    # Multi-frame Functional Groups, concatenations, Multi-frame Dimension
    "NumberOfFrames": _FAIL_NUMBER,
    "SharedFunctionalGroupsSequence": _sequence(_FUNCTIONAL_GROUPS, "fail"),
    "PerFrameFunctionalGroupsSequence": _sequence(_FUNCTIONAL_GROUPS, "fail"),
    "ConcatenationUID": _uid("fail"),
    "SOPInstanceUIDOfConcatenationSource": _uid("fail"),
    "InConcatenationNumber": _FAIL_NUMBER, "InConcatenationTotalNumber": _FAIL_NUMBER,
    "ConcatenationFrameOffsetNumber": _FAIL_NUMBER,
    "RepresentativeFrameNumber": _number(),
    "DimensionOrganizationSequence": _sequence({"DimensionOrganizationUID": _uid()}),
    "DimensionOrganizationType": _enum("TILED_FULL", "TILED_SPARSE", "3D", "3D_TEMPORAL", bad="fail"),
    "DimensionIndexSequence": _sequence(
        {"DimensionIndexPointer": _number(), "FunctionalGroupPointer": _number(), "DimensionOrganizationUID": _uid()}
    ),
    # Optical Path
    "NumberOfOpticalPaths": _number(),
    "OpticalPathSequence": _sequence(_OPTICAL_PATH, "fail"),
    # Specimen: identifiers become keyed pseudonyms, issuers and context are emptied
    "ContainerIdentifier": _PSEUDONYM,
    "IssuerOfTheContainerIdentifierSequence": _EMPTY,
    "ContainerTypeCodeSequence": _codes("empty"),
    "AcquisitionContextSequence": _EMPTY,
    "SpecimenDescriptionSequence": _sequence(_SPECIMEN_DESCRIPTION, "empty"),
    # Written by deid itself: the input's values are never copied
    "BurnedInAnnotation": Rule("fixed"),
    "SpecimenLabelInImage": Rule("fixed"),
    "PatientIdentityRemoved": Rule("fixed"),
    "LongitudinalTemporalInformationModified": Rule("fixed"),
    "DeidentificationMethod": Rule("fixed"),
    "DeidentificationMethodCodeSequence": Rule("fixed"),
}
"""The top level of a kept instance: every attribute not named here is removed."""
