"""B1-map series (transmit flip-angle maps) as the vendors export them: recognize one, and
read its map images into a :class:`processing.b1map.B1Map` (flip-angle ratio, own grid).

A B1-map series is not processed on its own: the node keeps it and hands it to the fit of
a 3D-QALAS series of the same study (:mod:`dicom_node.b1match`). Every rule below names
its source and how sure it is; a unit the rules do not know is never guessed: the series
is reported (:class:`B1MapUnitError`) and the fit runs with the nominal B1.

=========  =====================================  ===========================  ==========
vendor     which images are the map               value -> flip-angle ratio    confidence
=========  =====================================  ===========================  ==========
Siemens    ``tfl_b1map`` (Chung et al., MRM       actual flip angle x 10 (deg) high
           2010;64:439): two images per slice     for the nominal preparation   (value);
           position, often two series: an         flip in FlipAngle:           medium
           anatomical (FLASH-like) one and the    ``B1 = v / (10 FlipAngle)``  (nominal)
           flip-angle map: ImageType value        (hMRI toolbox
           ``FLIP ANGLE MAP`` or ImageComments    ``calc_tfl_b1map``:
           starting "flip angle map"              ``B1[%] = v*10/FlipAngle``;
                                                  BIDS qMRI appendix TB1TFL:
                                                  "scaled flip angle map")
Philips    DREAM (Nehrke & Boernert, MRM          percent of the nominal flip  medium
           2012;68:1517): the B1 map is an        angle: ``B1 = v / 100``
           image type within the DREAM series     (dual-TR AFI B1 maps are
           (STE/FID images beside it): ImageType  exported "in %" too,
           value ``B1`` / ``B1 MAP``              dcm2niix issue #743); the
                                                  ImageType by analogy with
                                                  the B0 map's ``B0 MAP\\B0``
                                                  (dcm2niix issue #455)
GE         product B1 map (Bloch-Siegert):        percent: ``B1 = v / 100``    low (no
           description "B1 map"; every image      (no public source seen; the  header
           of the series, unless ImageType        plausibility check below     seen)
           names a magnitude image                must pass)
generic    any other manufacturer                 unknown: not used, warning   --
=========  =====================================  ===========================  ==========

Values are the displayed values (stored x RescaleSlope + RescaleIntercept). Siemens VE-line
software may write the readout's excitation angle (< 30 deg) in FlipAngle instead of the
preparation angle (thread spinal-cord-7t/coil-qc-code #18): such a FlipAngle is not used
as the nominal (unknown unit). After conversion the median ratio over the map's object
(values above 20 % of the 99th percentile) must lie in [0.5, 1.6] (a brain at 1.5-7 T);
otherwise the unit is taken as unknown. Recognition: a marker (``tfl_b1``, ``b1map``,
``b1 map``, ``DREAM``, ``flip angle map``) in SeriesDescription / ProtocolName /
SequenceName, or an ImageType value ``FLIP ANGLE MAP`` / ``B1 MAP`` / ``B1``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.vendors.frames import Frame, frame_records
from dicom_node.vendors.normalize import _first_float, _pixels
from processing.b1map import B1Map

__all__ = [
    "B1_MAP_RULES",
    "B1MapUnitError",
    "B1SeriesInfo",
    "b1_series_info",
    "is_b1_map_series",
    "read_b1_map",
]

_MARKER = re.compile(r"tfl_?b1|b1[ _-]?map|\bdream\b|flip angle map", re.IGNORECASE)
_MARKER_TAGS = ("SeriesDescription", "ProtocolName", "SequenceName", "PulseSequenceName")
_MAP_TYPES = {"FLIP ANGLE MAP", "B1 MAP", "B1"}

#: Per-vendor B1-map rules (module docstring: sources and confidence). ``unit``:
#: "tenth_degree_of_nominal" (Siemens), "percent", or None (unknown: not used).
B1_MAP_RULES: dict[str, dict[str, Any]] = {
    "siemens": {
        "unit": "tenth_degree_of_nominal",
        "min_nominal_flip_deg": 30.0,
        "confidence": "high (value x10); medium (nominal = FlipAngle)",
        "source": "hMRI toolbox calc_tfl_b1map; BIDS qMRI TB1TFL; Chung MRM 2010",
    },
    "philips": {
        "unit": "percent",
        "confidence": "medium",
        "source": "Philips DREAM B1 map in percent of nominal (Nehrke MRM 2012); dcm2niix #743",
    },
    "ge": {
        "unit": "percent",
        "confidence": "low (no GE B1-map header seen)",
        "source": "assumption; checked by the plausibility test",
    },
    "generic": {"unit": None, "confidence": "-", "source": "unknown manufacturer"},
}

#: the converted map's median over its object must lie here (flip-angle ratio)
PLAUSIBLE_MEDIAN = (0.5, 1.6)


class B1MapUnitError(ValueError):
    """A B1-map series whose unit (or nominal flip) the rules do not establish."""


def _vendor(ds: Dataset) -> str:
    manu = str(ds.get("Manufacturer", "") or "").lower()
    if "siemens" in manu:
        return "siemens"
    if "philips" in manu:
        return "philips"
    if manu.startswith("ge") or "general electric" in manu:
        return "ge"
    return "generic"


def _image_types(f: Frame) -> set[str]:
    types: set[str] = set()
    for name in ("FrameType", "ImageType"):
        v = f.get(name)
        if v is None:
            continue
        vals = [v] if isinstance(v, str) else list(v)
        for item in vals:
            types.update(p.strip().upper() for p in str(item).split("\\"))
    return types


def _marked(ds: Dataset) -> bool:
    for tag in _MARKER_TAGS:
        v = ds.get(tag)
        if v is not None and _MARKER.search(str(v)):
            return True
    return False


#: derived objects (a synthmr B1 Parametric Map sent back, say) are not scanner B1 maps
_NOT_SCANNER_CLASSES = {"1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.7"}


def is_b1_map_series(datasets: Sequence[Dataset]) -> bool:
    """True when the first instance is part of a B1-map acquisition (map or companion)."""
    if not datasets:
        return False
    first = datasets[0]
    if str(first.get("SOPClassUID", "")) in _NOT_SCANNER_CLASSES:
        return False
    if _marked(first):
        return True
    return bool(_image_types(frame_records([first])[0]) & _MAP_TYPES)


def _is_map_image(f: Frame, vendor: str) -> bool | None:
    """True: a B1-map image; False: a companion (anatomical / STE / FID) image; None:
    the headers do not say (Siemens tfl_b1map without ImageType/ImageComments)."""
    types = _image_types(f)
    if types & _MAP_TYPES:
        return True
    comments = str(f.get("ImageComments") or "").strip().lower()
    if comments.startswith("flip angle map"):
        return True
    if comments.startswith("anatomical"):
        return False
    if vendor == "siemens":
        return None
    if vendor in ("ge", "generic") and not types & {"M", "MAGNITUDE", "M_FFE", "M_SE"}:
        return True
    return False


@dataclass(frozen=True)
class B1SeriesInfo:
    """What the headers of a B1-map series say (no pixels read)."""

    vendor: str
    has_map: bool  # at least one image is the map (False: a companion series only)
    unknown_images: int  # images the headers do not classify
    study_uid: str
    frame_of_reference_uid: str
    series_uid: str
    description: str
    acquisition_time_s: float | None  # seconds of the day (AcquisitionTime / SeriesTime)


def _seconds(text: Any) -> float | None:
    s = str(text or "").strip()
    if len(s) < 4 or not s[:4].isdigit():
        return None
    try:
        hh, mm = int(s[:2]), int(s[2:4])
        ss = float(s[4:]) if len(s) > 4 else 0.0
    except ValueError:
        return None
    return hh * 3600.0 + mm * 60.0 + ss


def acquisition_seconds(ds: Dataset) -> float | None:
    """AcquisitionTime (else SeriesTime, else ContentTime) as seconds of the day."""
    for tag in ("AcquisitionTime", "SeriesTime", "ContentTime"):
        v = _seconds(ds.get(tag))
        if v is not None:
            return v
    return None


def b1_series_info(datasets: Sequence[Dataset]) -> B1SeriesInfo:
    """Headers only (``stop_before_pixels`` datasets are fine)."""
    first = datasets[0]
    vendor = _vendor(first)
    kinds = [_is_map_image(f, vendor) for f in frame_records(datasets)]
    return B1SeriesInfo(
        vendor=vendor,
        has_map=any(k is True for k in kinds),
        unknown_images=sum(k is None for k in kinds),
        study_uid=str(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "") or ""),
        series_uid=str(first.get("SeriesInstanceUID", "")),
        description=str(first.get("SeriesDescription", "") or ""),
        acquisition_time_s=acquisition_seconds(first),
    )


def _floats(v: Any, n: int, what: str) -> np.ndarray:
    vals = [v] if isinstance(v, int | float | str) else list(v or [])
    arr = np.array([float(x) for x in vals], dtype=np.float64)
    if arr.size != n or not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: expected {n} numbers, got {v!r}")
    return arr


def _volume(frames: list[Frame], images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack single-position frames along their normal: ``([z, y, x] values, affine)``."""
    iop = _floats(frames[0].get("ImageOrientationPatient"), 6, "ImageOrientationPatient")
    spacing = _floats(frames[0].get("PixelSpacing"), 2, "PixelSpacing")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    pos = [_floats(f.get("ImagePositionPatient"), 3, "ImagePositionPatient") for f in frames]
    for f in frames[1:]:
        other = _floats(f.get("ImageOrientationPatient"), 6, "ImageOrientationPatient")
        if np.max(np.abs(other - iop)) > 1e-4:
            raise ValueError("the B1-map images do not share one orientation")
    depth = np.array([float(p @ normal) for p in pos])
    order = np.argsort(depth, kind="stable")
    if np.any(np.diff(depth[order]) < 1e-3):
        raise ValueError("two B1-map images at the same slice position")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"the B1-map images differ in size: {sorted(shapes)}")
    vol = np.stack([images[i] for i in order]).astype(np.float32)
    aff = np.eye(4)
    aff[:3, 0] = row_dir * spacing[1]  # x: along a row, column spacing
    aff[:3, 1] = col_dir * spacing[0]  # y: down a column, row spacing
    if len(frames) > 1:
        first, last = pos[order[0]], pos[order[-1]]
        aff[:3, 2] = (last - first) / (len(frames) - 1)
    else:
        thick = _first_float(frames[0].get("SliceThickness")) or 1.0
        aff[:3, 2] = normal * thick
    aff[:3, 3] = pos[order[0]]
    return vol, aff


def read_b1_map(
    datasets: Sequence[Dataset], rules: Mapping[str, Mapping[str, Any]] | None = None
) -> B1Map:
    """The B1 map of a B1-map series (pixels read) as flip-angle ratios on its own grid.

    Raises :class:`B1MapUnitError` when the rules do not establish the unit or the
    converted values are implausible, ValueError for a geometry that cannot be stacked
    (both name the series); the caller warns and fits with the nominal B1."""
    table = {**B1_MAP_RULES, **dict(rules or {})}
    first = datasets[0]
    vendor = _vendor(first)
    rule = table.get(vendor) or table["generic"]
    uid = str(first.get("SeriesInstanceUID", ""))
    frames = frame_records(datasets)
    kinds = [_is_map_image(f, vendor) for f in frames]
    if any(k is None for k in kinds) and not any(k is True for k in kinds):
        raise B1MapUnitError(
            f"B1-map series {uid} ({vendor}): neither ImageType (FLIP ANGLE MAP) nor"
            " ImageComments says which images are the flip-angle map"
        )
    sel = [f for f, k in zip(frames, kinds, strict=True) if k]
    if not sel:
        raise B1MapUnitError(f"B1-map series {uid}: no flip-angle map image in it")
    unit = rule.get("unit")
    if unit is None:
        raise B1MapUnitError(
            f"B1-map series {uid}: unit unknown for manufacturer "
            f"{str(first.get('Manufacturer', '') or '?')!r} (no B1-map rule)"
        )
    cache: dict[int, np.ndarray] = {}
    images = []
    for f in sel:
        if f.index not in cache:
            cache[f.index] = _pixels(datasets[f.index])
        slope = _first_float(f.get("RescaleSlope"))
        icpt = _first_float(f.get("RescaleIntercept"))
        img = cache[f.index][f.frame or 0].astype(np.float64)
        images.append(img * (1.0 if slope is None else slope) + (icpt or 0.0))
    if unit == "tenth_degree_of_nominal":
        nominal = _first_float(sel[0].get("FlipAngle"))
        if nominal is None or nominal < float(rule.get("min_nominal_flip_deg", 30.0)):
            raise B1MapUnitError(
                f"B1-map series {uid}: FlipAngle {nominal!r} is not a preparation flip"
                " angle (the nominal of the flip-angle map is not in the header)"
            )
        scale, how = 1.0 / (10.0 * nominal), f"value / (10 x {nominal:g} deg)"
    elif unit == "percent":
        scale, how = 0.01, "value / 100 (percent of nominal)"
    else:
        raise B1MapUnitError(f"B1-map series {uid}: unknown unit rule {unit!r}")
    vol, aff = _volume(sel, [im * scale for im in images])
    obj = vol[np.isfinite(vol)]
    top = float(np.percentile(obj, 99)) if obj.size else 0.0
    inside = obj[obj > 0.2 * top] if top > 0 else obj[:0]
    median = float(np.median(inside)) if inside.size else float("nan")
    lo, hi = PLAUSIBLE_MEDIAN
    if not (lo <= median <= hi):
        raise B1MapUnitError(
            f"B1-map series {uid} ({vendor}, {how}): median flip-angle ratio {median:.3g}"
            f" over the object is outside [{lo}, {hi}]: unit not established"
        )
    return B1Map(
        vol,
        aff,
        {
            "series_uid": uid,
            "description": str(first.get("SeriesDescription", "") or ""),
            "vendor": vendor,
            "conversion": how,
            "rule_confidence": str(rule.get("confidence", "")),
            "rule_source": str(rule.get("source", "")),
            "median_ratio": round(median, 4),
        },
    )
