"""The DICOM confidentiality profile: PS3.15 Annex E Basic Profile plus stricter catch-alls.

:class:`Cleaner` applies the WSI-relevant rows of PS3.15 Table E.1-1 (below) to a dataset
and, beyond the table, removes or empties every private element, person name, date/time,
free-text (LT/ST/UT) and unknown-VR element anywhere in it. Instance UIDs are remapped
with an HMAC keyed by the site secret (the same input UID always maps to the same
``2.25.<n>`` UID at this site). It remembers every removed value for the final check.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DICOM_ACTIONS", "Cleaner", "walk_strings"]

# PS3.15 Table E.1-1 rows that occur in WSI (Basic Profile column). D = dummy value,
# Z = empty, X = remove, U = remap UID. Where the table allows X/Z/D we take the
# strictest choice that keeps the WSI IOD's Type 1 / Type 2 attributes present.
DICOM_ACTIONS: dict[str, str] = {
    # patient
    "PatientName": "Z", "PatientID": "Z", "PatientBirthDate": "Z", "PatientSex": "Z",
    "PatientBirthTime": "X", "PatientAge": "X", "PatientSize": "X", "PatientWeight": "X",
    "PatientAddress": "X", "OtherPatientIDs": "X", "OtherPatientIDsSequence": "X",
    "OtherPatientNames": "X", "PatientComments": "X", "EthnicGroup": "X", "Occupation": "X",
    "MedicalRecordLocator": "X", "IssuerOfPatientID": "X", "PatientMotherBirthName": "X",
    "PatientTelephoneNumbers": "X", "MilitaryRank": "X", "BranchOfService": "X",
    "AdditionalPatientHistory": "X", "AdmittingDiagnosesDescription": "X",
    "PatientInsurancePlanCodeSequence": "X", "PatientReligiousPreference": "X",
    "CountryOfResidence": "X", "RegionOfResidence": "X", "PregnancyStatus": "X",
    "ReferencedPatientSequence": "X", "ResponsibleOrganization": "X", "ResponsiblePerson": "X",
    # study / series / request
    "StudyDate": "Z", "StudyTime": "Z", "StudyID": "Z", "AccessionNumber": "Z",
    "IssuerOfAccessionNumberSequence": "X", "StudyDescription": "X", "SeriesDescription": "X",
    "ReferringPhysicianName": "Z", "PhysiciansOfRecord": "X", "PerformingPhysicianName": "X",
    "NameOfPhysiciansReadingStudy": "X", "RequestingPhysician": "X", "OperatorsName": "X",
    "ReferencedStudySequence": "X", "RequestAttributesSequence": "X", "ReasonForStudy": "X",
    "RequestedProcedureDescription": "X", "RequestedProcedureID": "X",
    "PerformedProcedureStepID": "X", "PerformedProcedureStepDescription": "X",
    "ScheduledProcedureStepID": "X", "ProcedureCodeSequence": "X",
    "ReferencedPerformedProcedureStepSequence": "X", "ReferencedImageSequence": "X",
    "SourceImageSequence": "X", "DerivationDescription": "X", "ImageComments": "X",
    "ContentCreatorName": "Z", "InstanceCreatorUID": "U",
    # equipment and site (Type 1 in the Enhanced General Equipment module: dummy)
    "InstitutionName": "X", "InstitutionAddress": "X", "InstitutionalDepartmentName": "X",
    "InstitutionCodeSequence": "X", "StationName": "X", "DeviceSerialNumber": "D",
    "DeviceUID": "U", "SoftwareVersions": "D", "DeviceDescription": "X",
    # dates and times that the WSI IOD requires (Type 1): dummy; others go with the catch-all
    "ContentDate": "D", "ContentTime": "D", "AcquisitionDateTime": "D",
    # slide, container and specimen (PS3.15 E.1-1 specimen rows)
    "ContainerIdentifier": "D", "ContainerDescription": "X",
    "IssuerOfTheContainerIdentifierSequence": "Z", "AlternateContainerIdentifierSequence": "X",
    "AcquisitionContextSequence": "Z", "SpecimenIdentifier": "D",
    "IssuerOfTheSpecimenIdentifierSequence": "Z", "SpecimenShortDescription": "X",
    "SpecimenDetailedDescription": "X", "SpecimenAccessionNumber": "X",
    # signatures, original values and trial data would carry the removed identifiers
    "DigitalSignaturesSequence": "X", "MACParametersSequence": "X",
    "EncryptedAttributesSequence": "X", "OriginalAttributesSequence": "X",
    "ClinicalTrialSponsorName": "X", "ClinicalTrialProtocolID": "X", "ClinicalTrialSiteID": "X",
    "ClinicalTrialSiteName": "X", "ClinicalTrialSubjectID": "X", "ClinicalTrialTimePointID": "X",
    "GraphicAnnotationSequence": "X", "TextString": "X", "TextValue": "X",
    "PersonName": "X", "ObservationDateTime": "X", "VerifyingObserverName": "X",
    # UIDs (remapped consistently within and across runs at this site)
    "StudyInstanceUID": "U", "SeriesInstanceUID": "U", "SOPInstanceUID": "U",
    "FrameOfReferenceUID": "U", "SynchronizationFrameOfReferenceUID": "U",
    "DimensionOrganizationUID": "U", "PyramidUID": "U", "SpecimenUID": "U",
    "ConcatenationUID": "U", "ReferencedSOPInstanceUID": "U", "ReferencedFrameOfReferenceUID": "U",
    "StorageMediaFileSetUID": "U", "IrradiationEventUID": "U", "TargetUID": "U",
}
# UIDs that name coding schemes or standards rather than this patient's objects.
_UID_KEEP = {"CodingSchemeUID", "ContextUID", "MappingResourceUID", "SOPClassUID",
             "ReferencedSOPClassUID", "TransferSyntaxUID", "ContextGroupExtensionCreatorUID"}
_DUMMY = {"DA": "19000101", "DT": "19000101000000", "TM": "000000"}
_DUMMY_TEXT = "DEIDENTIFIED"
_FREE_TEXT_VRS = {"LT", "ST", "UT", "UN"}
_DATE_VRS = {"DA", "DT", "TM"}


@dataclass
class Cleaner:
    """Applies the profile in place and keeps what it removed (``removed_values``, ``fields_removed``)."""

    secret: bytes
    removed_values: set[str] = field(default_factory=set)
    fields_removed: int = 0

    def uid(self, old: str) -> str:
        """``2.25.<128-bit HMAC of the old UID>``: stable at this site, meaningless elsewhere."""
        mac = hmac.new(self.secret, b"wsiflow-deid-uid\0" + old.encode("ascii"), hashlib.sha256).digest()
        return f"2.25.{int.from_bytes(mac[:16], 'big')}"

    def _remember(self, element: Any) -> None:
        self.fields_removed += 1
        for text in _strings(element):
            if len(text) >= 4:
                self.removed_values.add(text)

    def clean(self, ds: Any) -> None:
        """Apply the profile to ``ds`` in place, recursively through sequences."""
        for elem in list(ds):
            tag = elem.tag
            keyword = elem.keyword
            action = DICOM_ACTIONS.get(keyword)
            if tag.is_private or (tag.group & 0xFF00) in (0x5000, 0x6000):
                # Private elements (Basic Profile: remove) and curves/overlays, which can
                # hold burned-in-like graphics and text.
                self._remember(elem)
                del ds[tag]
            elif action == "U" or (elem.VR == "UI" and keyword not in _UID_KEEP and action is None):
                self._remap(elem)
            elif action == "X":
                self._remember(elem)
                del ds[tag]
            elif action == "Z":
                self._remember(elem)
                elem.value = [] if elem.VR == "SQ" else ""
            elif action == "D":
                self._remember(elem)
                elem.value = _DUMMY.get(elem.VR, _DUMMY_TEXT)
            elif elem.VR == "PN":
                self._remember(elem)
                elem.value = ""
            elif elem.VR in _DATE_VRS or elem.VR in _FREE_TEXT_VRS:
                # Catch-alls beyond the table: dates date the patient's visit, free text
                # and unknown-VR values can hold anything.
                self._remember(elem)
                del ds[tag]
            elif elem.VR == "SQ":
                for item in elem.value:
                    self.clean(item)

    def _remap(self, elem: Any) -> None:
        if elem.VR != "UI" or elem.value in (None, ""):
            return
        values = elem.value if elem.VM > 1 else [elem.value]
        new = []
        for value in values:
            text = str(value)
            if text.startswith("1.2.840.10008."):
                new.append(text)  # a DICOM-registered UID (class, syntax): not about this patient
            else:
                self.removed_values.add(text)
                new.append(self.uid(text))
        elem.value = new if elem.VM > 1 else new[0]


def _strings(elem: Any) -> Iterator[str]:
    if elem.VR == "SQ":
        for item in elem.value:
            for sub in item:
                yield from _strings(sub)
        return
    value = elem.value
    if isinstance(value, (bytes, bytearray)) or value is None:
        return
    for part in value if elem.VM > 1 and not isinstance(value, str) else [value]:
        yield str(part)


def walk_strings(ds: Any) -> Iterator[str]:
    """Every string value in ``ds``, recursively through sequences."""
    for elem in ds:
        yield from _strings(elem)
