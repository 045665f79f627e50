"""A contrast chosen in the tuner, made from a series' stored maps as a synthetic MR series.

UIDs are derived from the source series, the software version, the stored processing
provenance, the export settings and the chosen kind and times (rounded to 0.1 ms): the
same parameters give the same Series/SOP Instance UIDs, so sending twice replaces the
first series in PACS (and the outbox row), never duplicates it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.export.common import series_number_base
from dicom_node.export.geometry import slice_geometry
from dicom_node.export.mr_images import synthetic_series
from dicom_node.export.settings import ExportSettings
from dicom_node.export.uids import parameter_fingerprint
from dicom_node.seriesstore import StoredSeries
from processing.results import QuantMaps, SeriesResult
from processing.synthesis import ContrastKind, ContrastSpec, SynthesisError, synthesize

__all__ = ["TUNED_SERIES_OFFSET", "spec_from_request", "stored_result", "tuned_series"]

#: Series number of tuned contrasts: source + export offset + 300 (maps +0.., MR maps +50..,
#: contrasts +100.., SEG +200, SR +201, report +202/+203).
TUNED_SERIES_OFFSET = 300


def spec_from_request(body: dict) -> ContrastSpec:
    """``{"kind": "IR", "tr_ms": .., "te_ms": .., "ti_ms": .., "ti2_ms": ..}`` -> resolved spec
    (SynthesisError names a bad value)."""
    try:
        kind = ContrastKind(str(body.get("kind", "")).upper())
    except ValueError:
        raise SynthesisError(
            f"kind: {body.get('kind')!r} is not one of {[k.value for k in ContrastKind]}"
        ) from None

    def ms(key: str, needed: bool) -> float | None:
        v = body.get(key)
        if v is None or v == "":
            if needed:
                raise SynthesisError(f"{key}: required for {kind.value}")
            return None
        try:
            return round(float(v), 1)
        except (TypeError, ValueError):
            raise SynthesisError(f"{key}: not a number: {v!r}") from None

    needs_ti = kind is not ContrastKind.SE
    spec = ContrastSpec(
        name=f"TUNED_{kind.value}",
        kind=kind,
        tr_ms=ms("tr_ms", True),  # type: ignore[arg-type]
        te_ms=ms("te_ms", True),  # type: ignore[arg-type]
        ti_ms=ms("ti_ms", needs_ti) if needs_ti else None,
        ti2_ms=ms("ti2_ms", kind is ContrastKind.DIR) if kind is ContrastKind.DIR else None,
    )
    return spec.resolved()


def stored_result(stored: StoredSeries, *, mask_only: bool = False) -> SeriesResult:
    """A SeriesResult carrying the stored maps, geometry and provenance (no contrasts).
    ``mask_only``: of the maps only the mask (the others None, not inflated from the
    store: what a map of other data and the fingerprint need)."""
    m = stored.meta
    if mask_only:
        mask = stored.arrays(("mask",))["mask"]
        maps = QuantMaps(*(None,) * 6, mask=mask, failed=None)  # type: ignore[arg-type]
    else:
        maps = stored.quant_maps()
    return SeriesResult(
        shape=tuple(m["shape"]),  # type: ignore[arg-type]
        voxel_size_mm=tuple(m["voxel_size_mm"]),  # type: ignore[arg-type]
        affine=np.asarray(m["affine"], float),
        maps=maps,
        volumes_ml=dict(m.get("volumes_ml") or {}),
        provenance=dict(m.get("provenance") or {}),
    )


def tuned_series(
    stored: StoredSeries, spec: ContrastSpec, settings: ExportSettings
) -> list[Dataset]:
    """The tuned contrast as a classic MR series (one instance per slice)."""
    result = stored_result(stored)
    syn = synthesize(result.maps, spec)
    syn = replace(
        syn,
        parameters={**syn.parameters, "made_by": "contrast tuner (web)", "method": "tuned"},
    )
    result.synthetic = {syn.name: syn}
    refs = stored.references()
    geometry = slice_geometry(result, refs, settings)
    timing = {k: getattr(spec, k) for k in ("tr_ms", "te_ms", "ti_ms", "ti2_ms")}
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "base": parameter_fingerprint(result, settings),
                "kind": spec.kind.value,
                "timing": timing,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    number = series_number_base(geometry.refs[0], settings) + TUNED_SERIES_OFFSET
    return synthetic_series(result, syn, geometry, settings, number, fingerprint)
