"""Volumes, tissue means, QC and provenance as a TID 1500 Comprehensive 3D SR."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import highdicom as hd
import highdicom.sr.templates as _hd_templates
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from processing._version import __version__
from processing.results import TISSUES, SeriesResult

from .common import (
    PATIENT_STUDY_KEYWORDS,
    UCUM_MS,
    UCUM_ONE,
    UCUM_PERCENT,
    UCUM_RATIO,
    series_number_base,
)
from .geometry import (
    SliceGeometry,
    highdicom_charset,
    slice_geometry,
)
from .parametric_map import BRAIN
from .segmentation import SEG_SERIES_INDEX, SEGMENT_CODES
from .settings import (
    SCHEME,
    ExportError,
    ExportSettings,
)
from .uids import (
    add_private_provenance,
    derive_uid,
    model_hash,
    parameter_fingerprint,
)

# highdicom's Image Library entry looks up its image's SOP class in the standard's IOD
# tables for each referenced image (30 slices: ~1/4 of the SR's build). Both look-ups are
# pure functions of the SOP Class UID: remembered (the same SR, bytes unchanged).
_hd_templates.does_iod_have_pixel_data = functools.lru_cache(maxsize=64)(
    _hd_templates.does_iod_have_pixel_data
)
_hd_templates._get_coded_modality = functools.lru_cache(maxsize=64)(
    _hd_templates._get_coded_modality
)

__all__ = ["GLOBAL_CODES", "flatten_qc", "qc_concept", "report"]

UCUM_ML = Code("ml", "UCUM", "milliliter")
VOLUME = Code("118565006", "SCT", "Volume")
MEAN = Code("373098007", "SCT", "Mean")

#: Whole-brain figures: key in result.volumes_ml -> (concept, unit).
GLOBAL_CODES: dict[str, tuple[Code, Code]] = {
    "ICV": (Code("ICV", SCHEME, "Intracranial volume"), UCUM_ML),
    "BPV": (Code("BPV", SCHEME, "Brain parenchymal volume"), UCUM_ML),
    "BPF": (Code("BPF", SCHEME, "Brain parenchymal fraction"), UCUM_RATIO),
    "MYELIN": (Code("MYV", SCHEME, "Myelin volume"), UCUM_ML),
    "EPW": (Code("EPWV", SCHEME, "Excess parenchymal water volume"), UCUM_ML),
}
YES = Code("373066001", "SCT", "Yes")
NO = Code("373067005", "SCT", "No")
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


def flatten_qc(qc: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """QC dict -> (dotted key, scalar) pairs: nested dicts as ``a.b``, lists as ``a[i]``."""
    for key in sorted(qc, key=str):
        value = qc[key]
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten_qc(value, name + ".")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if isinstance(v, Mapping):
                    yield from flatten_qc(v, f"{name}[{i}].")
                else:
                    yield f"{name}[{i}]", v
        else:
            yield name, value


def _short_code(prefix: str, text: str) -> str:
    """A CodeValue (SH, <= 16 chars) unique per text: readable when it fits, else hashed."""
    plain = f"{prefix}{text}".upper()
    if len(plain) <= 16:
        return plain
    return prefix + hashlib.sha256(text.encode()).hexdigest()[: 16 - len(prefix)].upper()


def qc_concept(key: str) -> Code:
    """Concept of a flattened QC figure: unique code, meaning ``"QC <key>"``."""
    return Code(_short_code("QC_", key), SCHEME, f"QC {key}"[:64])


def _qc_unit(key: str) -> Code:
    leaf = key.split(".")[-1].split("[")[0]
    if leaf.endswith("_ms") or "_ms_" in leaf:
        return UCUM_MS
    if leaf.endswith("_pu") or "_pu_" in leaf:
        return UCUM_PERCENT
    return UCUM_ONE


def _qc_items(
    qc: Mapping[str, Any], algo: hd.sr.AlgorithmIdentification
) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """Numbers as NUM items; flags (bool) as Yes/No and words as coded evaluations.

    Non-finite numbers (e.g. "no outlier" as NaN) are left out: NUM cannot hold them.
    """
    nums: list[hd.sr.Measurement] = []
    evals: list[hd.sr.QualitativeEvaluation] = []
    for key, value in flatten_qc(qc):
        if isinstance(value, (bool, np.bool_)):
            evals.append(hd.sr.QualitativeEvaluation(qc_concept(key), YES if value else NO))
        elif isinstance(value, str):
            word = Code(_short_code("", value) or "EMPTY", SCHEME, value[:64] or "(empty)")
            evals.append(hd.sr.QualitativeEvaluation(qc_concept(key), word))
        else:
            v = _finite(value)
            if v is not None:
                nums.append(
                    hd.sr.Measurement(
                        name=qc_concept(key), value=v, unit=_qc_unit(key), algorithm_id=algo
                    )
                )
    return nums, evals


#: What highdicom's SR evidence and image library read from a source header; copying
#: only these (not ~300 vendor attributes per slice) makes the SR ~2x cheaper to build.
_LIGHT_KEYWORDS: tuple[str, ...] = (
    *PATIENT_STUDY_KEYWORDS,
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDate",
    "SeriesTime",
    "InstanceNumber",
    "Modality",
    "ImageType",
    "ContentDate",
    "ContentTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "FrameOfReferenceUID",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
    "SpacingBetweenSlices",
    "PhotometricInterpretation",
    "BitsAllocated",
    "Manufacturer",
)


def _light(ds: Dataset) -> Dataset:
    """A header with just the attributes the SR needs (shallow values, no sequences)."""
    out = Dataset()
    for kw in _LIGHT_KEYWORDS:
        if kw in ds:
            out.add(ds[kw])
    return out


def _algorithm(result: SeriesResult, fingerprint: str) -> hd.sr.AlgorithmIdentification:
    params = [f"parameters_sha256={fingerprint}"]
    mh = model_hash(result)
    if mh:
        params.append(f"onnx_model_sha256={mh}")
    for key in ("delay_source", "vendor"):
        if key in result.provenance:
            params.append(f"{key}={result.provenance[key]}")
    b1 = result.provenance.get("b1_map")
    if isinstance(b1, dict) and b1.get("series_uid"):
        params.append(f"b1_map_series_uid={b1['series_uid']}")
    elif (result.provenance.get("acquisition") or {}).get("sequence") == "QALAS":
        params.append("b1_map=none (nominal B1 = 1 assumed)")
    return hd.sr.AlgorithmIdentification(name="synthmr", version=__version__, parameters=params)


def _tissue_groups(
    result: SeriesResult,
    settings: ExportSettings,
    seg: Dataset | None,
    algo: Any,
    src_series: str,
    fp: str,
) -> list:
    """One measurement group per tissue: volume and mean T1/T2/PD, referencing its SEG
    segment when there is a SEG."""
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
    return groups


def _whole_brain_group(
    result: SeriesResult, settings: ExportSettings, algo: Any, src_series: str, fp: str
) -> Any:
    """The whole-brain group: ICV, BPV, BPF, myelin volume and numeric QC figures (None
    when there is nothing to report)."""
    whole = []
    for key, (concept, unit) in GLOBAL_CODES.items():
        v = _finite(result.volumes_ml.get(key))
        if v is not None:
            whole.append(hd.sr.Measurement(name=concept, value=v, unit=unit, algorithm_id=algo))
    qc_nums, qc_evals = _qc_items(result.qc, algo)
    whole += qc_nums
    if not (whole or qc_evals):
        return None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier="synthmr whole brain",
            uid=derive_uid(settings, src_series, fp, "SR", "track", "whole"),
        ),
        finding_type=BRAIN,
        algorithm_id=algo,
        measurements=whole or None,
        qualitative_evaluations=qc_evals or None,
    )


def report(
    result: SeriesResult,
    sources: Sequence[Dataset],
    settings: ExportSettings,
    seg: Dataset | None = None,
    geometry: SliceGeometry | None = None,
    *,
    check_references: bool = False,
) -> Dataset:
    """A Comprehensive 3D SR holding a TID 1500 measurement report.

    ``check_references``: hand highdicom the whole content tree, so that it checks that
    every instance the tree references is in the evidence (a copy and a search of the
    tree; by construction they are, and the dataset is the same either way).

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
    light = [_light(ds) for ds in geometry.refs]
    groups = _tissue_groups(result, settings, seg, algo, src_series, fp)
    whole_group = _whole_brain_group(result, settings, algo, src_series, fp)
    if whole_group is not None:
        groups.append(whole_group)
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
        referenced_images=None if enhanced else light,
    )
    evidence = (enhanced or light) + ([_light(seg)] if seg is not None else [])
    # highdicom deep-copies the content tree, parses the copy back and searches it for
    # references (2/3 of the SR's cost at 30 slices with the QC figures). Every item this
    # tree references is in ``evidence`` by construction, so the document is built around
    # the root container alone and the tree is attached after: the same dataset.
    root = content[0]
    shell = Dataset()
    for elem in root:
        if elem.keyword != "ContentSequence":
            shell.add(elem)
    shell.ContentSequence = []
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=root if check_references else shell,
        series_instance_uid=derive_uid(settings, src_series, fp, "SR", "series"),
        series_number=series_number_base(geometry.refs[0], settings) + SEG_SERIES_INDEX + 1,
        sop_instance_uid=derive_uid(settings, src_series, fp, "SR", "sop"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        institution_name=settings.institution_name or None,
        is_complete=True,
        is_final=False,
        is_verified=False,
        **highdicom_charset(geometry),
    )
    sr.ContentSequence = root.ContentSequence
    sr.SeriesDescription = "synthmr volumes and tissue report (synthetic MRI)"
    sr.SoftwareVersions = f"synthmr {__version__}"
    sr.ManufacturerModelName = settings.manufacturer_model_name
    add_private_provenance(sr, result, settings)
    return sr
