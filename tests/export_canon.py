"""Compare exported datasets attribute by attribute, apart from the clock.

Used by tests/test_export_builders.py (direct builders against highdicom's) and
benchmarks/export_equivalence.py (every output before/after a change). Creation, content
and series dates/times, and the file meta's implementation identity (which library wrote
the file), are the only things left out.
"""

from __future__ import annotations

import hashlib
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

#: date/time attributes set from the clock when an output is built
CLOCK_KEYWORDS = frozenset(
    {
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ContentDate",
        "ContentTime",
        "SeriesDate",
        "SeriesTime",
        "DateTime",  # SR observation date/time items
        "ObservationDateTime",
        "VerificationDateTime",
        "ContributionDateTime",  # highdicom's own Contributing Equipment item
    }
)
#: file meta attributes that name the library that wrote the file
IMPLEMENTATION_KEYWORDS = frozenset({"ImplementationClassUID", "ImplementationVersionName"})


def encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _walk(ds: Dataset, path: str = "") -> dict[str, tuple[str, Any]]:
    out: dict[str, tuple[str, Any]] = {}
    for elem in ds:
        kw = elem.keyword or str(elem.tag)
        here = f"{path}{kw}"
        if elem.keyword in CLOCK_KEYWORDS:
            continue
        if elem.VR == "SQ":
            out[here] = ("SQ", len(elem.value))
            for i, item in enumerate(elem.value):
                out.update(_walk(item, f"{here}[{i}]."))
        else:
            value = elem.value
            if isinstance(value, (bytes, bytearray)):
                value = hashlib.sha256(value).hexdigest()
            elif isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
                value = tuple(str(v) for v in value)
            else:
                value = str(value)
            out[here] = (elem.VR, value)
    return out


def flat(ds: Dataset) -> dict[str, tuple[str, Any]]:
    """Every attribute of ``ds`` (nested paths, VR and value as read back from its
    encoding), the file meta included, minus the clock and implementation identity."""
    back = pydicom.dcmread(BytesIO(encode(ds)))
    out = {
        f"meta.{k}": v
        for k, v in _walk(back.file_meta).items()
        if k not in IMPLEMENTATION_KEYWORDS and k != "FileMetaInformationGroupLength"
    }
    out.update(_walk(back))
    return out


def differences(a: Dataset, b: Dataset, limit: int = 20) -> list[str]:
    """Attributes that differ between ``a`` and ``b`` (empty: the same content)."""
    fa, fb = flat(a), flat(b)
    out = []
    for key in sorted(set(fa) | set(fb)):
        if fa.get(key) != fb.get(key):
            out.append(f"{key}: {fa.get(key)!r} != {fb.get(key)!r}")
            if len(out) >= limit:
                break
    return out


def digest(ds: Dataset) -> str:
    """A hash of :func:`flat` (equal digests: the same content apart from the clock)."""
    h = hashlib.sha256()
    for key, (vr, value) in sorted(flat(ds).items()):
        h.update(f"{key}\x00{vr}\x00{value}\x01".encode())
    return h.hexdigest()[:16]


__all__ = ["CLOCK_KEYWORDS", "Sequence", "differences", "digest", "encode", "flat"]
