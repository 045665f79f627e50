"""Shared pieces of the export layer: settings, deterministic UIDs, provenance, headers.

Everything here is pure: datasets in, datasets out, no disk or network. The numbers
come from :class:`processing.results.SeriesResult`; this layer only packages them.
"""

from __future__ import annotations

import copy
import datetime as _dt
import enum
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid

from processing._version import __version__
from processing.results import SeriesResult

__all__ = [
    "ALL_MAPS",
    "PRIVATE_CREATOR",
    "SCHEME",
    "ExportError",
    "ExportSettings",
    "MapKind",
    "SegType",
    "SliceGeometry",
    "add_private_provenance",
    "copy_patient_study",
    "derive_uid",
    "frame_headers",
    "frame_number",
    "highdicom_sources",
    "map_array",
    "parameter_fingerprint",
    "provenance_text",
    "reference_images",
    "series_number_base",
    "slice_geometry",
]

#: Coding scheme for the few concepts that have no DCM/SCT/UCUM code.
SCHEME = "99SYNTHMR"
#: Private creator of the (0011,10xx) provenance block written on every output.
PRIVATE_CREATOR = "SYNTHMR 1"
PRIVATE_GROUP = 0x0011


class ExportError(ValueError):
    """The inputs cannot be exported; the message names the problem."""


class SegType(enum.Enum):
    """Segmentation encoding: tissue fractions (OCCUPANCY) or one label per voxel."""

    FRACTIONAL = "FRACTIONAL"
    BINARY = "BINARY"


class MapKind(enum.Enum):
    """Quantitative maps that can be exported (value = short name used in labels)."""

    T1 = "T1"
    T2 = "T2"
    PD = "PD"
    R1 = "R1"
    R2 = "R2"
    B1 = "B1"
    MYPV = "MYPV"
    RESIDUAL = "RESIDUAL"


ALL_MAPS: tuple[MapKind, ...] = tuple(MapKind)


@dataclass(frozen=True)
class ExportSettings:
    """How :func:`dicom_node.export.export_all` packages a result.

    series_number_offset: added to the source SeriesNumber (then + index per output series).
    contrasts: synthetic contrast names to export; None = every one in ``result.synthetic``.
    maps: quantitative maps to export. maps_as_parametric_map / maps_as_mr_images: the
    encodings (Parametric Map IOD, float; classic MR, uint16 + rescale). seg_type:
    FRACTIONAL (OCCUPANCY, 0..255) or BINARY; binary_method: ``"argmax"`` (each
    intracranial voxel gets its dominant tissue) or ``"threshold"`` (fraction >= 0.5).
    uid_root: prefix of every generated UID (must end with a dot).
    """

    series_number_offset: int = 1000
    contrasts: tuple[str, ...] | None = None
    maps: tuple[MapKind, ...] = ALL_MAPS
    maps_as_parametric_map: bool = True
    maps_as_mr_images: bool = False
    export_segmentation: bool = True
    export_report: bool = True
    seg_type: SegType = SegType.FRACTIONAL
    binary_method: str = "argmax"
    institution_name: str = ""
    manufacturer: str = "synthmr"
    manufacturer_model_name: str = "synthmr"
    device_serial_number: str = "0"
    uid_root: str = PYDICOM_ROOT_UID
    orientation_tolerance: float = 1e-4  # snap slice orientations that differ by less (GE)
    position_tolerance_mm: float = 0.5  # result affine vs source geometry

    def __post_init__(self) -> None:
        if not isinstance(self.seg_type, SegType):
            try:
                object.__setattr__(self, "seg_type", SegType(str(self.seg_type).upper()))
            except ValueError:
                raise ExportError(
                    f"seg_type: expected FRACTIONAL or BINARY, got {self.seg_type!r}"
                ) from None
        maps = []
        for m in self.maps:
            try:
                maps.append(m if isinstance(m, MapKind) else MapKind(str(m).upper()))
            except ValueError:
                raise ExportError(
                    f"maps: unknown map {m!r}; known: {[k.value for k in MapKind]}"
                ) from None
        object.__setattr__(self, "maps", tuple(maps))
        if self.contrasts is not None:
            object.__setattr__(self, "contrasts", tuple(self.contrasts))
        if self.binary_method not in ("argmax", "threshold"):
            raise ExportError(
                f"binary_method: expected 'argmax' or 'threshold', got {self.binary_method!r}"
            )
        root = self.uid_root
        if not root.endswith("."):
            root += "."
            object.__setattr__(self, "uid_root", root)
        if len(root) > 40 or not all(p.isdigit() for p in root[:-1].split(".")):
            raise ExportError(
                f"uid_root: must be dotted digits of at most 40 characters, got {self.uid_root!r}"
            )
        if not 0 <= self.series_number_offset < 2**31 - 1000:
            raise ExportError(f"series_number_offset: out of range: {self.series_number_offset}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view (enums as strings), for provenance and UID entropy."""
        d = asdict(self)
        d["maps"] = [m.value for m in self.maps]
        d["seg_type"] = self.seg_type.value
        return d


# --- provenance and UIDs -------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 64 else f"array{obj.shape}"
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


_SELECTION_FIELDS = frozenset(
    {
        "contrasts",
        "maps",
        "maps_as_parametric_map",
        "maps_as_mr_images",
        "export_segmentation",
        "export_report",
    }
)


def parameter_fingerprint(result: SeriesResult, settings: ExportSettings) -> str:
    """sha256 of the processing provenance + export settings (stable across runs).

    Output *selection* (which maps/contrasts/objects) is left out, so exporting one more
    contrast later does not change the UIDs of the outputs already in PACS.
    """
    export = {k: v for k, v in settings.as_dict().items() if k not in _SELECTION_FIELDS}
    payload = json.dumps(
        {"provenance": _jsonable(result.provenance), "export": _jsonable(export)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def derive_uid(
    settings: ExportSettings, source_series_uid: str, fingerprint: str, *parts: str
) -> UID:
    """Deterministic UID: same source series, software version, parameters and output
    identity (``parts``, e.g. ``("PM", "T1")``) give the same UID, so a re-run replaces."""
    return generate_uid(
        prefix=settings.uid_root,
        entropy_srcs=[str(source_series_uid), __version__, fingerprint, *map(str, parts)],
    )


def model_hash(result: SeriesResult) -> str:
    """The ONNX model sha256 recorded by processing (empty when no model ran)."""
    prov = result.provenance
    for key in ("model_sha256", "model_hash", "onnx_sha256"):
        if prov.get(key):
            return str(prov[key])
    enh = prov.get("enhance")
    if isinstance(enh, dict):
        for key in ("model_sha256", "sha256"):
            if enh.get(key):
                return str(enh[key])
    return ""


def provenance_text(result: SeriesResult, settings: ExportSettings, limit: int = 10240) -> str:
    """Human-readable provenance: software, model hash, parameters (JSON), capped."""
    mh = model_hash(result)
    text = (
        f"synthmr {__version__} synthetic MRI (not acquired)."
        + (f" ONNX model sha256 {mh}." if mh else "")
        + " Parameters: "
        + json.dumps(_jsonable(result.provenance), sort_keys=True, separators=(",", ":"))
    )
    return text if len(text) <= limit else text[: limit - 3] + "..."


def add_private_provenance(ds: Dataset, result: SeriesResult, settings: ExportSettings) -> None:
    """Write software version, model hash and full parameters into a private block."""
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", f"synthmr {__version__}")
    block.add_new(0x02, "LO", model_hash(result) or "none")
    block.add_new(
        0x03,
        "UT",
        json.dumps(
            {
                "software_version": __version__,
                "provenance": _jsonable(result.provenance),
                "export": _jsonable(settings.as_dict()),
            },
            sort_keys=True,
        ),
    )


# --- source headers ------------------------------------------------------------------


def _is_image(ds: Dataset) -> bool:
    return "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "Rows" in ds


def _is_magnitude(ds: Dataset) -> bool:
    it = [str(v).upper() for v in ds.get("ImageType", [])]
    if any(v in ("P", "PHASE", "R", "REAL", "I", "IMAGINARY") for v in it[2:]):
        return False
    ge = ds.get((0x0043, 0x102F))  # GE complex part: 0 magnitude
    if ge is not None:
        try:
            return int(ge.value) == 0
        except (TypeError, ValueError):
            return True
    return True


def _normal(ds: Dataset) -> np.ndarray:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


_FRAME_NUMBER_ATTR = "_synthmr_frame_number"


def _fg(ds: Dataset, frame: Dataset, seq: str) -> Dataset | None:
    """A functional-group macro item: per-frame first, else shared."""
    if seq in frame:
        return frame[seq].value[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and seq in shared[0]:
        return shared[0][seq].value[0]
    return None


def frame_headers(ds: Dataset) -> list[Dataset]:
    """Enhanced MR: one single-frame-like header per frame (pixel data left out).

    Each header keeps the instance's SOP Class/Instance UID, with the frame's plane
    position/orientation, pixel spacing, echo time and complex component, and
    remembers its frame number (used for ReferencedFrameNumber).
    """
    skip = {0x52009229, 0x52009230, 0x7FE00010, 0x00280008}
    base = Dataset()
    for elem in ds:
        if int(elem.tag) not in skip and elem.tag.group != 0x7FE0:
            base.add(copy.deepcopy(elem))
    out = []
    for i, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        pos = _fg(ds, frame, "PlanePositionSequence")
        ori = _fg(ds, frame, "PlaneOrientationSequence")
        meas = _fg(ds, frame, "PixelMeasuresSequence")
        if pos is None or ori is None or meas is None:
            raise ExportError(
                f"Enhanced MR {ds.SOPInstanceUID}: frame {i} lacks plane position, "
                "orientation or pixel measures"
            )
        h = copy.deepcopy(base)
        h.ImagePositionPatient = pos.ImagePositionPatient
        h.ImageOrientationPatient = ori.ImageOrientationPatient
        h.PixelSpacing = meas.PixelSpacing
        if "SliceThickness" in meas:
            h.SliceThickness = meas.SliceThickness
        echo = _fg(ds, frame, "MREchoSequence")
        if echo is not None and "EffectiveEchoTime" in echo:
            h.EchoTime = echo.EffectiveEchoTime
        ftype = _fg(ds, frame, "MRImageFrameTypeSequence")
        if ftype is not None:
            h.ImageType = ftype.get("FrameType", ds.get("ImageType", []))
            part = str(ftype.get("ComplexImageComponent", "MAGNITUDE")).upper()
            if part != "MAGNITUDE" and len(h.ImageType) > 2:
                h.ImageType = [*list(h.ImageType)[:2], "P", *list(h.ImageType)[3:]]
        content = _fg(ds, frame, "FrameContentSequence")
        if content is not None and "TemporalPositionIndex" in content:
            h.TemporalPositionIdentifier = content.TemporalPositionIndex
        object.__setattr__(h, _FRAME_NUMBER_ATTR, i)
        out.append(h)
    return out


def frame_number(ds: Dataset) -> int | None:
    """The source frame a reference header stands for (Enhanced MR), else None."""
    return getattr(ds, _FRAME_NUMBER_ATTR, None)


def reference_images(sources: Sequence[Dataset]) -> list[Dataset]:
    """One source image per slice, sorted by position along the slice normal (ascending).

    Result z index 0 is the slice with the smallest position, as in normalization. Per
    slice it prefers a magnitude image with the shortest TE and delay. Enhanced MR
    (multi-frame) sources are expanded into per-frame headers (:func:`frame_headers`);
    outputs then reference the instance and its frame number.
    """
    images: list[Dataset] = []
    for ds in sources:
        if "PerFrameFunctionalGroupsSequence" in ds:
            images += frame_headers(ds)
        elif _is_image(ds):
            images.append(ds)
    if not images:
        raise ExportError(
            "reference_images: no source image has ImagePositionPatient, "
            "ImageOrientationPatient and Rows"
        )
    uids = {str(ds.SeriesInstanceUID) for ds in images}
    if len(uids) != 1:
        raise ExportError(f"reference_images: sources span {len(uids)} series: {sorted(uids)}")
    normal = _normal(images[0])
    groups: dict[float, list[Dataset]] = {}
    for ds in images:
        pos = float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal))
        key = round(pos, 2)  # 0.01 mm bins: the same slice in different delays/echoes
        groups.setdefault(key, []).append(ds)

    def rank(ds: Dataset) -> tuple[float, ...]:
        delay = ds.get("InversionTime", None) or ds.get("TemporalPositionIdentifier", 0) or 0
        return (
            0.0 if _is_magnitude(ds) else 1.0,
            float(ds.get("EchoTime", 0) or 0),
            float(delay),
            float(ds.get("InstanceNumber", 0) or 0),
            float(frame_number(ds) or 0),
        )

    return [min(groups[k], key=rank) for k in sorted(groups)]


@dataclass(frozen=True)
class SliceGeometry:
    """Geometry shared by all outputs: one entry per result z index."""

    refs: list[Dataset]  # header-only copies of reference images (orientation snapped)
    orientation: tuple[float, ...]  # ImageOrientationPatient, 6 values
    positions: list[tuple[float, float, float]]  # ImagePositionPatient per slice
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    slice_thickness: float
    spacing_between_slices: float
    rows: int
    columns: int
    extra: dict[str, Any] = field(default_factory=dict)


def slice_geometry(
    result: SeriesResult, sources: Sequence[Dataset], settings: ExportSettings
) -> SliceGeometry:
    """Reference images matched to the result grid, with consistency checks."""
    refs = reference_images(sources)
    nz, ny, nx = (int(v) for v in result.shape)
    if len(refs) != nz:
        raise ExportError(
            f"source geometry: {len(refs)} distinct slice positions in the sources, "
            f"but the result has {nz} slices"
        )
    first = refs[0]
    if (int(first.Rows), int(first.Columns)) != (ny, nx):
        raise ExportError(
            f"source geometry: images are {first.Rows}x{first.Columns} (rows x columns), "
            f"result is {ny}x{nx}"
        )
    iop0 = np.asarray(first.ImageOrientationPatient, dtype=float)
    headers: list[Dataset] = []
    for ds in refs:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        if np.max(np.abs(iop - iop0)) > settings.orientation_tolerance:
            raise ExportError(
                f"source geometry: slice orientation {iop.tolist()} of "
                f"{ds.SOPInstanceUID} differs from {iop0.tolist()}"
            )
        if (int(ds.Rows), int(ds.Columns)) != (ny, nx):
            raise ExportError(f"source geometry: image {ds.SOPInstanceUID} has another size")
        h = Dataset()
        for elem in ds:
            if elem.tag.group in (0x7FE0,) or elem.tag == 0x00280301:
                continue
            h.add(copy.deepcopy(elem))
        h.ImageOrientationPatient = [float(v) for v in iop0]  # snap (GE ~1e-8 jitter)
        h.file_meta = copy.deepcopy(getattr(ds, "file_meta", Dataset()))
        if frame_number(ds) is not None:
            object.__setattr__(h, _FRAME_NUMBER_ATTR, frame_number(ds))
        headers.append(h)
    positions = [tuple(float(v) for v in ds.ImagePositionPatient) for ds in refs]
    # The result's own affine must put voxel (0,0,0) at the first reference slice, or the
    # z order (or the geometry) disagrees with what normalization produced.
    aff = np.asarray(result.affine, dtype=float)
    if aff.shape == (4, 4) and np.all(np.isfinite(aff)):
        for z in (0, nz - 1):
            expect = aff[:3, 3] + aff[:3, 2] * z
            if np.linalg.norm(expect - np.asarray(positions[z])) > settings.position_tolerance_mm:
                raise ExportError(
                    f"source geometry: result affine puts slice {z} at {expect.round(3).tolist()}"
                    f" but the source slice is at {list(positions[z])} (z order or geometry mismatch)"
                )
    normal = np.cross(iop0[:3], iop0[3:])
    locs = [float(np.dot(p, normal)) for p in positions]
    spacing = float(np.median(np.diff(locs))) if nz > 1 else float(result.voxel_size_mm[0])
    ps = tuple(float(v) for v in first.PixelSpacing)
    # Enhanced MR: highdicom wants the multi-frame instances themselves (header only)
    used = {str(ds.SOPInstanceUID) for ds in refs if frame_number(ds) is not None}
    instances = [
        _strip_pixels(ds)
        for ds in sources
        if "PerFrameFunctionalGroupsSequence" in ds and str(ds.SOPInstanceUID) in used
    ]
    return SliceGeometry(
        refs=headers,
        orientation=tuple(float(v) for v in iop0),
        positions=positions,
        pixel_spacing=(ps[0], ps[1]),
        slice_thickness=float(first.get("SliceThickness", spacing) or spacing),
        spacing_between_slices=spacing,
        rows=ny,
        columns=nx,
        extra={"enhanced_instances": instances},
    )


def _strip_pixels(ds: Dataset) -> Dataset:
    h = Dataset()
    for elem in ds:
        if elem.tag.group != 0x7FE0:
            h.add(copy.deepcopy(elem))
    h.file_meta = copy.deepcopy(getattr(ds, "file_meta", Dataset()))
    return h


def highdicom_sources(geometry: SliceGeometry) -> tuple[list[Dataset], list[Dataset]]:
    """(source_images, further_source_images) for highdicom's PM/SEG constructors.

    Classic sources: the per-slice headers. Enhanced MR: highdicom accepts exactly one
    multi-frame source, so the first instance is the source and the rest are "further"
    sources (Siemens XA writes one multi-frame file per slice).
    """
    inst = geometry.extra.get("enhanced_instances") or []
    if not inst:
        return list(geometry.refs), []
    return [inst[0]], list(inst[1:])


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
