"""Scanner emulator for 3D-QALAS: write a QALAS :class:`Acquisition` as a vendor-flavoured
DICOM series (for the demo and the tests).

Layouts (:data:`QALAS_LAYOUTS`); each stores the five images differently so that every path
of :mod:`dicom_node.vendors.qalas` is exercised:

===================  ===========  ==============================  ==========================
layout               SOP class    five images                     readout timing
===================  ===========  ==============================  ==========================
``ge``               MR Image     one series, 5 x nz instances,   TriggerTime = each image's
                                  TemporalPositionIdentifier      k-space-centre time
``siemens``          Enhanced MR  five multi-frame instances      none: the rules table
                                  (a concatenation), one per      (``QALAS_RULES``) supplies
                                  image, TemporalPositionIndex    the cycle
``philips_enhanced`` Enhanced MR  one instance, 5 x nz frames     per-frame
                                                                  NominalCardiacTriggerDelay
``philips``          MR Image     one series, random instance     TriggerTime
                                  order, TemporalPositionIdent.
===================  ===========  ==============================  ==========================

All layouts carry FlipAngle, RepetitionTime (the gradient-echo spacing), EchoTrainLength
(pulses per block) and EchoTime. Magnitude only (QALAS is reconstructed as magnitude), the
same power-of-two quantization for every layout, so the normalized floats agree exactly.
UIDs are deterministic from ``seed``. All patient/study data is fictional.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicom_node.emulator import (
    ENHANCED_MR,
    MR_IMAGE,
    EmulatorError,
    _base,
    _ds,
    _file_meta,
    _geometry,
    _item,
    _quantize,
    _shared_timing_geometry,
    _uid,
    write_datasets,
)
from processing.acquisition import Acquisition
from processing.qalas import QalasProtocol

__all__ = ["QALAS_LAYOUTS", "make_qalas_datasets", "write_qalas_series"]

QALAS_LAYOUTS: dict[str, str] = {
    "ge": "GE classic MR, one series of 5 x nz images; TriggerTime = centre time",
    "siemens": "Siemens Enhanced MR, five multi-frame instances (concatenation); no timing",
    "philips_enhanced": "Philips Enhanced MR, one instance of 5 x nz frames",
    "philips": "Philips classic MR, one series, random instance order",
}

_VENDOR = {
    "ge": ("GE MEDICAL SYSTEMS", "SIGNA Premier (emulated)"),
    "siemens": ("SIEMENS", "MAGNETOM Vida (emulated)"),
    "philips_enhanced": ("Philips", "Ingenia (emulated)"),
    "philips": ("Philips", "Ingenia (emulated)"),
}


def make_qalas_datasets(
    acq: Acquisition,
    layout: str,
    *,
    seed: int = 0,
    patient: Mapping[str, str] | None = None,
    study: Mapping[str, str] | None = None,
) -> list[Dataset]:
    """The QALAS series as pydicom Datasets (with file meta) in the vendor ``layout``."""
    if layout not in QALAS_LAYOUTS:
        raise EmulatorError(
            f"unknown QALAS layout {layout!r}; choose one of {sorted(QALAS_LAYOUTS)}"
        )
    if not isinstance(acq, Acquisition) or acq.sequence_kind != "QALAS":
        raise EmulatorError("expected a 3D-QALAS Acquisition (Acquisition.from_qalas)")
    proto = acq.sequence
    study = dict(study or {})
    study.setdefault("StudyInstanceUID", _uid("synthmr-study", seed))
    series_uid = _uid("synthmr-qalas-series", seed, layout, acq.signal.shape)
    geo = _geometry(acq)
    sv, _, q = _quantize(acq, False, seed)  # [z, 5, 1, y, x] uint16, step q
    base = _base(acq, layout, series_uid, study, dict(patient or {}))
    base.Manufacturer, base.ManufacturerModelName = _VENDOR[layout]
    base.SeriesDescription = "3D QALAS (synthetic phantom)"
    base.ProtocolName = "3D_QALAS"
    base.MRAcquisitionType = "3D"
    series = _Series(
        layout=layout,
        base=base,
        uid=series_uid,
        geo=geo,
        sv=sv,
        q=q,
        proto=proto,
        times=[float(t) for t in proto.sample_times_ms()],
        with_timing=layout != "siemens",
    )
    if layout in ("ge", "philips"):
        return _classic_images(series, seed)
    return _enhanced_images(series)


@dataclass(frozen=True)
class _Series:
    """What every instance of one emulated QALAS series shares."""

    layout: str
    base: Dataset  # patient, study, series, equipment (emulator._base)
    uid: str  # SeriesInstanceUID
    geo: dict[str, Any]  # emulator._geometry
    sv: np.ndarray  # quantized pixels [z, 5, 1, y, x] uint16
    q: float  # their rescale slope
    proto: QalasProtocol
    times: list[float]  # each image's k-space-centre time, ms
    with_timing: bool  # the layout stores the times


def _classic_images(series: _Series, seed: int) -> list[Dataset]:
    """GE / Philips classic MR: one instance per (image, slice), Philips in shuffled order."""
    geo, proto = series.geo, series.proto
    nz = series.sv.shape[0]
    out: list[Dataset] = []
    n_total = 5 * nz
    order = np.arange(n_total) + 1
    if series.layout == "philips":
        order = np.random.default_rng(seed + 3).permutation(n_total) + 1
    idx = 0
    for i in range(5):
        for z in range(nz):
            ds = Dataset()
            ds.update(series.base)
            ds.SOPClassUID = MR_IMAGE
            ds.SOPInstanceUID = _uid(series.uid, i, z)
            ds.InstanceNumber = int(order[idx])
            ds.AcquisitionNumber = 1
            ds.ImagesInAcquisition = n_total
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "QALAS"]
            ds.ScanningSequence = ["GR", "IR"]
            ds.SequenceVariant = ["SK", "SP", "MP"]
            ds.ScanOptions = "PPG"  # makes TriggerTime legal
            ds.RepetitionTime = _ds(proto.pulse_spacing_ms)
            ds.EchoTime = _ds(proto.echo_time_ms)
            ds.EchoTrainLength = proto.n_pulses
            ds.FlipAngle = _ds(proto.flip_deg)
            ds.TemporalPositionIdentifier = i + 1
            ds.NumberOfTemporalPositions = 5
            if series.with_timing:
                ds.TriggerTime = _ds(series.times[i])
            ds.SliceThickness = geo["dz"]
            ds.SpacingBetweenSlices = geo["dz"]
            ds.PixelSpacing = geo["spacing"]
            ds.ImageOrientationPatient = geo["iop"]
            ds.ImagePositionPatient = geo["ipp"][z]
            ds.SliceLocation = _ds(geo["slice_loc"][z])
            ds.RescaleSlope = _ds(series.q)
            ds.RescaleIntercept = "0"
            ds.RescaleType = "US"
            ds.PixelData = np.ascontiguousarray(series.sv[z, i, 0], dtype="<u2").tobytes()
            _file_meta(ds)
            out.append(ds)
            idx += 1
    return out


def _enhanced_images(series: _Series) -> list[Dataset]:
    """Enhanced MR: Siemens one instance per image (a concatenation), Philips one instance."""
    geo, proto = series.geo, series.proto
    nz = series.sv.shape[0]
    out: list[Dataset] = []
    groups = [[(i, z) for z in range(nz)] for i in range(5)]
    if series.layout == "philips_enhanced":
        groups = [[(i, z) for i in range(5) for z in range(nz)]]
    concat_uid = _uid(series.uid, "concatenation")
    offset = 0
    for g, frames in enumerate(groups):
        ds = Dataset()
        ds.update(series.base)
        ds.SOPClassUID = ENHANCED_MR
        ds.SOPInstanceUID = _uid(series.uid, "enh", g)
        ds.InstanceNumber = g + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M_FFE", "NONE"]
        ds.ContentQualification = "PRODUCT"
        ds.NumberOfFrames = len(frames)
        ds.AcquisitionContrast = "T1"
        ds.PixelPresentation = "MONOCHROME"
        ds.VolumetricProperties = "VOLUME"
        ds.VolumeBasedCalculationTechnique = "NONE"
        ds.ComplexImageComponent = "MAGNITUDE"
        if len(groups) > 1:
            ds.ConcatenationUID = concat_uid
            ds.InConcatenationNumber = g + 1
            ds.InConcatenationTotalNumber = len(groups)
            ds.ConcatenationFrameOffsetNumber = offset
            ds.SOPInstanceUIDOfConcatenationSource = _uid(series.uid, "concat-source")
        offset += len(frames)
        shared = _shared_timing_geometry(
            geo, proto.pulse_spacing_ms, proto.flip_deg, proto.n_pulses, 1, proto.n_pulses
        )
        shared.PixelValueTransformationSequence = DicomSequence(
            [_item(RescaleSlope=_ds(series.q), RescaleIntercept="0", RescaleType="US")]
        )
        shared.MREchoSequence = DicomSequence([_item(EffectiveEchoTime=proto.echo_time_ms)])
        ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
        per = []
        for i, z in frames:
            item = _item(
                FrameContentSequence=DicomSequence(
                    [
                        _item(
                            TemporalPositionIndex=i + 1,
                            InStackPositionNumber=z + 1,
                            StackID="1",
                            DimensionIndexValues=[i + 1, z + 1],
                        )
                    ]
                ),
                PlanePositionSequence=DicomSequence([_item(ImagePositionPatient=geo["ipp"][z])]),
            )
            if series.with_timing:
                item.CardiacSynchronizationSequence = DicomSequence(
                    [_item(NominalCardiacTriggerDelayTime=series.times[i])]
                )
            per.append(item)
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(per)
        pix = [series.sv[z, i, 0] for i, z in frames]
        ds.PixelData = np.ascontiguousarray(np.stack(pix), dtype="<u2").tobytes()
        _file_meta(ds)
        out.append(ds)
    return out


def write_qalas_series(acq: Acquisition, layout: str, out_dir: str | Path, **kw: Any) -> list[Path]:
    """Write :func:`make_qalas_datasets` to ``out_dir`` as ``IM_00001.dcm`` ...; returns paths."""
    return write_datasets(make_qalas_datasets(acq, layout, **kw), out_dir)


def layouts() -> Sequence[str]:
    """QALAS layout names, for CLIs."""
    return list(QALAS_LAYOUTS)
