"""3D-QALAS vendor adapter: recognize a QALAS series and normalize it to an ``Acquisition``.

Any vendor, any of the layouts the scanners use: the five images in one series (classic
5 x nz instances, or one Enhanced MR instance of 5 x nz frames) or as five multi-frame
instances. The image index comes from ``TemporalPositionIndex`` /
``TemporalPositionIdentifier``, else from clustering ``TriggerTime`` into five values.

Readout timing: FlipAngle, RepetitionTime (the gradient-echo spacing), EchoTrainLength
(pulses per block) and EchoTime from the headers; each image's k-space-centre time from
TriggerTime / NominalCardiacTriggerDelayTime where present; what no header carries (the
cycle length, T2-prep duration, inversion lead, ordering, inversion efficiency) from the
vendor's QALAS rules table (:data:`QALAS_RULES`, overridable). The Acquisition's
``delay_source`` says which came from where.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.vendors.frames import lookup
from dicom_node.vendors.normalize import (
    NormalizationError,
    _first_float,
    frame_images,
    vendor_of,
)
from dicom_node.vendors.rules import VendorRules, load_rules
from processing.acquisition import Acquisition, AcquisitionError
from processing.qalas import N_SAMPLES, QalasError, QalasProtocol

__all__ = ["QALAS_RULES", "is_qalas", "normalize_qalas", "qalas_protocol"]

_MARKER = re.compile(r"qalas", re.IGNORECASE)
_MARKER_TAGS = ("SeriesDescription", "ProtocolName", "SequenceName", "PulseSequenceName")

#: Per-vendor QALAS timing that no standard header carries (processing/QALAS.md), and the
#: header fallbacks. Keys: tr_ms, t2prep_ms, first_block_ms (first readout after the prep
#: start), block_spacing_ms (used only without trigger times), inversion_lead_ms (inversion
#: before block 2), ordering ("linear" | "centric"), inversion_efficiency, flip_deg,
#: pulse_spacing_ms, n_pulses, echo_time_ms (header fallbacks).
_DEFAULT = {
    "tr_ms": 4500.0,
    "t2prep_ms": 100.0,
    "first_block_ms": 110.0,
    "block_spacing_ms": 900.0,
    "inversion_lead_ms": 100.0,
    "ordering": "linear",
    "inversion_efficiency": 1.0,
    "flip_deg": 4.0,
    "pulse_spacing_ms": 5.8,
    "n_pulses": 128,
    "echo_time_ms": 2.3,
}
QALAS_RULES: dict[str, dict[str, Any]] = {
    "ge": dict(_DEFAULT),
    "siemens": dict(_DEFAULT),
    "philips": dict(_DEFAULT),
    "generic": dict(_DEFAULT),
}


def is_qalas(datasets: Sequence[Dataset]) -> bool:
    """True when the first instance names 3D-QALAS in its description/protocol/sequence."""
    if not datasets:
        return False
    first = datasets[0]
    for tag in _MARKER_TAGS:
        v = first.get(tag)
        if v is not None and _MARKER.search(str(v)):
            return True
    return False


def _rules_for(vendor: str, overrides: Mapping[str, Mapping[str, Any]] | None) -> dict:
    r = dict(QALAS_RULES.get(vendor, QALAS_RULES["generic"]))
    if overrides and vendor in overrides:
        r.update(overrides[vendor])
    return r


def qalas_protocol(
    sources: Sequence[Dataset],
    trigger_ms: Sequence[float | None],
    vendor: str,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> QalasProtocol:
    """Protocol from one image's header sources (a frame's functional groups, then the
    instance), the per-image trigger times and the rules."""
    r = _rules_for(vendor, overrides)
    src = tuple(sources)
    used: list[str] = []

    def hdr(name: str, key: str) -> float:
        v = _first_float(lookup(src, name))
        if v is not None and v > 0:
            used.append(name)
            return v
        return float(r[key])

    flip = hdr("FlipAngle", "flip_deg")
    esp = hdr("RepetitionTime", "pulse_spacing_ms")
    n = round(hdr("EchoTrainLength", "n_pulses"))
    if n < 2:  # a classic header's "1": the readout train length is not there
        n = int(r["n_pulses"])
    te = hdr("EchoTime", "echo_time_ms")
    kc = n // 2 if str(r["ordering"]).lower() == "linear" else 0
    if all(t is not None and t > 0 for t in trigger_ms) and len(set(trigger_ms)) == N_SAMPLES:
        starts = tuple(round(float(t) - kc * esp, 4) for t in trigger_ms)  # DS noise
        used.append("TriggerTime")
    else:
        s0 = float(r["first_block_ms"])
        starts = tuple(s0 + i * float(r["block_spacing_ms"]) for i in range(N_SAMPLES))
    source = f"header({', '.join(used) or '-'}) + rules:{vendor}"
    try:
        return QalasProtocol(
            tr_ms=float(r["tr_ms"]),
            t2prep_ms=float(r["t2prep_ms"]),
            block_starts_ms=starts,
            inversion_ms=starts[1] - float(r["inversion_lead_ms"]),
            n_pulses=n,
            pulse_spacing_ms=esp,
            flip_deg=flip,
            centre_index=kc,
            inversion_efficiency=float(r["inversion_efficiency"]),
            echo_time_ms=te,
            source=source,
        )
    except QalasError as exc:
        raise NormalizationError(
            "invalid", f"QALAS timing ({source}) is inconsistent: {exc}"
        ) from None


def normalize_qalas(
    datasets: Sequence[Dataset],
    rules: Mapping[str, VendorRules] | None = None,
    qalas_rules: Mapping[str, Mapping[str, Any]] | None = None,
) -> Acquisition:
    """Sort and scale one 3D-QALAS series (magnitude) into an :class:`Acquisition`.

    Raises :class:`NormalizationError` naming the problem (missing images, wrong count of
    images, inconsistent geometry or timing).
    """
    if not datasets:
        raise NormalizationError("missing", "no DICOM datasets")
    table = rules if rules is not None else load_rules(None)
    vendor = vendor_of(datasets[0], table).name
    frames = [(f, img) for f, part, img in frame_images(datasets, table) if part in ("M", None)]
    if not frames:
        raise NormalizationError("invalid", "no magnitude images in the QALAS series")
    # Image index (0..4) per frame.
    idx: list[int] = []
    trig = [_first_float(f.get("TriggerTime")) for f, _ in frames]
    for f, _ in frames:
        v = _first_float(f.get("TemporalPositionIndex")) or _first_float(
            f.get("TemporalPositionIdentifier")
        )
        idx.append(int(v) - 1 if v else -1)
    if min(idx) < 0:
        if any(t is None for t in trig):
            raise NormalizationError(
                "invalid",
                "QALAS image index missing: no TemporalPositionIndex/Identifier and no "
                "TriggerTime on every image",
            )
        values = sorted({round(float(t), 3) for t in trig})
        idx = [values.index(round(float(t), 3)) for t in trig]
    n_img = len(set(idx))
    if n_img != N_SAMPLES or min(idx) != 0 or max(idx) != N_SAMPLES - 1:
        raise NormalizationError(
            "missing",
            f"a 3D-QALAS series has {N_SAMPLES} images; found image indices {sorted(set(idx))}",
        )
    # Geometry: slice position along the normal of the first frame's orientation.
    iop0 = frames[0][0].get("ImageOrientationPatient")
    if iop0 is None:
        raise NormalizationError("invalid", "ImageOrientationPatient missing")
    row = np.array([float(v) for v in iop0[:3]])
    col = np.array([float(v) for v in iop0[3:6]])
    normal = np.cross(row, col)
    pos = []
    for f, _ in frames:
        p = f.get("ImagePositionPatient")
        if p is None:
            raise NormalizationError("invalid", "ImagePositionPatient missing on an image")
        pos.append(np.array([float(v) for v in p]))
    z_of = np.array([float(np.dot(p, normal)) for p in pos])
    zs = np.unique(np.round(z_of, 3))
    nz = zs.size
    counts = np.zeros((nz, N_SAMPLES), int)
    lab = np.searchsorted(zs, np.round(z_of, 3))
    for k, i in zip(lab, idx, strict=True):
        counts[k, i] += 1
    if counts.min() == 0 or counts.max() > 1:
        missing = int((counts == 0).sum())
        dup = int((counts > 1).sum())
        raise NormalizationError(
            "missing" if dup == 0 else "duplicate",
            f"QALAS grid {nz} positions x {N_SAMPLES} images: {missing} missing, {dup} duplicated",
        )
    ny, nx = frames[0][1].shape
    signal = np.zeros((nz, N_SAMPLES, 1, ny, nx), np.float32)
    for (_, img), k, i in zip(frames, lab, idx, strict=True):
        if img.shape != (ny, nx):
            raise NormalizationError("invalid", f"image size {img.shape} differs from {(ny, nx)}")
        signal[k, i, 0] = img
    trigger = [None] * N_SAMPLES
    for t, i in zip(trig, idx, strict=True):
        if t is not None and trigger[i] is None:
            trigger[i] = float(t)
    proto = qalas_protocol(frames[0][0].sources, trigger, vendor, qalas_rules)
    spacing = frames[0][0].get("PixelSpacing")
    dy, dx = (float(v) for v in spacing) if spacing is not None else (1.0, 1.0)
    first = int(np.argmin(z_of))
    if nz > 1:
        dz = float(np.mean(np.diff(zs)))
    else:
        dz = _first_float(frames[0][0].get("SpacingBetweenSlices")) or 1.0
    affine = np.eye(4)
    affine[:3, 0] = row * dx
    affine[:3, 1] = col * dy
    affine[:3, 2] = normal * dz
    affine[:3, 3] = pos[first]
    ds0 = datasets[0]
    meta = {
        "vendor": vendor,
        "sequence": "3D-QALAS",
        "manufacturer": str(ds0.get("Manufacturer", "")),
        "sop_class_uid": str(ds0.get("SOPClassUID", "")),
        "series_instance_uid": str(ds0.get("SeriesInstanceUID", "")),
        "study_instance_uid": str(ds0.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(ds0.get("FrameOfReferenceUID", "")),
        "series_description": str(ds0.get("SeriesDescription", "")),
        "n_instances": len(datasets),
        "n_frames": len(frames),
        "qalas_protocol": proto.describe(),
    }
    try:
        return Acquisition.from_qalas(
            signal,
            proto,
            (abs(dz), dy, dx),
            affine,
            is_magnitude=True,
            metadata=meta,
            delay_source=proto.source,
        )
    except AcquisitionError as exc:
        raise NormalizationError(
            "invalid", f"normalized QALAS acquisition is invalid: {exc}"
        ) from None
