"""Privacy errors: leaves of the one wsiflow exception tree."""

from __future__ import annotations

from pipeline import WsiflowError

__all__ = ["AuditLogError"]


class AuditLogError(WsiflowError, ValueError):
    """The site's audit log cannot be read back: a line is not an audit record."""

    kind = "audit-damaged"
    hint = (
        "run `wsiflow audit verify` to list every broken line; keep the damaged log as evidence and "
        "restore it from a backup"
    )
