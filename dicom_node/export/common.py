"""Shared header pieces of the export layer: patient/study copy, series numbers, map arrays
and their codes. Settings, UIDs and geometry live in :mod:`.settings`, :mod:`.uids` and
:mod:`.geometry`.

Everything here is pure: datasets in, datasets out, no disk or network. The numbers
come from :class:`processing.results.SeriesResult`; this layer only packages them.
"""

from __future__ import annotations

import copy
import datetime as _dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from pydicom.valuerep import DSfloat

from processing._version import __version__
from processing.results import SeriesResult

from .settings import SCHEME, ExportError, ExportSettings, MapKind

__all__ = [
    "MAP_INFO",
    "PATIENT_STUDY_KEYWORDS",
    "copy_patient_study",
    "decimal_string",
    "first_or",
    "map_array",
    "now_da_tm",
    "robust_window",
    "series_number_base",
    "set_equipment",
    "set_mr_series",
    "set_pixel_module_16",
]

PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "OtherPatientIDsSequence",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "PatientComments",
)


def copy_patient_study(dst: Dataset, src: Dataset) -> None:
    """Copy the Patient and General Study modules (and the character set) from src."""
    for kw in PATIENT_STUDY_KEYWORDS:
        if kw in src:
            setattr(dst, kw, copy.deepcopy(src[kw].value))
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        if kw not in dst:
            setattr(dst, kw, "")  # Type 2
    for kw in ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if kw not in dst:
            setattr(dst, kw, "")


def series_number_base(ref: Dataset, settings: ExportSettings) -> int:
    """Source SeriesNumber + offset (the first output series number)."""
    try:
        src = int(ref.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        src = 0
    return src + settings.series_number_offset


def now_da_tm() -> tuple[str, str]:
    now = _dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def new_instance(ref: Dataset, sop_class: str, sop_uid: str) -> Dataset:
    """A new Part-10 instance of ``sop_class``: file meta (Explicit VR Little Endian),
    the patient and study attributes of ``ref``, SOP class/instance and creation date/time."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    copy_patient_study(ds, ref)
    da, tm = now_da_tm()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = da, tm
    return ds


def decimal_string(value: float) -> DSfloat:
    """A DS value that fits the 16-character limit."""
    return DSfloat(float(value), auto_format=True)


def set_equipment(ds: Dataset, settings: ExportSettings) -> None:
    """General Equipment: this software made the instance."""
    ds.Manufacturer = settings.manufacturer
    ds.ManufacturerModelName = settings.manufacturer_model_name
    ds.DeviceSerialNumber = settings.device_serial_number
    ds.SoftwareVersions = f"synthmr {__version__}"
    if settings.institution_name:
        ds.InstitutionName = settings.institution_name


def set_mr_series(
    ds: Dataset, ref: Dataset, series_uid: str, series_number: int, description: str
) -> None:
    """General Series (an MR series started when the instance was created), Frame of
    Reference and the patient position / body part / protocol of ``ref`` (Laterality,
    which the classic and enhanced IODs treat differently, is the caller's)."""
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description[:64]
    ds.SeriesDate, ds.SeriesTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.PatientPosition = ref.get("PatientPosition", "")  # Type 2C for MR
    for kw in ("BodyPartExamined", "ProtocolName"):
        if kw in ref:
            setattr(ds, kw, ref[kw].value)
    ds.FrameOfReferenceUID = ref.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ref.get("PositionReferenceIndicator", "")


def set_pixel_module_16(ds: Dataset, rows: int, columns: int, signed: bool) -> None:
    """Image Pixel module of 16-bit grey images (signed: two's complement)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(rows), int(columns)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0


def map_array(result: SeriesResult, kind: MapKind) -> np.ndarray:
    """The float32 ``[z, y, x]`` array of a map, non-finite values set to 0."""
    m = result.maps
    if kind is MapKind.T1:
        arr = m.t1_ms
    elif kind is MapKind.T2:
        arr = m.t2_ms
    elif kind is MapKind.PD:
        arr = m.pd_pu
    elif kind is MapKind.R1:
        arr = m.r1_per_s
    elif kind is MapKind.R2:
        arr = m.r2_per_s
    elif kind is MapKind.B1:
        arr = m.b1
    elif kind is MapKind.RESIDUAL:
        arr = m.residual
    elif kind is MapKind.MYPV:
        if result.myelin is None:
            raise ExportError("maps: MYPV requested but the result has no myelin maps")
        arr = result.myelin.mypv
    else:  # pragma: no cover - enum is closed
        raise ExportError(f"maps: unknown map {kind}")
    arr = np.asarray(arr, dtype=np.float32)
    if arr.shape != tuple(result.shape):
        raise ExportError(
            f"maps: {kind.value} has shape {arr.shape}, result shape is {result.shape}"
        )
    return np.where(np.isfinite(arr), arr, np.float32(0)).astype(np.float32)


@dataclass(frozen=True)
class MapInfo:
    """Coded meaning of a quantitative map."""

    label: str  # short, <= 16 chars
    description: str
    quantity: Code
    unit: Code
    image_type_token: str  # MR-image ImageType value 3, e.g. "T1MAP"


UCUM_MS = Code("ms", "UCUM", "millisecond")
UCUM_PER_S = Code("/s", "UCUM", "per second")
UCUM_PERCENT = Code("%", "UCUM", "percent")
UCUM_RATIO = Code("{ratio}", "UCUM", "ratio")
UCUM_ONE = Code("1", "UCUM", "no units")
UCUM_ML = Code("ml", "UCUM", "milliliter")

MAP_INFO: dict[MapKind, MapInfo] = {
    MapKind.T1: MapInfo(
        "T1_ms", "T1 relaxation time", Code("113063", "DCM", "T1"), UCUM_MS, "T1MAP"
    ),
    MapKind.T2: MapInfo(
        "T2_ms", "T2 relaxation time", Code("113065", "DCM", "T2"), UCUM_MS, "T2MAP"
    ),
    MapKind.PD: MapInfo(
        "PD_pu",
        "Proton density, percent of pure water",
        Code("113058", "DCM", "Proton Density"),
        UCUM_PERCENT,
        "PDMAP",
    ),
    MapKind.R1: MapInfo(
        "R1_per_s", "R1 relaxation rate", Code("126393", "DCM", "R1"), UCUM_PER_S, "R1MAP"
    ),
    MapKind.R2: MapInfo(
        "R2_per_s", "R2 relaxation rate", Code("126394", "DCM", "R2"), UCUM_PER_S, "R2MAP"
    ),
    MapKind.B1: MapInfo(
        "B1_ratio",
        "B1 flip-angle ratio (actual/nominal)",
        Code("B1RATIO", SCHEME, "B1 flip angle ratio"),
        UCUM_RATIO,
        "B1MAP",
    ),
    MapKind.MYPV: MapInfo(
        "MYPV_pct",
        "Myelin partial volume, percent of voxel",
        Code("MYPV", SCHEME, "Myelin partial volume"),
        UCUM_PERCENT,
        "MYELINMAP",
    ),
    MapKind.RESIDUAL: MapInfo(
        "RESIDUAL",
        "RMS fit residual per sample, signal units",
        Code("FITRESID", SCHEME, "MDME fit residual"),
        UCUM_ONE,
        "RESIDUALMAP",
    ),
}


def robust_window(values: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """Display window (center, width) from the 1st..99th percentile of masked values."""
    v = values[mask] if mask is not None and mask.any() else values.ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = (float(x) for x in np.percentile(v, [1, 99]))
    width = max(hi - lo, 1e-6)
    return (lo + hi) / 2.0, width


def first_or(values: Iterable[Any], default: Any) -> Any:
    for v in values:
        return v
    return default
