"""Quantitative maps as Parametric Map instances (float, real-world value mapped)."""

from __future__ import annotations

import copy
import datetime
from collections.abc import Collection, Iterator, Sequence
from typing import NamedTuple

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from processing._version import __version__
from processing.results import SeriesResult

from .common import (
    MAP_INFO,
    MapInfo,
    map_array,
    robust_window,
    series_number_base,
)
from .geometry import (
    SliceGeometry,
    highdicom_charset,
    highdicom_sources,
    plane_arguments,
    slice_geometry,
)
from .part10 import freeze
from .settings import (
    ExportSettings,
    MapKind,
)
from .uids import (
    add_private_provenance,
    derive_uid,
    parameter_fingerprint,
    pin_dimension_organization_uid,
    provenance_text,
)

__all__ = ["BRAIN", "add_frame_anatomy", "parametric_map", "parametric_maps"]

BRAIN = hd.sr.CodedConcept("12738006", "SCT", "Brain")


def add_frame_anatomy(ds: Dataset) -> None:
    """Frame Anatomy (brain, laterality U) in the shared functional groups.

    dcmqi's paramap2itkimage needs it. No series-level Laterality: dciodvfy (2024+) flags
    an empty Laterality as an error when Frame Anatomy carries the laterality.
    """
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = [BRAIN]
    anatomy.FrameLaterality = "U"
    ds.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
    ds.pop("Laterality", None)


def ascending_frames(pm: Dataset) -> None:
    """Reorder frames so position increases along cross(row, col), in place.

    highdicom sorts PATIENT frames along its own (D, R) normal, i.e. descending along
    the DICOM normal; dcmqi 1.5 paramap2itkimage then stacks the frames from the lowest
    position upwards and flips the volume. Ascending frames read correctly in both.
    """
    frames = list(pm.PerFrameFunctionalGroupsSequence)
    if len(frames) < 2:
        return
    iop = np.asarray(
        pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient,
        dtype=float,
    )
    normal = np.cross(iop[:3], iop[3:])
    loc = [
        float(
            np.dot(np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, dtype=float), normal)
        )
        for f in frames
    ]
    order = np.argsort(loc, kind="stable")
    if np.array_equal(order, np.arange(len(frames))):
        return
    nframes, rows, cols = len(frames), int(pm.Rows), int(pm.Columns)
    if "FloatPixelData" in pm:
        kw, dtype = "FloatPixelData", np.dtype("<f4")
    elif "DoubleFloatPixelData" in pm:
        kw, dtype = "DoubleFloatPixelData", np.dtype("<f8")
    else:
        kw, dtype = "PixelData", np.dtype("<u2")
    px = np.frombuffer(pm[kw].value, dtype=dtype).reshape(nframes, rows, cols)
    pm[kw].value = np.ascontiguousarray(px[order]).tobytes()
    new = [frames[i] for i in order]
    if len(pm.get("DimensionIndexSequence", [])) == 1:
        for k, item in enumerate(new, start=1):
            # one dimension (position): index follows the new frame order
            item.FrameContentSequence[0].DimensionIndexValues = k
    pm.PerFrameFunctionalGroupsSequence = new


def parametric_map(
    result: SeriesResult,
    kind: MapKind,
    geometry: SliceGeometry,
    settings: ExportSettings,
    series_number: int,
    fingerprint: str,
    *,
    data: np.ndarray | None = None,
    info: MapInfo | None = None,
    name: str | None = None,
    reuse: bool = False,
) -> Dataset:
    """One map (float32 ``[z, y, x]``) as a highdicom ParametricMap, one frame per slice.

    ``data``/``info``/``name`` export a derived map that is not a :class:`MapKind` (e.g. the
    report's T1w/T2w ratio): its array, coded meaning and short name (labels, UIDs).
    ``reuse``: the first map built on ``geometry`` is highdicom's; the next ones copy
    everything they share with it (:func:`_from_template`): the same datasets, ~10x cheaper."""
    info = MAP_INFO[kind] if info is None else info
    data = map_array(result, kind) if data is None else np.asarray(data, np.float32)
    label = kind.value if name is None else name
    src_series = str(geometry.refs[0].SeriesInstanceUID)
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        hi = lo + 1.0
    rwvm = hd.pm.RealWorldValueMapping(
        lut_label=info.label[:16],
        lut_explanation=info.description[:64],
        unit=info.unit,
        value_range=(lo, hi),
        slope=1.0,
        intercept=0.0,
        quantity_definition=info.quantity,
    )
    center, width = robust_window(data, np.asarray(result.maps.mask, dtype=bool))
    voi = hd.VOILUTTransformation(
        window_center=center,
        window_width=width,
        # LINEAR requires width >= 1; B1 ratios need a narrower window
        voi_lut_function="LINEAR" if width >= 1 else "LINEAR_EXACT",
    )
    template = geometry.extra.get(_TEMPLATE_KEY) if reuse else None
    if template is not None:
        pm = _from_template(
            template,
            data,
            sop_uid=derive_uid(settings, src_series, fingerprint, "PM", label, "sop"),
            series_uid=derive_uid(settings, src_series, fingerprint, "PM", label, "series"),
            series_number=series_number,
            dimension_uid=derive_uid(settings, src_series, fingerprint, "PM", label, "dimensions"),
            rwvm=rwvm,
            voi=voi,
            content_description=f"synthmr {info.description}"[:64],
            content_label=f"{label}MAP"[:16],
        )
    else:
        pm = _highdicom_map(
            result, geometry, settings, series_number, fingerprint, data, info, label, rwvm, voi
        )
        if reuse:
            geometry.extra[_TEMPLATE_KEY] = _template_of(pm, geometry)
    pm.SeriesDescription = f"synthmr {label} map ({info.unit.value})"[:64]
    if settings.institution_name:
        pm.InstitutionName = settings.institution_name
    pm.ImageComments = provenance_text(result, settings)
    add_private_provenance(pm, result, settings)
    return pm


#: geometry.extra key of the first map's dataset, without pixel data (:func:`_template_of`)
_TEMPLATE_KEY = "parametric_map_template"


class _Template(NamedTuple):
    dataset: Dataset  # the first map of the export as highdicom built it, no pixel data
    frame_z: np.ndarray  # result z index of each frame, in frame order


def _template_of(pm: Dataset, geometry: SliceGeometry) -> _Template:
    """What the maps after the first share with it: every attribute but the few that
    name the map (:func:`_from_template`), and the frame order."""
    ds = Dataset()
    for elem in pm:
        if elem.tag.group != 0x7FE0:
            # a copy: setting an attribute that exists changes its element in place
            ds.add(copy.copy(elem))
    ds.file_meta = copy.deepcopy(pm.file_meta)
    positions = np.asarray(geometry.positions, dtype=float)
    frame_z = np.array(
        [
            int(
                np.argmin(
                    np.linalg.norm(
                        positions
                        - np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float),
                        axis=1,
                    )
                )
            )
            for f in pm.PerFrameFunctionalGroupsSequence
        ]
    )
    # every map of the export shares it, unchanged (_from_template): encoded once
    freeze(ds["PerFrameFunctionalGroupsSequence"])
    return _Template(ds, frame_z)


def _from_template(
    template: _Template,
    data: np.ndarray,
    *,
    sop_uid: str,
    series_uid: str,
    series_number: int,
    dimension_uid: str,
    rwvm: Dataset,
    voi: Dataset,
    content_description: str,
    content_label: str,
) -> Dataset:
    """Another map on the template's geometry: highdicom's dataset for it differs from the
    template only in what is set here (tests/test_export_builders.py compares them
    attribute by attribute), so the per-frame functional groups (a few hundred items, the
    same for every map) are built and checked once per export instead of once per map."""
    src = template.dataset
    pm = Dataset()
    for elem in src:
        # own elements (setting an attribute changes its element in place), shared
        # values: the sequences that differ are replaced below, never changed in place
        pm.add(copy.copy(elem))
    pm.file_meta = copy.deepcopy(src.file_meta)
    pm.file_meta.MediaStorageSOPInstanceUID = sop_uid
    now = datetime.datetime.now()
    pm.InstanceCreationDate, pm.InstanceCreationTime = DA(now.date()), TM(now.time())
    pm.ContentDate, pm.ContentTime = DA(now.date()), TM(now.time())
    pm.SOPInstanceUID = sop_uid
    pm.SeriesInstanceUID = series_uid
    pm.SeriesNumber = series_number
    pm.ContentDescription = content_description
    pm.ContentLabel = content_label
    organization = Dataset()
    organization.DimensionOrganizationUID = dimension_uid
    pm.DimensionOrganizationSequence = [organization]
    indices = []
    for item in src.DimensionIndexSequence:
        new = Dataset()
        for elem in item:
            new.add(copy.copy(elem))
        new.DimensionOrganizationUID = dimension_uid
        indices.append(new)
    pm.DimensionIndexSequence = indices
    shared = Dataset()
    for elem in src.SharedFunctionalGroupsSequence[0]:
        shared.add(copy.copy(elem))
    shared.RealWorldValueMappingSequence = [rwvm]
    shared.FrameVOILUTSequence = [voi]
    pm.SharedFunctionalGroupsSequence = [shared]
    pixels = np.ascontiguousarray(data[template.frame_z], dtype="<f4")
    pm.FloatPixelData = pixels.tobytes()
    return pm


def _highdicom_map(
    result: SeriesResult,
    geometry: SliceGeometry,
    settings: ExportSettings,
    series_number: int,
    fingerprint: str,
    data: np.ndarray,
    info: MapInfo,
    label: str,
    rwvm: Dataset,
    voi: Dataset,
) -> Dataset:
    """The map as highdicom's ParametricMap builds and checks it (frames ascending)."""
    src_series = str(geometry.refs[0].SeriesInstanceUID)
    pm = hd.pm.ParametricMap(
        source_images=highdicom_sources(geometry)[0],
        further_source_images=highdicom_sources(geometry)[1] or None,
        pixel_array=data,
        series_instance_uid=derive_uid(settings, src_series, fingerprint, "PM", label, "series"),
        series_number=series_number,
        sop_instance_uid=derive_uid(settings, src_series, fingerprint, "PM", label, "sop"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=settings.manufacturer_model_name,
        software_versions=f"synthmr {__version__}",
        device_serial_number=settings.device_serial_number,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[rwvm],
        voi_lut_transformations=[voi],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_description=f"synthmr {info.description}"[:64],
        content_label=f"{label}MAP"[:16],
        **plane_arguments(geometry),
        **highdicom_charset(geometry),
    )
    dim_uid = derive_uid(settings, src_series, fingerprint, "PM", label, "dimensions")
    pin_dimension_organization_uid(pm, dim_uid)
    add_frame_anatomy(pm)
    ascending_frames(pm)
    return pm


def parametric_maps(
    result: SeriesResult,
    sources: Sequence[Dataset],
    settings: ExportSettings,
    geometry: SliceGeometry | None = None,
) -> list[Dataset]:
    """Every map in ``settings.maps`` as its own Parametric Map series.

    Series numbers: source + offset + index (0-based in ``settings.maps`` order).
    """
    return list(iter_parametric_maps(result, sources, settings, geometry))


def iter_parametric_maps(
    result: SeriesResult,
    sources: Sequence[Dataset],
    settings: ExportSettings,
    geometry: SliceGeometry | None = None,
    kinds: Collection[MapKind] | None = None,
) -> Iterator[Dataset]:
    """:func:`parametric_maps` one at a time (a 40 x 512 x 512 map is 42 MB of pixel data
    plus highdicom's working copies: the node builds, stores and frees one after another).
    ``kinds``: only these of ``settings.maps`` (each keeps its series number)."""
    geometry = geometry or slice_geometry(result, sources, settings)
    fp = parameter_fingerprint(result, settings)
    base = series_number_base(geometry.refs[0], settings)
    for i, kind in enumerate(settings.maps):
        if kinds is None or kind in kinds:
            yield parametric_map(result, kind, geometry, settings, base + i, fp, reuse=True)
    geometry.extra.pop(_TEMPLATE_KEY, None)
