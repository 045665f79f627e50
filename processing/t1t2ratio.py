"""T1-weighted / T2-weighted image ratio (Glasser and Van Essen, J Neurosci 2011;31:11597),
a myelin-sensitive contrast the seed (section 2) compares with the myelin model.

Computed from the synthetic T1W and T2W images of the series, so both share one set of
maps: ``ratio = T1W / T2W`` inside the mask where T2W > 0. The absolute value depends on
the two contrasts' timing (recorded with the result); it is a relative measure.
"""

from __future__ import annotations

import numpy as np

__all__ = ["t1w_t2w_ratio", "t1w_t2w_ratio_in_mask", "tissue_medians"]


def t1w_t2w_ratio(t1w: np.ndarray, t2w: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float32 ``[z, y, x]`` ratio, 0 outside ``mask`` or where T2W <= 0."""
    a = np.asarray(t1w, np.float64)
    b = np.asarray(t2w, np.float64)
    ok = np.asarray(mask, bool) & (b > 0) & np.isfinite(a) & np.isfinite(b)
    out = np.zeros(a.shape, np.float32)
    out[ok] = (a[ok] / b[ok]).astype(np.float32)
    return out


def t1w_t2w_ratio_in_mask(t1w: np.ndarray, t2w: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """:func:`t1w_t2w_ratio` of two images that are 0 outside ``mask``, given as their
    values inside it (``[n]``, the mask's voxels in C order): the same float32
    ``[z, y, x]`` without whole-grid float64 volumes."""
    out = np.zeros(np.shape(mask), np.float32)
    out[np.asarray(mask, bool)] = t1w_t2w_ratio(t1w, t2w, np.ones(np.shape(t1w), bool))
    return out


def tissue_medians(
    ratio: np.ndarray, fractions: dict[str, np.ndarray], threshold: float = 0.9
) -> dict[str, float]:
    """Median ratio over voxels with a tissue fraction >= ``threshold`` (WM, GM)."""
    out: dict[str, float] = {}
    for t in ("WM", "GM"):
        f = fractions.get(t)
        if f is None:
            continue
        sel = np.asarray(f) >= np.float64(threshold)  # in float64, no whole-grid copy
        vals = np.asarray(ratio)[sel]
        vals = vals[vals > 0]
        if vals.size:
            out[t] = float(np.median(vals))
    return out
