"""Display mapping shared by the web thumbnails, the tuner test and the report.

``grey8(image, center, width)``: the linear DICOM-style window to 8-bit grey,
``round(clip((v - (center - width/2)) / width, 0, 1) * 255)``. The contrast tuner's
JavaScript (dicom_node/web/static/tuner.js) implements the same formula; a browser test
compares the two.
"""

from __future__ import annotations

import numpy as np

__all__ = ["grey8", "percentile_window"]


def grey8(image: np.ndarray, center: float, width: float) -> np.ndarray:
    """uint8 grey of ``image`` (any shape) through the window ``center``/``width``."""
    width = max(float(width), 1e-12)
    lo = float(center) - width / 2.0
    v = (np.asarray(image, np.float64) - lo) / width
    return np.floor(np.clip(v, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def percentile_window(
    image: np.ndarray, mask: np.ndarray | None = None, lo_pct: float = 1.0, hi_pct: float = 99.0
) -> tuple[float, float]:
    """``(center, width)`` spanning the ``lo_pct``..``hi_pct`` percentiles (inside ``mask``)."""
    vals = np.asarray(image, np.float64)
    vals = vals[np.asarray(mask, bool)] if mask is not None else vals.ravel()
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(vals, [lo_pct, hi_pct]))
    return 0.5 * (lo + hi), max(hi - lo, 1e-6)
