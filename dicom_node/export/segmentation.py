"""Tissue partial volumes (WM, GM, CSF, NON) as a DICOM Segmentation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from processing._version import __version__
from processing.results import TISSUES, SeriesResult

from .common import (
    series_number_base,
)
from .geometry import (
    SliceGeometry,
    highdicom_charset,
    highdicom_sources,
    plane_arguments,
    slice_geometry,
)
from .parametric_map import BRAIN
from .settings import (
    ExportError,
    ExportSettings,
    SegType,
)
from .uids import (
    add_private_provenance,
    derive_uid,
    parameter_fingerprint,
    pin_dimension_organization_uid,
    provenance_text,
)

__all__ = ["SEGMENT_CODES", "TISSUE_CATEGORY", "binary_labels", "segmentation"]

TISSUE_CATEGORY = Code("85756007", "SCT", "Tissue")
#: Segmented property type per tissue (SCT where a concept exists).
SEGMENT_CODES: dict[str, tuple[Code, str]] = {
    "WM": (Code("389080008", "SCT", "White matter"), "White matter"),
    "GM": (Code("389081007", "SCT", "Gray matter"), "Gray matter"),
    "CSF": (Code("65216001", "SCT", "Cerebrospinal fluid"), "Cerebrospinal fluid"),
    # NON: tissue whose T1/T2/PD match none of WM/GM/CSF (SyMRI's "non-WM/GM/CSF")
    "NON": (Code("85756007", "SCT", "Tissue"), "Other tissue (NON)"),
}

#: Offset of the SEG series number after the maps/MR series (source + offset + 200).
SEG_SERIES_INDEX = 200
#: FRACTIONAL: the stored value of a fraction of 1.
MAX_FRACTIONAL_VALUE = 255


def _fraction_arrays(result: SeriesResult) -> list[np.ndarray]:
    """The tissue fractions ``[z, y, x]`` in TISSUES order, as the result holds them."""
    seg = result.segmentation
    if seg is None:
        raise ExportError(
            "segmentation: the result has no tissue fractions (stage disabled/failed)"
        )
    missing = [t for t in TISSUES if t not in seg.fractions]
    if missing:
        raise ExportError(f"segmentation: fractions missing for {missing}")
    arrays = [np.asarray(seg.fractions[t]) for t in TISSUES]
    for t, arr in zip(TISSUES, arrays, strict=True):
        if arr.shape != tuple(result.shape):
            raise ExportError(f"segmentation: {t} fractions shape {arr.shape} != {result.shape}")
    return arrays


def _clean_plane(fraction: np.ndarray, z: int) -> np.ndarray:
    """float32 ``[y, x]`` copy of one slice of one tissue's fraction in [0, 1] (not finite:
    0). Slice by slice: at 40 x 512 x 512 a float32 copy of the four whole fractions is
    168 MB."""
    plane = np.array(fraction[z], dtype=np.float32)
    plane[~np.isfinite(plane)] = 0
    return np.clip(plane, 0, 1, out=plane)


def binary_labels(result: SeriesResult, method: str = "argmax") -> np.ndarray:
    """uint8 label map ``[z, y, x]`` (0 = none, i+1 = TISSUES[i]).

    argmax: every intracranial voxel with any fraction gets its dominant tissue (ties: the
    first in TISSUES order).
    threshold: only voxels whose dominant fraction is >= 0.5 are labelled.
    """
    fractions = _fraction_arrays(result)
    labels = np.empty(tuple(result.shape), np.uint8)
    for z in range(labels.shape[0]):
        fr = np.stack([_clean_plane(f, z) for f in fractions], axis=-1)
        best = np.argmax(fr, axis=-1)
        top = np.take_along_axis(fr, best[..., None], axis=-1)[..., 0]
        keep = top >= 0.5 if method == "threshold" else top > 0
        labels[z] = np.where(keep, best + 1, 0)
    return labels


def _rounded_fractions(result: SeriesResult, max_value: int) -> tuple[np.ndarray, np.ndarray]:
    """The FRACTIONAL SEG's stored values: uint8 ``[z, y, x, tissue]``, round(fraction x
    max_value) exactly as highdicom computes it from float32 (half to even), laid out
    ``[z, tissue, y, x]`` in memory so that every frame is contiguous; and bool ``[z]``:
    the slices where any fraction is above 0 before rounding."""
    fractions = _fraction_arrays(result)
    nz, ny, nx = result.shape
    stored = np.empty((nz, len(fractions), ny, nx), np.uint8)
    any_tissue = np.zeros(nz, bool)
    for z in range(nz):
        for i, fraction in enumerate(fractions):
            plane = _clean_plane(fraction, z)
            any_tissue[z] |= bool(plane.any())
            np.multiply(plane, float(max_value), out=plane)
            stored[z, i] = np.around(plane, out=plane)
    return stored.transpose(0, 2, 3, 1), any_tissue


class _RoundedFractionalSegmentation(hd.seg.Segmentation):
    """highdicom's FRACTIONAL Segmentation, given its frames already rounded to uint8.

    Given float fractions, highdicom checks their range with np.unique over the whole
    ``[z, y, x, segment]`` array (a sorted copy: at 40 x 512 x 512 the peak is about 2.5
    times the 168 MB array, and most of the CPU) and then rounds frame by frame; a uint8
    array it would take as binary (x 255). Here the three steps that look at the values
    take the rounded array instead: the range check (nothing to check), the frame of a
    segment (the stored values themselves) and which slices have any segment. The last
    keeps highdicom's rule for floats: a slice counts (and takes a dimension index value)
    when any fraction is above 0 before rounding, and then each frame that rounds to all
    zero is left out. Everything else (header, functional groups, frame order, pixel
    encoding) is highdicom's; tests/test_segmentation.py compares the whole dataset with
    highdicom's own result from the float array.
    """

    def __init__(self, *args: Any, any_tissue: np.ndarray, **kwargs: Any) -> None:
        self._any_tissue = any_tissue  # lowercase: a Python attribute, not a DICOM one
        super().__init__(*args, **kwargs)

    @classmethod
    def _check_and_cast_pixel_array(
        cls,
        pixel_array: np.ndarray,
        segment_numbers: np.ndarray,
        segmentation_type: hd.seg.SegmentationTypeValues,
        dtype: type,
    ) -> tuple[np.ndarray, hd.seg.SegmentsOverlapValues]:
        if pixel_array.dtype != np.uint8 or pixel_array.shape[-1] != len(segment_numbers):
            raise ValueError("rounded fractions: uint8 [z, y, x, segment] expected")
        # what highdicom says of float fractions: several segments -> undefined
        if pixel_array.shape[-1] == 1:
            return pixel_array, hd.seg.SegmentsOverlapValues.NO
        return pixel_array, hd.seg.SegmentsOverlapValues.UNDEFINED

    @staticmethod
    def _get_segment_pixel_array(
        pixel_array: np.ndarray, segment_number: int, *args: Any, **kwargs: Any
    ) -> np.ndarray:
        return pixel_array[:, :, segment_number - 1]

    def _get_nonempty_plane_indices(self, pixel_array: np.ndarray) -> tuple[list[int], bool]:
        nonempty = np.flatnonzero(self._any_tissue).tolist()
        if not nonempty:  # highdicom: no empty frame is left out when all are empty
            return list(range(pixel_array.shape[0])), True
        return nonempty, False


def segmentation(
    result: SeriesResult,
    sources: Sequence[Dataset],
    settings: ExportSettings,
    geometry: SliceGeometry | None = None,
) -> Dataset:
    """WM/GM/CSF/NON as one SEG: FRACTIONAL OCCUPANCY (default) or BINARY."""
    geometry = geometry or slice_geometry(result, sources, settings)
    fp = parameter_fingerprint(result, settings)
    src_series = str(geometry.refs[0].SeriesInstanceUID)
    algo = hd.AlgorithmIdentificationSequence(
        name="synthmr partial volume",
        # partial volumes from the T1/T2/PD distribution of each voxel (CID 7162)
        family=codes.cid7162.MultispectralProcessing,
        version=__version__,
        parameters={"fingerprint": fp[:64]},
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=tissue,
            segmented_property_category=TISSUE_CATEGORY,
            segmented_property_type=SEGMENT_CODES[tissue][0],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            anatomic_regions=[BRAIN],
        )
        for i, tissue in enumerate(TISSUES)
    ]
    kwargs: dict[str, Any]
    if settings.seg_type is SegType.FRACTIONAL:
        pixels, any_tissue = _rounded_fractions(result, MAX_FRACTIONAL_VALUE)
        seg_class: type[hd.seg.Segmentation] = _RoundedFractionalSegmentation
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
        kwargs = {
            "fractional_type": hd.seg.SegmentationFractionalTypeValues.OCCUPANCY,
            "max_fractional_value": MAX_FRACTIONAL_VALUE,
            "any_tissue": any_tissue,
        }
    else:
        pixels = binary_labels(result, settings.binary_method)
        seg_class = hd.seg.Segmentation
        seg_type = hd.seg.SegmentationTypeValues.BINARY
        kwargs = {}
    seg = seg_class(
        source_images=highdicom_sources(geometry)[0],
        further_source_images=highdicom_sources(geometry)[1] or None,
        pixel_array=pixels,
        segmentation_type=seg_type,
        segment_descriptions=descriptions,
        series_instance_uid=derive_uid(settings, src_series, fp, "SEG", "series"),
        series_number=series_number_base(geometry.refs[0], settings) + SEG_SERIES_INDEX,
        sop_instance_uid=derive_uid(settings, src_series, fp, "SEG", "sop"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=settings.manufacturer_model_name,
        software_versions=f"synthmr {__version__}",
        device_serial_number=settings.device_serial_number,
        content_description="synthmr tissue partial volumes"[:64],
        content_label="SYNTHMR_TISSUE",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **plane_arguments(geometry),
        **highdicom_charset(geometry),
        **kwargs,
    )
    pin_dimension_organization_uid(seg, derive_uid(settings, src_series, fp, "SEG", "dimensions"))
    seg.SeriesDescription = f"synthmr tissue segmentation ({settings.seg_type.value})"
    if settings.institution_name:
        seg.InstitutionName = settings.institution_name
    seg.ImageComments = provenance_text(result, settings)
    add_private_provenance(seg, result, settings)
    return seg
