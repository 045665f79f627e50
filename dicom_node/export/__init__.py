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

from collections.abc import Sequence

from pydicom.dataset import Dataset

from processing.results import SeriesResult

from .geometry import (
    reference_images,
    slice_geometry,
)
from .mr_images import map_mr_images, synthetic_images
from .parametric_map import parametric_maps
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
    "map_mr_images",
    "parametric_maps",
    "reference_images",
    "report",
    "segmentation",
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
    settings = settings or ExportSettings()
    geometry = slice_geometry(result, sources, settings)  # once; every builder gets it
    refs = sources
    maps = tuple(m for m in settings.maps if m is not MapKind.MYPV or result.myelin is not None)
    if maps != settings.maps:
        from dataclasses import replace

        settings = replace(settings, maps=maps)
    out: list[Dataset] = []
    if settings.maps_as_parametric_map and settings.maps:
        out += parametric_maps(result, refs, settings, geometry)
    if settings.maps_as_mr_images and settings.maps:
        out += map_mr_images(result, refs, settings, geometry)
    out += synthetic_images(result, refs, settings, geometry)
    seg = None
    if settings.export_segmentation and result.segmentation is not None:
        seg = segmentation(result, refs, settings, geometry)
        out.append(seg)
    if settings.export_report and (result.volumes_ml or result.tissue_stats):
        out.append(report(result, refs, settings, seg=seg, geometry=geometry))
    return out
