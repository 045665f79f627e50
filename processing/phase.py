"""Background-phase correction of complex MDME data (physics.md section 1).

Per slice, echo and voxel a background phase is estimated and removed; the real part is
the signed signal (negative at short delays). Two references:

- ``"longest_delay"`` (default): the phase of the sample at the longest delay. With TD
  close to TR that sample is positive for every T1 (g > 0 when 1.5*exp(-TD/T1) <
  1 + 0.5*exp(-TR/T1) at theta = 120 deg) and it has the largest magnitude.
- ``"sum"``: the phase of the complex sum over delays (the published recipe). Where the
  short-delay samples outweigh the long ones (long T1, e.g. CSF with delays 150/580/1900/
  3850 ms) the sum is negative and the whole voxel comes out sign-flipped; kept for
  comparison.

Numba kernels: no Python per voxel, no complex temporaries.
Shapes: inputs ``[z, delay, echo, y, x]`` float32 with delays in increasing order;
output the same shape, float32.
"""

from __future__ import annotations

import math
import threading

import numba as nb
import numpy as np

__all__ = ["PHASE_REFERENCES", "real_from_complex", "real_from_magnitude_phase"]

PHASE_REFERENCES = ("longest_delay", "sum")

# The kernels release the GIL (the node's receive threads run meanwhile) and are parallel
# over slices: two normalizations at once (two job threads) would launch two parallel
# regions concurrently, which numba's workqueue threading layer (where neither OpenMP nor
# TBB is installed) does not survive; one at a time costs nothing, each uses every core.
_KERNEL_LOCK = threading.Lock()


@nb.njit(cache=True)
def _rotate_real(re, im, use_sum, out_slice):
    """re/im [d, y, x] (float64) -> out_slice[d, y, x] = Re((re + i im) * exp(-i bg))."""
    nd, ny, nx = re.shape
    for y in range(ny):
        for x in range(nx):
            if use_sum:
                sr = 0.0
                si = 0.0
                for d in range(nd):
                    sr += re[d, y, x]
                    si += im[d, y, x]
            else:
                sr = re[nd - 1, y, x]
                si = im[nd - 1, y, x]
            n = math.hypot(sr, si)
            c = 1.0
            s = 0.0
            if n > 0.0:
                c = sr / n
                s = si / n
            for d in range(nd):
                out_slice[d, y, x] = re[d, y, x] * c + im[d, y, x] * s


# nogil: runs in the node process, whose receive threads must keep running meanwhile
@nb.njit(cache=True, parallel=True, nogil=True)
def _mp_kernel(mag, phase, use_sum, out):
    # cos(p - bg) = cos(p)cos(bg) + sin(p)sin(bg): two float32 trig calls per sample.
    # Slices in parallel (each its own scratch; the same operations per sample as one
    # thread): normalization runs in the node while the workers wait for it.
    nz, nd, ne, ny, nx = mag.shape
    for z in nb.prange(nz):
        im = np.empty((nd, ny, nx), dtype=np.float64)
        re = np.empty((nd, ny, nx), dtype=np.float64)
        for e in range(ne):
            for d in range(nd):
                for y in range(ny):
                    for x in range(nx):
                        m = mag[z, d, e, y, x]
                        p = phase[z, d, e, y, x]
                        re[d, y, x] = m * math.cos(p)
                        im[d, y, x] = m * math.sin(p)
            _rotate_real(re, im, use_sum, out[z, :, e])


# nogil: runs in the node process, whose receive threads must keep running meanwhile
@nb.njit(cache=True, parallel=True, nogil=True)
def _ri_kernel(real, imag, use_sum, out):
    nz, nd, ne, ny, nx = real.shape
    for z in nb.prange(nz):
        im = np.empty((nd, ny, nx), dtype=np.float64)
        re = np.empty((nd, ny, nx), dtype=np.float64)
        for e in range(ne):
            for d in range(nd):
                for y in range(ny):
                    for x in range(nx):
                        re[d, y, x] = real[z, d, e, y, x]
                        im[d, y, x] = imag[z, d, e, y, x]
            _rotate_real(re, im, use_sum, out[z, :, e])


def _check(a: np.ndarray, b: np.ndarray, names: str, reference: str):
    if reference not in PHASE_REFERENCES:
        raise ValueError(f"reference: expected one of {PHASE_REFERENCES}, got {reference!r}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    if a.ndim != 5 or a.shape != b.shape:
        raise ValueError(
            f"{names}: expected two arrays of the same shape [z, delay, echo, y, x], "
            f"got {a.shape} and {b.shape}"
        )
    return a, b, reference == "sum"


def _output(like: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return np.empty_like(like)
    if out.shape != like.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out: expected a C-contiguous float32 array of shape {like.shape}")
    return out


def real_from_magnitude_phase(
    magnitude: np.ndarray,
    phase_rad: np.ndarray,
    reference: str = "longest_delay",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Signed real signal from magnitude and phase (radians), ``[z, delay, echo, y, x]``.

    ``out``: where to write it; may be ``magnitude`` itself (each slice and echo is read
    whole before it is written), which saves the signal's size at the node's peak."""
    mag, ph, use_sum = _check(magnitude, phase_rad, "magnitude/phase", reference)
    out = _output(mag, out)
    with _KERNEL_LOCK:
        _mp_kernel(mag, ph, use_sum, out)
    return out


def real_from_complex(
    real: np.ndarray,
    imaginary: np.ndarray,
    reference: str = "longest_delay",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Signed real signal from real and imaginary images, ``[z, delay, echo, y, x]``.

    ``out``: as in :func:`real_from_magnitude_phase` (may be ``real``)."""
    re, im, use_sum = _check(real, imaginary, "real/imaginary", reference)
    out = _output(re, out)
    with _KERNEL_LOCK:
        _ri_kernel(re, im, use_sum, out)
    return out


def warmup() -> None:
    """Compile (or load from the numba cache) both kernels for the float32 arrays that
    normalization passes, so the node's first series does not pay for it."""
    a = np.ones((1, 2, 1, 2, 2), np.float32)
    real_from_magnitude_phase(a, a * 0.1)
    real_from_complex(a, a * 0.1)
