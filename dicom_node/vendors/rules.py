"""Vendor rule tables: where each MDME fact lives in a vendor's headers.

Every rule is data (a frozen dataclass). A site overrides fields from its TOML config::

    [vendors.philips]
    delay_sources = ["(2001,101B)", "InversionTime", "interleave"]
    interleave_offsets = [1, 6, 15, 29]

Tag names are pydicom keywords (``"InversionTime"``) or private tags written
``"(gggg,eeee)"`` with the element number as the vendors write it (the private block
included, e.g. Philips ``(2005,100E)``). Lookups search the frame's functional groups
(enhanced MR), then the vendor's private per-frame item, then the top-level dataset.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_RULES", "VendorRules", "load_rules"]

#: Special delay source: TD = (TR / n_slices) * offset(dynamic index).
INTERLEAVE = "interleave"


@dataclass(frozen=True)
class VendorRules:
    """How to read one vendor's MDME series. All fields can be overridden from TOML."""

    name: str
    #: regexes on Manufacturer (0008,0070), case-insensitive; empty = matches anything.
    manufacturer_patterns: tuple[str, ...] = ()
    #: (tag, regex): any match marks the series as MDME.
    mdme_markers: tuple[tuple[str, str], ...] = ()
    #: (tag, regex): any match marks the series as NOT MDME input (e.g. vendor output maps).
    reject_markers: tuple[tuple[str, str], ...] = ()
    #: ordered delay sources; the first one with a positive value on every frame and at
    #: least ``min_delays`` distinct values wins. ``"interleave"`` computes the delay.
    delay_sources: tuple[str, ...] = ("InversionTime", "(2001,101B)", "TriggerTime", INTERLEAVE)
    #: ordered complex-part sources: "ComplexImageComponent", "ImageType" or a private tag.
    part_sources: tuple[str, ...] = ("ComplexImageComponent", "ImageType")
    #: raw private part values -> "M", "P", "R", "I" (keys as strings).
    part_map: dict[str, str] = field(
        default_factory=lambda: {"0": "M", "1": "P", "2": "R", "3": "I"}
    )
    #: dynamic (delay) index sources for the interleave rule, 1-based.
    dynamic_sources: tuple[str, ...] = ("TemporalPositionIndex", "TemporalPositionIdentifier")
    #: slices per TR for the interleave rule; None = number of slices in the grid.
    interleave_n_slices: int | None = None
    #: slice offset per dynamic (dynamic index 1 -> offsets[0]); None = the index itself.
    interleave_offsets: tuple[int, ...] | None = None
    #: Philips floating-point scale SS: FP = (SV*RS + RI) / (RS*SS). None = not used.
    float_scale_tag: str | None = None
    #: complex parts the floating-point scale applies to.
    float_scale_parts: tuple[str, ...] = ("M", "R", "I")
    #: echo times to use when every echo carries the first TE (GE research quirk); the
    #: echoes are then ordered by (EchoNumbers, InstanceNumber). None = report the problem.
    fallback_echo_times_ms: tuple[float, ...] | None = None
    #: background-phase reference (processing.phase): "longest_delay" or "sum".
    phase_reference: str = "longest_delay"
    #: radians per rescaled phase unit; None = decided from the data of each series
    #: (dicom_node.vendors.phase_units: radians, degrees, milliradians, 12/16-bit scales).
    #: Set it only for a unit not in that table (the span/coverage checks still run).
    phase_to_rad: float | None = None
    #: expected instance count: ordered alternatives, each a product of tags.
    count_tags: tuple[tuple[str, ...], ...] = (("ImagesInAcquisition",),)
    #: nominal saturation flip angle (not in any header we know of), degrees.
    saturation_deg: float = 120.0
    #: excitation flip angle when FlipAngle is absent, degrees.
    excitation_deg: float = 90.0
    #: orientation cosines within this of the first frame's are snapped to it.
    orientation_tolerance: float = 1e-4
    #: relative tolerance for TR / flip angle consistency.
    timing_tolerance: float = 1e-3
    min_delays: int = 2
    min_echoes: int = 2


def _magic_markers() -> tuple[tuple[str, str], ...]:
    return (("ImageType", r"\bMAGIC\b"), ("SeriesDescription", r"magic"))


DEFAULT_RULES: dict[str, VendorRules] = {
    "ge": VendorRules(
        name="ge",
        manufacturer_patterns=(r"^GE\b", r"general electric"),
        mdme_markers=_magic_markers(),
        # GE's own MAGiC output maps are not input.
        reject_markers=(("ImageType", r"MULTI_QMAP|\bDERIVED\b"),),
        # GE uses TriggerTime for slice timing elsewhere: not trusted.
        delay_sources=("InversionTime", INTERLEAVE),
        part_sources=("(0043,102F)", "ComplexImageComponent", "ImageType"),
        count_tags=(("ImagesInAcquisition",),),
    ),
    "siemens": VendorRules(
        name="siemens",
        manufacturer_patterns=(r"siemens",),
        mdme_markers=(
            ("SequenceName", r"mdme"),
            ("PulseSequenceName", r"mdme"),
            ("(0021,1177)", r"mdme"),
        ),
        delay_sources=("InversionTime", "TriggerTime", INTERLEAVE),
        part_sources=("ComplexImageComponent", "ImageType"),
        count_tags=(("ImagesInAcquisition",),),
    ),
    "philips": VendorRules(
        name="philips",
        manufacturer_patterns=(r"philips",),
        mdme_markers=(
            ("SeriesDescription", r"syntac|qrapmaster|mdme"),
            ("ProtocolName", r"syntac|qrapmaster|mdme"),
        ),
        # TriggerTime: a cardiac trigger delay elsewhere, absent (or 0) on an ungated
        # MDME; a converter that drops the private tag may put the delay there.
        delay_sources=("(2001,101B)", "InversionTime", "TriggerTime", INTERLEAVE),
        part_sources=("ComplexImageComponent", "ImageType", "(2005,1011)"),
        dynamic_sources=(
            "TemporalPositionIndex",
            "TemporalPositionIdentifier",
        ),
        float_scale_tag="(2005,100E)",
        count_tags=(
            ("ImagesInAcquisition",),
            ("(2001,1018)", "(2001,1081)", "(2001,1014)"),
        ),
    ),
    "generic": VendorRules(
        name="generic",
        mdme_markers=(
            ("SequenceName", r"mdme|qrapmaster"),
            ("SeriesDescription", r"mdme|qrapmaster|magic|syntac"),
        ),
        delay_sources=("InversionTime", "TriggerTime", INTERLEAVE),
    ),
}


def _coerce(f: dataclasses.Field, value: Any, vendor: str) -> Any:
    """Convert a TOML value to the field's type; errors name vendors.<name>.<field>."""
    where = f"vendors.{vendor}.{f.name}"
    typ = str(f.type)
    try:
        if f.name == "part_map":
            if not isinstance(value, dict):
                raise TypeError("expected a table")
            return {str(k): str(v).upper() for k, v in value.items()}
        if typ.startswith("tuple[tuple"):
            return tuple(tuple(str(x) for x in item) for item in value)
        if typ.startswith("tuple[float"):
            return None if value is None else tuple(float(x) for x in value)
        if typ.startswith("tuple[int"):
            return None if value is None else tuple(int(x) for x in value)
        if typ.startswith("tuple[str"):
            if isinstance(value, str):
                raise TypeError("expected a list of strings")
            return tuple(str(x) for x in value)
        if typ.startswith("int"):
            return None if value is None else int(value)
        if typ.startswith("float"):
            return None if value is None else float(value)
        if typ.startswith("str"):
            return None if value is None else str(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cannot use {value!r}: {exc}") from None
    return value


def load_rules(overrides: dict[str, Any] | None = None) -> dict[str, VendorRules]:
    """Default rule tables with ``[vendors.<name>]`` TOML overrides applied.

    ``overrides`` maps vendor name -> {field: value}. An unknown vendor name starts from the
    generic table (so a site can add a vendor). Unknown fields raise ``ValueError`` naming
    ``vendors.<name>.<field>`` and the valid fields.
    """
    rules = dict(DEFAULT_RULES)
    if not overrides:
        return rules
    fields = {f.name: f for f in dataclasses.fields(VendorRules)}
    for vendor, table in overrides.items():
        if not isinstance(table, dict):
            raise ValueError(f"vendors.{vendor}: expected a table, got {type(table).__name__}")
        base = rules.get(vendor, dataclasses.replace(DEFAULT_RULES["generic"], name=vendor))
        changes: dict[str, Any] = {}
        for key, value in table.items():
            if key not in fields or key == "name":
                valid = ", ".join(sorted(k for k in fields if k != "name"))
                raise ValueError(f"vendors.{vendor}.{key}: unknown rule field (valid: {valid})")
            changes[key] = _coerce(fields[key], value, vendor)
        rules[vendor] = _validated(dataclasses.replace(base, **changes))
    return rules


def _validated(r: VendorRules) -> VendorRules:
    """Check tag names and enumerations now, so check-config names the bad field."""
    from dicom_node.vendors.frames import parse_tag

    def tags(fname: str, names: Any) -> None:
        for n in names:
            if n in (INTERLEAVE, "ImageType", "FrameType", "ComplexImageComponent"):
                continue
            try:
                parse_tag(n)
            except ValueError as exc:
                raise ValueError(f"vendors.{r.name}.{fname}: {exc}") from None

    tags("delay_sources", r.delay_sources)
    tags("part_sources", r.part_sources)
    tags("dynamic_sources", r.dynamic_sources)
    tags("mdme_markers", [t for t, _ in r.mdme_markers])
    tags("reject_markers", [t for t, _ in r.reject_markers])
    tags("count_tags", [t for alt in r.count_tags for t in alt])
    if r.float_scale_tag:
        tags("float_scale_tag", [r.float_scale_tag])
    if r.phase_reference not in ("longest_delay", "sum"):
        raise ValueError(
            f"vendors.{r.name}.phase_reference: expected 'longest_delay' or 'sum', "
            f"got {r.phase_reference!r}"
        )
    for pat in [*r.manufacturer_patterns, *(p for _, p in r.mdme_markers)]:
        try:
            re.compile(pat)
        except re.error as exc:
            raise ValueError(f"vendors.{r.name}: bad regex {pat!r}: {exc}") from None
    if r.phase_to_rad is not None and not (math.isfinite(r.phase_to_rad) and r.phase_to_rad > 0):
        raise ValueError(f"vendors.{r.name}.phase_to_rad: must be > 0, got {r.phase_to_rad!r}")
    if r.interleave_offsets is not None and min(r.interleave_offsets, default=1) <= 0:
        raise ValueError(f"vendors.{r.name}.interleave_offsets: offsets must be > 0")
    return r
