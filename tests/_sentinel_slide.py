"""A "sentinel" Aperio SVS: every place a real scanner puts identifying data holds one marker.

The folder name, file name, every ImageDescription field, the TIFF text tags and the
pixels of the label and macro images all carry :data:`SENTINEL`, so a de-identified copy
can be checked for leaks with one ``bytes.find`` (and the label/macro pixels by their
absence). Geometry: level 0 2048x1536 RGB at 0.5 µm/px (20x), JPEG tiles of 256 px,
reduced levels 1024x768 and 512x384, in Aperio page order (level 0, thumbnail, levels,
label, macro).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "E11_ATTRIBUTES",
    "SENTINEL",
    "SENTINEL_DATE",
    "SENTINEL_DICOM_DATE",
    "SENTINEL_NUMBERS",
    "SENTINEL_TIME",
    "SENTINEL_UID_ROOT",
    "label_image",
    "tissue_image",
    "write_sentinel_dicom",
    "write_sentinel_svs",
]

SENTINEL = "ZQXSENTINEL7"
SENTINEL_DATE = "11/27/26"
SENTINEL_TIME = "10:00:00"
_WIDTH, _HEIGHT = 2048, 1536
_TILE = 256
_HEADER = "Aperio Image Library v12.0.0"


def tissue_image(width: int = _WIDTH, height: int = _HEIGHT, seed: int = 7) -> np.ndarray:
    """Near-white glass with pink (eosin) blobs and purple (haematoxylin) nuclei."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.empty((height, width, 3), np.float32)
    image[:] = (242, 240, 244)
    for _ in range(6):
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
        rx, ry = rng.uniform(0.08, 0.18) * width, rng.uniform(0.08, 0.18) * height
        blob = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        image[blob] = (222, 140, 185)
    nuclei = (rng.random((height // 8, width // 8)) < 0.08).repeat(8, 0).repeat(8, 1)
    tissue = image[..., 1] < 200
    image[nuclei & tissue] = (120, 70, 150)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _text_image(width: int, height: int, text: str, background: tuple[int, int, int]) -> np.ndarray:
    picture = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(12, width // 9))
    draw.text((10, height // 3), text, fill=(0, 0, 0), font=font)
    return np.asarray(picture)


def label_image(width: int, height: int, text: str = SENTINEL) -> np.ndarray:
    """A slide label: ``text`` in black on near-white, as scanners photograph it."""
    return _text_image(width, height, text, (250, 250, 250))


def _reduce(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape[0] // factor, image.shape[1] // factor
    return image[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).mean((1, 3)).astype(np.uint8)


def write_sentinel_svs(parent: Path, sentinel: str = SENTINEL) -> Path:
    """Write ``parent/case-<sentinel>/<sentinel>-slide.svs`` and return its path."""
    folder = Path(parent) / f"case-{sentinel}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sentinel}-slide.svs"
    s = sentinel
    fields = (
        f"|AppMag = 20|StripeWidth = 1000|ScanScope ID = {s}|Filename = {s}|Date = {SENTINEL_DATE}"
        f"|Time = {SENTINEL_TIME}|Time Zone = GMT+0100|User = {s}-user|MPP = 0.5|Left = 20.1|Top = 19.9"
        f"|Patient = {s}^PATIENT|Barcode = {s}-BARCODE|OriginalWidth = {_WIDTH}|OriginalHeight = {_HEIGHT}"
    )
    text_tags = [
        (269, "s", 0, f"{s} document", True),
        (271, "s", 0, f"{s} make", True),
        (272, "s", 0, f"{s} model", True),
        (285, "s", 0, f"{s} page", True),
        (315, "s", 0, f"{s} artist", True),
        (316, "s", 0, f"{s}-host", True),
        (33432, "s", 0, f"(c) {s}", True),
    ]
    level0 = tissue_image()
    levels = [level0, _reduce(level0, 2), _reduce(level0, 4)]
    thumbnail = _reduce(level0, 4)
    label = _text_image(387, 463, s, (250, 250, 250))
    macro = _text_image(1280, 431, s, (200, 200, 210))
    common = {"photometric": "rgb", "metadata": None, "software": f"{s} scanner software"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            levels[0], tile=(_TILE, _TILE), compression="jpeg", subfiletype=0, datetime="2026:11:27 10:00:00",
            description=f"{_HEADER}\r\n{_WIDTH}x{_HEIGHT} [0,0 {_WIDTH}x{_HEIGHT}] ({_TILE}x{_TILE}) JPEG/RGB Q=70{fields}",
            extratags=text_tags, **common,
        )
        tif.write(
            thumbnail, compression="jpeg", subfiletype=0, rowsperstrip=16,
            description=f"{_HEADER}\r\n{_WIDTH}x{_HEIGHT} -> {thumbnail.shape[1]}x{thumbnail.shape[0]} - {fields}",
            extratags=text_tags, **common,
        )
        for level in levels[1:]:
            tif.write(
                level, tile=(_TILE, _TILE), compression="jpeg", subfiletype=0,
                description=f"{_HEADER}\r\n{_WIDTH}x{_HEIGHT} [0,0 {_WIDTH}x{_HEIGHT}] ({_TILE}x{_TILE}) "
                f"-> {level.shape[1]}x{level.shape[0]} JPEG/RGB Q=70{fields}",
                extratags=text_tags, **common,
            )
        tif.write(
            label, compression="lzw", subfiletype=1, rowsperstrip=16,
            description=f"{_HEADER}\r\nlabel 387x463\r\nBarcode = {s}-BARCODE", extratags=text_tags, **common,
        )
        tif.write(
            macro, compression="jpeg", subfiletype=9, rowsperstrip=16,
            description=f"{_HEADER}\r\nmacro 1280x431\r\nSlide = {s}", extratags=text_tags, **common,
        )
    return path


# ----------------------------------------------------------------------------------- DICOM

SENTINEL_DICOM_DATE = "19770707"
SENTINEL_UID_ROOT = "1.3.6.1.4.1.7077707"
SENTINEL_NUMBERS = ("7077.7077", "70777077", "077Y")
"""The DS, IS and AS values the sentinel DICOM puts where text cannot go."""

# PS3.15 (2024b) Table E.1-1, by Basic Profile action: every attribute with a D, Z, X or U
# action (or a choice of them), as pydicom keywords. Curves, overlays, private tags and
# the command group are added separately.
E11_ATTRIBUTES: dict[str, frozenset[str]] = {
    action: frozenset(words.split())
    for action, words in {
    "D": """
        AcquisitionFieldOfViewLabel AnnotationGroupLabel AnnotationGroupUID AssertionDateTime
        AttributeModificationDateTime BeamHoldTransitionDateTime CertificateOfSigner
        ClinicalTrialProtocolEthicsCommitteeName ClinicalTrialProtocolID ClinicalTrialSponsorName
        ClinicalTrialSubjectID ClinicalTrialSubjectReadingID ContainerIdentifier ContentSequence
        ContextGroupLocalVersion ContextGroupVersion Date DateTime DecayCorrectionDateTime DestinationAE
        DeviceLabel DigitalSignatureDateTime EffectiveDateTime EncapsulatedDocument EntityLabel
        EntityLongLabel ExclusionStartDateTime FlowIdentifier FlowIdentifierSequence
        FrameAcquisitionDateTime FrameOriginTimestamp FrameReferenceDateTime FunctionalSyncPulse
        GraphicAnnotationSequence HangingProtocolCreationDateTime ImpedanceMeasurementDateTime
        InformationIssueDateTime InterlockDateTime InterlockDescription InterlockOriginDescription
        ModifyingSystem OverrideDateTime PersonIdentificationCodeSequence PersonName RTPlanLabel
        RTPrescriptionLabel RTToleranceSetLabel RadiationDoseIdentificationLabel
        RadiationDoseInVivoMeasurementLabel RadiationGenerationModeLabel ReasonForTheAttributeModification
        RecordedRTControlPointDateTime ReferencedDateTime SafePositionExitDate SafePositionExitTime
        SafePositionReturnDate SafePositionReturnTime SelectorAEValue SelectorASValue SelectorDAValue
        SelectorDTValue SelectorLOValue SelectorLTValue SelectorOBValue SelectorPNValue SelectorSHValue
        SelectorSTValue SelectorTMValue SelectorUNValue SelectorURValue SelectorUTValue SourceEndDateTime
        SourceIdentifier SourceStartDateTime SourceStrengthReferenceDate SourceStrengthReferenceTime
        SpecimenIdentifier StructureSetLabel Time TreatmentControlPointDate TreatmentControlPointTime
        TreatmentPositionGroupLabel TreatmentToleranceViolationDateTime
        TreatmentToleranceViolationDescription UserContentLabel UserContentLongLabel VerificationDateTime
        VerifyingObserverName VerifyingObserverSequence VerifyingOrganization XRayDetectorID XRaySourceID
    """,
    "Z": """
        AccessionNumber CalibrationDateTime ClinicalTrialCoordinatingCenterName ClinicalTrialProtocolName
        ClinicalTrialSiteID ClinicalTrialSiteName ClinicalTrialTimePointID
        ConceptualVolumeCombinationDescription ConceptualVolumeDescription ConsultingPhysicianName
        DeviceAlternateIdentifier FillerOrderNumberImagingServiceRequest FractionationNotes
        IssuerOfTheContainerIdentifierSequence IssuerOfTheSpecimenIdentifierSequence
        ManufacturerDeviceIdentifier ParticipationDateTime PatientBirthDate PatientName PatientSex
        PlacerOrderNumberImagingServiceRequest PrescriptionNotes PrescriptionNotesSequence ROIInterpreter
        ROIName RTAccessoryDeviceSlotID RTAccessoryHolderSlotID RTPhysicianIntentNarrative
        RadiationGenerationModeDescription ReasonForSuperseding ReferringPhysicianName ReviewDate ReviewTime
        SourceOfPreviousValues SpecimenPreparationSequence StructureSetDate StructureSetTime StudyDate
        StudyID StudyTime TreatmentTechniqueNotes VerifyingObserverIdentificationCodeSequence
    """,
    "X": """
        AcquisitionComments AcquisitionProtocolDescription ActualHumanPerformersSequence
        AdditionalPatientHistory AddressTrial AdmissionID AdmittingDate AdmittingDiagnosesCodeSequence
        AdmittingDiagnosesDescription AdmittingTime Allergies AnnotationGroupDescription
        ApprovalStatusDateTime Arbitrary AssertionExpirationDateTime AuthorObserverSequence BeamDescription
        BolusDescription BranchOfService CalibrationDate CalibrationTime CameraOwnerName CassetteID
        CertifiedTimestamp ClinicalTrialProtocolEthicsCommitteeApprovalNumber ClinicalTrialSeriesDescription
        ClinicalTrialSeriesID ClinicalTrialTimePointDescription CommentsOnRadiationDose
        CommentsOnThePerformedProcedureStep CompensatorDescription
        ConfidentialityConstraintOnPatientDataDescription ConsultingPhysicianIdentificationSequence
        ContainerComponentID ContainerDescription ContentCreatorIdentificationCodeSequence
        ContrastBolusStartTime ContrastBolusStopTime ContributionDateTime ContributionDescription
        CountryOfResidence CreationDate CreationTime CurrentObserverTrial CurrentPatientLocation CurveDate
        CurveTime CustodialOrganizationSequence DateOfDocumentOrVerbalTransactionTrial DateOfInstallation
        DateOfLastCalibration DateOfManufacture DateOfSecondaryCapture DateTimeOfLastCalibration
        DecompositionDescription DerivationDescription DeviceDescription DeviceSettingDescription
        DigitalSignaturesSequence DischargeDate DischargeDiagnosisDescription DischargeTime
        DisplacementReferenceLabel DistributionAddress DistributionName DoseReferenceDescription
        EntityDescription EntityName EquipmentFrameOfReferenceDescription
        EthicsCommitteeApprovalEffectivenessEndDate EthicsCommitteeApprovalEffectivenessStartDate
        EthnicGroup ExpectedCompletionDateTime FilterLookupTableDescription FindingsGroupRecordingDateTrial
        FindingsGroupRecordingTimeTrial FixationDeviceDescription FractionGroupDescription FrameComments
        GPSAltitude GPSAltitudeRef GPSAreaInformation GPSDOP GPSDateStamp GPSDestBearing GPSDestBearingRef
        GPSDestDistance GPSDestDistanceRef GPSDestLatitude GPSDestLatitudeRef GPSDestLongitude
        GPSDestLongitudeRef GPSDifferential GPSImgDirection GPSImgDirectionRef GPSLatitude GPSLatitudeRef
        GPSLongitude GPSLongitudeRef GPSMapDatum GPSMeasureMode GPSProcessingMethod GPSSatellites GPSSpeed
        GPSSpeedRef GPSStatus GPSTimeStamp GPSTrack GPSTrackRef GPSVersionID GantryID GeneratorID
        HL7DocumentEffectiveTime HumanPerformerName HumanPerformerOrganization IconImageSequence
        IdentifyingComments ImageComments ImagePresentationComments ImagingServiceRequestComments
        Impressions InstanceCoercionDateTime InstanceOriginStatus InstitutionAddress
        InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence InsurancePlanIdentification
        IntendedFractionStartTime IntendedRecipientsOfResultsIdentificationSequence
        InterpretationApprovalDate InterpretationApprovalTime InterpretationApproverSequence
        InterpretationAuthor InterpretationDiagnosisDescription InterpretationID InterpretationIDIssuer
        InterpretationRecordedDate InterpretationRecordedTime InterpretationRecorder InterpretationText
        InterpretationTranscriber InterpretationTranscriptionDate InterpretationTranscriptionTime
        InterventionDrugStartTime InterventionDrugStopTime IssueDateOfImagingServiceRequest
        IssueTimeOfImagingServiceRequest IssuerOfAdmissionID IssuerOfAdmissionIDSequence
        IssuerOfClinicalTrialProtocolID IssuerOfClinicalTrialSeriesID IssuerOfClinicalTrialSiteID
        IssuerOfClinicalTrialSubjectID IssuerOfClinicalTrialSubjectReadingID
        IssuerOfClinicalTrialTimePointID IssuerOfPatientID IssuerOfServiceEpisodeID
        IssuerOfServiceEpisodeIDSequence LastMenstrualDate LensMake LensModel LensSerialNumber
        LensSpecification LongDeviceDescription MAC MakerNote MedicalAlerts MedicalRecordLocator
        MilitaryRank ModifiedAttributesSequence ModifiedImageDate ModifiedImageDescription ModifiedImageTime
        ModifyingDeviceID MultienergyAcquisitionDescription NameOfPhysiciansReadingStudy
        NamesOfIntendedRecipientsOfResults NetworkID NonconformingDataElementValue
        NonconformingModifiedAttributesSequence ObservationDateTrial ObservationStartDateTime
        ObservationTimeTrial Occupation OrderCallbackPhoneNumber OrderCallbackTelecomInformation
        OrderEnteredBy OrderEntererLocation OriginalAttributesSequence Originator
        OtherClinicalTrialProtocolIDsSequence OtherPatientIDs OtherPatientIDsSequence OtherPatientNames
        OverlayDate OverlayTime ParticipantSequence PatientAddress PatientAge PatientBirthName
        PatientBirthTime PatientComments PatientInstitutionResidence PatientInsurancePlanCodeSequence
        PatientMotherBirthName PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence
        PatientReligiousPreference PatientSetupPhotoDescription PatientSize PatientState
        PatientTelecomInformation PatientTelephoneNumbers PatientTransportArrangements
        PatientTreatmentPreparationMethodDescription
        PatientTreatmentPreparationProcedureParameterDescription PatientWeight PerformedLocation
        PerformedProcedureStepDescription PerformedProcedureStepEndDate PerformedProcedureStepEndDateTime
        PerformedProcedureStepEndTime PerformedProcedureStepID PerformedProcedureStepStartDate
        PerformedProcedureStepStartDateTime PerformedProcedureStepStartTime PerformedStationAETitle
        PerformedStationGeographicLocationCodeSequence PerformedStationName PerformedStationNameCodeSequence
        PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress
        PersonTelecomInformation PersonTelephoneNumbers PhysicianApprovingInterpretation PhysiciansOfRecord
        PhysiciansOfRecordIdentificationSequence PhysiciansReadingStudyIdentificationSequence PlateID
        PositionAcquisitionTemplateDescription PositionAcquisitionTemplateName PreMedication PregnancyStatus
        PrescriptionDescription PresentationCreationDate PresentationCreationTime
        PriorTreatmentDoseDescription ProcedureStepCancellationDateTime ProductExpirationDateTime
        PyramidDescription PyramidLabel ROICreatorSequence ROIDateTime ROIDescription
        ROIGenerationDescription ROIInterpreterSequence ROIObservationDateTime ROIObservationDescription
        ROIObservationLabel RTPlanDescription RTPlanName RadiopharmaceuticalStartDateTime
        RadiopharmaceuticalStartTime RadiopharmaceuticalStopDateTime RadiopharmaceuticalStopTime
        ReasonForOmissionDescription ReasonForRequestedProcedureCodeSequence ReasonForStudy
        ReasonForTheImagingServiceRequest ReasonForTheRequestedProcedure ReasonForVisit
        ReasonForVisitCodeSequence ReceivingAE ReferencedDigitalSignatureSequence
        ReferencedPatientAliasSequence ReferencedPatientPhotoSequence ReferencedPatientSequence
        ReferencedSOPInstanceMACSequence ReferringPhysicianAddress ReferringPhysicianIdentificationSequence
        ReferringPhysicianTelephoneNumbers RegionOfResidence RequestAttributesSequence
        RequestedContrastAgent RequestedProcedureComments RequestedProcedureID RequestedProcedureLocation
        RequestedSeriesDescription RequestingAE RequestingPhysician RequestingService
        RespiratoryMotionCompensationTechniqueDescription ResponsibleOrganization ResponsiblePerson
        ResultsComments ResultsDistributionListSequence ResultsID ResultsIDIssuer RetrieveAETitle
        SOPAuthorizationDateTime ScheduledAdmissionDate ScheduledAdmissionTime ScheduledDischargeDate
        ScheduledDischargeTime ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
        ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName
        ScheduledProcedureStepDescription ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime
        ScheduledProcedureStepExpirationDateTime ScheduledProcedureStepID ScheduledProcedureStepLocation
        ScheduledProcedureStepModificationDateTime ScheduledProcedureStepStartDate
        ScheduledProcedureStepStartDateTime ScheduledProcedureStepStartTime ScheduledStationAETitle
        ScheduledStationGeographicLocationCodeSequence ScheduledStationName ScheduledStationNameCodeSequence
        ScheduledStudyLocation ScheduledStudyLocationAETitle ScheduledStudyStartDate ScheduledStudyStartTime
        ScheduledStudyStopDate ScheduledStudyStopTime SeriesDescription ServiceEpisodeDescription
        ServiceEpisodeID SetupTechniqueDescription ShieldingDeviceDescription SlideIdentifier SmokingStatus
        SourceManufacturer SpecialNeeds SpecimenAccessionNumber SpecimenDetailedDescription
        SpecimenShortDescription StationAETitle StructureSetDescription StructureSetName StudyArrivalDate
        StudyArrivalTime StudyComments StudyCompletionDate StudyCompletionTime StudyDescription
        StudyIDIssuer StudyReadDate StudyReadTime StudyVerifiedDate StudyVerifiedTime
        SubstanceAdministrationDateTime TelephoneNumberTrial TemplateLocalVersion TemplateVersion
        TextComments TextString TimeOfDocumentCreationOrVerbalTransactionTrial TimeOfLastCalibration
        TimeOfSecondaryCapture TimezoneOffsetFromUTC TopicAuthor TopicKeywords TopicSubject TopicTitle
        TransducerIdentificationSequence TreatmentSites UDISequence UniqueDeviceIdentifier
        VerbalSourceIdentifierCodeSequenceTrial VerbalSourceTrial VisitComments WaveformFilterDescription
        XRayDetectorLabel
    """,
    "U": """
        AcquisitionUID ConcatenationUID ConceptualVolumeUID ConstituentConceptualVolumeUID DeviceUID
        DigitalSignatureUID DimensionOrganizationUID DoseReferenceUID DosimetricObjectiveUID
        FailedSOPInstanceUIDList FiducialUID FrameOfReferenceUID InstanceCreatorUID IrradiationEventUID
        LargePaletteColorLookupTableUID ManufacturerDeviceClassUID MultiplexGroupUID
        ObservationSubjectUIDTrial ObservationUID PaletteColorLookupTableUID PatientSetupUID
        PresentationDisplayCollectionUID PresentationSequenceCollectionUID PyramidUID RTTreatmentPhaseUID
        ReferencedConceptualVolumeUID ReferencedDoseReferenceUID ReferencedDosimetricObjectiveUID
        ReferencedFiducialsUID ReferencedFrameOfReferenceUID
        ReferencedGeneralPurposeScheduledProcedureStepTransactionUID ReferencedObservationUIDTrial
        ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile ReferencedTreatmentPositionGroupUID
        RelatedFrameOfReferenceUID SOPInstanceUID SeriesInstanceUID SourceConceptualVolumeUID
        SourceFrameOfReferenceUID SpecimenUID StorageMediaFileSetUID StudyInstanceUID
        SynchronizationFrameOfReferenceUID TargetUID TemplateExtensionCreatorUID
        TemplateExtensionOrganizationUID TrackingUID TransactionUID TreatmentPositionGroupUID
        TreatmentSessionUID UID
    """,
    "ZD": """
        ContentCreatorName ContentDate ContentTime ContrastBolusAgent InstructionPerformedDateTime PatientID
    """,
    "XZ": """
        AcquisitionContextSequence AcquisitionDate AcquisitionTime BarcodeValue LabelText PatientSexNeutered
        ReferencedStudySequence RequestedProcedureDescription ReviewerName SourceSerialNumber
        TreatmentMachineName
    """,
    "XD": """
        AcquisitionDeviceProcessingDescription DateOfLastDetectorCalibration DetectorID
        EndAcquisitionDateTime FirstTreatmentDate InstanceCreationDate IntendedPhaseEndDate
        IntendedPhaseStartDate MostRecentTreatmentDate ObservationDateTime OperatorIdentificationSequence
        ProtocolName RTPlanDate RTPlanTime RTTreatmentApproachLabel SeriesDate SeriesTime
        StartAcquisitionDateTime TimeOfLastDetectorCalibration TreatmentDate TreatmentSite TreatmentTime
    """,
    "XZD": """
        AcquisitionDateTime DeviceSerialNumber InstanceCreationTime InstitutionCodeSequence InstitutionName
        OperatorsName ReferencedPerformedProcedureStepSequence StationName
    """,
    "XZU": """
        ReferencedImageSequence SourceImageSequence
    """,
    }.items()
}

# Attributes the sentinel DICOM must keep consistent across instances (one slide): the
# same sentinel UID in every instance, except SOPInstanceUID (one per instance).
_SLIDE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PyramidUID")
# Not set: a ConcatenationUID makes OpenSlide read each instance as part of a split image.
_NOT_SET = frozenset({"ConcatenationUID"})


def _sentinel_value(keyword: str, vr: str, number: int) -> object:
    from pydicom.sequence import Sequence

    s = SENTINEL
    if vr == "SQ":
        return Sequence([_sentinel_item(keyword, depth=2)])
    if vr == "UI":
        return f"{SENTINEL_UID_ROOT}.{number}"
    if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        return f"{s} {keyword} ".encode()
    values = {
        "DA": SENTINEL_DICOM_DATE, "DT": f"{SENTINEL_DICOM_DATE}070707", "TM": "070707",
        "DS": SENTINEL_NUMBERS[0], "IS": SENTINEL_NUMBERS[1], "AS": SENTINEL_NUMBERS[2],
        "PN": f"{s}^{keyword[:40]}", "AE": s, "CS": s, "SH": s, "UR": f"https://{s.lower()}.example/{keyword}",
    }
    if vr in values:
        return values[vr]
    if vr in ("US", "UL", "SS", "SL", "UV", "SV"):
        return 7077
    if vr in ("FL", "FD"):
        return 7077.7077
    if vr == "AT":
        return 0x00107077
    return f"{s} {keyword}"  # LO, LT, ST, UT, UC


def _sentinel_item(name: str, depth: int) -> object:
    """A sequence item full of identifiers: a fake code, a patient ID, a private tag, nesting."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.CodeValue = SENTINEL
    item.CodingSchemeDesignator = "99ZQX"
    item.CodeMeaning = f"{SENTINEL} {name}"
    item.PatientID = f"{SENTINEL}-nested"
    item.TextValue = f"{SENTINEL} free text in {name}"
    item.private_block(0x0099, "ZQX NESTED", create=True).add_new(0x01, "LO", f"{SENTINEL} private in {name}")
    if depth > 0:
        item.OtherPatientIDsSequence = Sequence([_sentinel_item(f"{name}>nested", depth - 1)])
    return item


def _code(scheme: str, value: str, meaning: str) -> object:
    from pydicom.dataset import Dataset

    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _content_item(value_type: str, name: object, **values: object) -> object:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.ValueType = value_type
    item.ConceptNameCodeSequence = Sequence([name])
    for key, value in values.items():
        setattr(item, key, value)
    return item


def _add_sentinels(ds: object, instance: int) -> None:
    """Put the sentinel in every E.1-1 attribute, in the kept sequences, private tags and the rest."""
    from pydicom.datadict import dictionary_VR
    from pydicom.sequence import Sequence

    s = SENTINEL
    for number, keyword in enumerate(sorted(set().union(*E11_ATTRIBUTES.values()) - _NOT_SET)):
        if keyword == "SOPInstanceUID":
            value: object = f"{SENTINEL_UID_ROOT}.9.{instance}"
        elif keyword in _SLIDE_UIDS:
            value = f"{SENTINEL_UID_ROOT}.1.{_SLIDE_UIDS.index(keyword)}"
        else:
            value = _sentinel_value(keyword, dictionary_VR(keyword).split(" or ")[0], number)
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.SourceApplicationEntityTitle = s
    # Free text the IOD has room for, beyond the table.
    ds.Manufacturer = f"{s} scanners"
    ds.ManufacturerModelName = f"{s} model"
    ds.SoftwareVersions = f"{s} v1"
    ds.PositionReferenceIndicator = f"{s} corner"
    ds.ContainerTypeCodeSequence[0].CodeMeaning = f"{s} slide"  # a known code, a free-text meaning
    specimen = ds.SpecimenDescriptionSequence[0]
    specimen.SpecimenIdentifier = f"{s}-SPEC"
    specimen.SpecimenUID = f"{SENTINEL_UID_ROOT}.1.7"
    specimen.SpecimenShortDescription = f"{s} biopsy"
    specimen.SpecimenDetailedDescription = f"{s} detailed"
    specimen.IssuerOfTheSpecimenIdentifierSequence = Sequence([_sentinel_item("issuer", 0)])
    specimen.PrimaryAnatomicStructureSequence = Sequence([_code("SCT", "39937001", f"{s} skin")])
    specimen.private_block(0x0099, "ZQX SPECIMEN", create=True).add_new(0x01, "LO", f"{s} private specimen")
    step_name = _code("DCM", "121041", "Specimen Identifier")
    specimen.SpecimenPreparationSequence = Sequence([_sentinel_item("step", 0)])
    specimen.SpecimenPreparationSequence[0].SpecimenPreparationStepContentItemSequence = Sequence([
        _content_item("TEXT", step_name, TextValue=f"{s}-SPEC"),
        _content_item("CODE", _code("DCM", "111701", "Processing type"),
                      ConceptCodeSequence=Sequence([_code("SCT", "127790008", f"{s} staining")])),
        _content_item("CODE", _code("SCT", "424361007", "Using substance"),
                      ConceptCodeSequence=Sequence([_code("SCT", "12710003", "hematoxylin stain")])),
        _content_item("CODE", _code("SCT", "424361007", "Using substance"),
                      ConceptCodeSequence=Sequence([_code("99ZQX", s, f"{s} stain")])),
        _content_item("TEXT", _code("DCM", "111703", "Processing step description"),
                      TextValue=f"{s} stained by Dr {s}"),
        _content_item("DATETIME", _code("DCM", "111702", "DateTime of processing"),
                      DateTime=f"{SENTINEL_DICOM_DATE}070707"),
    ])
    path = ds.OpticalPathSequence[0]
    path.OpticalPathIdentifier = s
    path.OpticalPathDescription = f"{s} optical path"
    path.IlluminationTypeCodeSequence[0].CodeMeaning = f"{s} brightfield"
    path.private_block(0x0099, "ZQX OPTICS", create=True).add_new(0x01, "LO", f"{s} private optics")
    ds.DimensionOrganizationSequence[0].private_block(0x0099, "ZQX DIM", create=True).add_new(0x01, "LO", s)
    ds.TotalPixelMatrixOriginSequence[0].private_block(0x0099, "ZQX ORIGIN", create=True).add_new(0x01, "LO", s)
    groups = ds.SharedFunctionalGroupsSequence[0]
    groups.PixelMeasuresSequence[0].private_block(0x0099, "ZQX PIXELS", create=True).add_new(0x01, "LO", s)
    groups.private_block(0x0099, "ZQX GROUPS", create=True).add_new(0x01, "LO", s)
    # Private tags of every kind at the top level, curves, overlays and trailing padding.
    block = ds.private_block(0x0099, "ZQX SCANNER VENDOR", create=True)
    block.add_new(0x01, "LO", f"{s} private")
    block.add_new(0x02, "UT", f"{s} private text")
    block.add_new(0x03, "UN", f"{s} private bytes".encode())
    block.add_new(0x04, "SQ", Sequence([_sentinel_item("private", 1)]))
    ds.add_new(0x50003000, "OB", f"{s} curve".encode())
    ds.add_new(0x60003000, "OW", f"{s} overlay ".encode())
    ds.add_new(0x60004000, "LT", f"{s} overlay comment")
    ds.add_new(0xFFFCFFFC, "OB", f"{s} padding ".encode())


def write_sentinel_dicom(source: Path, parent: Path) -> Path:
    """``parent/dicom-<sentinel>/``: ``source``'s instances with the sentinel everywhere.

    Every instance gets :func:`_add_sentinels` and a file name carrying the sentinel.
    """
    import pydicom

    folder = Path(parent) / f"dicom-{SENTINEL}"
    folder.mkdir(parents=True)
    for index, path in enumerate(sorted(Path(source).iterdir())):
        ds = pydicom.dcmread(path)
        _add_sentinels(ds, index)
        ds.save_as(folder / f"{SENTINEL}-{index}.dcm", enforce_file_format=True)
    return folder
