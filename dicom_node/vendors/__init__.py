"""Vendor adapters: recognize an MDME or 3D-QALAS series and normalize it to an
``Acquisition`` (QALAS: :mod:`dicom_node.vendors.qalas`).

Public API::

    detect(datasets, rules=None) -> Detection
    normalize(datasets, rules=None) -> processing.acquisition.Acquisition
    expected_count(dataset, rules=None) -> int | None
    load_rules(overrides=None) -> dict[str, VendorRules]   # [vendors.<name>] TOML tables

Every vendor is a rule table (:class:`VendorRules`, data not code): GE, Siemens, Philips
and a generic fallback.
"""

from dicom_node.vendors.frames import Frame, frame_records
from dicom_node.vendors.normalize import (
    MR_SOP_CLASSES,
    Detection,
    NormalizationError,
    expected_count,
    frame_images,
    vendor_of,
)
from dicom_node.vendors.normalize import detect as _detect_mdme
from dicom_node.vendors.normalize import normalize as _normalize_mdme
from dicom_node.vendors.rules import DEFAULT_RULES, INTERLEAVE, VendorRules, load_rules

__all__ = [
    "DEFAULT_RULES",
    "INTERLEAVE",
    "MR_SOP_CLASSES",
    "Detection",
    "Frame",
    "NormalizationError",
    "VendorRules",
    "detect",
    "expected_count",
    "frame_images",
    "frame_records",
    "load_rules",
    "normalize",
    "vendor_of",
]


def detect(datasets, rules=None) -> Detection:
    """Decide whether ``datasets`` are an input the node processes: MDME or 3D-QALAS
    (``is_mdme`` is True for both; the reason names the sequence)."""
    from dicom_node.vendors.qalas import is_qalas

    if is_qalas(datasets):
        table = rules if rules is not None else load_rules(None)
        r = vendor_of(datasets[0], table)
        return Detection(True, r.name, r, f"{r.name}: 3D-QALAS marker in the description")
    return _detect_mdme(datasets, rules)


def normalize(datasets, rules=None):
    """Normalize an MDME (:func:`dicom_node.vendors.normalize.normalize`) or 3D-QALAS
    (:func:`dicom_node.vendors.qalas.normalize_qalas`) series into an ``Acquisition``."""
    from dicom_node.vendors.qalas import is_qalas, normalize_qalas

    if is_qalas(datasets):
        return normalize_qalas(datasets, rules)
    return _normalize_mdme(datasets, rules)
