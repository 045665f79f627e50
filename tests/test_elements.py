"""The node's own element encoders (dicom_node.elements) write what pydicom writes, and
the file meta reader (dicom_node.header_scan.read_meta_group) walks every VR of a 4-byte
length they write."""

from __future__ import annotations

import struct

from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

from dicom_node.elements import LONG_VRS, command_element, even, explicit_element
from dicom_node.header_scan import read_meta_group

# (VR, value as pydicom holds it, the same value encoded, even length)
VALUES = [
    ("OB", b"\x00\x01", b"\x00\x01"),
    ("OD", b"\x00" * 8, b"\x00" * 8),
    ("OF", b"\x00" * 4, b"\x00" * 4),
    ("OL", b"\x01\x00\x00\x00", b"\x01\x00\x00\x00"),
    ("OV", b"\x02" * 8, b"\x02" * 8),
    ("OW", b"\x01\x02", b"\x01\x02"),
    ("UN", b"ab", b"ab"),
    ("UC", "abc", b"abc "),
    ("UR", "http://x", b"http://x"),
    ("UT", "free text", b"free text "),
    ("SV", -5, struct.pack("<q", -5)),
    ("UV", 1 << 40, struct.pack("<Q", 1 << 40)),
    ("UI", "1.2.3", b"1.2.3\x00"),
    ("SH", "abc", b"abc "),
    ("US", 7, struct.pack("<H", 7)),
    ("UL", 70000, struct.pack("<I", 70000)),
]


def test_explicit_elements_are_pydicoms() -> None:
    assert {vr.encode() for vr, _, _ in VALUES} >= LONG_VRS - {b"SQ"}
    for i, (vr, value, raw) in enumerate(VALUES):
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, DataElement((0x0009, 0x1000 + i), vr, value))
        assert explicit_element((0x0009, 0x1000 + i), vr.encode(), raw) == fp.getvalue(), vr


def test_command_element_and_padding() -> None:
    assert even("1.2", b"\x00") == b"1.2\x00" and even("1.23", b"\x00") == b"1.23"
    assert even("abc", b" ") == b"abc "
    assert command_element(0x0110, b"\x07\x00") == b"\x00\x00\x10\x01\x02\x00\x00\x00\x07\x00"


def test_the_meta_reader_walks_every_long_vr() -> None:
    elements = [
        explicit_element((0x0002, 0x0010), b"UI", even("1.2.840.10008.1.2.1", b"\x00")),
        *(
            explicit_element((0x0002, 0x0100 + i), vr.encode(), raw)
            for i, (vr, _, raw) in enumerate(VALUES)
        ),
        explicit_element((0x0002, 0x0200), b"UI", even("1.2.3.4", b"\x00")),
    ]
    meta = b"".join(elements)
    data = b"\x00" * 128 + b"DICM" + meta + explicit_element((0x0008, 0x0060), b"CS", b"MR")
    wanted = {0x0010: "ts", 0x0200: "last"}
    found, end = read_meta_group(data, wanted, bytes.decode)
    assert end == 132 + len(meta)
    assert found == {"ts": "1.2.840.10008.1.2.1\x00", "last": "1.2.3.4\x00"}
    assert read_meta_group(data, wanted, bytes.decode, end) == (found, end)
