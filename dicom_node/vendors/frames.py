"""Per-frame header records from classic and Enhanced MR datasets.

A classic instance is one frame; an Enhanced MR instance has ``NumberOfFrames`` frames
whose attributes live in the per-frame and shared functional groups (and, for Philips, a
private per-frame item). :func:`frame_records` flattens both into :class:`Frame` records
that the grid sorter consumes. No pixel data is touched here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

__all__ = ["Frame", "frame_records", "lookup", "parse_tag"]

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
_PRIVATE_RE = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)?$")
_TAG_CACHE: dict[str, BaseTag] = {}

# Enhanced MR spells some classic attributes differently; classic name -> alternatives.
_ALIASES: dict[str, tuple[str, ...]] = {
    "EchoTime": ("EchoTime", "EffectiveEchoTime"),
    "InversionTime": ("InversionTime", "InversionTimes"),
    "TriggerTime": ("TriggerTime", "NominalCardiacTriggerDelayTime"),
    "TemporalPositionIndex": ("TemporalPositionIndex",),
}


def parse_tag(name: str) -> BaseTag:
    """A pydicom keyword or ``"(gggg,eeee)"`` -> Tag. Raises ValueError naming the rule."""
    tag = _TAG_CACHE.get(name)
    if tag is not None:
        return tag
    m = _PRIVATE_RE.match(name)
    try:
        tag = Tag(int(m.group(1), 16), int(m.group(2), 16)) if m else Tag(name)
    except (ValueError, TypeError):
        raise ValueError(f"unknown DICOM attribute {name!r} in a vendor rule") from None
    _TAG_CACHE[name] = tag
    return tag


_NUMERIC = {"FL": "f4", "FD": "f8", "SS": "i2", "US": "u2", "SL": "i4", "UL": "u4"}


def _fast_value(src: Dataset, raw: Any) -> Any:
    """Decode DS/IS/binary numbers straight from a raw element (pydicom's conversion is
    the hot spot when sorting hundreds of files); anything else goes through pydicom."""
    vr = raw.VR
    data = raw.value
    if isinstance(data, bytes | bytearray) and vr is not None:
        try:
            if vr in ("DS", "IS"):
                parts = [p.strip() for p in data.split(b"\\")]
                vals = [float(p) if vr == "DS" else int(float(p)) for p in parts if p]
                return vals[0] if len(vals) == 1 else (vals or None)
            code = _NUMERIC.get(vr)
            if code is not None and src.is_little_endian is not None:
                arr = np.frombuffer(data, dtype=("<" if src.is_little_endian else ">") + code)
                vals = arr.tolist()
                return vals[0] if len(vals) == 1 else (vals or None)
        except ValueError:
            pass
    return src[raw.tag].value


def lookup(sources: Sequence[Dataset], name: str) -> Any:
    """First value of ``name`` (or its enhanced alias) found in ``sources``, else None."""
    tags = [parse_tag(a) for a in _ALIASES.get(name, (name,))]
    for src in sources:  # source-major: the most specific source wins
        for tag in tags:
            if tag not in src._dict:
                continue
            raw = src._dict[tag]
            if type(raw).__name__ == "RawDataElement":
                value = _fast_value(src, raw)
                if value is None or value == "":
                    continue
                return value
            elem = raw
            if elem is not None:
                value = elem.value
                if value is None or value == "" or (isinstance(value, list | tuple) and not value):
                    continue
                return value
    return None


@dataclass(eq=False)
class Frame:
    """One 2-D image: which dataset/frame it is and the sources to look attributes up in."""

    index: int  # position in the input dataset list
    frame: int | None  # 0-based frame number in a multi-frame instance, None for classic
    sop_uid: str
    sources: tuple[Dataset, ...]

    def get(self, name: str) -> Any:
        # cached: detection and normalization ask for the same attributes
        try:
            return self._cache[name]
        except KeyError:
            v = self._cache[name] = lookup(self.sources, name)
            return v
        except AttributeError:
            self._cache: dict[str, Any] = {}
            v = self._cache[name] = lookup(self.sources, name)
            return v


def _group_items(group: Dataset | None) -> list[Dataset]:
    """The single items of a functional-group item's sequences (per-frame or shared)."""
    if group is None:
        return []
    items: list[Dataset] = []
    for elem in group:
        if elem.VR == "SQ" and elem.value:
            items.extend(elem.value)
    return items


def frame_records(datasets: Sequence[Dataset]) -> list[Frame]:
    """Flatten classic and Enhanced MR datasets into one :class:`Frame` per 2-D image."""
    frames: list[Frame] = []
    for i, ds in enumerate(datasets):
        sop = str(ds.get("SOPInstanceUID", ""))
        pffg = ds.get("PerFrameFunctionalGroupsSequence")
        if pffg is None:
            frames.append(Frame(i, None, sop, (ds,)))
            continue
        sfg = ds.get("SharedFunctionalGroupsSequence")
        shared = _group_items(sfg[0] if sfg else None)
        n = int(ds.get("NumberOfFrames", len(pffg)) or len(pffg))
        if len(pffg) != n:
            raise ValueError(
                f"instance {sop}: NumberOfFrames {n} but {len(pffg)} per-frame functional groups"
            )
        for k, item in enumerate(pffg):
            # per-frame before shared before the top level: the most specific value wins
            frames.append(Frame(i, k, sop, (*_group_items(item), *shared, ds)))
    return frames
