"""What a de-identification run kept and dropped, and the wording shared by its refusals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEID_SUPPORTED", "DEID_UNSUPPORTED_HINT", "DeidReport"]

DEID_SUPPORTED = "deid supports Aperio SVS, generic tiled TIFF and DICOM-WSI"
DEID_UNSUPPORTED_HINT = "convert the slide to one of these, or de-identify it with the scanner vendor's tools"


@dataclass(frozen=True)
class DeidReport:
    """What :func:`deidentify_slide` kept and dropped (no paths, no removed values)."""

    format: str
    levels_kept: int
    level_dimensions: tuple[tuple[int, int], ...]
    dropped: tuple[str, ...]
    fields_removed: int
    regions_verified: int
    regions_undecodable: int = 0
    kept_fields: tuple[str, ...] = field(default_factory=tuple)
    profile: tuple[str, ...] = field(default_factory=tuple)
    """DICOM: the PS3.15 profile and option codes recorded in the copy (113100, ...)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "levels_kept": self.levels_kept,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "dropped": list(self.dropped),
            "fields_removed": self.fields_removed,
            "regions_verified": self.regions_verified,
            "regions_undecodable": self.regions_undecodable,
            "kept_fields": list(self.kept_fields),
            "profile": list(self.profile),
        }

    def summary(self) -> str:
        """One line: what was kept and dropped."""
        dropped = ", ".join(self.dropped) if self.dropped else "nothing"
        kept = ", ".join(self.kept_fields) if self.kept_fields else "none"
        profile = f" (profile {', '.join(self.profile)})" if self.profile else ""
        return (
            f"de-identified {self.format}: kept {self.levels_kept} level(s), dropped {dropped}; "
            f"removed {self.fields_removed} metadata field(s){profile}, kept fields: {kept}; "
            f"verified {self.regions_verified} region(s) pixel-identical"
            + (f" ({self.regions_undecodable} undecodable in the input too)" if self.regions_undecodable else "")
        )
