"""Data elements encoded with ``struct``, without pydicom (PS3.5 7.1).

The few elements the node encodes itself on a per-instance path: the file meta group of a
received instance (explicit VR little endian, :func:`dicom_node.scp.part10_bytes`) and the
command sets of a pushed C-STORE request and of a C-STORE response (implicit VR little
endian, group 0000: :func:`dicom_node.requestor.c_store_rq_command`,
:func:`dicom_node.reactor.c_store_rsp_command`). Both are compared byte for byte with
pynetdicom's encoding in the tests (``test_scp``, ``test_push``).
"""

from __future__ import annotations

import struct

__all__ = ["LONG_VRS", "command_element", "even", "explicit_element"]

#: explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)


def even(text: str, pad: bytes) -> bytes:
    """``text`` in ASCII, padded to an even length with ``pad`` (PS3.5 6.2: a NUL for UI,
    a space for the other strings)."""
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def explicit_element(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (``tag``: group, element); ``value`` already
    of even length."""
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", *tag, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", *tag, vr, len(value)) + value


def command_element(elem: int, value: bytes) -> bytes:
    """One element of a DIMSE command set: group 0000, always implicit VR little endian
    (PS3.7 6.3.1)."""
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value
