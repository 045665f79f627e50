"""Checks a received instance must pass before the node answers Success.

Cheap, structural, on the parsed header and the raw pixel element (nothing is decoded):
the SOP class of the file meta (= the C-STORE request) against the dataset's; the image
attributes against the pixel data's length (native) or its fragments (encapsulated); the
transfer syntax against how the pixel data is encoded; and, before anything is parsed, the
size a deflated instance inflates to (read in bounded chunks, so a decompression bomb costs
no memory).
"""

from __future__ import annotations

import math
import zlib

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.uid import (
    UID,
    RLELossless,
)

__all__ = [
    "IMAGE_SOP_CLASSES",
    "InstanceTooLargeError",
    "InvalidInstanceError",
    "SOPClassMismatchError",
    "check_inflated_size",
    "check_instance",
    "meta_end",
]

# C-STORE failure statuses (PS3.4 B.2.3)
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

#: Storage classes whose instances must carry an image (Rows, Columns, pixel data).
IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
        "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
        "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    }
)

_PIXEL_KEYWORDS = {"PixelData": None, "FloatPixelData": 32, "DoubleFloatPixelData": 64}


class InvalidInstanceError(ValueError):
    """The instance is readable but not a consistent object; ``status`` is the C-STORE
    failure status to answer."""

    status = STATUS_CANNOT_UNDERSTAND


class SOPClassMismatchError(InvalidInstanceError):
    status = STATUS_DOES_NOT_MATCH_SOP_CLASS


class InstanceTooLargeError(InvalidInstanceError):
    status = STATUS_OUT_OF_RESOURCES


def meta_end(data: bytes) -> int:
    """Offset of the first dataset byte after the Part-10 preamble and file meta group.

    Reads (0002,0000) File Meta Information Group Length (explicit VR little endian, as
    the standard requires); 0 when ``data`` does not start that way."""
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        return 0
    group_length = int.from_bytes(data[140:144], "little")
    end = 144 + group_length
    return end if end <= len(data) else 0


def check_inflated_size(data: bytes, start: int, limit: int, chunk: int = 1 << 20) -> int:
    """Inflate ``data[start:]`` (raw deflate, PS3.5 A.5) in ``chunk``-sized steps, keeping
    nothing; return the inflated size, or raise :class:`InstanceTooLargeError` as soon as it
    passes ``limit`` (memory stays ~``chunk`` whatever the ratio)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    pending = memoryview(data)[start:]
    try:
        while pending:
            total += len(inflater.decompress(pending, chunk))
            if total > limit:
                raise InstanceTooLargeError(
                    f"deflated instance of {len(data)} bytes inflates beyond the"
                    f" {limit} byte limit (node.max_inflated_bytes)"
                )
            pending = memoryview(inflater.unconsumed_tail)
            if inflater.eof:
                break
    except zlib.error as exc:
        raise InvalidInstanceError(f"deflated dataset does not inflate: {exc}") from exc
    return total


def check_instance(ds: Dataset, transfer_syntax: str) -> None:
    """Raise :class:`InvalidInstanceError` naming the first inconsistency of ``ds``."""
    meta = getattr(ds, "file_meta", None)
    meta_class = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    ds_class = str(ds.get("SOPClassUID", ""))
    if meta_class and ds_class and meta_class != ds_class:
        raise SOPClassMismatchError(
            f"SOP class of the request/file meta {meta_class} differs from the dataset's"
            f" SOPClassUID {ds_class}"
        )
    _check_pixels(ds, UID(transfer_syntax) if transfer_syntax else None, ds_class)


def _check_pixels(ds: Dataset, ts: UID | None, sop_class: str) -> None:
    present = [kw for kw in _PIXEL_KEYWORDS if kw in ds]
    attrs = [kw for kw in ("Rows", "Columns", "BitsAllocated") if kw in ds]
    if not present and not attrs:
        if sop_class in IMAGE_SOP_CLASSES:
            raise InvalidInstanceError(f"image SOP class {sop_class} without Rows and PixelData")
        return
    if not present:
        raise InvalidInstanceError("dataset has no pixel data: image has Rows but no PixelData")
    missing = [kw for kw in ("Rows", "Columns") if kw not in ds]
    if missing or (present == ["PixelData"] and "BitsAllocated" not in ds):
        missing += [] if "BitsAllocated" in ds else ["BitsAllocated"]
        raise InvalidInstanceError(f"pixel data without {', '.join(missing)}")
    rows, cols = int(ds.Rows or 0), int(ds.Columns or 0)
    if rows <= 0 or cols <= 0:
        raise InvalidInstanceError(f"image of {rows} x {cols} pixels (Rows/Columns must be > 0)")
    frames = _int(ds, "NumberOfFrames", 1)
    samples = _int(ds, "SamplesPerPixel", 1)
    if frames <= 0 or samples not in (1, 3, 4):
        raise InvalidInstanceError(f"NumberOfFrames {frames} / SamplesPerPixel {samples}")
    keyword = present[0]
    bits = _PIXEL_KEYWORDS[keyword] or _int(ds, "BitsAllocated", 0)
    if bits not in (1, 8, 16, 32, 64):
        raise InvalidInstanceError(f"BitsAllocated {bits} is not 1, 8, 16, 32 or 64")
    elem = ds[keyword]
    encapsulated = bool(ts is not None and ts.is_encapsulated)
    if encapsulated and keyword == "PixelData":
        if not elem.is_undefined_length:
            raise InvalidInstanceError(
                f"transfer syntax {ts.name} needs encapsulated pixel data, got native"
                f" (defined length {len(elem.value or b'')})"
            )
        _check_fragments(bytes(elem.value or b""), frames, ts)
        return
    if elem.is_undefined_length:
        raise InvalidInstanceError(
            f"encapsulated pixel data in the native transfer syntax {ts.name if ts else '?'}"
        )
    expected = math.ceil(rows * cols * samples * frames * bits / 8)
    got = len(elem.value or b"")
    if got not in (expected, expected + 1):  # + 1: the pad byte to an even length
        raise InvalidInstanceError(
            f"{keyword} has {got} bytes; Rows x Columns x SamplesPerPixel x BitsAllocated/8"
            f" x NumberOfFrames = {rows} x {cols} x {samples} x {bits}/8 x {frames} = {expected}"
        )


def _int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword, default)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInstanceError(f"{keyword} is not a number: {exc}") from exc


def _check_fragments(value: bytes, frames: int, ts: UID) -> None:
    """Each encapsulated frame must start like its codec's stream (no decoding)."""
    try:
        encoded = [b"".join(f) for f in generate_fragmented_frames(value, number_of_frames=frames)]
    except (ValueError, EOFError, KeyError) as exc:
        raise InvalidInstanceError(f"encapsulated pixel data is malformed: {exc}") from exc
    if len(encoded) < frames:
        raise InvalidInstanceError(
            f"encapsulated pixel data has {len(encoded)} frames, NumberOfFrames is {frames}"
        )
    for i, frame in enumerate(encoded[:frames]):
        why = _frame_problem(frame, ts)
        if why:
            raise InvalidInstanceError(f"frame {i + 1} of {ts.name}: {why}")


def _frame_problem(frame: bytes, ts: UID) -> str:
    if len(frame) < 2:
        return "empty"
    if ts == RLELossless:
        if len(frame) < 64:
            return "shorter than the 64-byte RLE header"
        n = int.from_bytes(frame[:4], "little")
        offsets = [int.from_bytes(frame[4 + 4 * k : 8 + 4 * k], "little") for k in range(n)]
        if not 1 <= n <= 15 or offsets[0] != 64 or offsets != sorted(offsets):
            return "not an RLE header"
        if offsets[-1] >= len(frame):
            return "RLE segment offset past the frame's end"
        return ""
    head = frame[:12]
    if head[:2] == b"\xff\xd8":  # JPEG baseline/extended/lossless, JPEG-LS: SOI
        return ""
    if head[:4] == b"\xff\x4f\xff\x51":  # JPEG 2000 / HTJ2K codestream: SOC + SIZ
        return ""
    if head == b"\x00\x00\x00\x0cjP  \r\n\x87\n":  # JP2 file signature box
        return ""
    return f"does not start with a JPEG / JPEG-LS / JPEG 2000 marker ({head[:4].hex()})"
