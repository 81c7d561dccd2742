"""The mpp (µm/px) policy: where a slide's physical pixel size comes from.

mpp comes from the slide's metadata. When it is absent or implausible, analysis refuses
the slide unless the user supplied it: ``--mpp`` on the CLI, or a per-scanner / per-folder
override in the config. Objective power is never turned into an mpp (the same "20x" means
0.25 to 0.5 µm/px depending on the scanner). An override applies
only to slides without a usable µm/px unless it is forced (``--mpp-force``, ``force: true``
in the config). Every override is recorded in :class:`MppResolution` so results say where
their scale came from.
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
    "MppSource",
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

    ``label`` names the override in provenance; it never contains the folder path. The
    override applies only to slides whose metadata has no usable µm/px, unless ``force``
    (then it replaces valid metadata too, and says so in the results).
    """

    mpp_x: float
    mpp_y: float
    label: str
    vendor: str | None = None
    folder: Path | None = None
    force: bool = False

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
    """What the user supplied: an explicit value (``--mpp``) and config overrides.

    An explicit value applies only to slides without usable µm/px metadata, unless
    ``force`` (``--mpp-force``): a slide with valid metadata is never measured at another
    scale by accident. Precedence: the explicit value, then the first matching folder
    override, then the first matching vendor override, then the metadata.
    """

    cli_mpp: tuple[float, float] | None = None
    overrides: tuple[MppOverride, ...] = ()
    force: bool = False
    """Apply ``cli_mpp`` even to slides whose metadata has a valid µm/px."""

    def __post_init__(self) -> None:
        if self.cli_mpp is not None:
            check_plausible_mpp(*self.cli_mpp, where="--mpp")
        if self.force and self.cli_mpp is None:
            raise ConfigError("--mpp-force was given without --mpp", hint="add --mpp X (µm/px)")

    @classmethod
    def fixed(cls, mpp_x: float, mpp_y: float) -> MppPolicy:
        """A policy that uses exactly this µm/px: for a scale already resolved and recorded."""
        return cls(cli_mpp=(mpp_x, mpp_y), force=True)


MppSource = Literal["metadata", "cli", "config"]


@dataclass(frozen=True)
class MppResolution:
    """The µm/px used for analysis and where it came from."""

    mpp_x: float
    mpp_y: float
    source: MppSource
    metadata_mpp_x: float | None
    metadata_mpp_y: float | None
    override: str | None = None
    """Which override was applied (e.g. ``--mpp``, ``mpp_overrides[scanner-a]``), or None."""
    declined: str | None = None
    """An override that was *not* applied because the metadata is valid (e.g. ``--mpp``)."""

    @property
    def is_override(self) -> bool:
        return self.source != "metadata"

    def describe(self) -> str:
        """One line for the terminal: the µm/px and where it came from."""
        text = f"{self.mpp_x:g} x {self.mpp_y:g} µm/px"
        if self.source == "metadata":
            text += " (slide metadata)"
            if self.declined:
                text += f"; {self.declined} not applied: the metadata is valid (force it with --mpp-force)"
            return text
        text += f" (OVERRIDE {self.override}"
        if self.metadata_mpp_x is not None and self.metadata_mpp_y is not None:
            text += f"; metadata said {self.metadata_mpp_x:g} x {self.metadata_mpp_y:g}"
        else:
            text += "; the slide has no µm/px"
        return text + ")"

    def to_json(self) -> dict[str, object]:
        return {
            "mpp_x": self.mpp_x,
            "mpp_y": self.mpp_y,
            "source": self.source,
            "metadata_mpp_x": self.metadata_mpp_x,
            "metadata_mpp_y": self.metadata_mpp_y,
            "override": self.override,
            "declined": self.declined,
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
    declined: str | None = None
    if policy.cli_mpp is not None:
        if policy.force and meta_ok:
            return MppResolution(*policy.cli_mpp, "cli", meta_x, meta_y, "--mpp-force")
        if not meta_ok:
            return MppResolution(*policy.cli_mpp, "cli", meta_x, meta_y, "--mpp")
        declined = "--mpp"
    by_folder = [o for o in policy.overrides if o.folder is not None]
    by_vendor = [o for o in policy.overrides if o.folder is None]
    for override in (*by_folder, *by_vendor):
        if not override.matches(slide_path, vendor):
            continue
        name = f"mpp_overrides[{override.label}]"
        if meta_ok and not override.force:
            declined = declined or name
            continue
        return MppResolution(override.mpp_x, override.mpp_y, "config", meta_x, meta_y, name, declined)
    if meta_ok and meta_x is not None and meta_y is not None:  # meta_ok implies both are set
        return MppResolution(float(meta_x), float(meta_y), "metadata", meta_x, meta_y, declined=declined)
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
