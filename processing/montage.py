"""Tile 2-D images into a labelled-free montage and encode it as PNG (no imaging library).

Pure functions on arrays: ``window`` maps floats to uint8, ``tile`` lays out a grid,
``encode_png`` writes an 8-bit greyscale PNG with zlib only.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np

__all__ = ["encode_png", "tile", "window"]


def window(image: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map ``image`` linearly from [lo, hi] to uint8 [0, 255] (defaults: 1st/99.5th percentile)."""
    img = np.asarray(image, dtype=np.float64)
    finite = img[np.isfinite(img)]
    if lo is None:
        lo = float(np.percentile(finite, 1)) if finite.size else 0.0
    if hi is None:
        hi = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    if hi <= lo:
        hi = lo + 1.0
    out = np.clip((np.nan_to_num(img, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return (out * 255.0 + 0.5).astype(np.uint8)


def tile(images: Sequence[np.ndarray], columns: int = 4, pad: int = 2) -> np.ndarray:
    """Lay out equally sized uint8 2-D images row by row on a black background."""
    if not images:
        raise ValueError("tile: no images")
    h, w = images[0].shape
    if any(im.shape != (h, w) for im in images):
        raise ValueError("tile: all images must share one shape")
    rows = -(-len(images) // columns)
    out = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        y0 = pad + r * (h + pad)
        x0 = pad + c * (w + pad)
        out[y0 : y0 + h, x0 : x0 + w] = im
    return out


def encode_png(gray: np.ndarray) -> bytes:
    """Encode a uint8 ``[height, width]`` array as an 8-bit greyscale PNG."""
    img = np.ascontiguousarray(gray, dtype=np.uint8)
    if img.ndim != 2:
        raise ValueError(f"encode_png: expected a 2-D array, got shape {img.shape}")
    h, w = img.shape
    raw = np.zeros((h, w + 1), dtype=np.uint8)  # filter byte 0 (None) per row
    raw[:, 1:] = img

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + chunk(b"IEND", b"")
    )
