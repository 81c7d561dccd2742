"""wsiflow's privacy tools: de-identified slide copies and the site's hash-chained audit log.

``deidentify_slide`` writes a verified, de-identified copy of an Aperio SVS, generic tiled
TIFF or DICOM-WSI slide, failing closed. ``audit_event`` appends to the site's audit log,
whose chain ``verify_audit_log`` checks. Imports ``pipeline`` (site secret, errors) and
nothing from ``models``, ``flows`` or ``viewer``.
"""

from ._audit import AuditRotation, audit_event, check_audit_log, params_digest, rotate_audit_log
from ._audit_chain import AUDIT_ACTIONS, AuditRecord, audit_log_path
from ._audit_verify import AuditVerification, read_audit_log, verify_audit_log
from ._deid import deidentify_slide
from ._errors import AuditLogError
from ._report import DeidReport

__all__ = [
    "AUDIT_ACTIONS",
    "AuditLogError",
    "AuditRecord",
    "AuditRotation",
    "AuditVerification",
    "DeidReport",
    "audit_event",
    "audit_log_path",
    "check_audit_log",
    "deidentify_slide",
    "params_digest",
    "read_audit_log",
    "rotate_audit_log",
    "verify_audit_log",
]
