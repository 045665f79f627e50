"""Tile 2-D images into a labelled montage and encode it as PNG (no imaging library).

Pure functions on arrays: ``window`` maps floats to uint8, ``label`` burns a caption into
an image with a built-in 5 x 7 bitmap font, ``tile`` lays out a grid (optionally labelled),
``encode_png`` writes an 8-bit greyscale PNG with zlib only. ``MAP_DISPLAY_RANGES`` is the
one place the maps' display ranges live (the ``process`` montage and the demo's montage of
received images use it); ``series_montage_png`` is the montage of a processed series.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from processing.results import SeriesResult

__all__ = ["MAP_DISPLAY_RANGES", "encode_png", "label", "series_montage_png", "tile", "window"]

#: display range (low, high) of each map in montages, in the map's unit
MAP_DISPLAY_RANGES: dict[str, tuple[float, float]] = {
    "T1": (0.0, 4500.0),  # ms
    "T2": (0.0, 300.0),  # ms
    "PD": (0.0, 110.0),  # percent units
    "B1": (0.6, 1.4),  # ratio
    "MYELIN": (0.0, 40.0),  # percent of the voxel
}
_MAP_LABELS = {"T1": "T1 0-4500 MS", "T2": "T2 0-300 MS", "PD": "PD 0-110 PU", "B1": "B1 0.6-1.4"}

# 5 x 7 bitmap glyphs: one int per row (top to bottom), bit 4 = leftmost pixel.
_FONT: dict[str, tuple[int, ...]] = {
    "A": (14, 17, 17, 31, 17, 17, 17),
    "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14),
    "D": (30, 17, 17, 17, 17, 17, 30),
    "E": (31, 16, 16, 30, 16, 16, 31),
    "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15),
    "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14),
    "J": (7, 2, 2, 2, 2, 18, 12),
    "K": (17, 18, 20, 24, 20, 18, 17),
    "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17),
    "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14),
    "P": (30, 17, 17, 30, 16, 16, 16),
    "Q": (14, 17, 17, 17, 21, 18, 13),
    "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30),
    "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14),
    "V": (17, 17, 17, 17, 17, 10, 4),
    "W": (17, 17, 17, 21, 21, 21, 10),
    "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 10, 4, 4, 4, 4),
    "Z": (31, 1, 2, 4, 8, 16, 31),
    "0": (14, 17, 19, 21, 25, 17, 14),
    "1": (4, 12, 4, 4, 4, 4, 14),
    "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14),
    "4": (2, 6, 10, 18, 31, 2, 2),
    "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14),
    "7": (31, 1, 2, 4, 8, 8, 8),
    "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12),
    "-": (0, 0, 0, 31, 0, 0, 0),
    "_": (0, 0, 0, 0, 0, 0, 31),
    ".": (0, 0, 0, 0, 0, 12, 12),
    "/": (1, 1, 2, 4, 8, 16, 16),
    "%": (24, 25, 2, 4, 8, 19, 3),
    " ": (0, 0, 0, 0, 0, 0, 0),
}


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


def label(image: np.ndarray, text: str, scale: int = 1) -> np.ndarray:
    """A copy of uint8 ``image`` with ``text`` (upper-cased; characters outside the font
    become spaces) written white on a black band along the top-left edge, clipped to the
    image width. ``scale`` enlarges the 5 x 7 glyphs by an integer factor."""
    img = np.array(image, dtype=np.uint8, copy=True)
    if img.ndim != 2:
        raise ValueError(f"label: expected a 2-D array, got shape {img.shape}")
    if scale < 1:
        raise ValueError(f"label: scale must be >= 1, got {scale}")
    glyphs = [_FONT.get(ch, _FONT[" "]) for ch in text.upper()]
    if not glyphs:
        return img
    bitmap = np.zeros((7, 6 * len(glyphs) + 1), dtype=bool)
    for i, rows in enumerate(glyphs):
        for r, bits in enumerate(rows):
            for c in range(5):
                bitmap[r, 1 + 6 * i + c] = bool(bits >> (4 - c) & 1)
    bitmap = np.pad(bitmap, ((1, 1), (0, 1))).repeat(scale, 0).repeat(scale, 1)
    h = min(bitmap.shape[0], img.shape[0])
    w = min(bitmap.shape[1], img.shape[1])
    img[:h, :w] = np.where(bitmap[:h, :w], 255, 0)
    return img


def tile(
    images: Sequence[np.ndarray],
    columns: int = 4,
    pad: int = 2,
    labels: Sequence[str] | None = None,
) -> np.ndarray:
    """Lay out equally sized uint8 2-D images row by row on a black background;
    ``labels`` (one per image) are written into each tile's top-left corner."""
    if not images:
        raise ValueError("tile: no images")
    if labels is not None:
        if len(labels) != len(images):
            raise ValueError(f"tile: {len(labels)} labels for {len(images)} images")
        scale = max(1, images[0].shape[1] // 160)
        images = [label(im, text, scale) for im, text in zip(images, labels, strict=True)]
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


def series_montage_png(result: SeriesResult) -> bytes:
    """Middle slice of every map, contrast, myelin and tissue fraction, 4 columns (PNG)."""
    m = result.maps
    z = m.t1_ms.shape[0] // 2
    arrays = {"T1": m.t1_ms, "T2": m.t2_ms, "PD": m.pd_pu, "B1": m.b1}
    tiles = [window(arrays[k][z], *MAP_DISPLAY_RANGES[k]) for k in arrays]
    labels = [_MAP_LABELS[k] for k in arrays]
    for name, syn in result.synthetic.items():
        lo = -abs(syn.window_width) / 2 + syn.window_center
        tiles.append(window(syn.image[z], lo, lo + syn.window_width))
        labels.append(f"SYNTHETIC {name}")
    if result.myelin is not None:
        tiles.append(window(result.myelin.mypv[z], *MAP_DISPLAY_RANGES["MYELIN"]))
        labels.append("MYELIN 0-40 %")
    if result.segmentation is not None:
        for t in ("WM", "GM", "CSF"):
            tiles.append(window(result.segmentation.fractions[t][z], 0, 1))
            labels.append(f"{t} FRACTION")
    return encode_png(tile(tiles, columns=4, labels=labels))
