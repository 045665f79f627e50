"""processing.montage: window, label (Pillow's font), tile, PNG encoding (Pillow)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from processing.montage import encode_png, label, tile, window


def _decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(data))
    assert im.mode == "L"
    return np.asarray(im)


def test_label_writes_text_on_a_band_and_keeps_the_rest() -> None:
    img = np.full((60, 200), 77, np.uint8)
    out = label(img, "T1")
    assert img.min() == img.max() == 77  # input untouched
    band = out[:14, :20]
    assert (band > 200).any() and (band == 0).any()  # white glyphs on black
    assert (out[20:] == 77).all() and (out[:, 40:] == 77).all()  # the rest unchanged
    assert not np.array_equal(label(img, "T1"), label(img, "PD"))  # the text matters
    assert np.array_equal(label(img, "  "), img)


def test_label_clips_and_scales() -> None:
    small = np.zeros((5, 8), np.uint8)
    assert label(small, "LONG TEXT").shape == (5, 8)
    one = label(np.full((80, 200), 77, np.uint8), "A")
    two = label(np.full((80, 200), 77, np.uint8), "A", scale=2)
    assert (two != 77).sum() > 2 * (one != 77).sum()
    with pytest.raises(ValueError, match="scale"):
        label(small, "A", scale=0)


def test_tile_with_labels_round_trips_through_png() -> None:
    a = window(np.linspace(0, 1, 64 * 64).reshape(64, 64))
    b = window(np.ones((64, 64)))
    grid = tile([a, b, a], columns=2, labels=["T1", "PD", "B1"])
    assert grid.shape == (2 * 66 + 2, 2 * 66 + 2)
    assert np.array_equal(_decode_png(encode_png(grid)), grid)
