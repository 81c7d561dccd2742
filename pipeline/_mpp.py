"""The mpp (µm/px) policy: where a slide's physical pixel size comes from.

mpp comes from the slide's metadata. When it is absent or implausible, analysis refuses
the slide unless the user supplied it: ``--mpp`` on the CLI, or a per-scanner / per-folder
override in the config. Objective power is never turned into an mpp (the same "20x" means
0.25 to 0.5 µm/px depending on the scanner). Every override is recorded in
:class:`MppResolution` so results say where their scale came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ._errors import ConfigError, MissingMppError

__all__ = [
    "PLAUSIBLE_MPP_RANGE",
    "MppOverride",
    "MppPolicy",
    "MppResolution",
    "resolve_mpp",
    "check_plausible_mpp",
]

PLAUSIBLE_MPP_RANGE: tuple[float, float] = (0.05, 50.0)
"""µm/px outside this range is treated as absent (scanner bugs write inches or cm)."""


def _plausible(value: float | None) -> bool:
    lo, hi = PLAUSIBLE_MPP_RANGE
    return value is not None and math.isfinite(value) and lo <= value <= hi


def check_plausible_mpp(mpp_x: float, mpp_y: float, *, where: str) -> None:
    """Raise :class:`ConfigError` when a user-supplied mpp is outside the plausible range."""
    lo, hi = PLAUSIBLE_MPP_RANGE
    for axis, value in (("x", mpp_x), ("y", mpp_y)):
        if not _plausible(value):
            raise ConfigError(
                f"{where}: mpp {axis} = {value!r} µm/px is outside the plausible range {lo}-{hi}",
                hint="give the pixel size in micrometres per pixel, e.g. 0.25 (40x) or 0.5 (20x)",
            )


@dataclass(frozen=True)
class MppOverride:
    """A configured µm/px for slides of one scanner vendor and/or under one folder.

    ``label`` names the override in provenance; it never contains the folder path.
    ``only_if_missing`` applies the override only when the metadata has no usable mpp.
    """

    mpp_x: float
    mpp_y: float
    label: str
    vendor: str | None = None
    folder: Path | None = None
    only_if_missing: bool = False

    def __post_init__(self) -> None:
        check_plausible_mpp(self.mpp_x, self.mpp_y, where=f"mpp override {self.label!r}")
        if self.vendor is None and self.folder is None:
            raise ConfigError(
                f"mpp override {self.label!r} matches nothing",
                hint="give it a 'vendor' (e.g. aperio), a 'folder', or both",
            )

    def matches(self, slide_path: Path, vendor: str | None) -> bool:
        if self.vendor is not None and (vendor or "").lower() != self.vendor.lower():
            return False
        if self.folder is not None:
            try:
                slide_path.resolve().relative_to(self.folder.resolve())
            except ValueError:
                return False
        return True


@dataclass(frozen=True)
class MppPolicy:
    """What the user supplied: a CLI value (applies to every slide) and config overrides.

    Precedence: CLI value, then the first matching folder override, then the first matching
    vendor override, then the metadata.
    """

    cli_mpp: tuple[float, float] | None = None
    overrides: tuple[MppOverride, ...] = ()

    def __post_init__(self) -> None:
        if self.cli_mpp is not None:
            check_plausible_mpp(*self.cli_mpp, where="--mpp")


@dataclass(frozen=True)
class MppResolution:
    """The µm/px used for analysis and where it came from."""

    mpp_x: float
    mpp_y: float
    source: Literal["metadata", "cli", "config"]
    metadata_mpp_x: float | None
    metadata_mpp_y: float | None
    override: str | None = None
    """Which override was applied (e.g. ``--mpp``, ``mpp_overrides[scanner-a]``), or None."""

    @property
    def is_override(self) -> bool:
        return self.source != "metadata"

    def to_json(self) -> dict[str, object]:
        return {
            "mpp_x": self.mpp_x,
            "mpp_y": self.mpp_y,
            "source": self.source,
            "metadata_mpp_x": self.metadata_mpp_x,
            "metadata_mpp_y": self.metadata_mpp_y,
            "override": self.override,
        }


def resolve_mpp(
    metadata_mpp: tuple[float | None, float | None],
    *,
    slide_path: Path,
    vendor: str | None,
    objective_power: float | None,
    policy: MppPolicy,
) -> MppResolution:
    """Decide the µm/px of a slide under ``policy``; raise :class:`MissingMppError` if none."""
    meta_x, meta_y = metadata_mpp
    meta_ok = _plausible(meta_x) and _plausible(meta_y)
    if policy.cli_mpp is not None:
        return MppResolution(*policy.cli_mpp, "cli", meta_x, meta_y, "--mpp")
    by_folder = [o for o in policy.overrides if o.folder is not None]
    by_vendor = [o for o in policy.overrides if o.folder is None]
    for override in (*by_folder, *by_vendor):
        if override.only_if_missing and meta_ok:
            continue
        if override.matches(slide_path, vendor):
            return MppResolution(
                override.mpp_x, override.mpp_y, "config", meta_x, meta_y,
                f"mpp_overrides[{override.label}]",
            )
    if meta_ok:
        return MppResolution(float(meta_x), float(meta_y), "metadata", meta_x, meta_y)  # type: ignore[arg-type]
    if meta_x is None or meta_y is None:
        problem = "the slide metadata has no µm/px"
    else:
        lo, hi = PLAUSIBLE_MPP_RANGE
        problem = (
            f"the slide metadata says {meta_x:g} x {meta_y:g} µm/px, outside the plausible "
            f"range {lo}-{hi}"
        )
    if objective_power is not None:
        problem += (
            f" (its objective power {objective_power:g}x is not used as a substitute: "
            "the same power means different µm/px on different scanners)"
        )
    raise MissingMppError(problem)
