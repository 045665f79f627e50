"""Deterministic UIDs and provenance: same inputs, version and parameters -> same UIDs."""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from processing._version import __version__
from processing.results import SeriesResult

from .settings import PRIVATE_CREATOR, PRIVATE_GROUP, ExportSettings

__all__ = [
    "add_private_provenance",
    "derive_uid",
    "model_hash",
    "parameter_fingerprint",
    "pin_dimension_organization_uid",
    "provenance_text",
    "source_digest",
]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 64 else f"array{obj.shape}"
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


_SELECTION_FIELDS = frozenset(
    {
        "contrasts",
        "maps",
        "maps_as_parametric_map",
        "maps_as_mr_images",
        "export_segmentation",
        "export_report",
        "qc_fail",  # delivery policy, not content
        "multiframe_3d",  # packaging (classic or Enhanced MR), not content
    }
)


def source_digest(datasets: Sequence[Dataset]) -> str:
    """sha256 of the source instances as received: each one's SOP Instance UID and every
    element's encoded value (pixel data included), in SOP UID order.

    It joins the processing provenance, so it enters every output UID: the same instances
    give the same UIDs (a re-run replaces), changed or added instances give new ones (a UID
    names one unchanging object; the node retires the superseded version)."""
    h = hashlib.sha256()
    for ds in sorted(datasets, key=lambda d: str(d.get("SOPInstanceUID", ""))):
        h.update(str(ds.get("SOPInstanceUID", "")).encode() + b"\0")
        for tag in ds.keys():
            value = ds.get_item(tag).value  # raw bytes when not yet decoded
            h.update(int(tag).to_bytes(4, "little"))
            h.update(
                bytes(value) if isinstance(value, (bytes, bytearray)) else repr(value).encode()
            )
    return h.hexdigest()


def parameter_fingerprint(result: SeriesResult, settings: ExportSettings) -> str:
    """sha256 of the processing provenance + export settings (stable across runs).

    Output *selection* (which maps/contrasts/objects) is left out, so exporting one more
    contrast later does not change the UIDs of the outputs already in PACS.
    """
    export = {k: v for k, v in settings.as_dict().items() if k not in _SELECTION_FIELDS}
    payload = json.dumps(
        {"provenance": _jsonable(result.provenance), "export": _jsonable(export)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def derive_uid(
    settings: ExportSettings, source_series_uid: str, fingerprint: str, *parts: str
) -> UID:
    """Deterministic UID: same source series, software version, parameters and output
    identity (``parts``, e.g. ``("PM", "T1")``) give the same UID, so a re-run replaces."""
    return generate_uid(
        prefix=settings.uid_root,
        entropy_srcs=[str(source_series_uid), __version__, fingerprint, *map(str, parts)],
    )


def pin_dimension_organization_uid(ds: Dataset, uid: str) -> None:
    """Replace the DimensionOrganizationUID highdicom draws at random (a fresh one per call;
    0.28 takes none) with ``uid`` (from :func:`derive_uid`), in the Dimension Organization
    Sequence and in every Dimension Index item that carries it, so a re-export of the same
    result gives identical datasets."""
    items = list(ds.get("DimensionOrganizationSequence") or [])
    drawn = {str(item.DimensionOrganizationUID) for item in items}
    for item in items:
        item.DimensionOrganizationUID = uid
    for item in ds.get("DimensionIndexSequence") or []:
        if str(item.get("DimensionOrganizationUID", "")) in drawn:
            item.DimensionOrganizationUID = uid


def model_hash(result: SeriesResult) -> str:
    """The ONNX model sha256 recorded by processing (empty when no model ran)."""
    prov = result.provenance
    for key in ("model_sha256", "model_hash", "onnx_sha256"):
        if prov.get(key):
            return str(prov[key])
    enh = prov.get("enhance")
    if isinstance(enh, dict):
        for key in ("model_sha256", "sha256"):
            if enh.get(key):
                return str(enh[key])
    return ""


def provenance_text(result: SeriesResult, settings: ExportSettings, limit: int = 10240) -> str:
    """Human-readable provenance: software, model hash, parameters (JSON), capped."""
    mh = model_hash(result)
    text = (
        f"synthmr {__version__} synthetic MRI (not acquired)."
        + (f" ONNX model sha256 {mh}." if mh else "")
        + " Parameters: "
        + json.dumps(_jsonable(result.provenance), sort_keys=True, separators=(",", ":"))
    )
    return text if len(text) <= limit else text[: limit - 3] + "..."


def add_private_provenance(ds: Dataset, result: SeriesResult, settings: ExportSettings) -> None:
    """Write software version, model hash and full parameters into a private block."""
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", f"synthmr {__version__}")
    block.add_new(0x02, "LO", model_hash(result) or "none")
    block.add_new(
        0x03,
        "UT",
        json.dumps(
            {
                "software_version": __version__,
                "provenance": _jsonable(result.provenance),
                "export": _jsonable(settings.as_dict()),
            },
            sort_keys=True,
        ),
    )
