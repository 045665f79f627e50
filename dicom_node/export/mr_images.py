"""Classic MR Image Storage outputs: synthetic contrasts and (optionally) maps as uint16.

One instance per slice, geometry copied from the reference source image of that slice,
ImageType ``DERIVED\\SECONDARY\\SYNTHETIC\\<name>`` (maps: ``DERIVED\\PRIMARY\\T1MAP``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import NamedTuple

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import MRImageStorage

from processing._version import __version__
from processing.results import SeriesResult, SyntheticImage

from .common import (
    MAP_INFO,
    PATIENT_STUDY_KEYWORDS,
    decimal_string,
    map_array,
    new_instance,
    robust_window,
    series_number_base,
    set_equipment,
    set_mr_series,
    set_pixel_module_16,
)
from .enhanced_mr import enhanced_synthetic_series, is_3d
from .geometry import (
    SliceGeometry,
    frame_number,
    slice_geometry,
    with_frame_number,
)
from .part10 import SliceEncoder, encode_part10
from .settings import (
    ExportError,
    ExportSettings,
    MapKind,
)
from .uids import (
    add_private_provenance,
    derive_uid,
    model_hash,
    parameter_fingerprint,
)

__all__ = [
    "EncodedSlice",
    "encoded_synthetic_series",
    "map_mr_images",
    "map_mr_series",
    "mr_geometry",
    "synthetic_images",
    "synthetic_series",
    "uint16_rescale",
]


_ds = decimal_string


_SCANNING_SEQUENCE = {"SE": "SE", "IR": "IR", "PSIR": "IR", "DIR": "IR", "GRE": "GR"}


def _base_instance(
    ref: Dataset,
    geometry: SliceGeometry,
    z: int,
    settings: ExportSettings,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    series_description: str,
    image_type: list[str],
    pixels: np.ndarray,
    signed: bool,
) -> Dataset:
    """A classic MR instance with patient/study/frame-of-reference/geometry copied."""
    ds = new_instance(ref, MRImageStorage, sop_uid)
    set_mr_series(ds, ref, series_uid, series_number, series_description)
    # Laterality is Type 2C: copy it; absent for a known unpaired body part (head),
    # else empty (unknown) - dciodvfy flags both other choices
    if "Laterality" in ref:
        ds.Laterality = ref.Laterality
    elif not ref.get("BodyPartExamined"):
        ds.Laterality = ""
    set_equipment(ds, settings)
    # General image
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ImageType = image_type
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # Image plane
    ds.PixelSpacing = [_ds(v) for v in geometry.pixel_spacing]
    ds.ImageOrientationPatient = [_ds(v) for v in geometry.orientation]
    ds.SliceThickness = _ds(geometry.slice_thickness)
    ds.SpacingBetweenSlices = _ds(geometry.spacing_between_slices)
    # MR image module
    for kw in ("MagneticFieldStrength", "ImagingFrequency", "ImagedNucleus", "ReceiveCoilName"):
        if kw in ref:
            setattr(ds, kw, ref[kw].value)
    ds.MRAcquisitionType = ref.get("MRAcquisitionType", "2D") or "2D"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.EchoTrainLength = ""
    set_pixel_module_16(ds, pixels.shape[0], pixels.shape[1], signed)
    # instance number, source reference, position, pixels
    for elem in _slice_attributes(geometry, z, sop_uid, pixels, signed):
        ds.add(elem)
    return ds


def _to_int16_range(image: np.ndarray, signed: bool) -> np.ndarray:
    """The stored values of a float image: rounded, clipped to the 16-bit range (non-finite
    values 0), as little-endian int16 / uint16 (three passes over one copy)."""
    lo, hi = (-32768, 32767) if signed else (0, 65535)
    img = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
    np.rint(img, out=img)
    np.clip(img, lo, hi, out=img)
    return img.astype(np.dtype("<i2") if signed else np.dtype("<u2"))


def derivation_description(syn: SyntheticImage, result: SeriesResult) -> str:
    """Equation and parameters of a synthetic contrast (and the AI model when used)."""
    timing = f"TR={syn.tr_ms:g} ms TE={syn.te_ms:g} ms"
    if syn.ti_ms is not None:
        timing += f" TI={syn.ti_ms:g} ms"
    if syn.ti2_ms is not None:
        timing += f" TI2={syn.ti2_ms:g} ms"
    if syn.ai_enhanced:
        source = "the raw MDME samples by a pixel-wise network"
    elif syn.parameters.get("method") == "tissue mixture":
        source = "T1/T2/PD maps, with the nulled tissues' share (segmentation) drawn as their class"
    else:
        source = "T1/T2/PD maps"
    text = (
        f"SYNTHETIC {syn.name} ({syn.kind}) computed by synthmr {__version__} from {source}; "
        f"{syn.equation or 'equation not recorded'}; {timing}; scale={syn.scale:g}"
    )
    if syn.parameters:
        text += "; " + ", ".join(f"{k}={v}" for k, v in sorted(syn.parameters.items()))
    if syn.ai_enhanced:
        mh = str(syn.parameters.get("model_sha256", "")) or model_hash(result) or "unknown"
        text += f"; AI-enhanced (ONNX model sha256 {mh})"
    return text[:1024]  # ST


class EncodedSlice(NamedTuple):
    """One output instance as its Part-10 bytes, with the dataset it shares everything but
    the per-slice attributes with (its series, study and SOP class)."""

    sop_uid: str
    data: bytes
    template: Dataset


class _SlicePlan(NamedTuple):
    """What makes the instances of one classic MR series (:func:`_slices`)."""

    geometry: SliceGeometry
    sop_uid: Callable[[int], str]
    build: Callable[[int, str], Dataset]  # a whole instance: (z, sop_uid) -> dataset
    pixels: np.ndarray  # [z, y, x], the stored values
    signed: bool


def _series_uids(
    settings: ExportSettings, geometry: SliceGeometry, fingerprint: str, kind: str, name: str
) -> tuple[str, Callable[[int], str]]:
    """The series instance UID of an output MR series and its SOP instance UID per slice."""
    src_series = str(geometry.refs[0].SeriesInstanceUID)

    def sop_uid(z: int) -> str:
        return derive_uid(settings, src_series, fingerprint, kind, name, "sop", str(z))

    return derive_uid(settings, src_series, fingerprint, kind, name, "series"), sop_uid


def synthetic_series(
    result: SeriesResult,
    syn: SyntheticImage,
    geometry: SliceGeometry,
    settings: ExportSettings,
    series_number: int,
    fingerprint: str,
) -> list[Dataset]:
    """One synthetic contrast as a classic MR series (one instance per slice), or, for a 3D
    acquisition with ``settings.multiframe_3d``, one Enhanced MR instance
    (:mod:`dicom_node.export.enhanced_mr`)."""
    plan = _synthetic_plan(result, syn, geometry, settings, series_number, fingerprint)
    return [plan] if isinstance(plan, Dataset) else _slices(plan)


def encoded_synthetic_series(
    result: SeriesResult,
    syn: SyntheticImage,
    geometry: SliceGeometry,
    settings: ExportSettings,
    series_number: int,
    fingerprint: str,
    mark: Callable[[list[Dataset]], None] | None = None,
) -> list[EncodedSlice]:
    """:func:`synthetic_series` encoded, byte for byte what encoding its datasets gives, at
    a fraction of the cost (:class:`.part10.SliceEncoder`). ``mark``: applied to the
    datasets before they are encoded; it must set the same attributes on every slice of a
    series (it sees only each run's first slice)."""
    plan = _synthetic_plan(result, syn, geometry, settings, series_number, fingerprint)
    if isinstance(plan, Dataset):
        if mark is not None:
            mark([plan])
        return [EncodedSlice(str(plan.SOPInstanceUID), encode_part10(plan), plan)]
    return _encoded_slices(plan, mark)


def _synthetic_plan(
    result: SeriesResult,
    syn: SyntheticImage,
    geometry: SliceGeometry,
    settings: ExportSettings,
    series_number: int,
    fingerprint: str,
) -> _SlicePlan | Dataset:
    """:func:`synthetic_series`'s slices to make, or its one Enhanced MR instance."""
    img = np.asarray(syn.image, dtype=np.float32)
    if img.shape != tuple(result.shape):
        raise ExportError(
            f"synthetic {syn.name}: image shape {img.shape} != result shape {result.shape}"
        )
    series_uid, sop_uid = _series_uids(settings, geometry, fingerprint, "MR", syn.name)
    desc = syn.description or f"SYNTHETIC {syn.name} TR{syn.tr_ms:g} TE{syn.te_ms:g}"
    if not desc.upper().startswith(("SYNTHETIC", "SYNTHMR")):
        desc = "SYNTHETIC " + desc
    token = "".join(c if c.isalnum() or c in "_ " else "_" for c in syn.name.upper())[:16]
    image_type = ["DERIVED", "SECONDARY", "SYNTHETIC", token]
    if syn.ai_enhanced:
        image_type.append("AI_ENHANCED")
    elif syn.parameters.get("method") == "tissue mixture":
        image_type.append("TISSUE_MIXTURE")
    deriv = derivation_description(syn, result)
    if settings.multiframe_3d and is_3d(geometry, result):
        return enhanced_synthetic_series(
            result, syn, geometry, settings, series_number, fingerprint,
            description=desc, image_type=image_type, derivation_text=deriv,
        )  # fmt: skip
    pixels = _to_int16_range(img, syn.signed)

    def build(z: int, sop: str) -> Dataset:
        ds = _base_instance(
            geometry.refs[z], geometry, z, settings, series_uid, sop, series_number, desc,
            image_type, pixels[z], syn.signed,
        )  # fmt: skip
        ds.ScanningSequence = _SCANNING_SEQUENCE.get(syn.kind.upper(), "RM")
        ds.RepetitionTime = _ds(syn.tr_ms)
        ds.EchoTime = _ds(syn.te_ms)
        if syn.ti_ms is not None:
            ds.InversionTime = _ds(syn.ti_ms)
        ds.DerivationDescription = deriv
        ds.WindowCenter = _ds(syn.window_center)
        ds.WindowWidth = _ds(max(float(syn.window_width), 1.0))
        ds.ImageComments = f"Synthetic image (not acquired); {deriv}"[:10240]
        add_private_provenance(ds, result, settings)
        return ds

    return _SlicePlan(geometry, sop_uid, build, pixels, syn.signed)


#: what an MR output copies from its slice's reference image: slices whose references
#: agree on these are the same instance apart from the per-slice attributes (_next_slice)
_REF_KEYWORDS: tuple[str, ...] = (
    *PATIENT_STUDY_KEYWORDS,
    "Laterality",
    "BodyPartExamined",
    "PatientPosition",
    "ProtocolName",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "MagneticFieldStrength",
    "ImagingFrequency",
    "ImagedNucleus",
    "ReceiveCoilName",
    "MRAcquisitionType",
    "RepetitionTime",
)


#: every attribute of a reference image the MR builders read (this module's and
#: :mod:`.enhanced_mr`'s): what :func:`mr_geometry` keeps
_MR_REF_KEYWORDS: tuple[str, ...] = (
    *_REF_KEYWORDS,
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "AcquisitionDateTime",
)


def mr_geometry(geometry: SliceGeometry) -> SliceGeometry:
    """``geometry`` with reference headers cut down to what the MR builders read, for a
    worker that builds the synthetic series (each task pickles its geometry: the full
    vendor headers cost ~10x more to send and receive). Same outputs (tests/
    test_export_builders.py)."""
    refs = []
    for ref in geometry.refs:
        slim = Dataset()
        for kw in _MR_REF_KEYWORDS:
            if kw in ref:
                slim.add(ref[kw])
        refs.append(with_frame_number(slim, frame_number(ref)))
    return replace(geometry, refs=refs, extra={})


_REF_TAGS: tuple[BaseTag, ...] = tuple(Tag(kw) for kw in _REF_KEYWORDS)


def _ref_signature(ref: Dataset) -> tuple[tuple[int, str], ...]:
    return tuple((tag, str(elem.value)) for tag in _REF_TAGS if (elem := ref.get(tag)) is not None)


def _slice_order(plan: _SlicePlan) -> Iterator[tuple[int, str, bool]]:
    """``(z, sop_uid, whole)`` per slice; ``whole``: build it in full (the first slice, and
    any whose reference image differs from the previous one's in what the instances copy
    from it); the others are the previous whole one with their own per-slice attributes."""
    signature: tuple[tuple[int, str], ...] | None = None
    for z, ref in enumerate(plan.geometry.refs):
        here = _ref_signature(ref)
        yield z, plan.sop_uid(z), signature is None or here != signature
        signature = here


def _slices(plan: _SlicePlan) -> list[Dataset]:
    """One instance per slice (:func:`_slice_order`): the same datasets as building each
    in full gives, at a fraction of the cost (tests/test_export_builders.py)."""
    out: list[Dataset] = []
    template = Dataset()
    for z, sop, whole in _slice_order(plan):
        if whole:
            template = plan.build(z, sop)
            out.append(template)
        else:
            varying = _slice_attributes(plan.geometry, z, sop, plan.pixels[z], plan.signed)
            out.append(_next_slice(template, varying))
    return out


def _encoded_slices(
    plan: _SlicePlan, mark: Callable[[list[Dataset]], None] | None
) -> list[EncodedSlice]:
    """:func:`_slices`, encoded: each slice after a whole one is spliced into that one's
    bytes (:class:`.part10.SliceEncoder`)."""
    out: list[EncodedSlice] = []
    template, encoder = Dataset(), None
    for z, sop, whole in _slice_order(plan):
        varying = _slice_attributes(plan.geometry, z, sop, plan.pixels[z], plan.signed)
        if whole or encoder is None:
            template = plan.build(z, sop)
            if mark is not None:
                mark([template])
            encoder = SliceEncoder(template, varying)
            data = encoder.full
        elif encoder.spliceable:
            data = encoder.encode(varying)
        else:  # not expected: the splice of the whole slice differed from its encoding
            data = encode_part10(_next_slice(template, varying))
        out.append(EncodedSlice(sop, data, template))
    return out


def _slice_attributes(
    geometry: SliceGeometry, z: int, sop: str, pixels: np.ndarray, signed: bool
) -> Dataset:
    """The attributes in which the slices of one MR series differ (a dataset of their own):
    SOP instance, instance number, source image, position, slice location and pixels."""
    ds = Dataset()
    ds.SOPInstanceUID = sop
    ds.InstanceNumber = z + 1
    ds.SourceImageSequence = DicomSequence([_source_item(geometry.refs[z])])
    ds.ImagePositionPatient = [_ds(v) for v in geometry.positions[z]]
    normal = np.cross(geometry.orientation[:3], geometry.orientation[3:])
    ds.SliceLocation = _ds(np.dot(geometry.positions[z], normal))
    _set_pixels(ds, pixels, signed)
    return ds


def _next_slice(template: Dataset, varying: Dataset) -> Dataset:
    """``template``'s elements (copies: setting an attribute changes its element in place)
    with ``varying``'s (:func:`_slice_attributes`) instead of its own."""
    ds = Dataset()
    for elem in template:
        ds.add(copy.copy(elem))
    ds.file_meta = copy.deepcopy(template.file_meta)
    ds.file_meta.MediaStorageSOPInstanceUID = varying.SOPInstanceUID
    for elem in varying:
        ds.add(elem)
    return ds


def _source_item(ref: Dataset) -> Dataset:
    src = Dataset()
    src.ReferencedSOPClassUID = ref.SOPClassUID
    src.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    if frame_number(ref) is not None:  # Enhanced MR source: the frame of this slice
        src.ReferencedFrameNumber = frame_number(ref)
    return src


def _set_pixels(ds: Dataset, pixels: np.ndarray, signed: bool) -> None:
    dtype = np.dtype("<i2") if signed else np.dtype("<u2")
    arr = np.ascontiguousarray(pixels, dtype=dtype)
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OW"
    ds.SmallestImagePixelValue = int(arr.min())
    ds.LargestImagePixelValue = int(arr.max())
    ds["SmallestImagePixelValue"].VR = "SS" if signed else "US"
    ds["LargestImagePixelValue"].VR = "SS" if signed else "US"


def synthetic_images(
    result: SeriesResult,
    sources: Sequence[Dataset],
    settings: ExportSettings,
    geometry: SliceGeometry | None = None,
) -> list[Dataset]:
    """Every selected contrast (``settings.contrasts`` or all), one series each.

    Series numbers: source + offset + 100 + index, so maps (offset + index) never collide.
    """
    return [
        ds for series in iter_synthetic_series(result, sources, settings, geometry) for ds in series
    ]


def iter_synthetic_series(
    result: SeriesResult,
    sources: Sequence[Dataset],
    settings: ExportSettings,
    geometry: SliceGeometry | None = None,
) -> Iterator[list[Dataset]]:
    """:func:`synthetic_images` one contrast series at a time (the node stores and pushes
    each while the next is built)."""
    names = list(result.synthetic) if settings.contrasts is None else list(settings.contrasts)
    missing = [n for n in names if n not in result.synthetic]
    if missing:
        raise ExportError(
            f"contrasts: {missing} requested but the result has only {list(result.synthetic)}"
        )
    geometry = geometry or slice_geometry(result, sources, settings)
    fp = parameter_fingerprint(result, settings)
    base = series_number_base(geometry.refs[0], settings) + 100
    for i, name in enumerate(names):
        yield synthetic_series(result, result.synthetic[name], geometry, settings, base + i, fp)


def uint16_rescale(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Quantize to uint16 with a decimal slope: values = stored * slope + intercept."""
    v = np.where(np.isfinite(values), values, 0).astype(np.float64)
    intercept = float(min(0.0, math.floor(float(v.min()))))
    span = max(float(v.max()) - intercept, 1e-12)
    slope = 10.0 ** math.ceil(math.log10(span / 65000.0))
    stored = np.clip(np.rint((v - intercept) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, intercept


def map_mr_series(
    result: SeriesResult,
    kind: MapKind,
    geometry: SliceGeometry,
    settings: ExportSettings,
    series_number: int,
    fingerprint: str,
) -> list[Dataset]:
    """One quantitative map as classic MR images, uint16 with RescaleSlope/Intercept."""
    info = MAP_INFO[kind]
    data = map_array(result, kind)
    stored, slope, intercept = uint16_rescale(data)
    center, width = robust_window(data, np.asarray(result.maps.mask, dtype=bool))
    series_uid, sop_uid = _series_uids(settings, geometry, fingerprint, "MRMAP", kind.value)
    desc = f"synthmr {kind.value} map ({info.unit.value})"

    def build(z: int, sop: str) -> Dataset:
        ref = geometry.refs[z]
        ds = _base_instance(
            ref, geometry, z, settings, series_uid, sop, series_number, desc,
            ["DERIVED", "PRIMARY", info.image_type_token], stored[z], False,
        )  # fmt: skip
        ds.ScanningSequence = "RM"
        ds.RepetitionTime = _ds(float(ref.get("RepetitionTime", 0) or 0))
        ds.EchoTime = ""
        ds.RescaleSlope = f"{slope:.10g}"
        ds.RescaleIntercept = f"{intercept:.10g}"
        ds.RescaleType = info.unit.value if info.unit.value != "1" else "US"
        # Window in stored values (VOI applies after the modality rescale: real units)
        ds.WindowCenter = _ds(center)
        ds.WindowWidth = _ds(width)
        if width < 1:  # LINEAR needs width >= 1 (B1 ratios are narrower)
            ds.VOILUTFunction = "LINEAR_EXACT"
        ds.DerivationDescription = (
            f"{info.description} [{info.unit.value}] fitted by synthmr {__version__}; "
            f"real value = stored * {slope:g} + {intercept:g}"
        )
        add_private_provenance(ds, result, settings)
        return ds

    return _slices(_SlicePlan(geometry, sop_uid, build, stored, False))


def map_mr_images(
    result: SeriesResult,
    sources: Sequence[Dataset],
    settings: ExportSettings,
    geometry: SliceGeometry | None = None,
) -> list[Dataset]:
    """Every map in ``settings.maps`` as a classic MR series (offset + 50 + index)."""
    geometry = geometry or slice_geometry(result, sources, settings)
    fp = parameter_fingerprint(result, settings)
    base = series_number_base(geometry.refs[0], settings) + 50
    out: list[Dataset] = []
    for i, kind in enumerate(settings.maps):
        out += map_mr_series(result, kind, geometry, settings, base + i, fp)
    return out
