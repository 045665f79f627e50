"""Tissue partial volumes (WM, GM, CSF, NON) as a DICOM Segmentation."""

from __future__ import annotations

from collections.abc import Sequence

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


def _fractions(result: SeriesResult) -> np.ndarray:
    """float32 ``[z, y, x, tissue]`` in [0, 1], TISSUES order."""
    seg = result.segmentation
    if seg is None:
        raise ExportError(
            "segmentation: the result has no tissue fractions (stage disabled/failed)"
        )
    missing = [t for t in TISSUES if t not in seg.fractions]
    if missing:
        raise ExportError(f"segmentation: fractions missing for {missing}")
    arr = np.stack([np.asarray(seg.fractions[t], dtype=np.float32) for t in TISSUES], axis=-1)
    if arr.shape[:3] != tuple(result.shape):
        raise ExportError(f"segmentation: fractions shape {arr.shape[:3]} != {result.shape}")
    # in place: at 40 x 512 x 512 each copy of the four fractions is 168 MB
    arr[~np.isfinite(arr)] = 0
    return np.clip(arr, 0, 1, out=arr)


def binary_labels(result: SeriesResult, method: str = "argmax") -> np.ndarray:
    """uint8 label map ``[z, y, x]`` (0 = none, i+1 = TISSUES[i]).

    argmax: every intracranial voxel with any fraction gets its dominant tissue.
    threshold: only voxels whose dominant fraction is >= 0.5 are labelled.
    """
    fr = _fractions(result)
    best = np.argmax(fr, axis=-1)
    top = np.take_along_axis(fr, best[..., None], axis=-1)[..., 0]
    keep = top >= 0.5 if method == "threshold" else top > 0
    return np.where(keep, best + 1, 0).astype(np.uint8)


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
    if settings.seg_type is SegType.FRACTIONAL:
        pixels = _fractions(result)
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
        kwargs = {
            "fractional_type": hd.seg.SegmentationFractionalTypeValues.OCCUPANCY,
            "max_fractional_value": 255,
        }
    else:
        pixels = binary_labels(result, settings.binary_method)
        seg_type = hd.seg.SegmentationTypeValues.BINARY
        kwargs = {}
    seg = hd.seg.Segmentation(
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
        **kwargs,
    )
    pin_dimension_organization_uid(seg, derive_uid(settings, src_series, fp, "SEG", "dimensions"))
    seg.SeriesDescription = f"synthmr tissue segmentation ({settings.seg_type.value})"
    if settings.institution_name:
        seg.InstitutionName = settings.institution_name
    seg.ImageComments = provenance_text(result, settings)
    add_private_provenance(seg, result, settings)
    return seg
