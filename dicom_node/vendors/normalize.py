"""Detect an MDME series and normalize it into a :class:`processing.acquisition.Acquisition`.

The grid key of every 2-D image is ``(slice, delay, echo, part)``:

- slice: position along the normal, ``dot(IPP, cross(IOP row, IOP col))``, never
  InstanceNumber or SliceLocation;
- delay: the first usable source in the vendor's ``delay_sources`` (a header tag, or
  ``"interleave"``: TD = TR / n_slices * offset(dynamic index));
- echo: the echo time (EchoTime / EffectiveEchoTime);
- part: complex part M (magnitude), P (phase), R (real), I (imaginary).

Phase images are converted to radians in the unit their rescaled values show
(:mod:`dicom_node.vendors.phase_units`; an undecidable unit is an error, never a guess).
Phase (or real/imaginary) images are combined into the signed real signal: per echo the
background phase (phase of the complex sum over delays) is removed and the real part kept
(physics.md section 1).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_node.vendors.frames import Frame, frame_records, lookup
from dicom_node.vendors.phase_units import (
    PhaseDecision,
    PhaseRange,
    PhaseUnitError,
    decide_phase_unit,
)
from dicom_node.vendors.rules import INTERLEAVE, VendorRules, load_rules
from processing.acquisition import Acquisition, AcquisitionError
from processing.phase import real_from_complex, real_from_magnitude_phase

__all__ = [
    "MR_SOP_CLASSES",
    "Detection",
    "Grid",
    "NormalizationError",
    "detect",
    "expected_count",
    "frame_images",
    "normalize",
    "vendor_of",
]

MR_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}
PARTS = ("M", "P", "R", "I")
_PART_WORDS = {
    "M": "M",
    "MAGNITUDE": "M",
    "P": "P",
    "PHASE": "P",
    "R": "R",
    "REAL": "R",
    "I": "I",
    "IMAGINARY": "I",
}


class NormalizationError(ValueError):
    """A series cannot be normalized. ``kind`` says why; the message names the problem.

    kinds: ``not_mdme``, ``mixed_series``, ``duplicate``, ``missing``, ``geometry``,
    ``inconsistent``, ``delay``, ``pixels``, ``invalid``, ``phase_units`` (the unit of the
    phase images cannot be decided from their values, or frames disagree).
    ``missing`` lists absent grid cells as ``(slice, delay, echo, part)`` (0-based indices,
    part a letter); ``duplicates`` lists ``(cell, sop_uids)``.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        missing: Sequence[tuple[int, int, int, str]] = (),
        duplicates: Sequence[tuple[tuple[int, int, int, str], tuple[str, ...]]] = (),
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.missing = list(missing)
        self.duplicates = list(duplicates)
        self.details = dict(details or {})


@dataclass(frozen=True)
class Detection:
    """Result of :func:`detect`: the adapter to use, or why the series is not MDME."""

    is_mdme: bool
    vendor: str
    rules: VendorRules
    reason: str


@dataclass(frozen=True)
class Grid:
    """The sorted grid of a normalized series (for reports)."""

    n_slices: int
    n_delays: int
    n_echoes: int
    parts: tuple[str, ...]
    delay_source: str
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers
def _rules(rules: Mapping[str, VendorRules] | None) -> Mapping[str, VendorRules]:
    # an empty table (a config without [vendors]) means the defaults, not "generic only"
    return rules if rules else load_rules(None)


def vendor_of(ds: Dataset, rules: Mapping[str, VendorRules] | None = None) -> VendorRules:
    """The vendor rule table whose manufacturer pattern matches, else the generic one."""
    table = _rules(rules)
    manu = str(ds.get("Manufacturer", "") or "")
    for name, r in table.items():
        if name == "generic" or not r.manufacturer_patterns:
            continue
        if any(re.search(p, manu, re.IGNORECASE) for p in r.manufacturer_patterns):
            return r
    return table.get("generic") or load_rules(None)["generic"]


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _first_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            return None
        value = value[0]
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _marker_hit(sources: Sequence[Dataset], markers: Sequence[tuple[str, str]]) -> str | None:
    for tag, pattern in markers:
        text = _as_text(lookup(sources, tag))
        if text and re.search(pattern, text, re.IGNORECASE):
            return f"{tag} {text!r} matches {pattern!r}"
    return None


def _cluster(values: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Group nearly equal values: (label per value, sorted cluster centres)."""
    order = np.argsort(values, kind="stable")
    sv = values[order]
    new = np.empty(sv.size, dtype=bool)
    new[:1] = True
    new[1:] = np.diff(sv) > tol
    ids_sorted = np.cumsum(new) - 1
    labels = np.empty(values.size, dtype=np.int64)
    labels[order] = ids_sorted
    centres = np.array([sv[ids_sorted == k].mean() for k in range(int(ids_sorted[-1]) + 1)])
    return labels, centres


def _part_of(frame: Frame, rules: VendorRules) -> str | None:
    for src in rules.part_sources:
        value = frame.get(src)
        if value is None:
            continue
        if src == "ImageType" or src == "FrameType":
            tokens = [str(t).upper() for t in value][2:]
            for t in tokens:
                if t in _PART_WORDS:
                    return _PART_WORDS[t]
            continue
        if src == "ComplexImageComponent":
            p = _PART_WORDS.get(str(value).upper())
            if p:
                return p
            continue  # MIXED: look further
        key = str(value[0] if isinstance(value, list | tuple) else value).strip()
        p = rules.part_map.get(key) or _PART_WORDS.get(key.upper())
        if p:
            return p
    return None


def _frame_te(frames: Sequence[Frame]) -> list[float | None]:
    return [_first_float(f.get("EchoTime")) for f in frames]


def _header_delays(
    frames: Sequence[Frame], rules: VendorRules
) -> tuple[str | None, list[float] | None, list[str]]:
    """First header delay source usable on every frame (interleave excluded)."""
    tried: list[str] = []
    for src in rules.delay_sources:
        if src == INTERLEAVE:
            continue
        vals = [_first_float(f.get(src)) for f in frames]
        n_missing = sum(v is None for v in vals)
        if n_missing:
            tried.append(f"{src}: absent on {n_missing}/{len(vals)} frames")
            continue
        if any(v <= 0 for v in vals):  # type: ignore[operator]
            tried.append(f"{src}: zero or negative on some frames")
            continue
        n_distinct = len({round(v, 2) for v in vals})  # type: ignore[arg-type]
        if n_distinct < rules.min_delays:
            tried.append(f"{src}: only {n_distinct} distinct value(s)")
            continue
        return src, vals, tried  # type: ignore[return-value]
    return None, None, tried


# ----------------------------------------------------------------------------- detect
def detect(
    datasets: Sequence[Dataset], rules: Mapping[str, VendorRules] | None = None
) -> Detection:
    """Decide whether ``datasets`` (one series, headers suffice) are an MDME acquisition."""
    table = _rules(rules)
    if not datasets:
        generic = table.get("generic") or load_rules(None)["generic"]
        return Detection(False, "generic", generic, "no DICOM datasets")
    first = datasets[0]
    r = vendor_of(first, table)
    sop = str(first.get("SOPClassUID", ""))
    if sop not in MR_SOP_CLASSES:
        name = UID(sop).name if sop else "missing"
        return Detection(False, r.name, r, f"SOP class {sop or '-'} ({name}) is not an MR image")
    try:
        frames = frame_records(datasets)
    except ValueError as exc:
        return Detection(False, r.name, r, f"unreadable multi-frame header: {exc}")
    if not frames:
        return Detection(False, r.name, r, "no image frames")
    sources = frames[0].sources
    rejected = _marker_hit(sources, r.reject_markers)
    if rejected:
        return Detection(False, r.name, r, f"{r.name} rule rejects it as input: {rejected}")
    hit = _marker_hit(sources, r.mdme_markers)
    if hit:
        return Detection(True, r.name, r, f"{r.name} MDME marker: {hit}")
    # No marker: accept by structure (>= 2 echo times and >= 2 header delays).
    tes = {round(t, 2) for t in _frame_te(frames) if t is not None}
    src, delays, _ = _header_delays(frames, r)
    n_delays = len({round(v, 2) for v in delays}) if delays else 1
    if len(tes) >= r.min_echoes and src is not None:
        return Detection(
            True,
            r.name,
            r,
            f"{r.name}: no MDME marker, but {len(tes)} echo times x {n_delays} delays ({src})",
        )
    desc = _as_text(first.get("SeriesDescription")) or "-"
    seq = _as_text(lookup(sources, "SequenceName") or lookup(sources, "PulseSequenceName")) or "-"
    return Detection(
        False,
        r.name,
        r,
        f"no MDME marker for {r.name} (SeriesDescription {desc!r}, sequence {seq!r}) and "
        f"{len(tes)} echo time(s) x {n_delays} delay(s) in the headers "
        f"(need >= {r.min_echoes} x {r.min_delays})",
    )


def expected_count(dataset: Dataset, rules: Mapping[str, VendorRules] | None = None) -> int | None:
    """Expected number of instances in the series, from its first image, or None."""
    r = vendor_of(dataset, rules)
    if "PerFrameFunctionalGroupsSequence" in dataset:
        # enhanced: header counts are per frame, not per instance; a concatenation
        # announces its instance count
        total = _first_float(dataset.get("InConcatenationTotalNumber"))
        if total and total > 0:
            return int(total)
        return 1 if _holds_whole_volume(dataset, r) else None
    src = (dataset,)
    for alternative in r.count_tags:
        total = 1
        for tag in alternative:
            try:
                v = int(float(_first_float(lookup(src, tag)) or 0))
            except (ValueError, TypeError):
                v = 0
            if v <= 0:
                total = 0
                break
            total *= v
        if total > 0:
            return total
    return None


def _holds_whole_volume(dataset: Dataset, rules: VendorRules) -> bool:
    """True when one Enhanced MR instance carries a whole multi-slice MDME grid.

    Its frames span several slice positions and every (slice, echo, part) cell holds the
    same number (>= 2) of frames, i.e. all delays: the series is this one instance
    (Philips stores MDME so). A per-slice instance (Siemens XA) has one position: unknown.
    """
    try:
        frames = frame_records([dataset])
    except Exception:
        return False
    if len(frames) < 4:
        return False
    cells: dict[tuple[float, float, str], int] = {}
    for f in frames:
        pos = f.get("ImagePositionPatient")
        iop = f.get("ImageOrientationPatient")
        te = _first_float(f.get("EchoTime"))
        if pos is None or iop is None or te is None:
            return False
        row = np.asarray([float(v) for v in iop[:3]])
        col = np.asarray([float(v) for v in iop[3:6]])
        z = float(np.dot(np.asarray([float(v) for v in pos]), np.cross(row, col)))
        key = (round(z, 1), round(te, 1), _part_of(f, rules) or "M")
        cells[key] = cells.get(key, 0) + 1
    n_slices = len({k[0] for k in cells})
    counts = set(cells.values())
    return n_slices >= 2 and len(counts) == 1 and min(counts) >= 2


# ----------------------------------------------------------------------------- pixels
_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def _pixels(ds: Dataset) -> np.ndarray:
    """Stored values as ``(frames, rows, cols)``; native little endian without a copy."""
    if "PixelData" not in ds:
        raise NormalizationError(
            "pixels",
            f"instance {ds.get('SOPInstanceUID', '?')}: no pixel data (read with "
            "stop_before_pixels?)",
        )
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    rows, cols = int(ds.Rows), int(ds.Columns)
    nf = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16))
    spp = int(ds.get("SamplesPerPixel", 1))
    if (ts in _NATIVE_LE or not ts) and bits in (8, 16, 32) and spp == 1:
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        dt = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
        raw = ds.PixelData
        need = rows * cols * nf * dt.itemsize
        if len(raw) >= need:
            return np.frombuffer(raw, dtype=dt, count=rows * cols * nf).reshape(nf, rows, cols)
    try:
        arr = ds.pixel_array  # compressed: pydicom's handlers (pylibjpeg etc.)
    except Exception as exc:
        raise NormalizationError(
            "pixels",
            f"instance {ds.get('SOPInstanceUID', '?')}: cannot decode pixel data "
            f"(transfer syntax {ts or '?'}): {exc}",
        ) from exc
    return np.asarray(arr).reshape(nf, rows, cols)


# ----------------------------------------------------------------------------- normalize
def _dedupe(datasets: Sequence[Dataset]) -> list[Dataset]:
    seen: dict[str, Dataset] = {}
    out: list[Dataset] = []
    conflicts: list[str] = []
    for ds in datasets:
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid:
            out.append(ds)
            continue
        prev = seen.get(uid)
        if prev is None:
            seen[uid] = ds
            out.append(ds)
        elif prev is ds or prev == ds:
            continue  # identical resend: drop silently
        else:
            conflicts.append(uid)
    if conflicts:
        raise NormalizationError(
            "duplicate",
            f"{len(conflicts)} SOP Instance UID(s) received twice with different content: "
            + ", ".join(conflicts[:5]),
            details={"sop_uids": conflicts},
        )
    return out


def _check_same(frames: Sequence[Frame], name: str, rel_tol: float, default: float | None):
    vals = [_first_float(f.get(name)) for f in frames]
    present = [v for v in vals if v is not None]
    if not present:
        return default
    if len(present) != len(vals):
        raise NormalizationError(
            "inconsistent", f"{name} missing on {len(vals) - len(present)} of {len(vals)} images"
        )
    lo, hi = min(present), max(present)
    if hi - lo > rel_tol * max(abs(hi), 1e-9):
        raise NormalizationError(
            "inconsistent",
            f"inconsistent {name} within the series: {sorted({round(v, 4) for v in present})}",
            details={name: sorted(set(present))},
        )
    return present[0]


def normalize(
    datasets: Sequence[Dataset], rules: Mapping[str, VendorRules] | None = None
) -> Acquisition:
    """Sort, scale and phase-correct one MDME series into an :class:`Acquisition`.

    ``datasets`` must carry pixel data. ``rules`` is the output of
    :func:`~dicom_node.vendors.rules.load_rules` (defaults when None).
    Raises :class:`NormalizationError` naming the problem (kind ``phase_units`` when the
    phase images' unit cannot be decided from the data).
    """
    table = _rules(rules)
    datasets, det, frames = _series_frames(datasets, table)
    r = det.rules
    geo = _geometry(datasets, frames, r)
    tr, flip = _timing(frames, r)
    tes = _frame_te(frames)
    if any(t is None for t in tes):
        n = sum(t is None for t in tes)
        raise NormalizationError("inconsistent", f"EchoTime missing on {n} of {len(tes)} images")
    echo_lab, echo_vals = _cluster(np.array(tes, dtype=np.float64), 0.01)
    parts = [_part_of(f, r) or "M" for f in frames]
    part_set = [p for p in PARTS if p in set(parts)]
    src, delays = _delays(datasets, frames, r, table, tr, len(geo.slice_pos))
    delay_lab, delay_vals = _cluster(np.array(delays, dtype=np.float64), 0.01)
    echo_lab, echo_vals, echo_source = _echo_fallback(
        frames, r, parts, geo.slice_lab, delay_lab, echo_lab, echo_vals
    )
    labels = np.stack([geo.slice_lab, delay_lab, echo_lab], axis=1)
    axes = (geo.slice_pos, delay_vals, echo_vals)
    _check_grid(datasets, frames, r, table, labels, parts, part_set, axes)
    shape = (len(part_set), *(len(a) for a in axes), geo.n_rows, geo.n_cols)
    signal, is_mag, combine, phase = _scaled_signal(
        datasets, frames, r, labels, parts, part_set, shape
    )
    affine, voxel_size = _affine(frames, geo)
    first = datasets[0]
    meta = {
        "vendor": r.name,
        "detection": det.reason,
        "manufacturer": str(first.get("Manufacturer", "")),
        "model": str(first.get("ManufacturerModelName", "")),
        "sop_class_uid": str(first.get("SOPClassUID", "")),
        "series_instance_uid": str(first.get("SeriesInstanceUID", "")),
        "study_instance_uid": str(first.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
        "series_description": str(first.get("SeriesDescription", "")),
        "parts": "".join(part_set),
        "combine": combine,
        "echo_source": echo_source,
        "n_instances": len(datasets),
        "n_frames": len(frames),
        "slice_positions_mm": [float(p) for p in geo.slice_pos],
    }
    if phase is not None:
        meta["phase_unit"] = phase.describe()
    try:
        return Acquisition(
            signal=signal,
            delays_ms=delay_vals,
            echo_times_ms=echo_vals,
            tr_ms=float(tr),
            saturation_deg=r.saturation_deg,
            excitation_deg=float(flip),
            voxel_size_mm=voxel_size,
            affine=affine,
            is_magnitude=is_mag,
            delay_source=src,
            metadata=meta,
        )
    except AcquisitionError as exc:
        raise NormalizationError("invalid", f"normalized acquisition is invalid: {exc}") from None


def _series_frames(
    datasets: Sequence[Dataset], table: Mapping[str, VendorRules]
) -> tuple[list[Dataset], Detection, list[Frame]]:
    """One series, resends dropped, detected as MDME: (datasets, detection, frames)."""
    if not datasets:
        raise NormalizationError("not_mdme", "no DICOM datasets")
    series: dict[str, int] = {}
    for ds in datasets:
        uid = str(ds.get("SeriesInstanceUID", ""))
        series[uid] = series.get(uid, 0) + 1
    if len(series) > 1:
        desc = ", ".join(f"{u or '(none)'} ({n} images)" for u, n in series.items())
        raise NormalizationError(
            "mixed_series",
            f"mixed series: {len(series)} SeriesInstanceUIDs: {desc}",
            details={"series": series},
        )
    unique = _dedupe(datasets)
    det = detect(unique, table)
    if not det.is_mdme:
        raise NormalizationError("not_mdme", f"not MDME: {det.reason}")
    try:
        frames = frame_records(unique)
    except ValueError as exc:
        raise NormalizationError("invalid", str(exc)) from None
    return unique, det, frames


@dataclass(frozen=True)
class _Geometry:
    """In-plane size, orientation (snapped to the first image) and slice positions."""

    n_rows: int
    n_cols: int
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    ipp: np.ndarray  # per frame
    spacing: np.ndarray  # per frame (row spacing, column spacing)
    slice_lab: np.ndarray  # per frame
    slice_pos: np.ndarray  # sorted slice positions along the normal, mm


def _geometry(datasets: Sequence[Dataset], frames: Sequence[Frame], r: VendorRules) -> _Geometry:
    rows = {(int(datasets[f.index].Rows), int(datasets[f.index].Columns)) for f in frames}
    if len(rows) != 1:
        raise NormalizationError("geometry", f"inconsistent image sizes (rows, columns): {rows}")
    n_rows, n_cols = rows.pop()
    iop = np.array([_floats(f, "ImageOrientationPatient", 6) for f in frames])
    ipp = np.array([_floats(f, "ImagePositionPatient", 3) for f in frames])
    spacing = np.array([_floats(f, "PixelSpacing", 2) for f in frames])
    dev = np.abs(iop - iop[0]).max(axis=1)
    if dev.max() > r.orientation_tolerance:
        k = int(dev.argmax())
        raise NormalizationError(
            "geometry",
            f"inconsistent ImageOrientationPatient: image {frames[k].sop_uid}"
            f"{_frame_label(frames[k])} differs from the first by {dev.max():.3g} "
            f"(tolerance {r.orientation_tolerance:g})",
        )
    if np.abs(spacing - spacing[0]).max() > 1e-4:
        raise NormalizationError(
            "geometry", f"inconsistent PixelSpacing: {np.unique(spacing, axis=0).tolist()}"
        )
    row_dir, col_dir = iop[0, :3], iop[0, 3:]  # snapped to the first image's orientation
    normal = np.cross(row_dir, col_dir)
    slice_lab, slice_pos = _cluster(ipp @ normal, 0.01)
    return _Geometry(n_rows, n_cols, row_dir, col_dir, normal, ipp, spacing, slice_lab, slice_pos)


def _timing(frames: Sequence[Frame], r: VendorRules) -> tuple[float, float]:
    """(TR, excitation flip angle), each the same on every image."""
    tr = _check_same(frames, "RepetitionTime", r.timing_tolerance, None)
    if tr is None:
        raise NormalizationError("inconsistent", "RepetitionTime missing on every image")
    flip = _check_same(frames, "FlipAngle", r.timing_tolerance, r.excitation_deg)
    return tr, flip


def _delays(
    datasets: Sequence[Dataset],
    frames: Sequence[Frame],
    r: VendorRules,
    table: Mapping[str, VendorRules],
    tr: float,
    n_slices: int,
) -> tuple[str, list[float]]:
    """(delay source, delay per frame): the first usable header source, else interleave."""
    src, delays, tried = _header_delays(frames, r)
    if src is None and INTERLEAVE in r.delay_sources:
        src, delays, why = _interleave_delays(frames, r, tr, n_slices)
        if src is None:
            tried.append(why)
    if src is not None and delays is not None:
        return src, delays
    exp = expected_count(datasets[0], table)
    if exp is not None and exp > len(datasets):  # most likely cause: images missing
        raise NormalizationError(
            "missing",
            f"the header announces {exp} instances but {len(datasets)} distinct ones "
            f"arrived; no usable delay source for {r.name}: " + "; ".join(tried),
            details={"expected": exp, "received": len(datasets)},
        )
    raise NormalizationError("delay", f"no usable delay source for {r.name}: " + "; ".join(tried))


def _check_grid(
    datasets: Sequence[Dataset],
    frames: Sequence[Frame],
    r: VendorRules,
    table: Mapping[str, VendorRules],
    labels: np.ndarray,
    parts: Sequence[str],
    part_set: Sequence[str],
    axes: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """Every (slice, delay, echo, part) cell holds exactly one image, no slice is missing,
    the announced instance count arrived and the grid is big enough for MDME.
    ``labels``: per frame (slice, delay, echo) indices into ``axes`` (slice positions mm,
    delays ms, echo times ms)."""
    nz, nd, ne = (len(a) for a in axes)
    pidx = {p: i for i, p in enumerate(part_set)}
    cell_of = np.full((nz, nd, ne, len(part_set)), -1, dtype=np.int64)
    dups: dict[tuple[int, int, int, str], list[str]] = {}
    for k, f in enumerate(frames):
        c = (int(labels[k, 0]), int(labels[k, 1]), int(labels[k, 2]), pidx[parts[k]])
        if cell_of[c] >= 0:
            other = frames[int(cell_of[c])]
            key = (c[0], c[1], c[2], parts[k])
            dups.setdefault(key, [other.sop_uid + _frame_label(other)]).append(
                f.sop_uid + _frame_label(f)
            )
        else:
            cell_of[c] = k
    if dups:
        first = next(iter(dups.items()))
        raise NormalizationError(
            "duplicate",
            f"{len(dups)} grid cell(s) (slice, delay, echo, part) hold more than one image, "
            f"first {first[0]}: {', '.join(first[1])}",
            duplicates=[(k, tuple(v)) for k, v in dups.items()],
        )
    _check_missing(np.argwhere(cell_of < 0), part_set, axes)
    exp = expected_count(datasets[0], table)
    if exp is not None and exp > len(datasets):
        raise NormalizationError(
            "missing",
            f"the header announces {exp} instances but {len(datasets)} distinct ones arrived "
            f"(grid {nz} slices x {nd} delays x {ne} echoes x parts {''.join(part_set)})",
            details={"expected": exp, "received": len(datasets)},
        )
    if nd < r.min_delays or ne < r.min_echoes:
        raise NormalizationError(
            "not_mdme",
            f"grid has {nd} delay(s) x {ne} echo(es); need >= {r.min_delays} x {r.min_echoes}",
        )


def _check_missing(
    missing_idx: np.ndarray,
    part_set: Sequence[str],
    axes: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """Raise ``missing`` naming the first empty grid cell and any missing slice position."""
    slice_pos, delay_vals, echo_vals = axes
    gaps = _slice_gaps(slice_pos)
    if not missing_idx.size and not gaps:
        return
    missing = [(int(a), int(b), int(c), part_set[int(d)]) for a, b, c, d in missing_idx]
    msg = []
    if missing:
        a, b, c, d = missing[0]
        msg.append(
            f"{len(missing)} missing grid cell(s) (slice, delay, echo, part), first "
            f"{missing[0]} = slice at {slice_pos[a]:.2f} mm, delay {delay_vals[b]:g} ms, "
            f"TE {echo_vals[c]:g} ms, part {d}"
        )
    if gaps:
        msg.append(
            "missing slice(s) at "
            + ", ".join(f"{g:.2f} mm" for g in gaps)
            + " (uneven slice spacing)"
        )
    raise NormalizationError(
        "missing",
        "; ".join(msg),
        missing=missing,
        details={
            "missing_slice_positions_mm": gaps,
            "grid": (len(slice_pos), len(delay_vals), len(echo_vals), list(part_set)),
        },
    )


#: Slices of the phase (imaginary) part held at once when a magnitude/phase (real/imaginary)
#: pair is combined slab by slab: several per kernel thread (it is parallel over slices;
#: few launches, few idle threads between them), 64 MB at 512 x 512 x 4 delays x 2 echoes
_SLAB_SLICES = min(32, max(8, 2 * (os.cpu_count() or 1)))


def _scaled_signal(
    datasets: Sequence[Dataset],
    frames: Sequence[Frame],
    r: VendorRules,
    labels: np.ndarray,
    parts: Sequence[str],
    part_set: Sequence[str],
    shape: tuple[int, ...],
) -> tuple[np.ndarray, bool, str, PhaseDecision | None]:
    """Stored values -> the signal ``[z, d, e, y, x]`` float32, is_magnitude, how the parts
    were combined, and the phase unit decision (None when no phase is used).

    A series of exactly magnitude + phase (or real + imaginary), the usual case, never
    holds the second part's whole grid: it is scaled a few slices at a time into a small
    buffer and combined into the first part's grid at once (the kernels work per slice,
    so the samples are the same as from whole grids); at 40 x 512 x 512 that is 336 MB
    less at the node's peak and no page faults for it. Other part sets: every part's
    grid, then :func:`_combine`."""
    images, scales, phase = _images(datasets, frames, parts, r)
    pidx = {p: i for i, p in enumerate(part_set)}
    pair = tuple(part_set) if tuple(part_set) in (("M", "P"), ("R", "I")) else None
    later = pair[1] if pair else None
    data = [np.empty(shape[1:], dtype=np.float32) for p in part_set if p != later]
    # one float64 image, reused: a new temporary per image (512 KB at 256 x 256, above
    # malloc's mmap threshold) is page-faulted afresh each time
    work = np.empty(shape[-2:], dtype=np.float64)
    for k in range(len(images)):
        if parts[k] != later:
            dst = data[pidx[parts[k]]][int(labels[k, 0]), int(labels[k, 1]), int(labels[k, 2])]
            _scale_into(dst, images[k], _part_scale(scales[k], parts[k], phase), work)
    if "M" in pidx:
        _clip_magnitude(
            data[pidx["M"]], [abs(s) for (s, _), p in zip(scales, parts, strict=True) if p == "M"]
        )
    if pair is None:
        signal, is_mag, combine = _combine(data, part_set, r.phase_reference)
        return signal, is_mag, combine, phase
    signal = data[0]
    nz = shape[1]
    by_slice: list[list[int]] = [[] for _ in range(nz)]
    for k in range(len(images)):
        if parts[k] == later:
            by_slice[int(labels[k, 0])].append(k)
    slab = np.empty((min(_SLAB_SLICES, nz), *shape[2:]), dtype=np.float32)
    for z0 in range(0, nz, slab.shape[0]):
        z1 = min(z0 + slab.shape[0], nz)
        for z in range(z0, z1):
            for k in by_slice[z]:
                dst = slab[z - z0, int(labels[k, 1]), int(labels[k, 2])]
                _scale_into(dst, images[k], _part_scale(scales[k], parts[k], phase), work)
        _combine([signal[z0:z1], slab[: z1 - z0]], pair, r.phase_reference)
    return signal, *_combine_kind(pair, r.phase_reference), phase


def _images(
    datasets: Sequence[Dataset], frames: Sequence[Frame], parts: Sequence[str], r: VendorRules
) -> tuple[list[np.ndarray], list[tuple[float, float]], PhaseDecision | None]:
    """Every frame's stored values ``(rows, cols)``, its (scale, offset) and the phase unit
    (:func:`_phase_decision`)."""
    cache: dict[int, np.ndarray] = {}
    for f in frames:
        if f.index not in cache:
            cache[f.index] = _pixels(datasets[f.index])
    images = [cache[f.index][f.frame or 0] for f in frames]
    scales = [_scale_of(f, part, r) for f, part in zip(frames, parts, strict=True)]
    return images, scales, _phase_decision(frames, parts, images, scales, r)


def _part_scale(
    scale: tuple[float, float], part: str, phase: PhaseDecision | None
) -> tuple[float, float]:
    """(scale, offset) of one frame, phase frames converted to radians."""
    if part == "P" and phase is not None:
        return scale[0] * phase.to_rad, scale[1] * phase.to_rad
    return scale


def _scale_into(
    dst: np.ndarray, img: np.ndarray, scale: tuple[float, float], work: np.ndarray
) -> None:
    """``dst[...] = img * scale + offset``: one float64 pass, one rounding to float32."""
    s, offset = scale
    if img.dtype.kind in "iu" and img.shape == work.shape:
        # integers * a float are computed in float64 either way: the same operations as
        # the expression below, into the reused buffer
        np.multiply(img, s, out=work)
        if offset:
            np.add(work, offset, out=work)
        dst[...] = work
    else:
        dst[...] = img * s + offset if offset else img * s


def _clip_magnitude(mag: np.ndarray, steps: Sequence[float]) -> None:
    """A writer with a negative RescaleIntercept rounds zero magnitude to within one stored
    step below zero: clip that (in place). Anything more negative is a broken rescale."""
    lo = float(mag.min())
    if lo >= 0:
        return
    step = max(steps)
    if lo < -step:
        raise NormalizationError(
            "pixels",
            f"magnitude images go down to {lo:.6g} after RescaleSlope/Intercept (one stored "
            f"step is {step:.6g}): the rescale is inconsistent",
        )
    np.maximum(mag, 0, out=mag)


def _phase_decision(
    frames: Sequence[Frame],
    parts: Sequence[str],
    images: Sequence[np.ndarray],
    scales: Sequence[tuple[float, float]],
    r: VendorRules,
) -> PhaseDecision | None:
    """The unit of the phase frames, or None when there are none or a real/imaginary pair
    makes them unused. Raises ``phase_units`` when it cannot be decided."""
    if "P" not in parts or ("R" in parts and "I" in parts):
        return None
    ranges = []
    for f, part, img, (scale, offset) in zip(frames, parts, images, scales, strict=True):
        if part != "P":
            continue
        ends = (float(img.min()) * scale + offset, float(img.max()) * scale + offset)
        ranges.append(PhaseRange(min(ends), max(ends), abs(scale), f.sop_uid + _frame_label(f)))
    try:
        return decide_phase_unit(ranges, r.phase_to_rad)
    except PhaseUnitError as exc:
        raise NormalizationError(
            "phase_units",
            f"{r.name}: {exc}",
            details={
                "phase_min": min(p.lo for p in ranges),
                "phase_max": max(p.hi for p in ranges),
            },
        ) from None


def _affine(frames: Sequence[Frame], geo: _Geometry) -> tuple[np.ndarray, tuple[float, ...]]:
    """Voxel -> patient affine (contract in processing.acquisition) and voxel size (z, y, x)."""
    dy, dx = float(geo.spacing[0, 0]), float(geo.spacing[0, 1])
    if len(geo.slice_pos) > 1:
        dz = float(np.mean(np.diff(geo.slice_pos)))
    else:
        dz = (
            _first_float(frames[0].get("SpacingBetweenSlices"))
            or _first_float(frames[0].get("SliceThickness"))
            or 1.0
        )
    affine = np.eye(4)
    affine[:3, 0] = geo.row_dir * dx
    affine[:3, 1] = geo.col_dir * dy
    affine[:3, 2] = geo.normal * dz
    affine[:3, 3] = geo.ipp[int(np.argmax(geo.slice_lab == 0))]
    return affine, (abs(dz), dy, dx)


def _scale_of(f: Frame, part: str, r: VendorRules) -> tuple[float, float]:
    """Stored value -> rescaled float: ``value = SV * scale + offset`` for one frame.

    RescaleSlope/Intercept; Philips FP = (SV*RS + RI) / (RS*SS) on the parts the rule
    names. Phase stays in its rescaled unit (radians per unit: :func:`_phase_decision`).
    """
    slope = _first_float(f.get("RescaleSlope"))
    icpt = _first_float(f.get("RescaleIntercept"))
    slope = 1.0 if not slope else slope
    icpt = 0.0 if icpt is None else icpt
    scale, offset = slope, icpt
    if r.float_scale_tag and part in r.float_scale_parts:
        ss = _first_float(f.get(r.float_scale_tag))
        if ss:
            scale, offset = 1.0 / ss, icpt / (slope * ss)
    return scale, offset


def frame_images(
    datasets: Sequence[Dataset], rules: Mapping[str, VendorRules] | None = None
) -> list[tuple[Frame, str, np.ndarray]]:
    """Every frame decoded to float64 with its complex part, unsorted (for inspection and
    tests of the scaling rules on real headers). Works on non-MDME series too; phase in
    radians, its unit decided over all the frames given."""
    table = _rules(rules)
    if not datasets:
        return []
    r = vendor_of(datasets[0], table)
    frames = frame_records(datasets)
    parts = [_part_of(f, r) or "M" for f in frames]
    images, scales, phase = _images(datasets, frames, parts, r)
    out: list[tuple[Frame, str, np.ndarray]] = []
    for f, part, img, sc in zip(frames, parts, images, scales, strict=True):
        scale, offset = _part_scale(sc, part, phase)
        out.append((f, part, img * scale + offset))
    return out


def _echo_fallback(
    frames: Sequence[Frame],
    r: VendorRules,
    parts: Sequence[str],
    slice_lab: np.ndarray,
    delay_lab: np.ndarray,
    echo_lab: np.ndarray,
    echo_vals: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, str]:
    """GE research quirk: every echo written with the first TE (and EchoNumbers 1). When
    each (slice, delay, part) holds more images than distinct TEs, order them by
    (EchoNumbers, InstanceNumber) and take the TEs from ``fallback_echo_times_ms``."""
    cells: dict[tuple[int, int, str], list[int]] = {}
    for k in range(len(frames)):
        cells.setdefault((int(slice_lab[k]), int(delay_lab[k]), parts[k]), []).append(k)
    sizes = {len(v) for v in cells.values()}
    n = max(sizes)
    if n <= len(echo_vals) or len(sizes) != 1 or len(echo_vals) != 1:
        return echo_lab, echo_vals, "EchoTime"
    cfg = r.fallback_echo_times_ms
    if not cfg or len(cfg) != n:
        raise NormalizationError(
            "inconsistent",
            f"{n} images per (slice, delay, part) but only one EchoTime "
            f"({echo_vals[0]:g} ms): echoes cannot be told apart; if this is the GE quirk "
            f"(first TE written on every echo) set vendors.{r.name}.fallback_echo_times_ms "
            f"to the {n} echo times",
        )
    lab = echo_lab.copy()
    for members in cells.values():

        def order(k: int) -> tuple[float, float]:
            f = frames[k]
            return (
                _first_float(f.get("EchoNumbers")) or 0.0,
                _first_float(f.get("InstanceNumber")) or 0.0,
            )

        for rank, k in enumerate(sorted(members, key=order)):
            lab[k] = rank
    return lab, np.asarray(cfg, dtype=np.float64), "fallback: instance order"


def _frame_label(f: Frame) -> str:
    return "" if f.frame is None else f" frame {f.frame + 1}"


def _floats(f: Frame, name: str, n: int) -> list[float]:
    v = f.get(name)
    try:
        out = [float(x) for x in v]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        out = []
    if len(out) != n:
        raise NormalizationError(
            "geometry", f"image {f.sop_uid}{_frame_label(f)}: {name} missing or malformed ({v!r})"
        )
    return out


def _slice_gaps(pos: np.ndarray) -> list[float]:
    """Positions of slices missing from an otherwise evenly spaced stack."""
    if pos.size < 3:
        return []
    d = np.diff(pos)
    step = float(np.min(d))
    if step <= 0:
        return []
    ratio = d / step
    gaps: list[float] = []
    if np.all(np.abs(ratio - 1) < 0.05):
        return gaps
    for i, q in enumerate(ratio):
        k = round(q)
        if k >= 2 and abs(q - k) < 0.05:
            gaps.extend(float(pos[i] + j * step) for j in range(1, k))
    if not gaps:
        raise NormalizationError("geometry", f"uneven slice spacing: {np.round(d, 3).tolist()} mm")
    return gaps


def _interleave_delays(
    frames: Sequence[Frame], r: VendorRules, tr: float, n_slices: int
) -> tuple[str | None, list[float] | None, str]:
    for src in r.dynamic_sources:
        vals = [_first_float(f.get(src)) for f in frames]
        if any(v is None for v in vals):
            continue
        dyn = [int(v) for v in vals]  # type: ignore[arg-type]
        n = r.interleave_n_slices or n_slices
        if r.interleave_offsets is not None:
            try:
                offs = [r.interleave_offsets[d - 1] for d in dyn]
            except IndexError:
                return (
                    None,
                    None,
                    (
                        f"interleave: dynamic index {max(dyn)} beyond interleave_offsets "
                        f"{list(r.interleave_offsets)}"
                    ),
                )
        else:
            offs = dyn
        delays = [tr / n * o for o in offs]
        if len(set(offs)) < r.min_delays:
            return None, None, f"interleave: only {len(set(offs))} dynamic(s) in {src}"
        if min(offs) <= 0:
            return None, None, f"interleave: non-positive dynamic offset in {src}"
        return f"{INTERLEAVE}: TR/{n} x {src}", delays, ""
    return None, None, f"interleave: no dynamic index ({', '.join(r.dynamic_sources)})"


def _combine(
    data: Sequence[np.ndarray], parts: Sequence[str], reference: str = "longest_delay"
) -> tuple[np.ndarray, bool, str]:
    """[part][z, d, e, y, x] -> signal [z, d, e, y, x], is_magnitude, description. The
    signal is written over the real (magnitude) part: no third array of the grid's size."""
    ip = {p: i for i, p in enumerate(parts)}
    if "R" in ip and "I" in ip:
        re = data[ip["R"]]
        out = real_from_complex(re, data[ip["I"]], reference, out=re)
        return out, *_combine_kind(("R", "I"), reference)
    if "M" in ip and "P" in ip:
        mag = data[ip["M"]]
        out = real_from_magnitude_phase(mag, data[ip["P"]], reference, out=mag)
        return out, *_combine_kind(("M", "P"), reference)
    if "M" in ip:
        return data[ip["M"]], True, "magnitude"
    raise NormalizationError(
        "inconsistent", f"complex parts {''.join(parts)}: no magnitude or real/imaginary pair"
    )


def _combine_kind(pair: tuple[str, ...], reference: str) -> tuple[bool, str]:
    """(is_magnitude, description) of a combined magnitude/phase or real/imaginary pair."""
    what = "real/imaginary" if pair == ("R", "I") else "magnitude/phase"
    return False, f"{what} -> real (background phase: {reference})"
