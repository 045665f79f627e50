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
from types import SimpleNamespace
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

__all__ = [
    "B1_MAP_VENDORS",
    "QALAS_LAYOUTS",
    "b1_map_grid",
    "make_b1_map_datasets",
    "make_qalas_datasets",
    "write_qalas_series",
]

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


# --------------------------------------------------------------------------- B1 maps
#: B1-map series as each vendor exports it (dicom_node/vendors/b1map.py has the rules)
B1_MAP_VENDORS: dict[str, str] = {
    "siemens": "tfl_b1map: an anatomical series and a flip-angle-map series (deg x 10, "
    "nominal 80 deg in FlipAngle)",
    "philips": "DREAM: one series, STE magnitude images and B1 map images (percent)",
    "ge": "B1 Map: one series of B1 map images (percent)",
    "unknown": "another manufacturer's B1 map (unit unknown: the node must not use it)",
}
_B1_MANUFACTURER = {v: _VENDOR[v] for v in ("siemens", "philips", "ge")} | {
    "unknown": ("ACME Imaging", "Model X (emulated)")
}
_TFL_NOMINAL_DEG = 80.0


def b1_map_grid(
    acq: Acquisition, voxel_mm: float = 6.0, oblique: bool = True
) -> tuple[tuple[int, int, int], np.ndarray]:
    """A coarse B1-map grid ``(shape [z, y, x], affine)`` over the field of view of
    ``acq`` (all of it, corners included), tilted 25 deg / -10 deg against it when ``oblique``."""
    from processing.phantom import _rotation

    aff = np.asarray(acq.affine, dtype=np.float64)
    dims = np.array(acq.shape[::-1], dtype=np.float64)  # x, y, z
    centre = aff[:3, :3] @ ((dims - 1) / 2.0) + aff[:3, 3]
    rot = _rotation(25.0, -10.0) if oblique else np.eye(3)
    # the QALAS box's corners (voxel edges) in the tilted frame: the map covers them all
    corners = np.array([[cx, cy, cz] for cx in (-0.5, dims[0] - 0.5)
                        for cy in (-0.5, dims[1] - 0.5) for cz in (-0.5, dims[2] - 0.5)])  # fmt: skip
    world = corners @ aff[:3, :3].T + aff[:3, 3] - centre
    ext = 2.0 * np.max(np.abs(world @ rot), axis=0)  # along the tilted axes, mm
    n = np.maximum(np.ceil(ext / voxel_mm) + 1, 2).astype(int)  # x, y, z
    out = np.eye(4)
    for i in range(3):
        out[:3, i] = rot[:, i] * voxel_mm
    out[:3, 3] = centre - out[:3, :3] @ ((n - 1) / 2.0)
    return (int(n[2]), int(n[1]), int(n[0])), out


def make_b1_map_datasets(
    values: np.ndarray,
    affine: np.ndarray,
    vendor: str,
    *,
    study: Mapping[str, str],
    frame_of_reference_uid: str,
    patient: Mapping[str, str] | None = None,
    seed: int = 0,
) -> list[Dataset]:
    """A B1-map acquisition of flip-angle ratios ``values`` ``[z, y, x]`` (0 = outside
    the body) on ``affine`` as ``vendor`` exports it (:data:`B1_MAP_VENDORS`); classic
    MR images, Siemens as two series. ``frame_of_reference_uid``: the QALAS series' (one
    patient coordinate system)."""
    if vendor not in B1_MAP_VENDORS:
        raise EmulatorError(
            f"unknown B1-map vendor {vendor!r}; choose one of {list(B1_MAP_VENDORS)}"
        )
    vals = np.asarray(values, dtype=np.float64)
    grid = SimpleNamespace(shape=vals.shape, affine=np.asarray(affine, dtype=np.float64))
    geo = _geometry(grid)  # type: ignore[arg-type]
    body = vals > 0
    anat = np.where(body, 800.0, 0.0) * np.clip(vals, 0, 2)  # a FLASH-like magnitude
    if vendor == "siemens":
        # flip angle x 10 at the nominal 80 deg preparation: 1.0 -> 800
        series = [("anatomical", anat, 1.0, ["ORIGINAL", "PRIMARY", "M", "ND"],
                   "anatomical image"),
                  ("map", vals * 10.0 * _TFL_NOMINAL_DEG, 1.0,
                   ["ORIGINAL", "PRIMARY", "FLIP ANGLE MAP", "ND"],
                   "flip angle map, TraRefAmpl: 251.3 V")]  # fmt: skip
        groups = [[series[0]], [series[1]]]
    elif vendor == "philips":
        groups = [[("ste", anat, 1.0, ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"], ""),
                   ("map", vals * 100.0, 0.1, ["ORIGINAL", "PRIMARY", "B1 MAP", "B1",
                                               "UNSPECIFIED"], "")]]  # fmt: skip
    else:  # ge, unknown: percent, recognised by the description only
        groups = [[("map", vals * 100.0, 0.1, ["ORIGINAL", "PRIMARY", "OTHER"], "")]]
    manufacturer, model = _B1_MANUFACTURER[vendor]
    out: list[Dataset] = []
    for g, images in enumerate(groups):
        series_uid = _uid("synthmr-b1-series", seed, vendor, g, vals.shape)
        base = _base(grid, vendor, series_uid, dict(study), dict(patient or {}))  # type: ignore[arg-type]
        base.Manufacturer, base.ManufacturerModelName = manufacturer, model
        base.FrameOfReferenceUID = frame_of_reference_uid
        base.SeriesNumber = 3 + g
        base.SeriesTime = base.AcquisitionTime = f"0902{g:02d}"
        if vendor == "siemens":
            base.SeriesDescription = base.ProtocolName = "tfl_b1map"
            base.SequenceName = "*tfl2d1_16"
            base.FlipAngle = _ds(_TFL_NOMINAL_DEG)
        elif vendor == "philips":
            base.SeriesDescription = base.ProtocolName = "B1map_DREAM"
            base.FlipAngle = _ds(_TFL_NOMINAL_DEG / 2)
        else:
            base.SeriesDescription = base.ProtocolName = "B1 Map"
            base.FlipAngle = "10"
        n_inst = len(images) * vals.shape[0]
        idx = 0
        for kind, data, slope, image_type, comments in images:
            stored = np.clip(np.rint(data / slope), 0, 65535).astype("<u2")
            for z in range(vals.shape[0]):
                ds = Dataset()
                ds.update(base)
                ds.SOPClassUID = MR_IMAGE
                ds.SOPInstanceUID = _uid(series_uid, kind, z)
                ds.InstanceNumber = idx + 1
                ds.ImagesInAcquisition = n_inst
                ds.ImageType = image_type
                if comments:
                    ds.ImageComments = comments
                ds.ScanningSequence, ds.SequenceVariant = "GR", "SP"
                ds.RepetitionTime, ds.EchoTime = "5000", "2.0"
                ds.SliceThickness = ds.SpacingBetweenSlices = geo["dz"]
                ds.PixelSpacing = geo["spacing"]
                ds.ImageOrientationPatient = geo["iop"]
                ds.ImagePositionPatient = geo["ipp"][z]
                ds.SliceLocation = _ds(geo["slice_loc"][z])
                if slope != 1.0:
                    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slope), "0", "US"
                ds.PixelData = np.ascontiguousarray(stored[z]).tobytes()
                _file_meta(ds)
                out.append(ds)
                idx += 1
    return out


def write_b1_map_series(datasets: Sequence[Dataset], out_dir: str | Path) -> list[Path]:
    """Write B1-map datasets to ``out_dir`` (``IM_00001.dcm`` ...); returns the paths."""
    return write_datasets(list(datasets), out_dir)
