"""processing.montage: window, label (built-in bitmap font), tile, PNG encoding."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from processing.montage import encode_png, label, tile, window


def _decode_png(data: bytes) -> np.ndarray:
    """Minimal decoder for the 8-bit greyscale, filter-0 PNGs encode_png writes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if tag == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w + 1)
    assert not raw[:, 0].any()
    return raw[:, 1:]


def test_label_writes_known_glyphs_and_keeps_the_rest() -> None:
    img = np.full((40, 100), 77, np.uint8)
    out = label(img, "T1")
    assert img.min() == img.max() == 77  # input untouched
    # "T": top row of the glyph is 5 lit pixels starting at column 1, row 1
    assert out[1, 1:6].tolist() == [255] * 5
    assert out[2, 1:6].tolist() == [0, 0, 255, 0, 0]
    # band is 9 rows high (7 + 1 above + 1 below); below it the image is unchanged
    assert (out[9:] == 77).all()
    assert (out[:9, 14:] == 77).all()  # two glyphs = 13 columns
    # unknown characters are blanks; lower case is upper-cased
    assert np.array_equal(label(img, "t1"), out)
    assert np.array_equal(label(img, "~"), label(img, " "))


def test_label_clips_and_scales() -> None:
    small = np.zeros((5, 8), np.uint8)
    assert label(small, "LONG TEXT").shape == (5, 8)
    big = label(np.zeros((60, 200), np.uint8), "A", scale=2)
    assert big[:18].any() and not big[18:].any()
    with pytest.raises(ValueError, match="scale"):
        label(small, "A", scale=0)


def test_tile_with_labels_round_trips_through_png() -> None:
    a = window(np.linspace(0, 1, 64 * 64).reshape(64, 64))
    b = window(np.ones((64, 64)))
    grid = tile([a, b, a], columns=2, labels=["T1", "PD", "B1"])
    assert grid.shape == (2 * 66 + 2, 2 * 66 + 2)
    assert np.array_equal(_decode_png(encode_png(grid)), grid)
    plain = tile([a, b, a], columns=2)
    assert (grid != plain).any()
    with pytest.raises(ValueError, match="labels"):
        tile([a, b], labels=["one"])
