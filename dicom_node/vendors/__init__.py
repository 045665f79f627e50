"""Vendor adapters: recognize an MDME series and normalize it to an ``Acquisition``.

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
    detect,
    expected_count,
    frame_images,
    normalize,
    vendor_of,
)
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
