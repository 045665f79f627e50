"""Scanner emulator: write an :class:`~processing.acquisition.Acquisition` as a vendor-
flavoured MDME DICOM series (for the demo and the tests).

Layouts (:data:`VENDOR_LAYOUTS`) and where each puts the saturation delay, so that every
fallback of the vendor rules is exercised:

=====================  ==============  ==========================================  ================
layout                 SOP class       delay                                       complex part
=====================  ==============  ==========================================  ================
``ge``                 MR Image        InversionTime (TriggerTime = slice timing)  (0043,102F)
``siemens``            MR Image        TriggerTime                                 ImageType M / P
``siemens_xa_enhanced`` Enhanced MR    none: interleave TD = TR/n_slices*dynamic    ComplexImageComponent
                       (file/slice)    (per-frame InversionTimes only when the
                                       delays are not on that grid)
``philips``            MR Image        private (2001,101B)                         ImageType M / P
``philips_enhanced``   Enhanced MR     private per-frame (2005,140F)/(2001,101B)   ComplexImageComponent
=====================  ==============  ==========================================  ================

Quantization is shared by all layouts so the normalized floats agree: magnitude stored as
``round(|S| / q)`` with ``q`` a power of two, phase in integer milliradians. Each layout
encodes those integers its own way (RescaleSlope/Intercept, Siemens 12-bit phase units,
Philips floating-point scale ``FP = (SV*RS + RI)/(RS*SS)`` with RS varying per slice and
dynamic). With phase, the emulator adds a smooth background phase ``phi`` and writes
``|S|`` and ``angle(S*exp(i*phi))``: normalization must remove it to recover the signed
signal. All patient/study data is fictional; UIDs are deterministic from ``seed`` (``2.25.`` + hash).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from processing._version import __version__
from processing.acquisition import Acquisition

__all__ = ["VENDOR_LAYOUTS", "EmulatorError", "make_datasets", "write_series"]

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
PHASE_OFFSET = 3142  # stored phase value 0 = -3142 mrad
_MAX_SV = 65000

#: layout name -> one-line description.
VENDOR_LAYOUTS: dict[str, str] = {
    "ge": "GE MAGiC, classic MR; delay in InversionTime; part in (0043,102F)",
    "siemens": "Siemens VE11 classic MR, SequenceName *mdme2d1; delay in TriggerTime",
    "siemens_xa_enhanced": "Siemens XA Enhanced MR, one file per slice; delay only from the interleave",
    "philips": "Philips classic MR (SyntAc); delay in (2001,101B); float scale (2005,100E)",
    "philips_enhanced": "Philips Enhanced MR, one file; per-frame groups + private (2005,140F)",
}


class EmulatorError(ValueError):
    """The acquisition cannot be written in the requested layout (message says why)."""


def _ds(v: float) -> str:
    return format_number_as_ds(float(v))


def _uid(*parts: Any) -> str:
    # pydicom's generate_uid(prefix=None) ignores entropy_srcs (random UUID4): hash instead,
    # as a 2.25 (UUID-derived) UID, so the same seed gives the same UIDs.
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _geometry(acq: Acquisition) -> dict[str, Any]:
    aff = np.asarray(acq.affine, dtype=np.float64)
    dx, dy, dz = (float(np.linalg.norm(aff[:3, i])) for i in range(3))
    row, col, nrm = aff[:3, 0] / dx, aff[:3, 1] / dy, aff[:3, 2] / dz
    if float(np.dot(np.cross(row, col), nrm)) <= 0:
        raise EmulatorError(
            "affine: slice direction (column 2) must point along cross(row, column) "
            "(a right-handed affine); flip the slice order first"
        )
    nz = acq.shape[0]
    ipp = [aff[:3, 3] + z * aff[:3, 2] for z in range(nz)]
    return {
        "iop": [_ds(v) for v in (*row, *col)],
        "ipp": [[_ds(v) for v in p] for p in ipp],
        "slice_loc": [float(np.dot(p, np.cross(row, col))) for p in ipp],
        "spacing": [_ds(dy), _ds(dx)],
        "dz": _ds(dz),
    }


def _quantize(
    acq: Acquisition, with_phase: bool, seed: int
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Stored magnitude [z,d,e,y,x] uint16, stored phase (or None) and magnitude step q."""
    s = np.asarray(acq.signal, dtype=np.float64)
    mag = np.abs(s)
    peak = float(mag.max())
    q = 2.0 ** math.ceil(math.log2(peak / _MAX_SV)) if peak > 0 else 1.0
    sv_m = np.rint(mag / q).astype(np.uint16)
    if not with_phase:
        return sv_m, None, q
    # smooth background phase per slice and echo (coil / B0 phase): linear + quadratic
    rng = np.random.default_rng(seed)
    nz, _, ne, ny, nx = s.shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    phi = np.empty((nz, 1, ne, ny, nx))
    for z in range(nz):
        a, b, c, d0 = rng.uniform(-1.5, 1.5, 4)
        for e in range(ne):
            phi[z, 0, e] = d0 + 0.4 * e + a * xx + b * yy + c * (xx**2 + yy**2)
    ph = np.angle(s * np.exp(1j * phi))
    k = np.clip(np.rint(ph * 1000.0), -PHASE_OFFSET, PHASE_OFFSET).astype(np.int64)
    return sv_m, (k + PHASE_OFFSET).astype(np.uint16), q


def _base(acq: Acquisition, layout: str, series_uid: str, study: dict, patient: dict) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Modality = "MR"
    ds.PatientName = patient.get("PatientName", "SYNTHMR^PHANTOM")
    ds.PatientID = patient.get("PatientID", "SYNTHMR-PHANTOM-0001")
    ds.PatientBirthDate = patient.get("PatientBirthDate", "19700101")
    ds.PatientSex = patient.get("PatientSex", "O")
    ds.StudyInstanceUID = study["StudyInstanceUID"]
    ds.StudyID = study.get("StudyID", "1")
    ds.StudyDate = study.get("StudyDate", "20260101")
    ds.StudyTime = study.get("StudyTime", "090000")
    ds.AccessionNumber = study.get("AccessionNumber", "SYNTH0001")
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study.get("StudyDescription", "SYNTHMR phantom study")
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 5
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = "090500"
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = "090500"
    ds.FrameOfReferenceUID = _uid(series_uid, "for")
    ds.PositionReferenceIndicator = ""
    ds.InstitutionName = "SYNTHMR emulator"
    ds.StationName = "SYNTHMR"
    ds.SoftwareVersions = f"synthmr {__version__}"
    ds.DeviceSerialNumber = "0000"
    ds.MagneticFieldStrength = "3"
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    ds.MRAcquisitionType = "2D"
    ds.ImagingFrequency = "127.74"
    ds.ImagedNucleus = "1H"
    ds.Rows, ds.Columns = acq.shape[1], acq.shape[2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    return ds


def _file_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid("synthmr", __version__)
    meta.ImplementationVersionName = f"SYNTHMR_{__version__}"[:16]
    ds.file_meta = meta


_VENDOR = {
    "ge": ("GE MEDICAL SYSTEMS", "SIGNA Premier (emulated)", "MAGiC (synthetic phantom)"),
    "siemens": ("SIEMENS", "MAGNETOM Vida (emulated)", "MDME (synthetic phantom)"),
    "siemens_xa_enhanced": ("SIEMENS", "MAGNETOM Vida (emulated)", "MDME (synthetic phantom)"),
    "philips": ("Philips", "Ingenia (emulated)", "SyntAc (synthetic phantom)"),
    "philips_enhanced": ("Philips", "Ingenia (emulated)", "SyntAc (synthetic phantom)"),
}


def _interleave_offsets(acq: Acquisition) -> list[int] | None:
    """Dynamic offsets k with TD = TR/n_slices * k, or None when the delays are off-grid."""
    step = acq.tr_ms / acq.shape[0]
    ks = [d / step for d in acq.delays_ms]
    if all(abs(k - round(k)) < 1e-6 and round(k) > 0 for k in ks):
        return [round(k) for k in ks]
    return None


def make_datasets(
    acq: Acquisition,
    layout: str,
    *,
    with_phase: bool = True,
    seed: int = 0,
    patient: Mapping[str, str] | None = None,
    study: Mapping[str, str] | None = None,
) -> list[Dataset]:
    """The series as pydicom Datasets (with file meta), in the vendor ``layout``.

    ``with_phase``: write magnitude + phase (the signed signal must then be recovered by
    phase correction), else magnitude only. ``patient``/``study``: attribute overrides
    (keywords). UIDs derive from ``seed``, the layout and the phase option.
    """
    if layout not in VENDOR_LAYOUTS:
        raise EmulatorError(f"unknown layout {layout!r}; choose one of {sorted(VENDOR_LAYOUTS)}")
    if not isinstance(acq, Acquisition):
        raise EmulatorError(f"expected an Acquisition, got {type(acq).__name__}")
    patient = dict(patient or {})
    study = dict(study or {})
    study.setdefault("StudyInstanceUID", _uid("synthmr-study", seed))
    series_uid = _uid("synthmr-series", seed, layout, with_phase, acq.signal.shape)
    geo = _geometry(acq)
    sv_m, sv_p, q = _quantize(acq, with_phase, seed)
    parts = ["M", "P"] if with_phase else ["M"]
    base = _base(acq, layout, series_uid, study, patient)
    base.Manufacturer, base.ManufacturerModelName, base.SeriesDescription = _VENDOR[layout]
    base.ProtocolName = base.SeriesDescription.split(" ")[0]
    build = _enhanced if layout.endswith("_enhanced") else _classic
    return build(acq, layout, base, geo, sv_m, sv_p, q, parts, seed)


def _philips_rs(seed: int, nz: int, nd: int) -> np.ndarray:
    """Philips display rescale slope RS per (slice, dynamic): differs, FP must not."""
    return np.round(np.random.default_rng(seed + 7).uniform(0.7, 2.5, (nz, nd)), 6)


def _classic(acq, layout, base, geo, sv_m, sv_p, q, parts, seed) -> list[Dataset]:
    nz, nd, ne = acq.shape[0], acq.n_delays, acq.n_echoes
    n_total = nz * nd * ne * len(parts)
    rs = _philips_rs(seed, nz, nd)
    out: list[Dataset] = []
    order = np.random.default_rng(seed + 3).permutation(n_total) + 1  # Philips: random order
    idx = 0
    for z in range(nz):
        for d in range(nd):
            for e in range(ne):
                for part in parts:
                    ds = Dataset()
                    ds.update(base)
                    ds.SOPClassUID = MR_IMAGE
                    ds.SOPInstanceUID = _uid(base.SeriesInstanceUID, z, d, e, part)
                    ds.InstanceNumber = int(order[idx]) if layout == "philips" else idx + 1
                    ds.AcquisitionNumber = 1
                    ds.ImagesInAcquisition = n_total
                    # IR makes InversionTime legal, PPG makes TriggerTime legal (dciodvfy)
                    ds.ScanningSequence = ["SE", "IR"] if layout == "ge" else "SE"
                    ds.SequenceVariant = "SK"
                    ds.ScanOptions = ["SAT", "PPG"] if layout != "philips" else "SAT"
                    ds.RepetitionTime = _ds(acq.tr_ms)
                    ds.EchoTime = _ds(acq.echo_times_ms[e])
                    ds.EchoNumbers = e + 1
                    ds.EchoTrainLength = ne
                    ds.FlipAngle = _ds(acq.excitation_deg)
                    ds.SliceThickness = geo["dz"]
                    ds.SpacingBetweenSlices = geo["dz"]
                    ds.PixelSpacing = geo["spacing"]
                    ds.ImageOrientationPatient = geo["iop"]
                    ds.ImagePositionPatient = geo["ipp"][z]
                    ds.SliceLocation = _ds(geo["slice_loc"][z])
                    sv = sv_m[z, d, e] if part == "M" else sv_p[z, d, e]
                    delay = float(acq.delays_ms[d])
                    if part == "M":
                        slope, icpt = q, 0.0
                    else:
                        slope, icpt = 1.0, -float(PHASE_OFFSET)  # -> milliradians
                    if layout == "ge":
                        ds.ImageType = ["ORIGINAL", "PRIMARY", "MAGIC", "OTHER"]
                        ds.InversionTime = _ds(delay)
                        # GE writes slice timing here: the rule must not trust it
                        ds.TriggerTime = _ds(z * acq.tr_ms / nz)
                        blk = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
                        blk.add_new(0x2F, "SS", 0 if part == "M" else 1)
                    elif layout == "siemens":
                        ds.ImageType = ["ORIGINAL", "PRIMARY", part, "ND"]
                        ds.SequenceName = "*mdme2d1"
                        ds.TriggerTime = _ds(delay)
                        if part == "P":  # Siemens phase units: pi/4096 rad
                            slope = 4.096 / math.pi
                            icpt = -PHASE_OFFSET * slope
                    else:  # philips classic
                        word = "M_SE" if part == "M" else "P_SE"
                        ds.ImageType = ["ORIGINAL", "PRIMARY", word, part, "SE"]
                        ds.TemporalPositionIdentifier = d + 1
                        ds.NumberOfTemporalPositions = nd
                        ss = 1.0 / q
                        if part == "M":
                            slope, icpt = float(rs[z, d]), 0.0
                        else:
                            ss = 1.0
                        _philips_private(ds, delay, nz, nd, ne, z, ss, part)
                    ds.RescaleSlope = _ds(slope)
                    ds.RescaleIntercept = _ds(icpt)
                    ds.RescaleType = "US"
                    ds.PixelData = np.ascontiguousarray(sv, dtype="<u2").tobytes()
                    _file_meta(ds)
                    out.append(ds)
                    idx += 1
    return out


def _philips_private(ds: Dataset, delay, nz, nd, ne, z, ss, part) -> None:
    b1 = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
    b1.add_new(0x1B, "FL", float(delay))  # (2001,101B) prepulse delay
    b1.add_new(0x81, "IS", str(nd))  # (2001,1081) number of dynamics
    b1.add_new(0x18, "SL", int(nz))  # (2001,1018) number of slices
    b1.add_new(0x14, "SL", int(ne))  # (2001,1014) number of echoes
    b1.add_new(0x0A, "IS", str(z + 1))  # (2001,100A) slice number
    b5 = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
    b5.add_new(0x0E, "FL", float(ss))  # (2005,100E) scale slope SS
    b5.add_new(0x0D, "FL", 0.0)  # (2005,100D) scale intercept
    b5.add_new(0x11, "CS", part)  # (2005,1011) image type


def _item(**kw: Any) -> Dataset:
    it = Dataset()
    for k, v in kw.items():
        setattr(it, k, v)
    return it


# (index pointer, functional group pointer, label) matching DimensionIndexValues
_DIMENSIONS = (
    (0x00209057, 0x00209111, "In-Stack Position Number"),
    (0x00209128, 0x00209111, "Temporal Position Index"),
    (0x00189082, 0x00189114, "Effective Echo Time"),
    (0x00089208, 0x00189226, "Complex Image Component"),
)


def _modifier(inversion_ms: float | None = None) -> Dataset:
    it = _item(
        InversionRecovery="NO" if inversion_ms is None else "YES",
        FlowCompensation="NONE",
        Spoiling="NONE",
        T2Preparation="NO",
        SpectrallySelectedExcitation="NONE",
        SpatialPresaturation="NONE",
        PartialFourier="NO",
        ParallelAcquisition="NO",
    )
    if inversion_ms is not None:
        it.InversionTimes = [float(inversion_ms)]
    return it


def _enhanced(acq, layout, base, geo, sv_m, sv_p, q, parts, seed) -> list[Dataset]:
    nz, nd, ne = acq.shape[0], acq.n_delays, acq.n_echoes
    xa = layout == "siemens_xa_enhanced"
    offsets = _interleave_offsets(acq) if xa else None
    rs = _philips_rs(seed, nz, nd)
    if xa:
        groups = [
            [(z, d, e, p) for d in range(nd) for e in range(ne) for p in parts] for z in range(nz)
        ]
    else:
        groups = [
            [(z, d, e, p) for p in parts for z in range(nz) for d in range(nd) for e in range(ne)]
        ]
    shared = _enhanced_shared(acq, geo)
    per_frame_modifier = xa and offsets is None  # InversionTimes differ per frame
    if not per_frame_modifier:
        shared.MRModifierSequence = DicomSequence([_modifier()])
    dim_uid = _uid(base.SeriesInstanceUID, "dimensions")
    out: list[Dataset] = []
    for gi, cells in enumerate(groups):
        ds = _enhanced_instance(acq, base, xa, parts, gi, len(groups), len(cells), dim_uid)
        ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
        frames = [
            _enhanced_frame(acq, base, geo, xa, offsets, rs, q, parts, c, per_frame_modifier)
            for c in cells
        ]
        pix = [sv_m[z, d, e] if p == "M" else sv_p[z, d, e] for z, d, e, p in cells]
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
        ds.PixelData = np.ascontiguousarray(np.stack(pix), dtype="<u2").tobytes()
        _file_meta(ds)
        out.append(ds)
    return out


def _shared_timing_geometry(
    geo: dict, tr_ms: float, flip_deg: float, echo_train: int, rf_train: int, gradient_train: int
) -> Dataset:
    """A shared functional groups item with the MR timing (RepetitionTime ``tr_ms``, FlipAngle,
    the echo train lengths), pixel measures and plane orientation macros of ``geo``
    (:func:`_geometry`): what the MDME and the QALAS Enhanced MR layouts have in common."""
    return _item(
        MRTimingAndRelatedParametersSequence=DicomSequence(
            [
                _item(
                    RepetitionTime=_ds(tr_ms),
                    FlipAngle=_ds(flip_deg),
                    EchoTrainLength=echo_train,
                    RFEchoTrainLength=rf_train,
                    GradientEchoTrainLength=gradient_train,
                )
            ]
        ),
        PixelMeasuresSequence=DicomSequence(
            [
                _item(
                    PixelSpacing=geo["spacing"],
                    SliceThickness=geo["dz"],
                    SpacingBetweenSlices=geo["dz"],
                )
            ]
        ),
        PlaneOrientationSequence=DicomSequence([_item(ImageOrientationPatient=geo["iop"])]),
    )


def _enhanced_shared(acq, geo: dict) -> Dataset:
    """The functional groups every frame shares: timing, pixel measures, orientation and
    the remaining mandatory Enhanced MR macros."""
    ne = acq.n_echoes
    shared = _shared_timing_geometry(geo, acq.tr_ms, acq.excitation_deg, ne, ne, 0)
    # the remaining mandatory Enhanced MR macros, shared by all frames
    shared.FrameAnatomySequence = DicomSequence(
        [
            _item(
                AnatomicRegionSequence=DicomSequence(
                    [
                        _item(
                            CodeValue="12738006",
                            CodingSchemeDesignator="SCT",
                            CodeMeaning="Brain",
                        )
                    ]
                ),
                FrameLaterality="U",
            )
        ]
    )
    timing = shared.MRTimingAndRelatedParametersSequence[0]
    timing.OperatingModeSequence = DicomSequence(
        [
            _item(OperatingModeType=t, OperatingMode="IEC_NORMAL")
            for t in ("STATIC FIELD", "RF", "GRADIENT")
        ]
    )
    timing.SpecificAbsorptionRateSequence = DicomSequence(
        [_item(SpecificAbsorptionRateDefinition="IEC_HEAD", SpecificAbsorptionRateValue=0.5)]
    )
    shared.MRFOVGeometrySequence = DicomSequence(
        [
            _item(
                InPlanePhaseEncodingDirection="ROW",
                MRAcquisitionFrequencyEncodingSteps=acq.shape[2],
                MRAcquisitionPhaseEncodingStepsInPlane=acq.shape[1],
                PercentSampling="100",
                PercentPhaseFieldOfView="100",
            )
        ]
    )
    shared.MRAveragesSequence = DicomSequence([_item(NumberOfAverages="1")])
    shared.MRImagingModifierSequence = DicomSequence(
        [
            _item(
                PixelBandwidth="200",
                MagnetizationTransfer="NONE",
                BloodSignalNulling="NO",
                Tagging="NONE",
                TransmitterFrequency=127.74,
            )
        ]
    )
    shared.MRReceiveCoilSequence = DicomSequence(
        [
            _item(
                ReceiveCoilName="HEAD 32",
                ReceiveCoilManufacturerName="",
                ReceiveCoilType="MULTICOIL",
                QuadratureReceiveCoil="NO",
                MultiCoilDefinitionSequence=DicomSequence(
                    [_item(MultiCoilElementName="HEAD", MultiCoilElementUsed="YES")]
                ),
            )
        ]
    )
    shared.MRTransmitCoilSequence = DicomSequence(
        [
            _item(
                TransmitCoilName="BODY",
                TransmitCoilManufacturerName="",
                TransmitCoilType="BODY",
            )
        ]
    )
    return shared


def _enhanced_instance(
    acq, base: Dataset, xa: bool, parts, gi: int, n_groups: int, n_frames: int, dim_uid: str
) -> Dataset:
    """The instance-level attributes of one Enhanced MR instance (no frames yet)."""
    ds = Dataset()
    ds.update(base)
    ds.SOPClassUID = ENHANCED_MR
    ds.SOPInstanceUID = _uid(base.SeriesInstanceUID, "enh", gi)
    ds.InstanceNumber = gi + 1
    ds.ImagesInAcquisition = n_groups
    ds.ImageType = ["ORIGINAL", "PRIMARY", "MIXED" if len(parts) > 1 else "M", "NONE"]
    ds.ContentQualification = "PRODUCT"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MIXED" if len(parts) > 1 else "MAGNITUDE"
    ds.AcquisitionContrast = "MIXED"
    ds.AcquisitionDateTime = base.StudyDate + "090500"
    ds.PulseSequenceName = "*mdme2d1" if xa else "SyntAc"
    ds.EchoPulseSequence = "SPIN"
    ds.NumberOfFrames = n_frames
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.MultipleSpinEcho = "YES"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.AcquisitionDuration = round(acq.tr_ms / 1000.0 * 64, 3)
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "YES"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.CardiacSynchronizationTechnique = "NONE"
    ds.RespiratoryMotionCompensationTechnique = "NONE"
    ds.KSpaceFiltering = "NONE"
    ds.NumberOfKSpaceTrajectories = 1
    ds.ResonantNucleus = "1H"
    ds.ApplicableSafetyStandardDescription = "IEC 60601-2-33"
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=dim_uid)])
    ds.DimensionIndexSequence = DicomSequence(
        [
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=ptr,
                FunctionalGroupPointer=grp,
                DimensionDescriptionLabel=label,
            )
            for ptr, grp, label in _DIMENSIONS
        ]
    )
    return ds


def _enhanced_frame(
    acq,
    base: Dataset,
    geo: dict,
    xa: bool,
    offsets,
    rs,
    q: float,
    parts,
    cell,
    per_frame_modifier: bool,
) -> Dataset:
    """The per-frame functional groups of one (slice, delay, echo, part) cell."""
    z, d, e, p = cell
    nz, nd, ne = acq.shape[0], acq.n_delays, acq.n_echoes
    delay = float(acq.delays_ms[d])
    fg = Dataset()
    fg.MREchoSequence = DicomSequence([_item(EffectiveEchoTime=float(acq.echo_times_ms[e]))])
    word = "M" if p == "M" else "P"
    fg.MRImageFrameTypeSequence = DicomSequence(
        [
            _item(
                FrameType=["ORIGINAL", "PRIMARY", word, "NONE"],
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
                ComplexImageComponent="MAGNITUDE" if p == "M" else "PHASE",
                AcquisitionContrast="UNKNOWN",
            )
        ]
    )
    dyn = (offsets[d] if offsets is not None else d + 1) if xa else d + 1
    fg.FrameContentSequence = DicomSequence(
        [
            _item(
                FrameAcquisitionDateTime=base.StudyDate + "090500",
                FrameReferenceDateTime=base.StudyDate + "090500",
                FrameAcquisitionDuration=acq.tr_ms,
                StackID="1",
                InStackPositionNumber=z + 1,
                TemporalPositionIndex=dyn,
                DimensionIndexValues=[z + 1, d + 1, e + 1, parts.index(p) + 1],
            )
        ]
    )
    fg.PlanePositionSequence = DicomSequence([_item(ImagePositionPatient=geo["ipp"][z])])
    if p == "M":
        slope, icpt = (q, 0.0) if xa else (float(rs[z, d]), 0.0)
    elif xa:
        slope = 4.096 / math.pi
        icpt = -PHASE_OFFSET * slope
    else:
        slope, icpt = 1.0, -float(PHASE_OFFSET)
    fg.PixelValueTransformationSequence = DicomSequence(
        [_item(RescaleSlope=_ds(slope), RescaleIntercept=_ds(icpt), RescaleType="US")]
    )
    if per_frame_modifier:
        fg.MRModifierSequence = DicomSequence([_modifier(delay)])
    if not xa:
        priv = Dataset()
        _philips_private(priv, delay, nz, nd, ne, z, 1.0 / q if p == "M" else 1.0, p)
        priv.TemporalPositionIdentifier = d + 1
        fg.add_new(0x20050014, "LO", "Philips MR Imaging DD 005")
        fg.add_new(0x2005140F, "SQ", DicomSequence([priv]))
    return fg


def write_series(
    acq: Acquisition,
    layout: str,
    out_dir: str | Path,
    **kw: Any,
) -> list[Path]:
    """Write :func:`make_datasets` to ``out_dir`` (created) as ``IM_00001.dcm`` ...; returns
    the paths. Keyword arguments go to :func:`make_datasets`."""
    return write_datasets(make_datasets(acq, layout, **kw), out_dir)


def write_datasets(datasets: Sequence[Dataset], out_dir: str | Path) -> list[Path]:
    """Write ``datasets`` to ``out_dir`` (created) as ``IM_00001.dcm`` ...; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i, ds in enumerate(datasets):
        p = out / f"IM_{i + 1:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def layouts() -> Sequence[str]:
    """Layout names, for CLIs."""
    return list(VENDOR_LAYOUTS)
