"""Tile 2-D images into a labelled montage and encode it as PNG, with Pillow.

Pure functions on arrays: ``window`` maps floats to uint8, ``label`` writes a caption
(Pillow's bundled scalable font) on a black band at the top-left, ``tile`` lays out a
grid (optionally labelled), ``encode_png`` writes an 8-bit greyscale PNG. Pillow is a
dependency of matplotlib and highdicom; no font file or download is needed.
``MAP_DISPLAY_RANGES`` is the one place the maps' display ranges live (the ``process``
montage and the demo's montage of received images use it); ``series_montage_png`` is the
montage of a processed series.
"""

from __future__ import annotations

import io
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
    """A copy of uint8 ``image`` with ``text`` written white on a black band along the
    top-left edge (clipped to the image). ``scale`` multiplies the 10-pixel font size."""
    from PIL import Image, ImageDraw, ImageFont

    img = np.array(image, dtype=np.uint8, copy=True)
    if img.ndim != 2:
        raise ValueError(f"label: expected a 2-D array, got shape {img.shape}")
    if scale < 1:
        raise ValueError(f"label: scale must be >= 1, got {scale}")
    if not text.strip():
        return img
    font = ImageFont.load_default(size=10 * scale)
    pil = Image.fromarray(img, mode="L")
    draw = ImageDraw.Draw(pil)
    _, _, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = scale
    draw.rectangle((0, 0, right + 2 * pad, bottom + 2 * pad), fill=0)
    draw.text((pad, pad), text, fill=255, font=font)
    return np.asarray(pil, dtype=np.uint8).copy()


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
    from PIL import Image

    img = np.ascontiguousarray(gray, dtype=np.uint8)
    if img.ndim != 2:
        raise ValueError(f"encode_png: expected a 2-D array, got shape {img.shape}")
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


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
