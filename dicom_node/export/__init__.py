"""SeriesResult + source headers -> DICOM outputs (pure functions, no disk or network).

Outputs and their series numbers (source SeriesNumber + ``settings.series_number_offset``):

==================  =====================  =========================================
output              series number          function
==================  =====================  =========================================
Parametric Maps     + i (one per map)      :func:`parametric_maps`
maps as MR images   + 50 + i               :func:`map_mr_images` (optional)
synthetic contrasts + 100 + i              :func:`synthetic_images`
SEG                 + 200                  :func:`segmentation`
SR (TID 1500)       + 201                  :func:`report`
==================  =====================  =========================================

Every UID is derived from the source SeriesInstanceUID, the software version and the
parameters, so a re-run with the same inputs replaces the previous outputs in PACS.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields, replace
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset

from processing.results import SeriesResult

from .geometry import (
    SliceGeometry,
    reference_images,
    slice_geometry,
)
from .mr_images import iter_synthetic_series, map_mr_images, synthetic_images
from .parametric_map import iter_parametric_maps, parametric_maps
from .segmentation import segmentation
from .settings import (
    ALL_MAPS,
    ExportError,
    ExportSettings,
    MapKind,
    SegType,
)
from .sr import report

__all__ = [
    "ALL_MAPS",
    "ExportError",
    "ExportSettings",
    "MapKind",
    "SegType",
    "export_all",
    "export_groups",
    "map_mr_images",
    "parametric_maps",
    "reference_images",
    "report",
    "segmentation",
    "settings_for",
    "synthetic_images",
]


def export_all(
    result: SeriesResult, sources: Sequence[Dataset], settings: ExportSettings | None = None
) -> list[Dataset]:
    """Every configured output for one processed series, in send order.

    Order: parametric maps, map MR images, synthetic contrasts, SEG, SR (the SR
    references the SEG, so it comes last). SEG/SR/maps that the result cannot provide
    (no segmentation, no myelin) are skipped rather than failing the whole export.
    """
    return [ds for group in export_groups(result, sources, settings) for ds in group]


def _constant_b1(result: SeriesResult) -> bool:
    """The B1 map is one value over the fitted voxels: assumed, not measured (3D-QALAS
    without a B1 map series fits with the nominal flip angle, processing/QALAS.md). Its
    Parametric Map would carry no information (the provenance records the assumption)."""
    b1 = np.asarray(result.maps.b1)[np.asarray(result.maps.mask, bool)]
    return b1.size > 0 and bool(np.all(b1 == b1[0]))


def settings_for(result: SeriesResult, settings: ExportSettings | None) -> ExportSettings:
    """The settings every builder of this result gets: without the MYPV map when the
    result has no myelin maps, without the B1 map when B1 was assumed (one value over the
    fit) (the settings enter every output's provenance block)."""
    settings = settings or ExportSettings()
    maps = tuple(
        m
        for m in settings.maps
        if (m is not MapKind.MYPV or result.myelin is not None)
        and (m is not MapKind.B1 or not _constant_b1(result))
    )
    if maps != settings.maps:
        from dataclasses import replace

        settings = replace(settings, maps=maps)
    return settings


def without_arrays(obj: Any) -> Any:
    """A copy of a result dataclass (QuantMaps, MyelinMaps, SyntheticImage, ...) whose
    array fields are None (the arrays are no longer referenced through it)."""
    gone = {f.name: None for f in fields(obj) if isinstance(getattr(obj, f.name), np.ndarray)}
    return replace(obj, **gone)


def export_groups(
    result: SeriesResult,
    sources: Sequence[Dataset],
    settings: ExportSettings | None = None,
    *,
    synthetic: bool = True,
    geometry: SliceGeometry | None = None,
    part: Literal["all", "early", "late"] = "all",
    seg: Dataset | None = None,
    release: bool = False,
) -> Iterator[list[Dataset]]:
    """:func:`export_all` as it is built, a group of datasets at a time (each parametric
    map, the map MR images, each synthetic contrast series, the SEG, the SR), so the node
    stores and pushes a group while the next is encoded. ``synthetic=False``: without the
    synthetic contrast series (the node builds those in its worker meanwhile);
    ``geometry``: :func:`slice_geometry`'s, when the caller has it already.

    ``part``: ``"early"``, only what needs nothing but the maps, the segmentation and the
    provenance (the parametric maps but MYPV, the SEG), which the node builds while its
    worker still computes the rest; ``"late"``: everything else, with ``seg`` the SEG the
    early part built (the SR references it).

    ``release`` (not with ``"early"``): ``result`` lets go of each array once the groups
    that read it are handed over (the maps after the map series, the fractions after the
    SEG): the node's job frees its memory as it goes (40 x 512 x 512: ~40 MB a volume).
    The result then keeps only its figures; nobody may read its arrays afterwards."""
    settings = settings_for(result, settings)
    # once; every builder gets it
    geometry = geometry or slice_geometry(result, sources, settings)
    refs = sources
    early = None if part == "all" else [k for k in settings.maps if k is not MapKind.MYPV]
    if settings.maps_as_parametric_map and settings.maps:
        kinds = early if part != "late" else [k for k in settings.maps if k not in early]
        for pm in iter_parametric_maps(result, refs, settings, geometry, kinds):
            yield [pm]  # each map its own series: built, stored and freed one at a time
    if part == "early":
        if settings.export_segmentation and result.segmentation is not None:
            yield [segmentation(result, refs, settings, geometry)]
        return
    if settings.maps_as_mr_images and settings.maps:
        yield map_mr_images(result, refs, settings, geometry)
    if synthetic:
        yield from iter_synthetic_series(result, refs, settings, geometry)
    if release:  # nothing below reads the maps
        result.maps = without_arrays(result.maps)
        if result.myelin is not None:
            result.myelin = without_arrays(result.myelin)
    if part == "all" and settings.export_segmentation and result.segmentation is not None:
        seg = segmentation(result, refs, settings, geometry)
        yield [seg]
    if release and result.segmentation is not None:
        result.segmentation = replace(without_arrays(result.segmentation), fractions={})
    if settings.export_report and (result.volumes_ml or result.tissue_stats):
        yield [report(result, refs, settings, seg=seg, geometry=geometry)]
