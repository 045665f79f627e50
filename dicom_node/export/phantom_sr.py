"""Phantom QC outputs: a SEG of the sphere ROIs and a TID 1500 SR with one measurement
group per sphere (measured and reference values, units, the ROI) plus the per-array
linearity. Parametric Maps come from :func:`dicom_node.export.parametric_maps` unchanged.

The numbers are exactly those of ``result.phantom_qc`` (phantom_qc.json); this module only
packages them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from processing._version import __version__
from processing.results import SeriesResult

from .common import UCUM_MS, UCUM_ONE, UCUM_PERCENT, series_number_base
from .geometry import SliceGeometry, highdicom_sources, plane_arguments, slice_geometry
from .parametric_map import parametric_maps
from .segmentation import SEG_SERIES_INDEX
from .settings import SCHEME, ExportError, ExportSettings, MapKind
from .sr import _algorithm, _finite, _light
from .uids import add_private_provenance, derive_uid, parameter_fingerprint, provenance_text

__all__ = ["MEASURED", "PHANTOM_MAPS", "export_phantom", "phantom_report", "phantom_segmentation"]

#: Maps exported for a phantom series.
PHANTOM_MAPS: tuple[MapKind, ...] = (MapKind.T1, MapKind.T2, MapKind.PD)
PHANTOM = Code("PHANTOM", SCHEME, "Quantitative MRI phantom")
SPHERE = Code("PHSPHERE", SCHEME, "Phantom sphere")
PHANTOM_CATEGORY = Code("PHCAT", SCHEME, "Phantom component")
VOXELS = Code("NVOX", SCHEME, "ROI voxel count")
UCUM_VOXELS = Code("{voxels}", "UCUM", "voxels")
#: quantity -> (measured concept, unit). Measured values are ROI medians.
MEASURED: dict[str, tuple[Code, Code]] = {
    "t1_ms": (Code("113063", "DCM", "T1"), UCUM_MS),
    "t2_ms": (Code("113065", "DCM", "T2"), UCUM_MS),
    "pd_pu": (Code("113058", "DCM", "Proton Density"), UCUM_PERCENT),
}
_SHORT = {"t1_ms": "T1", "t2_ms": "T2", "pd_pu": "PD"}
ROBUST_SD = Code("RSD", SCHEME, "Robust standard deviation (1.4826 MAD)")


def _ref_code(q: str) -> Code:
    return Code(f"REF{_SHORT[q]}", SCHEME, f"Certified reference {_SHORT[q]}")


def _err_code(q: str) -> Code:
    return Code(f"ERR{_SHORT[q]}", SCHEME, f"{_SHORT[q]} error against reference")


def _lin_codes(q: str) -> dict[str, tuple[Code, Code]]:
    unit = MEASURED[q][1]
    return {
        "slope": (Code(f"SLOPE{_SHORT[q]}", SCHEME, f"{_SHORT[q]} linearity slope"), UCUM_ONE),
        "intercept": (Code(f"ICPT{_SHORT[q]}", SCHEME, f"{_SHORT[q]} linearity intercept"), unit),
        "r2": (Code(f"R2{_SHORT[q]}", SCHEME, f"{_SHORT[q]} linearity R squared"), UCUM_ONE),
        "n": (Code(f"NSPH{_SHORT[q]}", SCHEME, f"{_SHORT[q]} spheres in linearity"), UCUM_ONE),
    }


def _report(result: SeriesResult) -> dict[str, Any]:
    rep = result.phantom_qc
    if not rep or result.phantom_rois is None:
        raise ExportError("phantom export: the result holds no phantom_qc report / ROIs")
    return rep


def _segment_rows(result: SeriesResult) -> list[tuple[int, dict[str, Any]]]:
    """(1-based sphere number in the ROI label map, row) of measured spheres."""
    rows = _report(result)["spheres"]
    present = set(np.unique(result.phantom_rois).tolist()) - {0}
    return [(k + 1, r) for k, r in enumerate(rows) if r["measured"] and (k + 1) in present]


def phantom_segmentation(
    result: SeriesResult,
    sources: Sequence[Dataset],
    settings: ExportSettings,
    geometry: SliceGeometry | None = None,
) -> Dataset:
    """BINARY SEG: one segment per measured sphere ROI (the voxels its numbers come from)."""
    geometry = geometry or slice_geometry(result, sources, settings)
    seg_rows = _segment_rows(result)
    if not seg_rows:
        raise ExportError("phantom SEG: no measured sphere")
    fp = parameter_fingerprint(result, settings)
    src_series = str(geometry.refs[0].SeriesInstanceUID)
    algo = hd.AlgorithmIdentificationSequence(
        name="synthmr phantom ROI",
        family=codes.cid7162.ArtificialIntelligence
        if hasattr(codes.cid7162, "ArtificialIntelligence")
        else codes.cid7162.MultispectralProcessing,
        version=__version__,
        parameters={"fingerprint": fp[:64]},
    )
    labels = np.zeros(result.phantom_rois.shape, np.uint8)
    descriptions = []
    for new, (old, row) in enumerate(seg_rows, start=1):
        labels[result.phantom_rois == old] = new
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=new,
                segment_label=row["label"],
                segmented_property_category=PHANTOM_CATEGORY,
                segmented_property_type=SPHERE,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algo,
                tracking_id=f"synthmr phantom {row['label']}",
                tracking_uid=derive_uid(settings, src_series, fp, "PSEG", "track", row["label"]),
            )
        )
    seg = hd.seg.Segmentation(
        source_images=highdicom_sources(geometry)[0],
        further_source_images=highdicom_sources(geometry)[1] or None,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derive_uid(settings, src_series, fp, "PSEG", "series"),
        series_number=series_number_base(geometry.refs[0], settings) + SEG_SERIES_INDEX,
        sop_instance_uid=derive_uid(settings, src_series, fp, "PSEG", "sop"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=settings.manufacturer_model_name,
        software_versions=f"synthmr {__version__}",
        device_serial_number=settings.device_serial_number,
        content_description="synthmr phantom sphere ROIs (eroded)"[:64],
        content_label="SYNTHMR_PHANTOM",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **plane_arguments(geometry),
    )
    seg.SeriesDescription = "synthmr phantom QC sphere ROIs"
    if settings.institution_name:
        seg.InstitutionName = settings.institution_name
    seg.ImageComments = provenance_text(result, settings)
    add_private_provenance(seg, result, settings)
    return seg


def _num(name: Code, value: Any, unit: Code, algo, derivation: Code | None = None):
    v = _finite(value)
    if v is None:
        return None
    return hd.sr.Measurement(
        name=name, value=v, unit=unit, derivation=derivation, algorithm_id=algo
    )


def phantom_report(
    result: SeriesResult,
    sources: Sequence[Dataset],
    settings: ExportSettings,
    seg: Dataset,
    geometry: SliceGeometry | None = None,
) -> Dataset:
    """Comprehensive 3D SR, TID 1500: per measured sphere a volumetric group referencing its
    SEG segment (median T1, T2, PD with robust SD, voxel count, the reference of the array's
    quantity and the error); per array a group with slope, intercept, R^2, sphere count."""
    rep = _report(result)
    geometry = geometry or slice_geometry(result, sources, settings)
    fp = parameter_fingerprint(result, settings)
    src_series = str(geometry.refs[0].SeriesInstanceUID)
    algo = _algorithm(result, fp)
    enhanced = list(geometry.extra.get("enhanced_instances") or [])
    light = [_light(ds) for ds in geometry.refs]
    groups: list = []
    for seg_no, (_, row) in enumerate(_segment_rows(result), start=1):
        q = row["quantity"]
        ms = []
        for key, (concept, unit) in MEASURED.items():
            ms.append(_num(concept, row.get(key), unit, algo, codes.SCT.Median))
            ms.append(
                _num(
                    Code(f"RSD{_SHORT[key]}", SCHEME, f"{_SHORT[key]} robust SD"),
                    (row.get("sd") or {}).get(key),
                    unit,
                    algo,
                )
            )
        ms.append(_num(VOXELS, row.get("voxels"), UCUM_VOXELS, algo))
        ms.append(_num(_ref_code(q), (row.get("reference") or {}).get(q), MEASURED[q][1], algo))
        ms.append(_num(_err_code(q), row.get("error"), MEASURED[q][1], algo))
        ref = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=seg_no,
            source_series=hd.sr.SourceSeriesForSegmentation(src_series),
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    identifier=f"synthmr phantom {row['label']}",
                    uid=derive_uid(settings, src_series, fp, "PSR", "track", row["label"]),
                ),
                referenced_segment=ref,
                finding_type=SPHERE,
                algorithm_id=algo,
                measurements=[m for m in ms if m is not None],
            )
        )
    for array, fit in (rep.get("linearity") or {}).items():
        q = fit.get("quantity", "t1_ms")
        ms = [_num(c, fit.get(k), u, algo) for k, (c, u) in _lin_codes(q).items()]
        ms = [m for m in ms if m is not None]
        if not ms:
            continue
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    identifier=f"synthmr phantom {array} array linearity",
                    uid=derive_uid(settings, src_series, fp, "PSR", "track", "lin", array),
                ),
                finding_type=PHANTOM,
                algorithm_id=algo,
                measurements=ms,
            )
        )
    observation = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=derive_uid(settings, "device", "synthmr", settings.device_serial_number),
                name="synthmr",
                manufacturer_name=settings.manufacturer,
                model_name=settings.manufacturer_model_name,
                serial_number=settings.device_serial_number,
            ),
        )
    )
    content = hd.sr.MeasurementReport(
        observation_context=observation,
        procedure_reported=Code("PHQC", SCHEME, "Quantitative MRI phantom QC"),
        imaging_measurements=groups,
        referenced_images=None if enhanced else light,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=(enhanced or light) + [_light(seg)],
        content=content[0],
        series_instance_uid=derive_uid(settings, src_series, fp, "PSR", "series"),
        series_number=series_number_base(geometry.refs[0], settings) + SEG_SERIES_INDEX + 1,
        sop_instance_uid=derive_uid(settings, src_series, fp, "PSR", "sop"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        institution_name=settings.institution_name or None,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = f"synthmr phantom QC {rep.get('phantom', '')} (synthetic MRI)"[:64]
    sr.SoftwareVersions = f"synthmr {__version__}"
    sr.ManufacturerModelName = settings.manufacturer_model_name
    add_private_provenance(sr, result, settings)
    return sr


def export_phantom(
    result: SeriesResult, sources: Sequence[Dataset], settings: ExportSettings | None = None
) -> list[Dataset]:
    """Parametric Maps (T1, T2, PD), the sphere SEG and the SR, in send order."""
    settings = settings or ExportSettings()
    geometry = slice_geometry(result, sources, settings)
    maps = tuple(m for m in settings.maps if m in PHANTOM_MAPS) or PHANTOM_MAPS
    out: list[Dataset] = list(parametric_maps(result, sources, replace(settings, maps=maps)))
    if _segment_rows(result):
        seg = phantom_segmentation(result, sources, settings, geometry)
        out.append(seg)
        out.append(phantom_report(result, sources, settings, seg, geometry))
    return out
