"""Source geometry of an export: reference images per slice, matched to the result grid.

:func:`slice_geometry` runs once per export (:func:`dicom_node.export.export_all`) and its
:class:`SliceGeometry` is passed to every builder.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from processing.results import SeriesResult

from .settings import ExportError, ExportSettings

__all__ = [
    "SliceGeometry",
    "frame_headers",
    "frame_number",
    "highdicom_charset",
    "highdicom_sources",
    "reference_images",
    "slice_geometry",
    "with_frame_number",
]


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
        # A shallow copy: the elements below are replaced, never changed in place, and
        # slice_geometry deep-copies the headers it keeps (a deep copy of the instance's
        # header per frame cost ~10 s for the 880 frames of a 1 mm QALAS series).
        h = Dataset()
        h.update(base)
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


def with_frame_number(ds: Dataset, number: int | None) -> Dataset:
    """``ds`` remembering that it stands for frame ``number`` of its (Enhanced MR) instance:
    a header read back from disk (dicom_node.seriesstore) gets its frame back this way."""
    if number is not None:
        object.__setattr__(ds, _FRAME_NUMBER_ATTR, int(number))
    return ds


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


def highdicom_charset(geometry: SliceGeometry) -> dict[str, Any]:
    """``specific_character_set`` for highdicom's PM/SEG/SR constructors where the source's
    cannot be taken as it is: highdicom refuses an empty value, which DICOM reads as the
    default repertoire (written by many scanners; then none is given), and an empty first
    of several values, the default repertoire with code extensions (PS3.3 C.12.1.1.2, e.g.
    ``\\ISO 2022 IR 87`` from Japanese sites; then written out as ``ISO 2022 IR 6``).
    Otherwise nothing: highdicom copies the source's own."""
    value = geometry.refs[0].get("SpecificCharacterSet") if geometry.refs else None
    if value is None:
        return {}
    values = [value] if isinstance(value, str) else [str(v) for v in value]
    if not any(v.strip() for v in values):
        return {"specific_character_set": None}
    if len(values) > 1 and not values[0].strip():
        return {"specific_character_set": ["ISO 2022 IR 6", *values[1:]]}
    return {}


def plane_arguments(geometry: SliceGeometry) -> dict[str, Any]:
    """``plane_orientation``, ``plane_positions`` and ``pixel_measures`` for highdicom's
    PM/SEG constructors: every frame on the source's slice grid (patient LPS, mm)."""
    return {
        "plane_orientation": hd.PlaneOrientationSequence(
            coordinate_system="PATIENT", image_orientation=geometry.orientation
        ),
        "plane_positions": [
            hd.PlanePositionSequence(coordinate_system="PATIENT", image_position=p)
            for p in geometry.positions
        ],
        "pixel_measures": hd.PixelMeasuresSequence(
            pixel_spacing=geometry.pixel_spacing,
            slice_thickness=geometry.slice_thickness,
            spacing_between_slices=geometry.spacing_between_slices,
        ),
    }
