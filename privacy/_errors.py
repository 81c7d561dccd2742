"""Privacy errors: leaves of the one wsiflow exception tree."""

from __future__ import annotations

from pipeline import WsiflowError

__all__ = ["AuditLogError"]


class AuditLogError(WsiflowError, ValueError):
    """The site's audit log is damaged or inconsistent: a line is not an audit record, the
    head or anchor does not match, or the log or its head is gone. Nothing is appended to
    such a log, and nothing repairs it silently."""

    kind = "audit-damaged"
    hint = (
        "run `wsiflow audit verify` to list every problem; keep the files as evidence and restore the log, its head "
        "and anchor from a backup, or start a new log with `wsiflow audit rotate --reason \"...\"` (the damaged log "
        "is kept beside it)"
    )
