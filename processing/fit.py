"""Per-voxel MDME fit: ``fit_mdme(acq) -> QuantMaps`` (physics.md section 1).

Model (processing.signal): ``S(TD, TE) = M0 * exp(-R2*TE) * g(R1, B1; TD)``, fitted in every
masked voxel for ``(M0, R1, R2, B1)``.

Recipe per voxel (numba, ``parallel=True`` over voxel chunks, no allocation per voxel):

1. R2 start from the echo ratio: ``sum_d y[d,0]*y[d,-1] / sum_d y[d,0]^2`` (a least-squares
   ratio, insensitive to the sign of the short-delay samples).
2. Variable projection on a coarse log-R1 x B1 grid: the model separates into an echo factor
   times a delay factor, so with R2 fixed the best M0 is closed form and the grid search is one
   dot product per grid point with a voxel-independent, precomputed, normalized table of
   ``g(TD)`` (``|g|`` for magnitude data). Grid points are classed by how many delays are
   negative; magnitude data have a local minimum per class near the zero crossing.
3. Bounded Levenberg-Marquardt on ``(M0, R1, R2, B1)`` (Marquardt scaling, projected steps
   with an active set: a parameter on a bound whose gradient points outwards is frozen) and
   an analytic Jacobian (value-identical to :func:`processing.signal.t1_factor`, but the
   B1-dependent trigonometry and ``exp(-R1*TR)`` are computed once per evaluation instead of
   once per delay). Magnitude data are fitted as signed data with the sign pattern of the
   grid point's class (the first c delays negative): the model is then smooth and LM cannot
   stall on the kink of ``|model|`` at the zero crossing; the cost that decides between
   candidates is always the true ``||y - |model|| ||^2``.
   If the final RMS residual is above 1.5x the noise SD (or 1e-6 of the signal RMS when the
   noise is 0), LM restarts from the best grid point of every other sign class and, for
   magnitude data, from the best fit so far with the neighbouring sign patterns; the lowest
   cost wins. (400k random noise-free voxels, T1 300-4500, T2 40-2000, B1 0.6-1.4, two
   protocols, ideal and Gaussian slice profile, real and magnitude: all within 1e-4.)
   Magnitude data with noise (noise SD > 0, ``noise_floor=True``): a last LM polish fits the
   Rician expectation ``E|S + n|`` (processing.signal.rician_mean_scalar) instead of ``|S|``,
   from the best fit above. ``|S|`` lies below the data wherever a sample is within a few
   noise SDs of zero (the noise floor), which biased T2 by +1-5 % and T1 by up to 6 % at
   SNR 30-60 (benchmarks/magnitude_fit.py). ``E|S + n|`` is smooth through zero, so the
   polish needs no sign pattern.
4. Optional second pass: B1 is smoothed in-plane (Gaussian-weighted local quadratic fit,
   FWHM in mm, weights ``[T1 < 2500 ms] / misfit``: :func:`smooth_b1`) and ``(M0, R1, R2)``
   are refitted with B1 fixed. Magnitude data with the noise floor then get two pooled
   Gauss-Newton corrections of that B1 (:func:`_pooled_b1`: each homogeneous voxel's
   profile gradient and curvature in B1, summed over a 40 mm neighbourhood in 3-D), each
   followed by the refit: the smooth of per-voxel magnitude B1 estimates was ~0.25 % low
   (skewed estimates, partial volume), GM T1 +1 %; pooled, GM/WM T1 +0.03-0.98 % at SNR 60.

Bounds: R1 0.05-10 /s, R2 0.3-100 /s, B1 0.5-1.5, M0 >= 0. ``failed`` marks voxels where LM
did not converge, a parameter ended on a bound, or a value is not finite.

Kernel arguments travel in typed bundles (NamedTuples numba compiles as structs):
:class:`Protocol`, :class:`GridTable`, :class:`FitSetup` (protocol, bounds, noise) and
:class:`FitOutput`; the parallel drivers unpack and rebuild them around ``prange`` (numba's
parfor lowering takes arrays and scalars only).

Units: times in ms, rates in 1/s inside the LM (1/ms in the forward model), B1 a ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numba as nb
import numpy as np
from scipy import ndimage

from processing._threads import both
from processing.acquisition import Acquisition
from processing.results import QuantMaps
from processing.signal import IDEAL_PROFILE, kernel_protocol, rician_mean_scalar, t1_factor

__all__ = [
    "B1_BOUNDS",
    "R1_BOUNDS_PER_S",
    "R2_BOUNDS_PER_S",
    "FitGrid",
    "FitOutput",
    "FitSetup",
    "GridTable",
    "Protocol",
    "background_mask",
    "estimate_noise_sd",
    "fit_mdme",
    "make_grid",
    "smooth_b1",
    "warmup",
]

#: Parameter bounds (physics.md section 1).
R1_BOUNDS_PER_S: tuple[float, float] = (0.05, 10.0)
R2_BOUNDS_PER_S: tuple[float, float] = (0.3, 100.0)
B1_BOUNDS: tuple[float, float] = (0.5, 1.5)

# Grid density: 18 % steps in R1 and 0.1 in B1 put LM in the right basin for >98 % of
# voxels; the rest are caught by the restart logic (the round-trip tests check the outcome).
# Finer grids cost ~1 ns per point per voxel and save little LM work.
_N_GRID_R1 = 32
_N_GRID_B1 = 11
_MAX_ITER = 60
_STEP_TOL = 1e-5  # relative parameter step that counts as converged (quadratic: error ~1e-10)
_RESTART_FACTOR = 1.5  # restart from other sign classes when RMS > this x noise SD
_SERIAL_BELOW = 2048  # small inputs skip the thread pool (its wake-up costs ms on a busy host)
_RESTART_REL = 1e-6  # ... or, for noise-free data, > this x RMS signal
# Magnitude data leave the sign of near-zero samples open: at SNR 30 a WM voxel's own B1
# is bimodal (a second mode ~30 % low, a third of the voxels), which pulls the plain local
# B1 average ~2 % low (WM T1 +4 %). Tukey-biweight iterations (smooth_b1) drop the second
# mode: WM B1 -0.6 %, T1 +1.8 % at SNR 30; +0.8 % at SNR 60 (benchmarks/magnitude_fit.py).
_MAGNITUDE_B1_ROBUST = 2
# ... and what bias the robust smooth leaves (~0.25 % low) is removed by pooled
# Gauss-Newton steps on the summed cost (_pooled_b1); each costs a profile evaluation and a
# refit (~0.3x the whole two-pass magnitude fit). Two: at SNR 60 a second step moves B1
# < 0.05 %, but at SNR 30 WM's smooth starts 0.7-1.4 % low (two-peaked estimates) and one
# step leaves WM T1 +1.5-2.8 % (two: +1.2-1.7 %; benchmarks/magnitude_fit.py).
# Steps are clipped: the smooth is already within a few % of the truth.
_POOLED_B1_STEPS = 2
_POOLED_B1_MAX_STEP = 0.05
# Voxels pooled for B1: both log R1 and log R2 (3x3x3 median) change by less than this to
# each face neighbour (_homogeneous). 0.05: 90 % of the kept MNI-phantom voxels are >= 95 %
# one tissue (0.1: 79 %, 0.2: 64 %); pooled WM B1 -0.02 % noise-free (all voxels: -0.25 %).
_HOMOGENEOUS_LOG_STEP = 0.05
# The pooled step uses this x the B1-smoothing FWHM: it corrects a smooth bias, and its
# noise (few kept voxels) moved GM T1 by +-0.3 % between noise seeds at 1x (2x: +-0.2 %).
_POOL_FWHM_FACTOR = 2.0

# Safe fast-math: allow reassociation/contraction but keep NaN/Inf semantics (we test them).
_FM = {"nsz", "arcp", "contract", "reassoc"}

Profile = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------
# Grid table (voxel independent)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitGrid:
    """Precomputed (R1, B1) search table for one protocol.

    r1_per_s, b1: ``[n_grid]`` grid coordinates. table: ``[n_delay, n_grid]`` unit-norm
    delay factor ``g/||g||`` (``|g|/||g||`` for magnitude data), delay-major so the per-voxel
    projection vectorizes over grid points. norm: ``[n_grid]`` ``||g||``. sign_class:
    ``[n_grid]`` number of delays with ``g < 0``.
    """

    r1_per_s: np.ndarray
    b1: np.ndarray
    table: np.ndarray
    norm: np.ndarray
    sign_class: np.ndarray


@nb.njit(cache=True)
def _grid_kernel(r1_ms, b1, td, tr, theta, alpha, ps, pw, out):
    for n in range(r1_ms.shape[0]):
        for i in range(td.shape[0]):
            g, _, _ = t1_factor(r1_ms[n], b1[n], td[i], tr, theta, alpha, ps, pw)
            out[i, n] = g


def make_grid(
    delays_ms: np.ndarray,
    tr_ms: float,
    saturation_deg: float,
    excitation_deg: float,
    *,
    magnitude: bool,
    profile: Profile = IDEAL_PROFILE,
    n_r1: int = _N_GRID_R1,
    n_b1: int = _N_GRID_B1,
) -> FitGrid:
    """Build the voxel-independent (R1, B1) table (log-spaced R1, linear B1, within bounds)."""
    r1 = np.geomspace(R1_BOUNDS_PER_S[0] * 1.02, R1_BOUNDS_PER_S[1] / 1.02, n_r1)
    b1 = np.linspace(B1_BOUNDS[0] + 0.01, B1_BOUNDS[1] - 0.01, n_b1)
    rr, bb = np.meshgrid(r1, b1, indexing="ij")
    rr = np.ascontiguousarray(rr.ravel())
    bb = np.ascontiguousarray(bb.ravel())
    td = np.ascontiguousarray(delays_ms, np.float64)
    g = np.empty((td.size, rr.size))
    _grid_kernel(
        rr * 1e-3,
        bb,
        td,
        float(tr_ms),
        math.radians(saturation_deg),
        math.radians(excitation_deg),
        np.ascontiguousarray(profile[0], np.float64),
        np.ascontiguousarray(profile[1], np.float64),
        g,
    )
    norm = np.sqrt((g * g).sum(axis=0))
    norm = np.where(norm > 0, norm, 1.0)
    sign_class = (g < 0).sum(axis=0).astype(np.int64)
    table = (np.abs(g) if magnitude else g) / norm
    return FitGrid(rr, bb, np.ascontiguousarray(table), norm, sign_class)


# --------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------


class Protocol(NamedTuple):
    """The MDME protocol as the kernels see it (float64 arrays; ms and radians)."""

    td: np.ndarray  # [n_delay] saturation delays, ms
    te: np.ndarray  # [n_echo] echo times, ms
    tr: float  # ms
    theta: float  # saturation flip angle, rad
    alpha: float  # excitation flip angle, rad
    ps: np.ndarray  # [n_iso] slice-profile flip-angle scales
    pw: np.ndarray  # [n_iso] slice-profile weights


class GridTable(NamedTuple):
    """The arrays of a :class:`FitGrid`, for the kernels."""

    r1: np.ndarray  # [n_grid] 1/s
    b1: np.ndarray  # [n_grid]
    table: np.ndarray  # [n_delay, n_grid] unit-norm delay factors
    norm: np.ndarray  # [n_grid]
    sign_class: np.ndarray  # [n_grid] int64


class FitSetup(NamedTuple):
    """Everything a voxel fit needs besides its samples.

    noise_sd decides when LM restarts from other basins. floor_sd > 0 (magnitude data only)
    fits the Rician expectation ``E|S + n|`` with that noise SD instead of ``|S|`` in a last
    LM polish (processing.signal.rician_mean_scalar); 0 fits ``|S|``. lo, hi: ``[4]`` bounds
    of (M0, R1 [1/s], R2 [1/s], B1).
    """

    proto: Protocol
    magnitude: bool
    noise_sd: float
    floor_sd: float
    lo: np.ndarray
    hi: np.ndarray


class FitOutput(NamedTuple):
    """Per fitted voxel: ``par[n, 4]`` (M0, R1 [1/s], R2 [1/s], B1; the start for a refit),
    ``rms[n]`` RMS residual, ``ok[n]`` converged."""

    par: np.ndarray
    rms: np.ndarray
    ok: np.ndarray


class _Work(NamedTuple):
    """Per-thread scratch arrays of the LM (allocated once per chunk, never per voxel)."""

    ws: np.ndarray  # [5, max(nd, ne, ns)]: exp(-R1 TD), g, dg/dR1, dg/dB1, exp(-R2 TE)
    h: np.ndarray  # [15] cost and normal equations (see _eval)
    ht: np.ndarray  # [15] the same at the trial point
    a: np.ndarray  # [4, 5] augmented damped system
    d: np.ndarray  # [4] step
    q: np.ndarray  # [4] trial point
    best: np.ndarray  # [4] best parameters of the restarts
    pstart: np.ndarray  # [4] their start
    cls_best: np.ndarray  # [nd + 1] int64 best grid index per sign class
    cls_val: np.ndarray  # [nd + 1] its projection


@nb.njit(cache=True)
def _work(nd, ne):
    ns = nd * ne
    return _Work(
        np.empty((5, max(nd, ne, ns))),
        np.empty(15),
        np.empty(15),
        np.empty((4, 5)),
        np.empty(4),
        np.empty(4),
        np.empty(4),
        np.empty(4),
        np.empty(nd + 1, dtype=np.int64),
        np.empty(nd + 1),
    )


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _eval(p, y, pr, magnitude, fix_b1, floor_sd, ws, h):
    """Cost and normal equations at p = (M0, R1 [1/s], R2 [1/s], B1).

    h[0] = sum r^2, h[1:11] = upper triangle of J^T J (row-major), h[11:15] = J^T r,
    with r = y - model; model = S (real), |S| (magnitude) or E|S + n| (magnitude with
    floor_sd > 0). ws (rows: exp(-R1 TD), g, dg/dR1, dg/dB1, exp(-R2 TE)) and h are
    caller-owned.
    """
    td = pr.td
    te = pr.te
    tr = pr.tr
    theta = pr.theta
    alpha = pr.alpha
    ps = pr.ps
    pw = pr.pw
    ed = ws[0]
    g = ws[1]
    gr = ws[2]
    gb = ws[3]
    e2 = ws[4]
    nd = td.shape[0]
    ne = te.shape[0]
    m0 = p[0]
    r1 = p[1] * 1e-3
    r2 = p[2] * 1e-3
    b1 = p[3]
    er = math.exp(-r1 * tr)
    for i in range(nd):
        ed[i] = math.exp(-r1 * td[i])
        g[i] = 0.0
        gr[i] = 0.0
        gb[i] = 0.0
    # Same algebra as processing.signal._g_single, hoisting the delay-independent terms.
    for k in range(ps.shape[0]):
        s = ps[k]
        w = pw[k]
        bs = b1 * s
        ct = math.cos(bs * theta)
        ca = math.cos(bs * alpha)
        dct = -theta * math.sin(bs * theta)
        dca = -alpha * math.sin(bs * alpha)
        inv = 1.0 / (1.0 - ct * ca * er)
        dden_r1 = ct * ca * tr * er
        dden_b1 = -er * (dct * ca + ct * dca)
        for i in range(nd):
            gg = (1.0 - (1.0 - ct) * ed[i] - ct * er) * inv
            g[i] += w * gg
            gr[i] += w * ((1.0 - ct) * td[i] * ed[i] + ct * tr * er - gg * dden_r1) * inv
            gb[i] += w * s * (dct * (ed[i] - er) - gg * dden_b1) * inv
    for j in range(ne):
        e2[j] = math.exp(-r2 * te[j])
    for q in range(15):
        h[q] = 0.0
    for i in range(nd):
        for j in range(ne):
            eg = e2[j] * g[i]
            s = m0 * eg
            j0 = eg
            j1 = m0 * e2[j] * gr[i] * 1e-3
            j2 = -te[j] * 1e-3 * s
            j3 = 0.0 if fix_b1 else m0 * e2[j] * gb[i]
            if floor_sd > 0.0:
                # Rician expectation: chain rule through dE/dS (its sign included).
                s, slope = rician_mean_scalar(s, floor_sd)
                j0 *= slope
                j1 *= slope
                j2 *= slope
                j3 *= slope
            elif magnitude and s < 0.0:
                s = -s
                j0 = -j0
                j1 = -j1
                j2 = -j2
                j3 = -j3
            r = y[i * ne + j] - s
            h[0] += r * r
            h[1] += j0 * j0
            h[2] += j0 * j1
            h[3] += j0 * j2
            h[4] += j0 * j3
            h[5] += j1 * j1
            h[6] += j1 * j2
            h[7] += j1 * j3
            h[8] += j2 * j2
            h[9] += j2 * j3
            h[10] += j3 * j3
            h[11] += j0 * r
            h[12] += j1 * r
            h[13] += j2 * r
            h[14] += j3 * r


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _solve_damped(h, lam, fix_b1, p, lo, hi, a, d):
    """Solve (JtJ + lam*diag(JtJ)) d = Jtr for the free parameters.

    A parameter is frozen (d = 0) when it is fixed (B1 in the second pass) or sits on a bound
    with the descent direction (J^T r) pointing out of the box: an active-set projection,
    without which the coupled step keeps pushing into the bound and LM never converges.
    """
    # Unpack the upper triangle into a full 4x4 (a[4][5] holds the augmented system).
    idx = 1
    for r in range(4):
        for c in range(r, 4):
            a[r, c] = h[idx]
            a[c, r] = h[idx]
            idx += 1
        a[r, 4] = h[11 + r]
    for r in range(4):
        dr = a[r, r]
        if dr <= 0.0:
            dr = 1e-300
        a[r, r] = dr * (1.0 + lam) + 1e-300
    for k in range(4):
        g = h[11 + k]
        if (k == 3 and fix_b1) or (p[k] <= lo[k] and g < 0.0) or (p[k] >= hi[k] and g > 0.0):
            for c in range(4):
                a[k, c] = 0.0
                a[c, k] = 0.0
            a[k, k] = 1.0
            a[k, 4] = 0.0
    # Gaussian elimination, no pivoting (SPD after damping).
    for c in range(4):
        piv = a[c, c]
        if not (abs(piv) > 0.0):
            return False
        for r in range(c + 1, 4):
            f = a[r, c] / piv
            for cc in range(c, 5):
                a[r, cc] -= f * a[c, cc]
    for r in range(3, -1, -1):
        acc = a[r, 4]
        for c in range(r + 1, 4):
            acc -= a[r, c] * d[c]
        d[r] = acc / a[r, r]
    return True


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _clip(v, lo, hi):
    return lo if v < lo else (hi if v > hi else v)


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _lm(p, y, st, magnitude, fix_b1, floor_sd, wk):
    """Projected Levenberg-Marquardt from p (updated in place). Returns (cost, converged)."""
    pr = st.proto
    lo = st.lo
    hi = st.hi
    h = wk.h
    ht = wk.ht
    q = wk.q
    _eval(p, y, pr, magnitude, fix_b1, floor_sd, wk.ws, h)
    cost = h[0]
    if not math.isfinite(cost):
        return cost, False
    lam = 1e-3
    for _ in range(_MAX_ITER):
        if not _solve_damped(h, lam, fix_b1, p, lo, hi, wk.a, wk.d):
            return cost, False
        step = 0.0
        for k in range(4):
            q[k] = _clip(p[k] + wk.d[k], lo[k], hi[k])
            rel = abs(q[k] - p[k]) / (abs(p[k]) + 1e-30)
            if rel > step:
                step = rel
        if step < _STEP_TOL:
            return cost, True
        _eval(q, y, pr, magnitude, fix_b1, floor_sd, wk.ws, ht)
        if ht[0] < cost:
            for k in range(4):
                p[k] = q[k]
            for k in range(15):
                h[k] = ht[k]
            cost = ht[0]
            lam = max(lam * 0.2, 1e-9)
        else:
            lam *= 10.0
            if lam > 1e7:
                # No descent along any damped step: a (possibly bounded) minimum.
                return cost, True
    return cost, False


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _r2_start(y, nd, ne, te, lo, hi):
    """R2 [1/s] from the ratio of the last to the first echo, summed over delays."""
    if ne < 2:
        return 10.0
    num = 0.0
    den = 0.0
    for i in range(nd):
        a = y[i * ne]
        num += a * y[i * ne + ne - 1]
        den += a * a
    if den > 0.0 and num > 0.0:
        r2 = -math.log(num / den) / (te[ne - 1] - te[0]) * 1e3
        if math.isfinite(r2):
            return _clip(r2, lo, hi)
    return 10.0


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _fit_signed(p, y, ys, c, st, fix_b1, wk):
    """LM from p; magnitude data are fitted as signed data with the first c delays negative.

    With the sign pattern fixed the model is smooth (no kink at the zero crossing), so LM
    cannot stall there. Returns (cost, converged), the cost being the true objective
    (sum of squares against |model| for magnitude data).
    """
    nd = st.proto.td.shape[0]
    ne = st.proto.te.shape[0]
    if not st.magnitude:
        return _lm(p, y, st, False, fix_b1, 0.0, wk)
    for i in range(nd):
        sg = -1.0 if i < c else 1.0
        for j in range(ne):
            ys[i * ne + j] = sg * y[i * ne + j]
    _, ok = _lm(p, ys, st, False, fix_b1, 0.0, wk)
    _eval(p, y, st.proto, True, fix_b1, 0.0, wk.ws, wk.h)
    return wk.h[0], ok


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _neg_count(p, pr, wk):
    """Number of delays where the model at p is negative (g is increasing in TD)."""
    ws = wk.ws
    _eval(p, ws[4], pr, False, False, 0.0, ws, wk.h)
    c = 0
    for i in range(pr.td.shape[0]):
        if ws[1, i] < 0.0:
            c += 1
    return c


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _grid_start(y, st, grid, wk, z, proj, p):
    """Start point p from the R2 echo ratio and the (R1, B1) grid search.

    Returns (best grid index, ||echo factor||^2, R2 start [1/s]); proj[m] holds each grid
    point's projection (used again by the restarts).
    """
    pr = st.proto
    nd = pr.td.shape[0]
    ne = pr.te.shape[0]
    ng = grid.r1.shape[0]
    ws = wk.ws
    r2 = _r2_start(y, nd, ne, pr.te, st.lo[2], st.hi[2])
    # Echo-weighted delay vector: <y, e2 (x) g> = sum_i g_i z_i; ||e2 (x) g||^2 = E*||g||^2.
    ee = 0.0
    for j in range(ne):
        e = math.exp(-r2 * 1e-3 * pr.te[j])
        ws[4, j] = e
        ee += e * e
    for i in range(nd):
        acc = 0.0
        for j in range(ne):
            acc += ws[4, j] * y[i * ne + j]
        z[i] = acc
    # Grid search: maximize the projection onto unit-norm table rows (vectorized over grid).
    for m in range(ng):
        proj[m] = 0.0
    for i in range(nd):
        zi = z[i]
        row = grid.table[i]
        for m in range(ng):
            proj[m] += zi * row[m]
    mbest = 0
    vbest = proj[0]
    for m in range(1, ng):
        if proj[m] > vbest:
            vbest = proj[m]
            mbest = m
    p[0] = max(vbest / (grid.norm[mbest] * ee), 0.0)
    p[1] = grid.r1[mbest]
    p[2] = r2
    p[3] = grid.b1[mbest]
    return mbest, ee, r2


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _restart(p, y, ys, st, grid, wk, proj, cbest, ee, r2, cost, ok):
    """LM restarts when the first fit looks like a wrong basin; p ends at the best fit.

    From the best grid point of every other sign class (for magnitude data: with that
    class's sign pattern), then, for magnitude data, from the best fit so far with the
    neighbouring sign patterns. Returns the (cost, converged) of the lowest cost.
    """
    nd = st.proto.td.shape[0]
    lo = st.lo
    hi = st.hi
    cls_best = wk.cls_best
    cls_val = wk.cls_val
    best = wk.best
    for c in range(nd + 1):
        cls_best[c] = -1
        cls_val[c] = -1e300
    for m in range(grid.r1.shape[0]):
        c = grid.sign_class[m]
        if proj[m] > cls_val[c]:
            cls_val[c] = proj[m]
            cls_best[c] = m
    for k in range(4):
        best[k] = p[k]
    bcost = cost
    bok = ok
    for c in range(nd + 1):
        m = cls_best[c]
        if m < 0 or c == cbest or cls_val[c] <= 0.0:
            continue
        p[0] = cls_val[c] / (grid.norm[m] * ee)
        p[1] = grid.r1[m]
        p[2] = r2
        p[3] = grid.b1[m]
        c2, ok2 = _fit_signed(p, y, ys, c, st, False, wk)
        if c2 < bcost or not math.isfinite(bcost):
            bcost = c2
            bok = ok2
            for k in range(4):
                best[k] = p[k]
    if st.magnitude:
        # The grid point of the right class can be far away when that class is a thin
        # sliver near the zero crossing: also restart from the best fit so far with the
        # neighbouring sign patterns.
        cb = _neg_count(best, st.proto, wk)
        pstart = wk.pstart
        for k in range(4):
            pstart[k] = best[k]
        for c in (cb - 1, cb, cb + 1):
            if c < 0 or c > nd:
                continue
            for k in range(4):
                p[k] = pstart[k]
            p[3] = _clip(p[3], lo[3] + 0.02, hi[3] - 0.02)  # leave a bound it stuck on
            c2, ok2 = _fit_signed(p, y, ys, c, st, False, wk)
            if c2 < bcost:
                bcost = c2
                bok = ok2
                for k in range(4):
                    best[k] = p[k]
    for k in range(4):
        p[k] = best[k]
    return bcost, bok


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _fit_chunk(samples, idx, start, stop, st, grid, out):
    """First pass over fitted voxels start..stop-1 (idx: flat voxel index into samples)."""
    nd = st.proto.td.shape[0]
    ne = st.proto.te.shape[0]
    ns = nd * ne
    y = np.empty(ns)
    ys = np.empty(ns)
    z = np.empty(nd)
    proj = np.empty(grid.r1.shape[0])
    p = np.empty(4)
    wk = _work(nd, ne)
    for n in range(start, stop):
        v = idx[n]
        yy = 0.0
        for k in range(ns):
            y[k] = samples[v, k]
            yy += y[k] * y[k]
        mbest, ee, r2 = _grid_start(y, st, grid, wk, z, proj, p)
        cbest = grid.sign_class[mbest]
        cost, ok = _fit_signed(p, y, ys, cbest, st, False, wk)
        thr = max(
            _RESTART_FACTOR * _RESTART_FACTOR * st.noise_sd * st.noise_sd,
            _RESTART_REL * _RESTART_REL * yy / ns,
        )
        if not (cost / ns <= thr):
            # Suspect a wrong basin: restart and keep the lowest cost.
            cost, ok = _restart(p, y, ys, st, grid, wk, proj, cbest, ee, r2, cost, ok)
        if st.magnitude and st.floor_sd > 0.0:
            cost, ok = _lm(p, y, st, True, False, st.floor_sd, wk)
        for k in range(4):
            out.par[n, k] = p[k]
        out.rms[n] = math.sqrt(cost / ns) if cost >= 0.0 else math.nan
        out.ok[n] = ok


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _refit_chunk(samples, idx, start, stop, st, io):
    """Second pass (B1 fixed at io.par[:, 3]) from io.par, updated in place."""
    nd = st.proto.td.shape[0]
    ne = st.proto.te.shape[0]
    ns = nd * ne
    y = np.empty(ns)
    ys = np.empty(ns)
    p = np.empty(4)
    wk = _work(nd, ne)
    for n in range(start, stop):
        v = idx[n]
        for k in range(ns):
            y[k] = samples[v, k]
        for k in range(4):
            p[k] = io.par[n, k]
        # Magnitude data keep the sign pattern of the start point (B1 moved only slightly).
        c = _neg_count(p, st.proto, wk) if st.magnitude else 0
        cost, ok = _fit_signed(p, y, ys, c, st, True, wk)
        if st.magnitude and st.floor_sd > 0.0:
            cost, ok = _lm(p, y, st, True, True, st.floor_sd, wk)
        for k in range(4):
            io.par[n, k] = p[k]
        io.rms[n] = math.sqrt(cost / ns) if cost >= 0.0 else math.nan
        io.ok[n] = ok


@nb.njit(cache=True, error_model="numpy", parallel=True)
def _b1_weights(par, rms, noise_sd, out):
    """Weight of each voxel's B1 in the smoothing: ``[T1 < 2500 ms] / misfit``.

    CSF-like voxels (T1 >= 2500 ms) determine B1 poorly (their samples barely depend on
    the saturation angle) and get no weight. ``misfit = max(1, (rms/noise)^2)`` down-weights
    voxels the single-compartment model does not explain (partial volume, flow), whose B1 is
    biased. Both matter: a plain mean over a brain lets ~45 % mixed voxels shift B1 by ~1 %
    and CSF T1 by ~7 %. The weight deliberately ignores the voxel's own fitted B1: a weight
    that depends on the B1 error would correlate with it and bias the weighted mean (~1.5 %).
    """
    for n in nb.prange(par.shape[0]):
        m0 = par[n, 0]
        r1 = par[n, 1] * 1e-3  # 1/ms
        w = 0.0
        if m0 > 0.0 and math.isfinite(m0) and r1 > 1.0 / 2500.0:
            misfit = 1.0
            if noise_sd > 0.0 and math.isfinite(rms[n]):
                q = rms[n] / noise_sd
                misfit = max(1.0, q * q)
            w = 1.0 / misfit
        out[n] = w


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _b1_profile_chunk(samples, idx, start, stop, st, par, grad, curv):
    """Profile gradient and Gauss-Newton curvature of each voxel's cost in B1.

    At the fit with B1 fixed, the cost ``C(B1) = min over (M0, R1, R2)`` has (envelope
    theorem, Gauss-Newton) ``dC/dB1 ~ -2 (g_b - H_bt H_tt^-1 g_t)`` and
    ``d2C/dB1^2 ~ 2 (H_bb - H_bt H_tt^-1 H_tb)`` with ``H = J^T J``, ``g = J^T r`` of the
    voxel's model (the Rician expectation when st.floor_sd > 0). grad, curv ``[n]`` get the
    bracketed terms (so a pooled step is ``sum grad / sum curv``); 0 where not finite.
    """
    nd = st.proto.td.shape[0]
    ne = st.proto.te.shape[0]
    ns = nd * ne
    y = np.empty(ns)
    p = np.empty(4)
    wk = _work(nd, ne)
    h = wk.h
    for n in range(start, stop):
        v = idx[n]
        for k in range(ns):
            y[k] = samples[v, k]
        for k in range(4):
            p[k] = par[n, k]
        _eval(p, y, st.proto, st.magnitude, False, st.floor_sd, wk.ws, h)
        # H_tt (M0, R1, R2) is h[1], h[2], h[3] / h[5], h[6] / h[8]; H_tb = h[4], h[7], h[9].
        a00, a01, a02, a11, a12, a22 = h[1], h[2], h[3], h[5], h[6], h[8]
        c00 = a11 * a22 - a12 * a12
        c01 = a02 * a12 - a01 * a22
        c02 = a01 * a12 - a02 * a11
        c11 = a00 * a22 - a02 * a02
        c12 = a01 * a02 - a00 * a12
        c22 = a00 * a11 - a01 * a01
        det = a00 * c00 + a01 * c01 + a02 * c02
        b0, b1, b2 = h[4], h[7], h[9]
        g0, g1, g2 = h[11], h[12], h[13]
        if not (abs(det) > 0.0):
            grad[n] = 0.0
            curv[n] = 0.0
            continue
        # u = H_tt^-1 H_tb (adjugate / det; H_tt symmetric)
        u0 = (c00 * b0 + c01 * b1 + c02 * b2) / det
        u1 = (c01 * b0 + c11 * b1 + c12 * b2) / det
        u2 = (c02 * b0 + c12 * b1 + c22 * b2) / det
        gp = h[14] - (u0 * g0 + u1 * g1 + u2 * g2)
        hp = h[10] - (u0 * b0 + u1 * b1 + u2 * b2)
        if math.isfinite(gp) and math.isfinite(hp) and hp > 0.0:
            grad[n] = gp
            curv[n] = hp
        else:
            grad[n] = 0.0
            curv[n] = 0.0


# The per-voxel passes share one driver (the chunk kernels above do the work).
_FIRST_PASS = 0  # _fit_chunk: grid start, LM, restarts
_REFIT_PASS = 1  # _refit_chunk: LM with B1 fixed at out.par[:, 3]
_B1_PROFILE_PASS = 2  # _b1_profile_chunk: profile gradient and curvature in B1 -> grad, curv
_NO_VALUES = np.empty(0)  # grad / curv of the passes that do not fill them


@nb.njit(cache=True, error_model="numpy")
def _pass_chunk(which, samples, idx, start, stop, st, grid, out, grad, curv):
    """Voxels start..stop-1 of pass ``which`` (_FIRST_PASS, _REFIT_PASS, _B1_PROFILE_PASS)."""
    if which == _FIRST_PASS:
        _fit_chunk(samples, idx, start, stop, st, grid, out)
    elif which == _REFIT_PASS:
        _refit_chunk(samples, idx, start, stop, st, out)
    else:
        _b1_profile_chunk(samples, idx, start, stop, st, out.par, grad, curv)


@nb.njit(cache=True, error_model="numpy", parallel=True)
def _pass_all(which, samples, idx, st, grid, out, grad, curv, n_chunks):
    """:func:`_pass_chunk` over all voxels, ``n_chunks`` chunks in parallel."""
    # A prange body cannot capture tuples (numba's parfor lowering takes arrays and scalars
    # only): unpack the bundles here and rebuild them inside the loop (no copies).
    td, te, tr, theta, alpha, ps, pw = st.proto
    _, magnitude, noise_sd, floor_sd, lo, hi = st
    gr1, gb1, gtab, gnorm, gcls = grid
    par, rms, ok = out
    n = idx.shape[0]
    for c in nb.prange(n_chunks):
        pr = Protocol(td, te, tr, theta, alpha, ps, pw)
        _pass_chunk(
            which,
            samples,
            idx,
            c * n // n_chunks,
            (c + 1) * n // n_chunks,
            FitSetup(pr, magnitude, noise_sd, floor_sd, lo, hi),
            GridTable(gr1, gb1, gtab, gnorm, gcls),
            FitOutput(par, rms, ok),
            grad,
            curv,
        )


# --------------------------------------------------------------------------------------
# Noise, mask, B1 smoothing (array operations)
# --------------------------------------------------------------------------------------


def _corner_samples(acq: Acquisition) -> np.ndarray:
    ny, nx = acq.signal.shape[3:]
    cy = max(2, ny // 8)
    cx = max(2, nx // 8)
    s = acq.signal
    parts = [
        s[..., :cy, :cx],
        s[..., :cy, nx - cx :],
        s[..., ny - cy :, :cx],
        s[..., ny - cy :, nx - cx :],
    ]
    return np.concatenate([p.reshape(-1) for p in parts]).astype(np.float64)


def estimate_noise_sd(acq: Acquisition) -> float:
    """Noise SD per sample and real channel, from the four in-plane image corners (air).

    Corner patches are ``ny/8 x nx/8`` voxels in every slice, delay and echo. Real data:
    ``1.4826 * MAD`` (Gaussian). Magnitude data: background is Rayleigh, so
    ``sigma = median / sqrt(2 ln 2)``. Returns 0.0 for noise-free (all-zero) backgrounds.
    Assumes the corners are air, as in any head acquisition with a normal field of view.
    """
    v = _corner_samples(acq)
    if acq.is_magnitude:
        return float(np.median(np.abs(v)) / math.sqrt(2.0 * math.log(2.0)))
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def background_mask(acq: Acquisition, noise_sd: float | None = None, k: float = 3.0) -> np.ndarray:
    """Voxels whose sample norm is well above noise: bool ``[z, y, x]``.

    A noise-only voxel has ``E||y||^2 = n*sigma^2`` (real) or ``2*n*sigma^2`` (magnitude,
    Rayleigh); the mask keeps ``||y|| > k * sqrt(E||y||^2)`` (k = 3: false-positive rate
    < 1e-12 for 8 samples). A relative floor of 1e-6 of the largest norm handles noise-free data.
    """
    if noise_sd is None:
        noise_sd = estimate_noise_sd(acq)
    ns = acq.n_delays * acq.n_echoes
    norm = np.sqrt(np.einsum("zdeyx,zdeyx->zyx", acq.signal, acq.signal, dtype=np.float64))
    expected = noise_sd * math.sqrt(ns * (2.0 if acq.is_magnitude else 1.0))
    thr = max(k * expected, 1e-6 * float(norm.max(initial=0.0)))
    return norm > thr


@nb.njit(cache=True, parallel=True)
def _block_moments(b, w, f, out):
    """Block sums (f x f in-plane) of the moments w, w x, w y, w x^2, w y^2, w x y, w b,
    w b x, w b y of float32 ``[z, y, x]`` into ``out[9, z, ly, lx]`` (float64, zeroed).
    One pass, no temporaries: the numpy version made nine full-size float64 copies."""
    nz, ny, nx = b.shape
    for zi in nb.prange(nz):
        for yi in range(ny):
            by = yi // f
            y = float(yi)
            for xi in range(nx):
                wv = float(w[zi, yi, xi])
                if wv == 0.0:
                    continue
                bx = xi // f
                x = float(xi)
                wb = wv * float(b[zi, yi, xi])
                out[0, zi, by, bx] += wv
                out[1, zi, by, bx] += wv * x
                out[2, zi, by, bx] += wv * y
                out[3, zi, by, bx] += wv * x * x
                out[4, zi, by, bx] += wv * y * y
                out[5, zi, by, bx] += wv * x * y
                out[6, zi, by, bx] += wb
                out[7, zi, by, bx] += wb * x
                out[8, zi, by, bx] += wb * y


@nb.njit(cache=True, inline="always")
def _plane_intercept(sw, mx, my, mxx, myy, mxy, sb, mbx, mby):
    """Intercept c0 of the weighted local plane from centred moments, by Cramer's rule:

    | sw  mx  my  | c0   sb
    | mx  mxx mxy | c1 = mbx
    | my  mxy myy | c2   mby

    A degenerate design (weights on a line) falls back to the local mean ``sb / sw``."""
    c00 = mxx * myy - mxy * mxy
    c01 = mx * myy - mxy * my
    c02 = mx * mxy - mxx * my
    det = sw * c00 - mx * c01 + my * c02
    if abs(det) > 1e-6 * abs(max(sw * mxx * myy, 1e-300)):
        return (sb * c00 - mx * (mbx * myy - mxy * mby) + my * (mbx * mxy - mxx * mby)) / det
    return sb / sw


@nb.njit(cache=True, parallel=True)
def _local_plane(m, f, min_weight, out):
    """Intercept of the weighted local plane fit at each block centre, from the filtered
    moments ``m[9, z, ly, lx]`` (order of :func:`_block_moments`). Moments are centred on
    the block centre for conditioning; a degenerate design falls back to the local mean;
    a cell with total weight <= ``min_weight`` is NaN. 3x3 solve by Cramer's rule."""
    _, nz, ly, lx = m.shape
    for zi in nb.prange(nz):
        for i in range(ly):
            cy = i * f + (f - 1) / 2.0
            for j in range(lx):
                cx = j * f + (f - 1) / 2.0
                sw = m[0, zi, i, j]
                if not sw > min_weight:
                    out[zi, i, j] = np.nan
                    continue
                sx = m[1, zi, i, j]
                sy = m[2, zi, i, j]
                sb = m[6, zi, i, j]
                mx = sx - cx * sw
                my = sy - cy * sw
                mxx = m[3, zi, i, j] - 2 * cx * sx + cx * cx * sw
                myy = m[4, zi, i, j] - 2 * cy * sy + cy * cy * sw
                mxy = m[5, zi, i, j] - cx * sy - cy * sx + cx * cy * sw
                mbx = m[7, zi, i, j] - cx * sb
                mby = m[8, zi, i, j] - cy * sb
                out[zi, i, j] = _plane_intercept(sw, mx, my, mxx, myy, mxy, sb, mbx, mby)


def _smooth_local_linear(b: np.ndarray, w: np.ndarray, sig_y: float, sig_x: float) -> np.ndarray:
    """Gaussian-weighted local *linear* fit of ``b`` in-plane (weights ``w``), float32 [z,y,x].

    A plain normalized convolution (local mean) is biased wherever the weights are
    asymmetric (head edge, next to CSF): the estimate drifts by gradient x weighted-centroid
    offset, ~1 % of B1 for a typical 3T field. Fitting a local plane b = c0 + c1 x + c2 y
    removes that first-order bias. Moments are block-summed (f x f, exact) and filtered on
    that coarse grid (sigma / f), then interpolated back; where the local design is
    degenerate the local mean is used. Where no weight is near, the result is NaN.
    """
    f = int(max(1, min(sig_y, sig_x) // 3))
    z, ny, nx = b.shape
    ly, lx = -(-ny // f), -(-nx // f)
    sums = np.zeros((9, z, ly, lx))
    _block_moments(
        np.ascontiguousarray(b, np.float32), np.ascontiguousarray(w, np.float32), f, sums
    )
    filt = _filter_channels(sums, (0.0, 0.0, sig_y / f, sig_x / f))
    out = np.empty((z, ly, lx), np.float32)
    _local_plane(filt, f, 1e-3 * float(filt[0].max(initial=0.0)), out)
    return out if f == 1 else _upsample_linear(out, f, ny, nx)


# Monomials u^a v^b of the local quadratic B1 model (a + b <= 2), and of its normal
# equations (a + b <= 4), in a fixed order.
_Q2 = np.array([(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)], np.int64)
_Q4 = np.array([(a, n - a) for n in range(5) for a in range(n, -1, -1)], np.int64)
_BINOM = np.array([[math.comb(n, k) for k in range(5)] for n in range(5)], np.float64)


@nb.njit(cache=True, parallel=True)
def _block_moments_q(b, w, f, scale, q4, q2, out):
    """Block sums (f x f in-plane) of ``w u^a v^b`` (q4 exponents) and ``w b u^a v^b``
    (q2 exponents), u = x / scale, v = y / scale (absolute voxel coordinates), of float32
    ``[z, y, x]`` into ``out[len(q4) + len(q2), z, ly, lx]`` (float64, zeroed)."""
    nz, ny, nx = b.shape
    n4 = q4.shape[0]
    n2 = q2.shape[0]
    for zi in nb.prange(nz):
        pu = np.empty(5)
        pv = np.empty(5)
        for yi in range(ny):
            by = yi // f
            v = yi / scale
            pv[0] = 1.0
            for k in range(1, 5):
                pv[k] = pv[k - 1] * v
            for xi in range(nx):
                wv = float(w[zi, yi, xi])
                if wv == 0.0:
                    continue
                bx = xi // f
                u = xi / scale
                pu[0] = 1.0
                for k in range(1, 5):
                    pu[k] = pu[k - 1] * u
                wb = wv * float(b[zi, yi, xi])
                for k in range(n4):
                    out[k, zi, by, bx] += wv * pu[q4[k, 0]] * pv[q4[k, 1]]
                for k in range(n2):
                    out[n4 + k, zi, by, bx] += wb * pu[q2[k, 0]] * pv[q2[k, 1]]


@nb.njit(cache=True, parallel=True)
def _local_quadratic(m, f, scale, min_weight, q4, q2, binom, out):
    """Intercept of the weighted local quadratic fit at each block centre from the filtered
    moments of :func:`_block_moments_q`. Moments are re-centred on the block centre
    (binomial expansion); the 6 x 6 normal equations are solved by Cholesky. An
    ill-conditioned design (weights on a line, an edge) falls back to the local plane, then
    to the local mean; total weight <= ``min_weight`` gives NaN."""
    _, nz, ly, lx = m.shape
    n4 = q4.shape[0]
    n2 = q2.shape[0]
    # index of u^a v^b in q4 / q2
    i4 = np.full((5, 5), -1, np.int64)
    for k in range(n4):
        i4[q4[k, 0], q4[k, 1]] = k
    for zi in nb.prange(nz):
        mc = np.empty((5, 5))
        bc = np.empty((3, 3))
        a = np.empty((6, 6))
        r = np.empty(6)
        pu = np.empty(5)
        pv = np.empty(5)
        for i in range(ly):
            cv = (i * f + (f - 1) / 2.0) / scale
            for j in range(lx):
                cu = (j * f + (f - 1) / 2.0) / scale
                sw = m[0, zi, i, j]
                if not sw > min_weight:
                    out[zi, i, j] = np.nan
                    continue
                pu[0] = 1.0
                pv[0] = 1.0
                for k in range(1, 5):
                    pu[k] = pu[k - 1] * -cu
                    pv[k] = pv[k - 1] * -cv
                # centred moments: sum w (u-cu)^a (v-cv)^b
                for aa in range(5):
                    for bb in range(5 - aa):
                        acc = 0.0
                        for ii in range(aa + 1):
                            for jj in range(bb + 1):
                                acc += (
                                    binom[aa, ii] * binom[bb, jj] * pu[aa - ii] * pv[bb - jj]
                                    * m[i4[ii, jj], zi, i, j]
                                )  # fmt: skip
                        mc[aa, bb] = acc
                for aa in range(3):
                    for bb in range(3 - aa):
                        acc = 0.0
                        for ii in range(aa + 1):
                            for jj in range(bb + 1):
                                kk = 0
                                for t in range(n2):
                                    if q2[t, 0] == ii and q2[t, 1] == jj:
                                        kk = t
                                acc += (
                                    binom[aa, ii] * binom[bb, jj] * pu[aa - ii] * pv[bb - jj]
                                    * m[n4 + kk, zi, i, j]
                                )  # fmt: skip
                        bc[aa, bb] = acc
                for p in range(6):
                    r[p] = bc[q2[p, 0], q2[p, 1]]
                    for q in range(6):
                        a[p, q] = mc[q2[p, 0] + q2[q, 0], q2[p, 1] + q2[q, 1]]
                # Cholesky with a relative pivot test; solve for the intercept
                ok = True
                for p in range(6):
                    app = a[p, p]
                    d = app
                    for k in range(p):
                        d -= a[p, k] * a[p, k]
                    if not d > 1e-8 * app:
                        ok = False
                        break
                    d = math.sqrt(d)
                    a[p, p] = d
                    for q in range(p + 1, 6):
                        e = a[q, p]
                        for k in range(p):
                            e -= a[q, k] * a[p, k]
                        a[q, p] = e / d
                if ok:
                    y = np.empty(6)
                    for p in range(6):
                        e = r[p]
                        for k in range(p):
                            e -= a[p, k] * y[k]
                        y[p] = e / a[p, p]
                    for p in range(5, -1, -1):
                        e = y[p]
                        for k in range(p + 1, 6):
                            e -= a[k, p] * y[k]
                        y[p] = e / a[p, p]
                    out[zi, i, j] = y[0]
                    continue
                out[zi, i, j] = _plane_intercept(
                    mc[0, 0], mc[1, 0], mc[0, 1], mc[2, 0], mc[0, 2], mc[1, 1],
                    bc[0, 0], bc[1, 0], bc[0, 1],
                )  # fmt: skip


def _smooth_local_quadratic(
    b: np.ndarray, w: np.ndarray, sig_y: float, sig_x: float, sig_z: float = 0.0
) -> np.ndarray:
    """Gaussian-weighted local *quadratic* fit of ``b`` in-plane (weights ``w``), float32
    ``[z, y, x]``.

    3T B1 is curved (central brightening) and has holes in its weights (ventricles: CSF
    determines B1 poorly and gets no weight). A local plane bridges a hole with a chord and
    is ~0.3 % low in the middle of the ventricles, i.e. CSF T1 ~2 % long (CSF T1 moves
    ~6.5 x the relative B1 error); the quadratic follows the curvature. Moments are
    block-summed and filtered on the coarse grid like :func:`_smooth_local_linear`.
    """
    f = int(max(1, min(sig_y, sig_x) // 3))
    z, ny, nx = b.shape
    ly, lx = -(-ny // f), -(-nx // f)
    scale = float(max(sig_y, sig_x, 1.0))
    sums = np.zeros((_Q4.shape[0] + _Q2.shape[0], z, ly, lx))
    _block_moments_q(
        np.ascontiguousarray(b, np.float32),
        np.ascontiguousarray(w, np.float32),
        f,
        scale,
        _Q4,
        _Q2,
        sums,
    )
    filt = _filter_channels(sums, (0.0, sig_z, sig_y / f, sig_x / f))
    out = np.empty((z, ly, lx), np.float32)
    _local_quadratic(filt, f, scale, 1e-3 * float(filt[0].max(initial=0.0)), _Q4, _Q2, _BINOM, out)
    return out if f == 1 else _upsample_linear(out, f, ny, nx)


def _filter_channels(sums: np.ndarray, sig: tuple[float, float, float, float]) -> np.ndarray:
    """``ndimage.gaussian_filter(sums, sig, mode="constant", truncate=3.0)`` for moments
    ``[channel, z, y, x]`` (``sig[0]`` = 0: channels are independent): half the channels
    on a second thread (the filters release the GIL), the same values."""
    if sig[0] != 0.0:
        raise ValueError("sig[0]: the channels must not be mixed")
    out = np.empty_like(sums)
    half = sums.shape[0] // 2

    def part(lo: int, hi: int) -> None:
        ndimage.gaussian_filter(sums[lo:hi], sig, output=out[lo:hi], mode="constant", truncate=3.0)

    both(lambda: part(0, half), lambda: part(half, sums.shape[0]), concurrent=half > 0)
    return out


def _upsample_linear(low: np.ndarray, f: int, ny: int, nx: int) -> np.ndarray:
    """Separable linear interpolation of block centres back to the full in-plane grid.

    Output voxel j sits at low-res coordinate (j + 0.5)/f - 0.5 (block-centre convention),
    clamped at the borders. ~10x faster than ndimage.zoom for this special case.
    """

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = np.clip((np.arange(n_out) + 0.5) / f - 0.5, 0.0, n_in - 1.0)
        i0 = np.floor(c).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (c - i0).astype(np.float32)

    y0, y1, wy = axis(ny, low.shape[1])
    x0, x1, wx = axis(nx, low.shape[2])
    out = np.empty((low.shape[0], ny, nx), np.result_type(low.dtype, wy.dtype))

    def slab(z0: int, z1: int) -> None:  # slices are independent: two threads
        lz = low[z0:z1]
        t = lz[:, y0, :] * (1 - wy)[None, :, None] + lz[:, y1, :] * wy[None, :, None]
        out[z0:z1] = t[:, :, x0] * (1 - wx) + t[:, :, x1] * wx

    half = low.shape[0] // 2
    both(lambda: slab(0, half), lambda: slab(half, low.shape[0]), concurrent=half > 0)
    return out


def smooth_b1(
    b1: np.ndarray,
    weight: np.ndarray,
    voxel_size_mm: tuple[float, float, float],
    fwhm_mm: float,
    *,
    robust_iterations: int = 0,
    order: int = 2,
    through_plane_fwhm_mm: float = 0.0,
) -> np.ndarray:
    """In-plane normalized Gaussian smoothing of a B1 map ``[z, y, x]``, robust to skew.

    ``order`` 2 (default): local quadratic fit (:func:`_smooth_local_quadratic`), which
    follows the curvature of 3T B1 across weightless holes (ventricles). ``order`` 1: local
    plane plus a twicing correction of the curvature term (the earlier method; 0.3 % B1 low
    in the middle of the ventricles).

    ``weight`` (bool or float ``[z, y, x]``) selects the voxels that contribute (fitted, not
    failed). The per-voxel B1 estimates have a skewed error distribution at moderate SNR
    (a long tail towards high B1), so a plain local mean is biased by ~0.5 %; a few
    Tukey-biweight reweighting iterations pull the local estimate to the centre of the
    distribution. ``through_plane_fwhm_mm`` > 0 (order 2 only) also pools neighbouring
    slices with a Gaussian of that FWHM (slice spacing ``voxel_size_mm[0]``; the local
    model stays constant through-plane). Returns float64 ``[z, y, x]``; where no weight is
    near, the input is kept.
    """
    if not (fwhm_mm > 0 and math.isfinite(fwhm_mm)):
        raise ValueError(f"b1_smoothing_fwhm_mm: must be a finite number > 0, got {fwhm_mm!r}")
    if np.shape(b1) != np.shape(weight) or np.ndim(b1) != 3:
        raise ValueError(
            f"b1/weight: expected equal [z, y, x] shapes, got {np.shape(b1)} and {np.shape(weight)}"
        )
    w0 = np.asarray(weight, np.float32)
    sig_y = fwhm_mm / 2.3548 / voxel_size_mm[1]
    sig_x = fwhm_mm / 2.3548 / voxel_size_mm[2]
    b = np.where(w0 > 0, b1, 0.0).astype(np.float32)
    sel = w0 > 0
    w = w0
    if order not in (1, 2):
        raise ValueError(f"order: expected 1 or 2, got {order!r}")
    smooth = _smooth_local_quadratic if order == 2 else _smooth_local_linear
    sig_z = through_plane_fwhm_mm / 2.3548 / voxel_size_mm[0]
    if sig_z > 0 and order != 2:
        raise ValueError("through_plane_fwhm_mm: only with order 2")
    for it in range(robust_iterations + 1):
        sm = smooth(b, w, sig_y, sig_x, sig_z) if sig_z > 0 else smooth(b, w, sig_y, sig_x)
        if it == robust_iterations:
            break
        dev = (b - sm)[sel]
        dev = dev[np.isfinite(dev)]
        scale = (
            1.4826 * float(np.median(np.abs(dev[:: max(1, dev.size // 100_000)])))
            if dev.size
            else 0.0
        )
        if not scale > 0:
            break
        u = np.nan_to_num((b - sm) / (4.685 * scale), nan=1.0)
        w = w0 * np.where(np.abs(u) < 1, (1 - u * u) ** 2, 0.0).astype(np.float32)
    # Second-order correction (twicing): a Gaussian of width sigma turns a curved field
    # b into ~ b + sigma^2/2 * laplacian(b); 3T B1 is curved (central brightening), so the
    # plain smooth is ~0.4 % low in the middle at 20 mm FWHM. 2*S(b) - S(S(b)) cancels
    # that term at the cost of a little more noise.
    if order == 1:
        filled = np.where(np.isfinite(sm), sm, b).astype(np.float32)
        sm2 = _smooth_local_linear(filled, w, sig_y, sig_x)
        both = np.isfinite(sm) & np.isfinite(sm2)
        sm = np.where(both, 2.0 * sm - sm2, sm)
    out = np.asarray(b1, np.float64).copy()
    ok = np.isfinite(sm)
    out[ok] = sm[ok]
    return out


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def _n_chunks(n: int) -> int:
    return int(max(1, min(n, nb.get_num_threads() * 16)))


def _check_profile(profile: Profile) -> tuple[np.ndarray, np.ndarray]:
    ps = np.ascontiguousarray(profile[0], np.float64).ravel()
    pw = np.ascontiguousarray(profile[1], np.float64).ravel()
    if ps.size < 1 or ps.size != pw.size or not (np.isfinite(ps).all() and np.isfinite(pw).all()):
        raise ValueError("profile: expected (scales, weights), equal non-empty finite 1-D arrays")
    return ps, pw


def _check_inputs(
    acq: Acquisition, mask: np.ndarray | None, noise_sd: float | None
) -> tuple[float, np.ndarray]:
    """Validate the acquisition; return (noise SD, bool mask ``[z, y, x]``)."""
    if not isinstance(acq, Acquisition):
        raise TypeError(
            f"acq: expected processing.acquisition.Acquisition, got {type(acq).__name__}"
        )
    if acq.n_delays < 3:
        raise ValueError(
            f"acq.delays_ms: need at least 3 delays to fit M0, R1 and B1, got {acq.n_delays}"
        )
    if acq.n_echoes < 2:
        raise ValueError(f"acq.echo_times_ms: need at least 2 echoes to fit R2, got {acq.n_echoes}")
    if noise_sd is None:
        noise_sd = estimate_noise_sd(acq)
    elif not (math.isfinite(noise_sd) and noise_sd >= 0):
        raise ValueError(f"noise_sd: must be a finite number >= 0, got {noise_sd!r}")
    if mask is None:
        return float(noise_sd), background_mask(acq, noise_sd)
    mask = np.asarray(mask)
    if mask.shape != acq.shape:
        raise ValueError(f"mask: expected shape {acq.shape} (z, y, x), got {mask.shape}")
    return float(noise_sd), mask.astype(bool)


def _setup(
    acq: Acquisition, profile: Profile, noise_sd: float, noise_floor: bool
) -> tuple[FitSetup, GridTable]:
    """The kernels' view of the protocol, bounds, noise and the (R1, B1) grid."""
    ps, pw = _check_profile(profile)
    proto = Protocol(
        *kernel_protocol(
            acq.delays_ms,
            acq.echo_times_ms,
            acq.tr_ms,
            acq.saturation_deg,
            acq.excitation_deg,
            (ps, pw),
        )
    )
    grid = make_grid(
        acq.delays_ms,
        acq.tr_ms,
        acq.saturation_deg,
        acq.excitation_deg,
        magnitude=acq.is_magnitude,
        profile=(ps, pw),
    )
    magnitude = bool(acq.is_magnitude)
    setup = FitSetup(
        proto,
        magnitude,
        noise_sd,
        noise_sd if (magnitude and noise_floor) else 0.0,
        np.array([0.0, R1_BOUNDS_PER_S[0], R2_BOUNDS_PER_S[0], B1_BOUNDS[0]]),
        np.array([np.inf, R1_BOUNDS_PER_S[1], R2_BOUNDS_PER_S[1], B1_BOUNDS[1]]),
    )
    table = GridTable(grid.r1_per_s, grid.b1, grid.table, grid.norm, grid.sign_class)
    return setup, table


def _b1_voxel_weights(out: FitOutput, setup: FitSetup) -> np.ndarray:
    """``[n]`` weight of each fitted voxel's B1 evidence (:func:`_b1_weights`), 0 for voxels
    that did not converge or sit on a bound, capped at the 95th percentile and scaled to 1
    there (a few bright voxels cannot dominate a neighbourhood)."""
    par = out.par
    usable = out.ok & _inside(par, setup.lo, setup.hi, True) & np.isfinite(par).all(1)
    wv = np.zeros(par.shape[0])
    _b1_weights(par, out.rms, setup.noise_sd, wv)
    wv = np.where(usable & np.isfinite(wv), wv, 0.0)
    pos = wv[wv > 0]
    if pos.size:
        wv = np.minimum(wv, float(np.percentile(pos, 95))) / float(np.percentile(pos, 95))
    return wv


def _homogeneous(par: np.ndarray, idx: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``[n]`` bool: the fitted voxel lies inside a homogeneous region of R1 and R2.

    A partial-volume voxel (two tissues, or tissue and CSF) is fitted by one compartment
    with a B1 that is low (a sum of two recoveries looks like a shallower saturation):
    ~0.4 % at 10 % mixing, ~1 % at 40 % in the MNI phantom, noise-free. Per voxel the
    misfit is hidden in the noise at SNR 30-60, but summed over the ~half of a brain that
    is mixed it pulls a pooled B1 0.3 % low. Mixed voxels sit where R1 and R2 change:
    median-filter log R1 and log R2 (3x3x3, noise) and keep voxels whose six face
    neighbours differ by less than _HOMOGENEOUS_LOG_STEP in both.
    """
    keep = np.ones(idx.size, bool)
    # Work in the fitted voxels' bounding box, float32 (the filters dominate the cost).
    zyx = np.unravel_index(idx, shape)
    box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in zyx)
    sub = tuple(c - b.start for c, b in zip(zyx, box, strict=True))
    sub_shape = tuple(b.stop - b.start for b in box)
    for k in (1, 2):
        v = np.zeros(sub_shape, np.float32)
        v[sub] = np.log(np.clip(par[:, k], 1e-3, None))
        med = ndimage.median_filter(v, size=3, mode="nearest")
        step = np.zeros(sub_shape, np.float32)
        for ax in range(3):
            a = [slice(None)] * 3
            b = [slice(None)] * 3
            a[ax] = slice(1, None)
            b[ax] = slice(None, -1)
            d = np.abs(med[tuple(a)] - med[tuple(b)])
            np.maximum(step[tuple(a)], d, out=step[tuple(a)])
            np.maximum(step[tuple(b)], d, out=step[tuple(b)])
        keep &= step[sub] < _HOMOGENEOUS_LOG_STEP
    return keep


def _pooled_b1(
    samples: np.ndarray,
    rows: np.ndarray,
    out: FitOutput,
    idx: np.ndarray,
    setup: FitSetup,
    grid: GridTable,
    shape: tuple[int, int, int],
    voxel_size_mm: tuple[float, float, float],
    fwhm_mm: float,
) -> np.ndarray:
    """``[n]`` B1 after one pooled Gauss-Newton step on the neighbourhood's summed cost.

    Smoothing per-voxel B1 *estimates* inherits their bias: for magnitude data at SNR
    30-60 a voxel's own B1 is skewed and partly two-peaked (the sign of near-zero samples
    is open), and the robust smooth stays ~0.25 % low in WM and GM, i.e. T1 +0.6 %
    (benchmarks/magnitude_fit.py). Pooling the *cost* instead is the local maximum
    likelihood of a shared, smooth B1: each voxel contributes its profile gradient and
    curvature in B1 at the current fit (:func:`_b1_profile_chunk`), weighted like the
    smoothing (:func:`_b1_voxel_weights`) and only where the tissue is homogeneous
    (:func:`_homogeneous`: partial-volume voxels pull B1 low). The step is the weighted
    local quadratic fit (:func:`smooth_b1`, FWHM ``fwhm_mm`` in-plane and through-plane)
    of the voxels' own steps ``g/h`` with weights ``w*h``: locally ``sum w g / sum w h``,
    the Gauss-Newton step of the summed cost. The expected gradient of the
    Rician-expectation model at the true B1 is zero, so the step removes the estimate's
    bias instead of averaging it. ``[n]`` in, B1 ``[n]`` out (clipped to the bounds).
    ``samples[rows[i]]`` are the samples of the voxel at flat index ``idx[i]``.
    """
    n = idx.size
    grad = np.zeros(n)
    curv = np.zeros(n)
    _run_pass(_B1_PROFILE_PASS, samples, rows, setup, grid, out, grad, curv)
    wv = _b1_voxel_weights(out, setup) * _homogeneous(out.par, idx, shape)
    # Each voxel's own Gauss-Newton step g/h with weight w*h; their weighted local
    # quadratic fit (smooth_b1) is the pooled step that follows a curved bias of the smooth.
    own = np.zeros(shape)
    weight = np.zeros(shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        own.ravel()[idx] = np.where(curv > 0, grad / curv, 0.0)
    weight.ravel()[idx] = wv * curv
    weight /= max(float(weight.max(initial=0.0)), 1e-300)
    # Pooled through-plane too: in-plane alone a 20 mm neighbourhood holds ~50 kept voxels
    # and the step is noisy (+-0.2 % per slice at SNR 60); B1 is smooth over a few slices.
    pooled = smooth_b1(own, weight, voxel_size_mm, fwhm_mm, through_plane_fwhm_mm=fwhm_mm)
    step = pooled.ravel()[idx]
    # where no pooled evidence is near, smooth_b1 keeps the voxel's own step: drop it
    sig = [fwhm_mm / 2.3548 / v for v in voxel_size_mm]
    near = ndimage.gaussian_filter((weight > 0).astype(np.float32), sig).ravel()[idx]
    step = np.where(near > 0.01, step, 0.0)
    # A step is a correction of a smooth estimate: large ones mean too little evidence.
    step = np.clip(np.nan_to_num(step), -_POOLED_B1_MAX_STEP, _POOLED_B1_MAX_STEP)
    return np.clip(out.par[:, 3] + step, B1_BOUNDS[0], B1_BOUNDS[1])


def _smoothed_b1(
    out: FitOutput,
    idx: np.ndarray,
    setup: FitSetup,
    shape: tuple[int, int, int],
    voxel_size_mm: tuple[float, float, float],
    fwhm_mm: float,
) -> np.ndarray:
    """``[n]`` B1 of every fitted voxel after in-plane smoothing (:func:`smooth_b1`)."""
    par = out.par
    b1map = np.zeros(shape)
    b1map.ravel()[idx] = par[:, 3]
    wv = _b1_voxel_weights(out, setup)
    good = np.zeros(shape, np.float32)
    good.ravel()[idx] = wv.astype(np.float32)
    robust = _MAGNITUDE_B1_ROBUST if setup.magnitude else 0
    b1s = smooth_b1(b1map, good, voxel_size_mm, fwhm_mm, robust_iterations=robust)
    return np.clip(b1s.ravel()[idx], B1_BOUNDS[0], B1_BOUNDS[1])


def _to_maps(
    out: FitOutput,
    idx: np.ndarray,
    setup: FitSetup,
    mask: np.ndarray,
    fix_b1: bool,
) -> QuantMaps:
    """Scatter the per-voxel results into float32 ``[z, y, x]`` maps."""
    par = out.par
    shape = mask.shape
    finite = np.isfinite(par).all(axis=1) & np.isfinite(out.rms)
    failed_v = ~out.ok | ~finite | ~_inside(par, setup.lo, setup.hi, not fix_b1)

    def scatter(values: np.ndarray) -> np.ndarray:
        m = np.zeros(shape, np.float32)
        m.ravel()[idx] = np.where(finite, values, 0.0)
        return m

    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = scatter(1000.0 / par[:, 1])
        t2 = scatter(1000.0 / par[:, 2])
    m0 = scatter(par[:, 0])
    failed = np.zeros(shape, bool)
    failed.ravel()[idx] = failed_v
    return QuantMaps(
        t1_ms=t1,
        t2_ms=t2,
        pd_pu=m0.copy(),
        b1=scatter(par[:, 3]),
        m0=m0,
        residual=scatter(out.rms),
        mask=mask,
        failed=failed,
        noise_sd=float(setup.noise_sd),
    )


def fit_mdme(
    acq: Acquisition,
    mask: np.ndarray | None = None,
    *,
    b1_smoothing: bool = False,
    b1_smoothing_fwhm_mm: float = 20.0,
    profile: Profile = IDEAL_PROFILE,
    n_threads: int | None = None,
    noise_sd: float | None = None,
    noise_floor: bool = True,
) -> QuantMaps:
    """Fit M0, T1, T2 and B1 in every voxel of ``mask`` (default: :func:`background_mask`).

    Parameters
    ----------
    acq: the MDME acquisition (real/phase-corrected, or magnitude if ``acq.is_magnitude``).
    mask: optional bool ``[z, y, x]``; voxels to fit.
    b1_smoothing: run the second pass (B1 smoothed in-plane, (M0, R1, R2) refitted).
    b1_smoothing_fwhm_mm: FWHM of that smoothing, mm.
    profile: slice profile ``(scales, weights)``, e.g. ``gaussian_slice_profile()``.
    n_threads: numba threads for this call (default: numba's current setting).
    noise_sd: noise SD per sample if known (default: :func:`estimate_noise_sd`); it sets the
    background mask, when LM restarts from other grid basins and the noise floor.
    noise_floor: magnitude data only: fit the Rician expectation of the magnitude
    (``E|S + n|`` with SD ``noise_sd``) instead of ``|S|``, which removes the noise-floor
    bias of low samples (T1 of WM-like tissue several % off at SNR 30-60 without it).
    No effect on real (phase-corrected) data.

    Returns :class:`QuantMaps`: float32 ``[z, y, x]`` maps (0 outside the mask), ``pd_pu`` a
    copy of ``m0`` until :mod:`processing.pd` converts it, ``noise_sd`` the estimated noise
    SD per sample.
    """
    noise_sd, mask = _check_inputs(acq, mask, noise_sd)
    setup, grid = _setup(acq, profile, noise_sd, noise_floor)
    idx = np.flatnonzero(mask.ravel()).astype(np.int64)
    n = idx.size
    # the kernels read sample rows through an index: the fitted voxels' rows, in order
    samples, rows = acq.masked_samples(mask), np.arange(n, dtype=np.int64)
    out = FitOutput(np.zeros((n, 4)), np.zeros(n), np.zeros(n, dtype=np.bool_))
    old_threads = nb.get_num_threads()
    if n_threads is not None:
        if n_threads < 1:
            raise ValueError(f"n_threads: must be >= 1, got {n_threads}")
        nb.set_num_threads(min(int(n_threads), nb.config.NUMBA_NUM_THREADS))
    fix_b1 = False
    try:
        if n:
            _run_pass(_FIRST_PASS, samples, rows, setup, grid, out)
        if b1_smoothing and n:
            out.par[:, 3] = _smoothed_b1(
                out, idx, setup, acq.shape, acq.voxel_size_mm, b1_smoothing_fwhm_mm
            )
            _run_pass(_REFIT_PASS, samples, rows, setup, grid, out)
            # Magnitude data with the noise floor: correct the smoothed B1 by pooled
            # Gauss-Newton steps on the neighbourhood's cost (_pooled_b1), refitting after each.
            for _ in range(_POOLED_B1_STEPS if setup.floor_sd > 0.0 else 0):
                out.par[:, 3] = _pooled_b1(
                    samples,
                    rows,
                    out,
                    idx,
                    setup,
                    grid,
                    acq.shape,
                    acq.voxel_size_mm,
                    _POOL_FWHM_FACTOR * b1_smoothing_fwhm_mm,
                )
                _run_pass(_REFIT_PASS, samples, rows, setup, grid, out)
            fix_b1 = True
    finally:
        nb.set_num_threads(old_threads)
    return _to_maps(out, idx, setup, mask, fix_b1)


def _run_pass(
    which: int,
    samples: np.ndarray,
    idx: np.ndarray,
    setup: FitSetup,
    grid: GridTable,
    out: FitOutput,
    grad: np.ndarray = _NO_VALUES,
    curv: np.ndarray = _NO_VALUES,
) -> None:
    """Pass ``which`` over the voxels ``idx`` (in place); serial below _SERIAL_BELOW."""
    n = idx.size
    if n < _SERIAL_BELOW:
        _pass_chunk(which, samples, idx, 0, n, setup, grid, out, grad, curv)
    else:
        _pass_all(which, samples, idx, setup, grid, out, grad, curv, _n_chunks(n))


def _inside(par: np.ndarray, lo: np.ndarray, hi: np.ndarray, check_b1: bool) -> np.ndarray:
    """True where no parameter sits on a bound (relative tolerance 1e-6) and M0 > 0."""
    tol = 1e-6
    ins = par[:, 0] > 0
    for k in (1, 2) + ((3,) if check_b1 else ()):
        ins &= (par[:, k] > lo[k] * (1 + tol)) & (par[:, k] < hi[k] * (1 - tol))
    return ins


def warmup() -> None:
    """Compile (or load from the cache) every kernel on a tiny acquisition: real and
    magnitude data, both passes, the slice-profile path, and both the serial (small input)
    and the parallel (large input) drivers, so the first real series is as fast as later ones.
    """
    global _SERIAL_BELOW
    from processing.signal import gaussian_slice_profile, mdme_signal

    td = np.array([150.0, 580.0, 1900.0, 3850.0])
    te = np.array([20.0, 100.0])
    t1 = np.full((1, 4, 4), 800.0)
    t1[0, 0, 0] = 600.0
    sig = mdme_signal(60.0, t1, 80.0, 1.0, td, te, 4000.0)  # [z, y, x, k]
    sig = sig.reshape(1, 4, 4, 4, 2).transpose(0, 3, 4, 1, 2).astype(np.float32)
    serial_below = _SERIAL_BELOW
    try:
        for magnitude in (False, True):
            acq = Acquisition(
                signal=np.ascontiguousarray(np.abs(sig) if magnitude else sig),
                delays_ms=td,
                echo_times_ms=te,
                tr_ms=4000.0,
                saturation_deg=120.0,
                excitation_deg=90.0,
                voxel_size_mm=(4.0, 1.0, 1.0),
                affine=np.diag([1.0, 1.0, 4.0, 1.0]),
                is_magnitude=magnitude,
                delay_source="warmup",
            )
            mask = np.ones(acq.shape, bool)
            for below in (0, 1 << 62):  # parallel driver, then serial driver
                _SERIAL_BELOW = below
                fit_mdme(acq, mask, b1_smoothing=True)
                fit_mdme(acq, mask, profile=gaussian_slice_profile(3))
    finally:
        _SERIAL_BELOW = serial_below
