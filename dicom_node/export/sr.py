"""Volumes, tissue means, QC and provenance as a TID 1500 Comprehensive 3D SR."""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from processing._version import __version__
from processing.results import TISSUES, SeriesResult

from .common import (
    SCHEME,
    UCUM_MS,
    UCUM_ONE,
    UCUM_PERCENT,
    UCUM_RATIO,
    ExportError,
    ExportSettings,
    SliceGeometry,
    add_private_provenance,
    derive_uid,
    model_hash,
    parameter_fingerprint,
    series_number_base,
    slice_geometry,
)
from .parametric_map import BRAIN
from .segmentation import SEG_SERIES_INDEX, SEGMENT_CODES

__all__ = ["GLOBAL_CODES", "report"]

UCUM_ML = Code("ml", "UCUM", "milliliter")
VOLUME = Code("118565006", "SCT", "Volume")
MEAN = Code("373098007", "SCT", "Mean")

#: Whole-brain figures: key in result.volumes_ml -> (concept, unit).
GLOBAL_CODES: dict[str, tuple[Code, Code]] = {
    "ICV": (Code("ICV", SCHEME, "Intracranial volume"), UCUM_ML),
    "BPV": (Code("BPV", SCHEME, "Brain parenchymal volume"), UCUM_ML),
    "BPF": (Code("BPF", SCHEME, "Brain parenchymal fraction"), UCUM_RATIO),
    "MYELIN": (Code("MYV", SCHEME, "Myelin volume"), UCUM_ML),
}
_STAT_CODES: dict[str, tuple[Code, Code]] = {
    "t1_ms": (Code("113063", "DCM", "T1"), UCUM_MS),
    "t2_ms": (Code("113065", "DCM", "T2"), UCUM_MS),
    "pd_pu": (Code("113058", "DCM", "Proton Density"), UCUM_PERCENT),
}


def _finite(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _algorithm(result: SeriesResult, fingerprint: str) -> hd.sr.AlgorithmIdentification:
    params = [f"parameters_sha256={fingerprint}"]
    mh = model_hash(result)
    if mh:
        params.append(f"onnx_model_sha256={mh}")
    for key in ("delay_source", "vendor"):
        if key in result.provenance:
            params.append(f"{key}={result.provenance[key]}")
    return hd.sr.AlgorithmIdentification(name="synthmr", version=__version__, parameters=params)


def report(
    result: SeriesResult,
    sources: Sequence[Dataset],
    settings: ExportSettings,
    seg: Dataset | None = None,
    geometry: SliceGeometry | None = None,
) -> Dataset:
    """A Comprehensive 3D SR holding a TID 1500 measurement report.

    One volumetric group per tissue (volume in mL, mean T1/T2/PD) referencing its SEG
    segment when ``seg`` is given; one whole-brain group (ICV, BPV, BPF, myelin volume
    and numeric QC figures). Provenance goes into the algorithm identification.
    """
    geometry = geometry or slice_geometry(result, sources, settings)
    if not result.volumes_ml and not result.tissue_stats:
        raise ExportError("report: the result has neither volumes_ml nor tissue_stats")
    fp = parameter_fingerprint(result, settings)
    src_series = str(geometry.refs[0].SeriesInstanceUID)
    algo = _algorithm(result, fp)
    enhanced = list(geometry.extra.get("enhanced_instances") or [])
    groups: list = []
    for i, tissue in enumerate(TISSUES):
        measurements = []
        vol = _finite(result.volumes_ml.get(tissue))
        if vol is not None:
            measurements.append(
                hd.sr.Measurement(name=VOLUME, value=vol, unit=UCUM_ML, algorithm_id=algo)
            )
        for key, (concept, unit) in _STAT_CODES.items():
            v = _finite(result.tissue_stats.get(tissue, {}).get(key))
            if v is not None:
                measurements.append(
                    hd.sr.Measurement(
                        name=concept, value=v, unit=unit, derivation=MEAN, algorithm_id=algo
                    )
                )
        if not measurements:
            continue
        tracking = hd.sr.TrackingIdentifier(
            identifier=f"synthmr {tissue}",
            uid=derive_uid(settings, src_series, fp, "SR", "track", tissue),
        )
        if seg is not None:
            ref = hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=i + 1,
                source_series=hd.sr.SourceSeriesForSegmentation(src_series),
            )
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_segment=ref,
                    finding_type=SEGMENT_CODES[tissue][0],
                    finding_sites=[hd.sr.FindingSite(BRAIN)],
                    algorithm_id=algo,
                    measurements=measurements,
                )
            )
        else:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    finding_type=SEGMENT_CODES[tissue][0],
                    finding_sites=[hd.sr.FindingSite(BRAIN)],
                    algorithm_id=algo,
                    measurements=measurements,
                )
            )
    whole = []
    for key, (concept, unit) in GLOBAL_CODES.items():
        v = _finite(result.volumes_ml.get(key))
        if v is not None:
            whole.append(hd.sr.Measurement(name=concept, value=v, unit=unit, algorithm_id=algo))
    for key, value in sorted(result.qc.items()):
        v = _finite(value) if not isinstance(value, bool) else None
        if v is not None:
            concept = Code(f"QC_{key}"[:16].upper(), SCHEME, f"QC {key}"[:64])
            whole.append(hd.sr.Measurement(name=concept, value=v, unit=UCUM_ONE, algorithm_id=algo))
    if whole:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    identifier="synthmr whole brain",
                    uid=derive_uid(settings, src_series, fp, "SR", "track", "whole"),
                ),
                finding_type=BRAIN,
                algorithm_id=algo,
                measurements=whole,
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
        procedure_reported=Code("24590-2", "LN", "Brain MRI"),
        imaging_measurements=groups,
        # Enhanced MR: the library describes single-frame images only
        referenced_images=None if enhanced else geometry.refs,
    )
    evidence = (enhanced or list(geometry.refs)) + ([seg] if seg is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content[0],
        series_instance_uid=derive_uid(settings, src_series, fp, "SR", "series"),
        series_number=series_number_base(geometry.refs[0], settings) + SEG_SERIES_INDEX + 1,
        sop_instance_uid=derive_uid(settings, src_series, fp, "SR", "sop"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        institution_name=settings.institution_name or None,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = "synthmr volumes and tissue report (synthetic MRI)"
    sr.SoftwareVersions = f"synthmr {__version__}"
    sr.ManufacturerModelName = settings.manufacturer_model_name
    add_private_provenance(sr, result, settings)
    return sr
