"""DICOM Part-10 encoding of the outputs, and its shortcut for the slices of one series.

The slices of a classic MR series differ in a handful of top-level elements (SOP instance,
instance number, position, source reference, pixels: :mod:`.mr_images`); everything else is
the same bytes. :class:`SliceEncoder` encodes a series' first slice with pydicom, keeps its
elements' bytes, and makes each further slice by encoding only the elements that differ
and splicing them in (~10x cheaper per slice than building and encoding a whole dataset;
the same bytes: it checks the first slice's splice against pydicom's own encoding and
falls back to that when they differ).
"""

from __future__ import annotations

import io
import struct
import weakref
from collections.abc import Iterable
from typing import Any

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_dataset
from pydicom.tag import BaseTag, ItemDelimiterTag, ItemTag, SequenceDelimiterTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

__all__ = ["SliceEncoder", "encode_part10", "freeze"]


def encode_part10(ds: Dataset) -> bytes:
    """Encode a dataset as a DICOM Part-10 file (adds file meta when missing): pydicom's
    bytes, with the pixel data copied once instead of ~5 times and the sequences
    :func:`freeze` marked encoded once (:func:`_encode_in_runs`)."""
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
    read = ds.original_encoding != (None, None)  # from a file: raw elements, own encoding
    if read or ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        return _dcmwrite(ds)
    frozen = _frozen_elements(ds) if _FROZEN else {}
    charset = ds.get("SpecificCharacterSet", default_encoding)
    key = str(charset)
    if any(key not in cache for cache in frozen.values()):
        data = _dcmwrite(ds)  # also corrects the ambiguous VRs in the sequences
        for tag, cache in frozen.items():
            fp = _buffer()
            write_data_element(fp, ds[tag], charset)
            cache.setdefault(key, fp.getvalue())
        return data
    ready = {tag: [cache[key]] for tag, cache in frozen.items()}
    trees = [BaseTag(t) for t in _TREE_TAGS if t in ds and t not in ready]
    if trees:
        # the ambiguous VRs of the whole dataset at once, as dcmwrite does first; the
        # trees are then written without pydicom's correction again at every level
        correct_ambiguous_vr(ds, True)
        for tag in trees:
            fp = _buffer()
            _write_sequence_element(fp, ds[tag], charset)
            ready[tag] = [fp.getvalue()]
    if not ready and not any(_bulk(ds, tag) for tag in _PIXEL_TAGS):
        return _dcmwrite(ds)
    return _encode_in_runs(ds, ready, charset)


#: sequences of hundreds of nested items (an SR's content tree, the functional groups of
#: a multi-frame image), which :func:`_write_sequence_element` writes: pydicom's
#: ``write_dataset`` corrects the ambiguous VRs of every item again at every level of a
#: tree (~1/3 of an SR's encoding)
_TREE_TAGS = (0x0040A730, 0x52009229, 0x52009230)


def _write_sequence_element(fp: DicomBytesIO, elem: DataElement, charset: Any) -> None:
    """pydicom's ``write_data_element`` of a sequence (explicit VR little endian), its
    items written by :func:`_write_item_elements` (no VR correction: done already)."""
    encodings = convert_encodings(charset or [default_encoding])
    body = _buffer()
    if not elem.is_empty:
        for item in elem.value:
            body.write_tag(ItemTag)
            inner = _buffer()
            _write_item_elements(inner, item, encodings)
            if getattr(item, "is_undefined_length_sequence_item", False):
                body.write_UL(0xFFFFFFFF)
                body.write(inner.getvalue())
                body.write_tag(ItemDelimiterTag)
                body.write_UL(0)
            else:
                body.write_UL(inner.tell())
                body.write(inner.getvalue())
    fp.write_tag(elem.tag)
    fp.write(b"SQ")
    fp.write_US(0)
    fp.write_UL(0xFFFFFFFF if elem.is_undefined_length else body.tell())
    fp.write(body.getvalue())
    if elem.is_undefined_length:
        fp.write_tag(SequenceDelimiterTag)
        fp.write_UL(0)


def _write_item_elements(fp: DicomBytesIO, item: Dataset, parent_encoding: Any) -> None:
    """pydicom's ``write_dataset`` of a sequence item, minus its VR correction."""
    if item.original_encoding != (None, None):
        # decoded from a file: pydicom writes its elements as they were read (raw values,
        # trailing spaces and all), the ambiguous VRs corrected where the encoding changes
        write_dataset(fp, item, parent_encoding=parent_encoding)
        return
    charset = item.get("SpecificCharacterSet", parent_encoding)
    for tag in sorted(item.keys()):
        if tag.element == 0 and tag.group > 6:  # no group lengths, as pydicom
            continue
        elem = item[tag]
        if elem.VR == "SQ" and not elem.is_raw:
            _write_sequence_element(fp, elem, charset)
        else:
            write_data_element(fp, elem, charset)


def _dcmwrite(ds: Dataset) -> bytes:
    """pydicom's own Part-10 encoding of ``ds`` (the reference every shortcut here equals)."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


#: id(sequence) -> (a weak reference to it, its encoding per character set)
#: (single dict operations, atomic under the GIL: no lock, which a weak reference's
#: callback run by the garbage collector inside a locked block would wait on forever)
_FROZEN: dict[int, tuple[weakref.ref, dict[str, bytes]]] = {}


def freeze(elem: DataElement) -> None:
    """Promise that the sequence of ``elem`` (shared by several outputs, e.g. the Parametric
    Maps' per-frame functional groups: a few hundred items) is not changed any more, so
    that :func:`encode_part10` encodes it once and reuses its bytes (as long as it lives).
    """
    value = elem.value
    key = id(value)

    def forget(_: weakref.ref, key: int = key) -> None:
        _FROZEN.pop(key, None)

    _FROZEN_TAGS.add(elem.tag)
    _FROZEN[key] = (weakref.ref(value, forget), {})


#: the tags of the elements :func:`freeze` was given (where to look for frozen sequences)
_FROZEN_TAGS: set[BaseTag] = set()


def _frozen_elements(ds: Dataset) -> dict[BaseTag, dict[str, bytes]]:
    """The top-level elements of ``ds`` whose value is a frozen sequence: tag -> the
    sequence's encodings (after the SOP Instance UID: the file meta is made from the rest)."""
    out = {}
    for tag in list(_FROZEN_TAGS):
        if tag <= 0x00080018 or tag not in ds:
            continue
        elem = ds.get_item(tag)
        if isinstance(elem, DataElement) and elem.VR == "SQ":
            entry = _FROZEN.get(id(elem.value))
            if entry is not None and entry[0]() is elem.value:
                out[tag] = entry[1]
    return out


#: the bulk pixel data elements, written by :func:`_encode_in_runs` as their bytes
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)
_BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW"}


#: pixel data from this size on is worth writing in runs (below, pydicom's ~5 copies cost
#: less than taking the dataset apart)
_BULK_BYTES = 4 << 20


def _bulk(ds: Dataset, tag: int) -> bool:
    """Whether ``ds`` has pixel data element ``tag`` as bytes of at least _BULK_BYTES."""
    elem = ds.get_item(tag) if tag in ds else None
    return (
        isinstance(elem, DataElement)
        and isinstance(elem.value, bytes)
        and len(elem.value) >= _BULK_BYTES
    )


def _buffer() -> DicomBytesIO:
    """An empty buffer that encodes explicit VR little endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return fp


def _encode_in_runs(
    ds: Dataset, ready: dict[BaseTag, list[bytes]], charset: str | list[str]
) -> bytes:
    """:func:`pydicom.dcmwrite`'s bytes of ``ds`` (Explicit VR Little Endian) with the
    elements of ``ready`` taken as they are (encoded frozen sequences) and the pixel data
    written as its header and its bytes: the dataset in runs between them (the first run,
    with the file meta, by dcmwrite; the others by its ``write_dataset``), after the
    ambiguous VRs of all the rest were corrected in one piece, as dcmwrite does."""
    rest = Dataset()
    for tag in ds.keys():
        if tag not in ready:
            rest.add(ds.get_item(tag))
    correct_ambiguous_vr(rest, True)
    if "PixelData" in rest:  # what dcmwrite sets for an uncompressed syntax
        rest["PixelData"].is_undefined_length = False
    ready = dict(ready)
    for tag in _PIXEL_TAGS:
        elem = rest.get_item(tag) if tag in rest else None
        if (
            isinstance(elem, DataElement)
            and elem.VR in _BULK_VRS
            and isinstance(elem.value, bytes)
            and len(elem.value) % 2 == 0
            and not elem.is_undefined_length
        ):
            head = struct.pack(
                "<HH2sHI", tag >> 16, tag & 0xFFFF, elem.VR.encode(), 0, len(elem.value)
            )
            ready[BaseTag(tag)] = [head, elem.value]
            del rest[tag]
    cuts = sorted(ready)
    runs: list[Dataset] = [Dataset() for _ in range(len(cuts) + 1)]
    at = 0
    for tag in sorted(rest.keys()):
        while at < len(cuts) and tag > cuts[at]:
            at += 1
        runs[at].add(rest.get_item(tag))
    first = runs[0]
    first.file_meta = ds.file_meta
    if getattr(ds, "preamble", None) is not None:
        first.preamble = ds.preamble
    parts = [_dcmwrite(first)]
    for tag, run in zip(cuts, runs[1:], strict=True):
        parts += ready[tag]
        if len(run):
            fp = _buffer()
            write_dataset(fp, run, parent_encoding=charset)
            parts.append(fp.getvalue())
    return b"".join(parts)


#: explicit VR little endian: the VRs with a 4-byte length (after 2 reserved bytes)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_PREFIX = 128 + 4  # preamble + "DICM"
_GROUP_LENGTH = 12  # (0002,0000) UL, explicit VR little endian
_MEDIA_SOP_INSTANCE = 0x00020003


def _meta_elements(meta: bytes) -> list[tuple[int, bytes]]:
    """The File Meta elements after the group length, (tag, encoded bytes) in file order."""
    out, at = [], 0
    while at < len(meta):
        group, elem = struct.unpack_from("<HH", meta, at)
        vr = meta[at + 4 : at + 6]
        if vr in _LONG_VRS:
            end = at + 12 + struct.unpack_from("<I", meta, at + 8)[0]
        else:
            end = at + 8 + struct.unpack_from("<H", meta, at + 6)[0]
        out.append(((group << 16) | elem, meta[at:end]))
        at = end
    return out


class SliceEncoder:
    """Part-10 bytes of datasets that are ``template`` apart from some top-level elements.

    ``varying``: the per-instance elements of the template's own instance (a Dataset holding
    only them, with the template's values): which tags differ, and the check that
    splicing them gives the template's encoding. ``full`` is the template's encoding;
    :meth:`encode` that of the template with another instance's elements (a Dataset with
    the same tags, ``SOPInstanceUID`` among them: the file meta carries it too)."""

    def __init__(self, template: Dataset, varying: Dataset) -> None:
        self.full = encode_part10(template)
        self._tags: frozenset[BaseTag] = frozenset(varying.keys())
        self._encoding = template.get("SpecificCharacterSet", default_encoding)
        (meta_length,) = struct.unpack_from("<I", self.full, _PREFIX + 8)
        meta_end = _PREFIX + _GROUP_LENGTH + meta_length
        self._meta_head = self.full[: _PREFIX + 8]  # preamble, DICM, the group length's header
        self._meta = _meta_elements(self.full[_PREFIX + _GROUP_LENGTH : meta_end])
        # the dataset as runs of unchanging bytes between the per-instance tags
        self._plan: list[bytes | BaseTag] = []
        static: list[bytes] = []
        for tag in sorted(template.keys()):
            if tag.element == 0 and tag.group > 6:  # pydicom writes no group lengths
                continue
            if tag in self._tags:
                self._plan += [b"".join(static), tag]
                static = []
            else:
                static.append(self._element(template[tag]))
        self._plan.append(b"".join(static))
        self.spliceable = (
            self._tags <= set(template.keys())
            and "SOPInstanceUID" in varying
            and self.encode(varying) == self.full
        )

    def _element(self, elem: DataElement) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, self._encoding)
        return fp.getvalue()

    def encode(self, varying: Dataset) -> bytes:
        """The Part-10 bytes of the template with ``varying``'s elements instead of its own
        (only when :attr:`spliceable`; else encode the whole dataset)."""
        if frozenset(varying.keys()) != self._tags:  # an element would be lost or missing
            got = set(varying.keys())
            raise ValueError(
                f"slice splice: per-instance elements {sorted(got - self._tags)} are not "
                f"the template's, {sorted(self._tags - got)} are missing"
            )
        sop = self._element(DataElement(_MEDIA_SOP_INSTANCE, "UI", varying.SOPInstanceUID))
        meta = [sop if tag == _MEDIA_SOP_INSTANCE else data for tag, data in self._meta]
        parts: list[bytes] = [self._meta_head, struct.pack("<I", sum(map(len, meta))), *meta]
        parts += self._dataset_parts(varying)
        return b"".join(parts)

    def _dataset_parts(self, varying: Dataset) -> Iterable[bytes]:
        for part in self._plan:
            yield part if isinstance(part, bytes) else self._element(varying[part])
