"""Background-phase correction of complex MDME data (physics.md section 1).

Per slice, echo and voxel the background phase is the phase of the complex sum over the
delays; removing it and keeping the real part gives the signed signal (negative at short
delays). Numba kernels: no Python per voxel, no complex temporaries.

Shapes: inputs ``[z, delay, echo, y, x]`` float32; output the same shape, float32.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

__all__ = ["real_from_complex", "real_from_magnitude_phase"]


@nb.njit(cache=True)
def _mp_kernel(mag, phase, out):
    # cos(p - bg) = cos(p)cos(bg) + sin(p)sin(bg): two trig calls per sample, x innermost
    nz, nd, ne, ny, nx = mag.shape
    im = np.empty((nd, ny, nx), dtype=np.float64)
    re = np.empty((nd, ny, nx), dtype=np.float64)
    for z in range(nz):
        for e in range(ne):
            for d in range(nd):
                for y in range(ny):
                    for x in range(nx):
                        m = mag[z, d, e, y, x]
                        p = phase[z, d, e, y, x]
                        re[d, y, x] = m * math.cos(p)
                        im[d, y, x] = m * math.sin(p)
            for y in range(ny):
                for x in range(nx):
                    sr = 0.0
                    si = 0.0
                    for d in range(nd):
                        sr += re[d, y, x]
                        si += im[d, y, x]
                    n = math.hypot(sr, si)
                    c = 1.0
                    s = 0.0
                    if n > 0.0:
                        c = sr / n
                        s = si / n
                    for d in range(nd):
                        out[z, d, e, y, x] = re[d, y, x] * c + im[d, y, x] * s


@nb.njit(cache=True, parallel=False)
def _ri_kernel(re, im, out):
    nz, nd, ne, ny, nx = re.shape
    for z in range(nz):
        for e in range(ne):
            for y in range(ny):
                for x in range(nx):
                    sr = 0.0
                    si = 0.0
                    for d in range(nd):
                        sr += re[z, d, e, y, x]
                        si += im[z, d, e, y, x]
                    n = math.hypot(sr, si)
                    c = 1.0
                    s = 0.0
                    if n > 0.0:
                        c = sr / n
                        s = si / n
                    for d in range(nd):
                        # Re((re + i*im) * exp(-i*bg))
                        out[z, d, e, y, x] = re[z, d, e, y, x] * c + im[z, d, e, y, x] * s


def _check(a: np.ndarray, b: np.ndarray, names: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    if a.ndim != 5 or a.shape != b.shape:
        raise ValueError(
            f"{names}: expected two arrays of the same shape [z, delay, echo, y, x], "
            f"got {a.shape} and {b.shape}"
        )
    return a, b


def real_from_magnitude_phase(magnitude: np.ndarray, phase_rad: np.ndarray) -> np.ndarray:
    """Signed real signal from magnitude and phase (radians), ``[z, delay, echo, y, x]``."""
    mag, ph = _check(magnitude, phase_rad, "magnitude/phase")
    out = np.empty_like(mag)
    _mp_kernel(mag, ph, out)
    return out


def real_from_complex(real: np.ndarray, imaginary: np.ndarray) -> np.ndarray:
    """Signed real signal from real and imaginary images, ``[z, delay, echo, y, x]``."""
    re, im = _check(real, imaginary, "real/imaginary")
    out = np.empty_like(re)
    _ri_kernel(re, im, out)
    return out
