"""The C-STORE fast path (dicom_node.header_scan) answers like pydicom's path.

For every vendor layout of the emulator (classic and Enhanced MR, private tags, nested
sequences), in explicit and implicit VR little endian, and for many damaged copies of each
(cut short, bytes added, bytes changed, bytes removed), the scan either defers to pydicom
(None) or gives exactly the identity pydicom's path reads; it never accepts an instance
that path refuses."""

from __future__ import annotations

import copy
import io
import random
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from dicom_node import emulator, spool
from dicom_node.header_scan import scan_header
from dicom_node.requestor import part10_meta, read_part10_meta
from dicom_node.scp import part10_bytes
from dicom_node.validate import meta_end
from tests.test_emulator import small_acquisition

FIELDS = (
    "sop_instance_uid",
    "sop_class_uid",
    "series_instance_uid",
    "study_instance_uid",
    "modality",
    "transfer_syntax_uid",
)


def _part10(ds: pydicom.Dataset, ts: str) -> bytes:
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = ts
    out = io.BytesIO()
    ds.save_as(
        out, implicit_vr=ts == ImplicitVRLittleEndian, little_endian=True, enforce_file_format=True
    )
    return out.getvalue()


def _pydicom_path(data: bytes, monkeypatch: pytest.MonkeyPatch) -> spool.InstanceHeader | None:
    with monkeypatch.context() as m:
        m.setattr(spool, "scan_header", lambda data, start, meta=None: None)
        try:
            return spool.read_header(data)
        except spool.InvalidInstanceError:
            return None


@pytest.fixture(scope="module")
def encoded() -> list[tuple[str, bytes]]:
    acq = small_acquisition()
    out = []
    for layout in emulator.layouts():
        ds = emulator.make_datasets(acq, layout, with_phase=True)[0]
        for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            out.append((f"{layout} {ts.name}", _part10(ds, ts)))
    return out


def test_valid_instances_take_the_fast_path_with_pydicoms_values(
    encoded: list[tuple[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, data in encoded:
        scanned = scan_header(data, meta_end(data))
        assert scanned is not None, name  # the usual case is fast
        ref = _pydicom_path(data, monkeypatch)
        assert ref is not None, name
        for f in FIELDS:
            assert scanned[f] == getattr(ref, f), (name, f)
        header = spool.read_header(data)
        assert header.parsed is None and header.content_sha256 == ref.content_sha256
        # the SCP names the file meta it wrote: the same values without reading it again
        meta = (str(ref.dataset.SOPClassUID), ref.transfer_syntax_uid)
        assert scan_header(data, meta_end(data), meta) == scanned, name
        assert scan_header(data, meta_end(data), ("1.2.3", meta[1])) is None  # class differs
        assert header.dataset.SOPInstanceUID == ref.sop_instance_uid  # parsed on demand


def test_damaged_instances_never_pass_where_pydicom_fails(
    encoded: list[tuple[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(14)
    deferred = refused = 0
    for name, data in encoded:
        start = meta_end(data)
        for k in range(60):
            d = bytearray(data)
            kind = k % 4
            if kind == 0:
                del d[rng.randrange(start, len(d)) :]
            elif kind == 1:
                d += bytes(rng.randrange(1, 9))
            elif kind == 2:
                d[rng.randrange(start, len(d))] ^= 1 << rng.randrange(8)
            else:
                i = rng.randrange(start, len(d))
                del d[i : i + rng.randrange(1, 64)]
            damaged = bytes(d)
            scanned = scan_header(damaged, start) if meta_end(damaged) else None
            ref = _pydicom_path(damaged, monkeypatch)
            refused += ref is None
            if scanned is None:
                deferred += 1
                continue
            assert ref is not None, f"{name} damage {kind}: the fast path accepted it"
            for f in FIELDS:
                assert scanned[f] == getattr(ref, f), (name, kind, f)
    assert refused > 100 and deferred >= refused  # the damage was real


def test_what_the_scan_leaves_to_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    acq = small_acquisition()
    ds = emulator.make_datasets(acq, "ge", with_phase=False)[0]
    explicit = _part10(ds, ExplicitVRLittleEndian)
    assert scan_header(explicit, meta_end(explicit)) is not None
    # a transfer syntax other than native little endian
    rle = copy.deepcopy(ds)
    rle.compress(RLELossless)
    data = io.BytesIO()
    rle.save_as(data, enforce_file_format=True)
    raw = data.getvalue()
    assert scan_header(raw, meta_end(raw)) is None
    assert spool.read_header(raw).transfer_syntax_uid == RLELossless  # pydicom's path
    # pixel data one row short: the image check fails, pydicom's path names it
    short = copy.deepcopy(ds)
    short.PixelData = short.PixelData[: -2 * short.Columns]
    raw = _part10(short, ExplicitVRLittleEndian)
    assert scan_header(raw, meta_end(raw)) is None
    with pytest.raises(spool.InvalidInstanceError, match="PixelData has"):
        spool.read_header(raw)
    # the request's (file meta's) SOP class differs from the dataset's
    raw = part10_bytes(
        "1.2.840.10008.5.1.4.1.1.7",
        ds.SOPInstanceUID,
        ExplicitVRLittleEndian,
        explicit[meta_end(explicit) :],
    )
    assert scan_header(raw, meta_end(raw)) is None
    with pytest.raises(spool.InvalidInstanceError, match="SOP class"):
        spool.read_header(raw)


@pytest.mark.parametrize("vr", [b"SV", b"UV"])
def test_both_meta_readers_walk_a_64_bit_element(
    vr: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file meta reader of the C-STORE fast path and of the push steps over an element
    of a VR with a 4-byte length that came in 2019 (SV, UV: PS3.5 7.1.2). Read with a
    2-byte length (its reserved bytes, 0) the group would seem to end inside it: the fast
    path would defer, the push would send part of the meta as the data set."""
    ds = emulator.make_datasets(small_acquisition(), "ge", with_phase=False)[0]
    plain = _part10(ds, ExplicitVRLittleEndian)
    start = meta_end(plain)
    # (0002,0011), between Transfer Syntax UID and Implementation Class UID: 8 bytes
    at = plain.index(b"\x02\x00\x12\x00UI", 144, start)
    extra = struct.pack("<HH2sHI", 0x0002, 0x0011, vr, 0, 8) + struct.pack("<q", 1 << 40)
    meta = plain[144:at] + extra + plain[at:start]
    data = plain[:140] + struct.pack("<I", len(meta)) + meta + plain[start:]
    assert meta_end(data) == start + len(extra)
    ref = _pydicom_path(data, monkeypatch)
    assert ref is not None and ref.parsed.file_meta[0x00020011].VR == vr.decode()
    scanned = scan_header(data, meta_end(data))
    assert scanned is not None  # the fast path, with pydicom's values
    for f in FIELDS:
        assert scanned[f] == getattr(ref, f), f
    (tmp_path / "a.dcm").write_bytes(data)
    for got in (
        part10_meta(data),
        part10_meta(memoryview(data)),
        read_part10_meta(tmp_path / "a.dcm"),
    ):
        assert got.offset == meta_end(data)  # the data set, and nothing of the meta, is sent
        assert (got.sop_class_uid, got.sop_instance_uid, got.transfer_syntax_uid) == (
            ref.sop_class_uid,
            ref.sop_instance_uid,
            ExplicitVRLittleEndian,
        )
