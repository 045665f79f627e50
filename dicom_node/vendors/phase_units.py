"""Phase units decided from the data, not from one constant per vendor.

Writers store phase images in many units after RescaleSlope/Intercept: radians (GE writes
integer milliradians with RescaleSlope 0.001), milliradians (integers +-3142), degrees,
Siemens 12-bit units (+-4096 = +-pi), a raw 12-bit full cycle (0..4095 = 2 pi, any
intercept), 16-bit full cycles. Trusting one constant per vendor scaled GE phase twice
(issue 13: T1 off by 47 % in WM).

Wrapped phase covers nearly a whole cycle in every real series: noise in the background has
uniform phase, and the background (coil / B0) phase varies across the field of view. So the
span ``max - min`` of the rescaled phase over the series names the unit: the smallest known
cycle that holds the span, provided the span fills most of it (:data:`MIN_COVERAGE`). A
constant phase offset does not matter (the background-phase removal absorbs it), so
``0..cycle`` and ``-cycle/2..cycle/2`` are the same unit.

Consistency checks, each a :class:`PhaseUnitError` naming the problem (the pipeline turns it
into a QUARANTINED series, never a fit with a wrong phase):

- the span fits no known cycle, or fills too little of the smallest that holds it
  (ambiguous: e.g. masked phase covering a quarter turn could be radians or degrees);
- one stored step is coarser than :data:`MAX_STEP_RAD` (radians stored as integers);
- a phase frame spans a tiny fraction of the cycle while the series spans all of it (frames
  written in different units).

A site whose writer uses a unit not listed here (e.g. tenths of a degree), or masks the
phase outside the head, sets ``vendors.<name>.phase_to_rad``; the checks still apply to it
(with :data:`MIN_COVERAGE_CONFIGURED`), so a wrong setting (GE's radians multiplied by 1e-3
again) is quarantined, not fitted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_STEP_RAD",
    "MIN_COVERAGE",
    "MIN_COVERAGE_CONFIGURED",
    "PHASE_UNITS",
    "PhaseDecision",
    "PhaseRange",
    "PhaseUnit",
    "PhaseUnitError",
    "decide_phase_unit",
]


@dataclass(frozen=True)
class PhaseUnit:
    """A phase unit: ``cycle`` rescaled units make one turn; ``to_rad`` radians per unit."""

    name: str
    cycle: float
    to_rad: float


#: Known units, by increasing cycle. Adjacent cycles differ by >= 1.3x, so a span that
#: fills >= MIN_COVERAGE of one cannot fit a smaller one. (Tenths of a degree, 3600 per
#: turn, would sit 0.88x below the 12-bit cycle: not listed, set phase_to_rad for it.)
PHASE_UNITS: tuple[PhaseUnit, ...] = (
    PhaseUnit("radians", 2.0 * math.pi, 1.0),
    PhaseUnit("degrees", 360.0, math.pi / 180.0),
    PhaseUnit("12-bit full cycle (4096 per turn)", 4096.0, math.pi / 2048.0),
    PhaseUnit("milliradians", 2000.0 * math.pi, 1e-3),
    PhaseUnit("Siemens 12-bit (+-4096 = +-pi)", 8192.0, math.pi / 4096.0),
    PhaseUnit("16-bit full cycle (65536 per turn)", 65536.0, math.pi / 32768.0),
)
#: the span must fill at least this fraction of the chosen cycle (emulator series with
#: noise: >= 0.99; noiseless phantoms: >= 0.989).
MIN_COVERAGE = 0.9
#: with a configured ``phase_to_rad`` the unit is known, so masked phase (a head-shaped
#: region only) may fill less of a turn; a wrong setting (a factor 57 or 1000 off) fills
#: far less than this.
MIN_COVERAGE_CONFIGURED = 0.25
#: a stored step coarser than this (radians) cannot carry a usable phase (~5.6 degrees).
MAX_STEP_RAD = 2.0 * math.pi / 64.0
#: a frame spanning less than this fraction of the cycle (but not constant) disagrees with
#: a series that spans the cycle: its values are in another unit.
MIN_FRAME_COVERAGE = 0.05
#: slack above one cycle: relative, plus this many stored steps (rounding at +-pi).
_REL_SLACK = 2e-3
_STEP_SLACK = 2.0


class PhaseUnitError(ValueError):
    """The phase images' unit cannot be decided or is inconsistent (message says why)."""


@dataclass(frozen=True)
class PhaseRange:
    """Rescaled value range of one phase frame: ``lo``/``hi`` (rescaled units) and
    ``step`` (rescaled units per stored integer, ``|RescaleSlope|``); ``label`` names the
    frame in messages."""

    lo: float
    hi: float
    step: float
    label: str


@dataclass(frozen=True)
class PhaseDecision:
    """The unit used: name, radians per rescaled unit, the series' rescaled span and the
    fraction of the cycle it fills."""

    unit: str
    to_rad: float
    lo: float
    hi: float
    coverage: float

    def describe(self) -> str:
        return (
            f"{self.unit} (rescaled phase {self.lo:.6g}..{self.hi:.6g}, "
            f"{100 * self.coverage:.1f} % of a turn; x {self.to_rad:.6g} rad)"
        )


def _fits(span: float, cycle: float, step: float) -> bool:
    return span <= cycle * (1.0 + _REL_SLACK) + _STEP_SLACK * step


def decide_phase_unit(
    frames: Sequence[PhaseRange], configured_to_rad: float | None = None
) -> PhaseDecision:
    """Decide the radians per rescaled phase unit of one series from its phase frames.

    ``configured_to_rad``: the site's ``phase_to_rad`` (replaces the unit table; checked).
    Raises :class:`PhaseUnitError` when the unit is ambiguous or the frames disagree.
    """
    if not frames:
        raise PhaseUnitError("no phase frames to decide the phase unit from")
    lo = min(f.lo for f in frames)
    hi = max(f.hi for f in frames)
    span = hi - lo
    step = max(f.step for f in frames)
    where = f"rescaled phase spans {lo:.6g}..{hi:.6g} ({span:.6g} units) over {len(frames)} frames"
    if configured_to_rad is not None:
        unit = PhaseUnit(
            f"configured phase_to_rad {configured_to_rad:.6g}",
            2.0 * math.pi / configured_to_rad,
            configured_to_rad,
        )
        if not _fits(span, unit.cycle, step):
            raise PhaseUnitError(
                f"phase unit inconsistent: {where}, that is {span * configured_to_rad:.4g} rad "
                f"with the configured phase_to_rad {configured_to_rad:.6g}: more than one turn"
            )
    else:
        unit = next((u for u in PHASE_UNITS if _fits(span, u.cycle, step)), None)
        if unit is None:
            raise PhaseUnitError(
                f"phase unit unknown: {where}: more than one turn in every known unit "
                f"({', '.join(u.name for u in PHASE_UNITS)}); set vendors.<name>.phase_to_rad"
            )
    coverage = span / unit.cycle
    need = MIN_COVERAGE_CONFIGURED if configured_to_rad else MIN_COVERAGE
    if coverage < need:
        which = "" if configured_to_rad else ", the smallest known unit that holds it"
        fix = (
            "check vendors.<name>.phase_to_rad"
            if configured_to_rad
            else "if the writer's unit is known and not listed, set vendors.<name>.phase_to_rad"
        )
        raise PhaseUnitError(
            f"phase unit ambiguous: {where}: only {100 * coverage:.0f} % of a turn in "
            f"{unit.name}{which} (need >= {100 * need:.0f} % of a turn: masked or "
            f"mis-scaled phase?); {fix}"
        )
    coverage = min(span / unit.cycle, 1.0)
    if step * unit.to_rad > MAX_STEP_RAD:
        raise PhaseUnitError(
            f"phase unit inconsistent: {where} read as {unit.name}, one stored step is "
            f"{step * unit.to_rad:.3g} rad (limit {MAX_STEP_RAD:.3g}): too coarse to be phase"
        )
    narrow = [f for f in frames if 0.0 < (f.hi - f.lo) < MIN_FRAME_COVERAGE * unit.cycle]
    if narrow:
        f = narrow[0]
        raise PhaseUnitError(
            f"phase unit inconsistent: {where} ({unit.name}), but {len(narrow)} frame(s) "
            f"span less than {100 * MIN_FRAME_COVERAGE:.0f} % of that turn, first "
            f"{f.label}: {f.lo:.6g}..{f.hi:.6g}: frames written in different units"
        )
    return PhaseDecision(unit.name, unit.to_rad, lo, hi, coverage)
