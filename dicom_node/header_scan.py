"""A received instance's identity and image checks without pydicom: the C-STORE fast path.

:func:`dicom_node.spool.read_header` parses every received instance with pydicom and checks
it (~0.5 ms of CPU per 256x256 image, held under the GIL that all associations share).
:func:`scan_header` walks the encoded elements of the usual case, a native (uncompressed)
little endian dataset, from their headers alone: it proves that the dataset is whole (every
element, sequence and item ends inside the bytes, the last exactly at the end), reads the
five identifying attributes and the image attributes, and makes the same image checks as
:func:`dicom_node.validate.check_instance`. It returns the values only when every check
passes and nothing is unusual; anything else (another transfer syntax, encapsulated or
float pixel data, an attribute with an unexpected VR, multiple or non-ASCII values, a
failed check) returns None and the caller takes pydicom's path, which gives the error
message. So the fast path changes no answer, only what a valid instance costs.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping

from dicom_node.elements import LONG_VRS

__all__ = ["Part10Error", "read_meta_group", "scan_header"]

_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"

#: every other explicit VR: a 2-byte length (any two upper-case letters, as before: an
#: unknown VR is pydicom's to judge)
_SHORT_VRS = (
    frozenset(
        bytes((a, b)) for a in range(ord("A"), ord("Z") + 1) for b in range(ord("A"), ord("Z") + 1)
    )
    - LONG_VRS
)
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD

_HEAD = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_EXPLICIT = struct.Struct("<HH2sH")  # tag, VR, short length
_IMPLICIT = struct.Struct("<HHI")  # tag, length

# attributes read at the top level: tag -> (keyword, accepted explicit VRs)
_SOP_CLASS, _SOP_INSTANCE, _MODALITY = 0x00080016, 0x00080018, 0x00080060
_STUDY, _SERIES = 0x0020000D, 0x0020000E
_SAMPLES, _FRAMES, _ROWS, _COLUMNS, _BITS = (
    0x00280002,
    0x00280008,
    0x00280010,
    0x00280011,
    0x00280100,
)
_PIXEL_DATA, _FLOAT_PIXELS, _DOUBLE_PIXELS = 0x7FE00010, 0x7FE00008, 0x7FE00009
_WANTED = {
    _SOP_CLASS: (b"UI",),
    _SOP_INSTANCE: (b"UI",),
    _MODALITY: (b"CS",),
    _STUDY: (b"UI",),
    _SERIES: (b"UI",),
    _SAMPLES: (b"US",),
    _FRAMES: (b"IS",),
    _ROWS: (b"US",),
    _COLUMNS: (b"US",),
    _BITS: (b"US",),
    _PIXEL_DATA: (b"OB", b"OW"),
    _FLOAT_PIXELS: (b"OF",),
    _DOUBLE_PIXELS: (b"OD",),
}


class _Unusual(Exception):
    """Not the plain case: the caller takes pydicom's path."""


def _text(raw: bytes) -> str:
    """A single ASCII value as pydicom reads it (trailing NUL and spaces dropped)."""
    if b"\\" in raw:
        raise _Unusual  # several values
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _Unusual from None
    text = text.rstrip("\x00 ")
    if text != text.strip():
        raise _Unusual  # leading spaces: pydicom's rules decide
    return text


class Part10Error(ValueError):
    """A file whose Part-10 header (preamble, DICM, group 0002) this reader cannot walk."""


def read_meta_group(
    data: bytes | memoryview,
    wanted: Mapping[int, str],
    decode: Callable[[bytes], str],
    end: int | None = None,
) -> tuple[dict[str, str], int]:
    """Walk the file meta group (always explicit VR little endian, PS3.10 7.1) from offset
    132 (after preamble and "DICM", which the caller checked): the ``decode``-d values of
    the ``wanted`` elements (element number -> name) by name, and the offset after the
    group. With ``end`` (where the group length says the dataset starts) the group must
    fill the bytes up to it exactly; without, it ends at the first element of another
    group. Raises :class:`Part10Error` when an element ends beyond the bytes (or ``end``)
    or has an undefined length, or (with ``end``) one of another group comes first.

    The one meta reader of the node: the C-STORE fast path (:func:`scan_header`) and the
    push's (:func:`dicom_node.requestor.part10_meta`)."""
    limit = len(data) if end is None else end
    pos = 132
    found: dict[str, str] = {}
    while end is None or pos < end:
        if pos + 8 > limit:
            raise Part10Error("file meta truncated")
        group, elem, vr, length = _EXPLICIT.unpack_from(data, pos)
        if group != 0x0002:
            if end is None:
                break
            raise Part10Error("an element of another group inside the file meta")
        if vr in LONG_VRS:
            if pos + 12 > limit:
                raise Part10Error("file meta truncated")
            length = _U32.unpack_from(data, pos + 8)[0]
            pos += 12
        else:
            pos += 8
        if length == _UNDEFINED or pos + length > limit:
            raise Part10Error("file meta truncated or of undefined length")
        if elem in wanted:
            found[wanted[elem]] = decode(bytes(data[pos : pos + length]))
        pos += length
    return found, pos


#: what the fast path reads of the file meta
_META_WANTED = {0x0002: "sop_class", 0x0010: "transfer_syntax"}


def _skip_items(
    data: bytes, pos: int, end: int, explicit: bool, depth: int, delimited: bool
) -> int:
    """Walk a sequence's items from ``pos``: up to its sequence delimiter (``delimited``,
    undefined length) or exactly to ``end`` (defined length); return the offset after it."""
    while delimited or pos < end:
        if pos + 8 > end:
            raise _Unusual
        group, elem = _HEAD.unpack_from(data, pos)
        length = _U32.unpack_from(data, pos + 4)[0]
        tag = group << 16 | elem
        pos += 8
        if delimited and tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Unusual
        if length == _UNDEFINED:
            pos = _walk(data, pos, end, explicit, depth + 1, None, until_item_end=True)
        else:
            if pos + length > end:
                raise _Unusual
            # a defined-length item: its elements must fill it exactly
            _walk(data, pos, pos + length, explicit, depth + 1, None)
            pos += length
    if pos != end:
        raise _Unusual
    return pos


def _walk(
    data: bytes,
    pos: int,
    end: int,
    explicit: bool,
    depth: int,
    found: dict[int, tuple[bytes, int, int]] | None,
    until_item_end: bool = False,
) -> int:
    """Walk a dataset's elements from ``pos`` to ``end`` (or to its item delimiter); at the
    top level (``found`` given) keep the wanted attributes as (VR, offset, length)."""
    if depth > 16:
        raise _Unusual
    # the loop runs once per element of every received instance (hundreds in a vendor's
    # header), under the GIL: bound methods and sets, one unpack per element header
    explicit_head, u32, implicit_head = (
        _EXPLICIT.unpack_from,
        _U32.unpack_from,
        _IMPLICIT.unpack_from,
    )
    long_vrs, short_vrs, wanted = LONG_VRS, _SHORT_VRS, _WANTED
    top = found is not None
    last_tag = -1
    while pos < end:
        if pos + 8 > end:
            raise _Unusual
        if explicit:
            group, elem, vr, length = explicit_head(data, pos)
        else:
            group, elem, length = implicit_head(data, pos)
            vr = b""
        tag = group << 16 | elem
        if until_item_end and tag == _ITEM_END:
            return pos + 8
        if tag <= last_tag or group == 0xFFFE or (top and group == 0x0002):
            raise _Unusual  # out of order, a stray delimiter, file meta in the dataset
        last_tag = tag
        if not explicit:
            pos += 8
        elif vr in long_vrs:
            if pos + 12 > end:
                raise _Unusual
            length = u32(data, pos + 8)[0]
            pos += 12
        elif vr in short_vrs:
            pos += 8
        else:
            raise _Unusual
        if length == _UNDEFINED:
            if (explicit and vr != b"SQ") or tag == _PIXEL_DATA:
                # encapsulated pixel data (pydicom's path checks the fragments), or UN
                # holding an implicit VR sequence
                raise _Unusual
            pos = _skip_items(data, pos, end, explicit, depth, delimited=True)
            if top and tag in wanted:
                raise _Unusual
            continue
        if pos + length > end:
            raise _Unusual
        if top and tag in wanted:
            if explicit and vr not in wanted[tag]:
                raise _Unusual
            found[tag] = (vr, pos, length)  # type: ignore[index]
        elif explicit and vr == b"SQ" and length:
            _skip_items(data, pos, pos + length, explicit, depth, delimited=False)
        pos += length
    if until_item_end or pos != end:
        raise _Unusual
    return pos


def _us(data: bytes, at: tuple[bytes, int, int] | None, default: int | None) -> int | None:
    if at is None:
        return default
    _, pos, length = at
    if length != 2:
        raise _Unusual  # empty or several values
    return int(_U16.unpack_from(data, pos)[0])


def scan_header(
    data: bytes, start: int, meta: tuple[str, str] | None = None
) -> dict[str, str] | None:
    """The identity of a valid native little endian instance (Part 10 bytes whose dataset
    starts at ``start``) as :class:`dicom_node.spool.InstanceHeader` fields (the five
    attributes and ``transfer_syntax_uid``), or None: see the module's docstring.
    ``meta``: (SOP class, transfer syntax) of the file meta when the caller wrote it
    itself (the SCP's received bytes): not read again."""
    try:
        return _scan(data, start, meta)
    except (_Unusual, struct.error, IndexError, ValueError):
        return None


def _scan(data: bytes, start: int, known: tuple[str, str] | None) -> dict[str, str] | None:
    if start <= 144:
        return None
    if known is None:
        meta = read_meta_group(data, _META_WANTED, _text, start)[0]
        ts, meta_class = meta.get("transfer_syntax", ""), meta.get("sop_class", "")
    else:
        meta_class, ts = known
    if ts not in (_EXPLICIT_LE, _IMPLICIT_LE):
        return None
    found: dict[int, tuple[bytes, int, int]] = {}
    _walk(data, start, len(data), ts == _EXPLICIT_LE, 0, found)

    def text(tag: int) -> str:
        at = found.get(tag)
        return "" if at is None else _text(data[at[1] : at[1] + at[2]])

    values = {tag: text(tag) for tag in (_SOP_CLASS, _SOP_INSTANCE, _STUDY, _SERIES, _MODALITY)}
    if not (values[_SOP_CLASS] and values[_SOP_INSTANCE] and values[_SERIES]):
        return None
    if meta_class and meta_class != values[_SOP_CLASS]:
        return None
    if _FLOAT_PIXELS in found or _DOUBLE_PIXELS in found:
        return None
    pixels = found.get(_PIXEL_DATA)
    if pixels is None:
        if _ROWS in found or _COLUMNS in found or _BITS in found:
            return None
        from dicom_node.validate import IMAGE_SOP_CLASSES

        if values[_SOP_CLASS] in IMAGE_SOP_CLASSES:
            return None
    else:
        rows, cols, bits = (_us(data, found.get(t), None) for t in (_ROWS, _COLUMNS, _BITS))
        samples = _us(data, found.get(_SAMPLES), 1)
        frames_text = text(_FRAMES)
        frames = int(frames_text) if frames_text else 1
        if rows is None or cols is None or bits is None or samples is None:
            return None
        if rows <= 0 or cols <= 0 or frames <= 0 or samples not in (1, 3, 4):
            return None
        if bits not in (1, 8, 16, 32, 64):
            return None
        expected = math.ceil(rows * cols * samples * frames * bits / 8)
        if pixels[2] not in (expected, expected + 1):
            return None
    return {
        "sop_instance_uid": values[_SOP_INSTANCE],
        "sop_class_uid": values[_SOP_CLASS],
        "series_instance_uid": values[_SERIES],
        "study_instance_uid": values[_STUDY],
        "modality": values[_MODALITY],
        "transfer_syntax_uid": ts,
    }
