"""Per-voxel 3D-QALAS fit: ``fit_qalas(acq) -> QuantMaps`` (model: :mod:`processing.qalas`).

Fitted per masked voxel: ``(M0, R1, R2, B1)`` from the 5 images; same contract as
:func:`processing.fit.fit_mdme` (float32 ``[z, y, x]`` maps, 0 outside the mask, ``pd_pu`` a
copy of ``m0`` until :mod:`processing.pd` converts it).

Recipe per voxel (numba, ``parallel=True`` over voxel chunks, no allocation per voxel):

1. Variable projection on a coarse log-R1 x B1 grid. For fixed (R1, B1) the steady-state
   samples are *linear* in ``u = M0/(1 - e2 A')`` and ``v = e2 u`` (``e2 = exp(-R2
   TE_prep)``, ``A'`` the cycle's post-prep map; see processing.qalas), so the best
   (M0, R2) is a 2x2 least-squares solve per grid point, with ``e2`` constrained to the R2
   bounds. Magnitude data: each grid point tries the sign patterns the model can take there
   (a sample's sign is monotone in e2, so the patterns at the two e2 bounds are all).
2. Projected Levenberg-Marquardt on ``(M0, R1, R2, B1)`` with the analytic Jacobian
   (Marquardt scaling, a parameter on a bound with the gradient pointing out is frozen).
   Magnitude data are fitted as signed data with the grid candidate's sign pattern (smooth
   model, no kink at zero); if the converged model has another pattern LM reruns with it and
   the lower true cost ``||y - |model| ||^2`` wins.
3. B1: the five samples barely determine B1 per voxel (smallest normalized singular value
   of the Jacobian 0.001-0.007, B1 CRLB ~3 at 1 % noise), so B1 is never a free per-voxel
   parameter: it is fixed to a measured B1 map (``b1_map``), else to 1 (nominal), or
   (experimental, ``b1_field="estimate"``) to a smooth polynomial field fitted by adjusted
   profile likelihood over the whole volume (:func:`estimate_b1_field`; exact on noise-free
   data, not usable at clinical SNR: processing/QALAS.md).

With B1 fixed (every :func:`fit_qalas` call) the fast path replaces 1-2: the samples are
linear in (u, v) and nonlinear in R1 alone (:func:`processing.qalas.basis_fixed_b1`, each
readout train one closed-form affine map, 10 exponentials per evaluation), so the fit is a
1-D variable-projection problem in log R1: a 48-row coarse table scan (nearest B1 column,
0.01 apart; magnitude: the sign patterns at the two e2 bounds) and a parabola give the
start, then Gauss-Newton in log R1 (Kaufman's step, backtracking; secant steps when a large
residual slows it) with the exact model to a step < 1e-6, and the last step applied
(quadratic convergence: noise-free round trip ~1e-12). About 1 us per voxel and core.

Bounds: R1 0.05-10 /s, R2 0.3-100 /s, B1 0.5-1.5, M0 >= 0. ``failed`` marks voxels where LM
did not converge, a parameter ended on a bound, or a value is not finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba as nb
import numpy as np

from processing.acquisition import Acquisition
from processing.qalas import N_SAMPLES, QalasProtocol, basis_fixed_b1, cycle_maps, model_eval
from processing.results import QuantMaps

__all__ = ["QalasGrid", "crlb", "fit_qalas", "fit_qalas_samples", "make_qalas_grid", "warmup"]

R1_BOUNDS_PER_S: tuple[float, float] = (0.05, 10.0)
R2_BOUNDS_PER_S: tuple[float, float] = (0.3, 100.0)
B1_BOUNDS: tuple[float, float] = (0.5, 1.5)

_N_GRID_R1 = 24
_N_GRID_B1 = 7
_MAX_ITER = 80
_STEP_TOL = 1e-7
_SERIAL_BELOW = 2048


@dataclass(frozen=True)
class QalasGrid:
    """Voxel-independent (R1, B1) table for one protocol.

    r1_per_s, b1: ``[ng]``. basis: ``[ng, 2, 2, 5]``: per grid point and sign candidate,
    the two linear basis vectors (u, v) with the candidate's sign pattern folded in (real
    data: both candidates unsigned). gram: ``[ng, 3]`` (uu, uv, vv), sign-independent.
    a_post: ``[ng]`` A' (M0 = u - A' v). n_cand: ``[ng]`` 1 or 2 candidates. signs:
    ``[ng, 2, 5]`` the candidates' sign patterns (+1 everywhere for real data).
    """

    r1_per_s: np.ndarray
    b1: np.ndarray
    basis: np.ndarray
    gram: np.ndarray
    a_post: np.ndarray
    n_cand: np.ndarray
    signs: np.ndarray


def make_qalas_grid(
    protocol: QalasProtocol, *, magnitude: bool, n_r1: int = _N_GRID_R1, n_b1: int = _N_GRID_B1
) -> QalasGrid:
    """Build the (R1, B1) search table (log-spaced R1, linear B1, inside the bounds)."""
    r1 = np.geomspace(R1_BOUNDS_PER_S[0] * 1.05, R1_BOUNDS_PER_S[1] / 1.05, n_r1)
    b1 = np.linspace(B1_BOUNDS[0] + 0.05, B1_BOUNDS[1] - 0.05, n_b1)
    rr, bb = (np.ascontiguousarray(a.ravel()) for a in np.meshgrid(r1, b1, indexing="ij"))
    ng = rr.size
    basis = np.empty((ng, 2, 2, N_SAMPLES))
    gram = np.empty((ng, 3))
    a_post = np.empty(ng)
    n_cand = np.ones(ng, np.int64)
    signs_out = np.ones((ng, 2, N_SAMPLES))
    st = np.empty(6)
    cen = np.empty((N_SAMPLES, 6))
    args = protocol.kernel_args()
    alpha = args[6]
    e2_bounds = np.exp(-np.array(R2_BOUNDS_PER_S) * 1e-3 * protocol.t2prep_ms)
    for g in range(ng):
        cycle_maps(rr[g] * 1e-3, bb[g], *args, st, cen)
        f = math.sin(bb[g] * alpha) / math.sin(alpha)
        gu = f * cen[:, 3]
        gv = f * (cen[:, 0] * st[3] - cen[:, 3] * st[0])
        gram[g] = (gu @ gu, gu @ gv, gv @ gv)
        a_post[g] = st[0]
        if not magnitude:
            basis[g, :, 0] = gu
            basis[g, :, 1] = gv
            continue
        signs = [np.where(gu + e * gv < 0, -1.0, 1.0) for e in e2_bounds]
        if np.array_equal(signs[0], signs[1]):
            signs = signs[:1]
        n_cand[g] = len(signs)
        for c in range(2):
            sg = signs[min(c, len(signs) - 1)]
            basis[g, c, 0] = sg * gu
            basis[g, c, 1] = sg * gv
            signs_out[g, c] = sg
    return QalasGrid(rr, bb, basis, gram, a_post, n_cand, signs_out)


# --------------------------------------------------------------------------------------
# numba kernels
# --------------------------------------------------------------------------------------


@nb.njit(cache=True, error_model="numpy")
def _eval(p, y, sg, magnitude, pk, st, cen, s, jac, h):
    """Cost and normal equations at p = (M0, R1 [1/s], R2 [1/s], B1) for data y with the
    sign pattern sg folded into the model (model_i -> sg_i * model_i).

    h[0] = sum r^2, h[1:11] = upper triangle of J^T J, h[11:15] = J^T r (r = y - model).
    With ``magnitude`` the true |model| is used instead of the sign pattern.
    """
    starts, t_inv, tr, te, n, esp, alpha, kc, eta = pk
    model_eval(
        p[0], p[1] * 1e-3, p[2] * 1e-3, p[3], starts, t_inv, tr, te, n, esp, alpha, kc, eta,
        st, cen, s, jac,
    )  # fmt: skip
    for q in range(15):
        h[q] = 0.0
    for i in range(N_SAMPLES):
        sig = sg[i]
        if magnitude:
            sig = -1.0 if s[i] < 0.0 else 1.0
        m = sig * s[i]
        j0 = sig * jac[i, 0]
        j1 = sig * jac[i, 1] * 1e-3
        j2 = sig * jac[i, 2] * 1e-3
        j3 = sig * jac[i, 3]
        r = y[i] - m
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


@nb.njit(cache=True, error_model="numpy")
def _solve_damped(h, lam, fix_b1, p, lo, hi, a, d):
    """(JtJ + lam diag(JtJ)) d = Jtr over the free parameters (active-set projection)."""
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


@nb.njit(cache=True, error_model="numpy")
def _lm(p, y, sg, fix_b1, lo, hi, pk, st, cen, s, jac, h, ht, a, d, q):
    """Projected LM from p (in place) on signed data (pattern sg). Returns (cost, converged)."""
    _eval(p, y, sg, False, pk, st, cen, s, jac, h)
    cost = h[0]
    if not math.isfinite(cost):
        return cost, False
    lam = 1e-3
    for _ in range(_MAX_ITER):
        if not _solve_damped(h, lam, fix_b1, p, lo, hi, a, d):
            return cost, False
        step = 0.0
        for k in range(4):
            v = p[k] + d[k]
            v = lo[k] if v < lo[k] else (hi[k] if v > hi[k] else v)
            q[k] = v
            rel = abs(v - p[k]) / (abs(p[k]) + 1e-30)
            if rel > step:
                step = rel
        if step < _STEP_TOL:
            return cost, True
        _eval(q, y, sg, False, pk, st, cen, s, jac, ht)
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
                return cost, True
    return cost, False


@nb.njit(cache=True, error_model="numpy")
def _fit_magnitude(p, y, sg, fix_b1, lo, hi, pk, st, cen, s, jac, h, ht, a, d, q, pbest):
    """LM with pattern sg, then (magnitude) with the converged model's own pattern if it
    differs; p <- the better. Returns (true cost, converged)."""
    ok = _lm(p, y, sg, fix_b1, lo, hi, pk, st, cen, s, jac, h, ht, a, d, q)[1]
    _eval(p, y, sg, True, pk, st, cen, s, jac, h)
    cost = h[0]
    differs = False
    for i in range(N_SAMPLES):
        si = -1.0 if s[i] < 0.0 else 1.0
        if si != sg[i]:
            differs = True
        sg[i] = si
    if not differs:
        return cost, ok
    for k in range(4):
        pbest[k] = p[k]
    ok2 = _lm(p, y, sg, fix_b1, lo, hi, pk, st, cen, s, jac, h, ht, a, d, q)[1]
    _eval(p, y, sg, True, pk, st, cen, s, jac, h)
    if h[0] <= cost:
        return h[0], ok2
    for k in range(4):
        p[k] = pbest[k]
    return cost, ok


@nb.njit(cache=True, error_model="numpy")
def _grid_start(y, gbasis, ggram, ga, gn, gsigns, gr1, gb1, e2lo, e2hi, te, p, sg):
    """Best grid point by variable projection; fills p (M0, R1, R2, B1) and sign pattern sg."""
    yy = 0.0
    for i in range(N_SAMPLES):
        yy += y[i] * y[i]
    best = np.inf
    bg = 0
    bc = 0
    bu = 0.0
    bv = 0.0
    for g in range(gr1.shape[0]):
        guu = ggram[g, 0]
        guv = ggram[g, 1]
        gvv = ggram[g, 2]
        det = guu * gvv - guv * guv
        for c in range(gn[g]):
            bu_ = gbasis[g, c, 0]
            bv_ = gbasis[g, c, 1]
            yu = 0.0
            yv = 0.0
            for i in range(N_SAMPLES):
                yu += bu_[i] * y[i]
                yv += bv_[i] * y[i]
            u = (gvv * yu - guv * yv) / det
            v = (guu * yv - guv * yu) / det
            if u > 0.0 and e2lo * u <= v <= e2hi * u:
                cost = yy - (u * yu + v * yv)
            else:
                # Best point on the boundary rays v = e2 u (e2 at a bound).
                cost = np.inf
                for e2 in (e2lo, e2hi):
                    gg = guu + 2.0 * e2 * guv + e2 * e2 * gvv
                    gy = yu + e2 * yv
                    if gy > 0.0:
                        cst = yy - gy * gy / gg
                        if cst < cost:
                            cost = cst
                            u = gy / gg
                            v = e2 * u
                if cost == np.inf:
                    cost = yy
                    u = 0.0
                    v = 0.0
            if cost < best:
                best = cost
                bg = g
                bc = c
                bu = u
                bv = v
    e2 = bv / bu if bu > 0.0 else e2hi
    e2 = min(max(e2, e2lo), e2hi)
    p[0] = max(bu - ga[bg] * bv, 1e-12)
    p[1] = gr1[bg]
    p[2] = -math.log(e2) / te * 1e3
    p[3] = gb1[bg]
    for i in range(N_SAMPLES):
        sg[i] = gsigns[bg, bc, i]
    return bg, bc


@nb.njit(cache=True)
def _lm_work():
    """Scratch arrays of one chunk's LM fits (allocated per chunk, not per voxel): samples
    y, signs sg, cycle state st, cen, model s, Jacobian jac, normal equations h, ht, a, d,
    trial q, parameters p, pbest."""
    return (
        np.empty(N_SAMPLES),
        np.empty(N_SAMPLES),
        np.empty(6),
        np.empty((N_SAMPLES, 6)),
        np.empty(N_SAMPLES),
        np.empty((N_SAMPLES, 4)),
        np.empty(15),
        np.empty(15),
        np.empty((4, 5)),
        np.empty(4),
        np.empty(4),
        np.empty(4),
        np.empty(4),
    )


@nb.njit(cache=True, error_model="numpy")
def _fit_chunk(
    samples, idx, start, stop, pk, gbasis, ggram, ga, gn, gsigns, gr1, gb1, magnitude,
    b1_fixed, lo, hi, out_p, out_rms, out_ok,
):  # fmt: skip
    te = pk[3]
    e2lo = math.exp(-hi[2] * 1e-3 * te)
    e2hi = math.exp(-lo[2] * 1e-3 * te)
    y, sg, st, cen, s, jac, h, ht, a, d, q, p, pbest = _lm_work()
    p0 = np.empty(4)
    palt = np.empty(4)
    sg2 = np.empty(N_SAMPLES)
    fix = b1_fixed.shape[0] > 0
    for n in range(start, stop):
        v = idx[n]
        for i in range(N_SAMPLES):
            y[i] = samples[v, i]
        bg, bc = _grid_start(y, gbasis, ggram, ga, gn, gsigns, gr1, gb1, e2lo, e2hi, te, p, sg)
        if fix:
            p[3] = b1_fixed[n]
        if magnitude:
            for k in range(4):
                p0[k] = p[k]
            cost, ok = _fit_magnitude(
                p, y, sg, fix, lo, hi, pk, st, cen, s, jac, h, ht, a, d, q, pbest
            )
            if gn[bg] == 2:
                # The sign of a sample is ambiguous near this grid point: try the other
                # pattern too (noise-free data otherwise end in a false minimum ~1 % off).
                for i in range(N_SAMPLES):
                    sg2[i] = gsigns[bg, 1 - bc, i]
                for k in range(4):
                    palt[k] = p0[k]
                cost2, ok2 = _fit_magnitude(
                    palt, y, sg2, fix, lo, hi, pk, st, cen, s, jac, h, ht, a, d, q, pbest
                )
                if cost2 < cost:
                    cost = cost2
                    ok = ok2
                    for k in range(4):
                        p[k] = palt[k]
        else:
            cost, ok = _lm(p, y, sg, fix, lo, hi, pk, st, cen, s, jac, h, ht, a, d, q)
        for k in range(4):
            out_p[n, k] = p[k]
        out_rms[n] = math.sqrt(max(cost, 0.0) / N_SAMPLES)
        out_ok[n] = ok


@nb.njit(cache=True, error_model="numpy")
def _refit_chunk(samples, idx, start, stop, pk, magnitude, lo, hi, out_p, out_rms, out_ok):
    """LM from out_p with B1 fixed (the second pass)."""
    y, sg, st, cen, s, jac, h, ht, a, d, q, p, pbest = _lm_work()
    for n in range(start, stop):
        v = idx[n]
        for i in range(N_SAMPLES):
            y[i] = samples[v, i]
        for k in range(4):
            p[k] = out_p[n, k]
        if not (math.isfinite(p[0]) and p[0] > 0.0):
            continue
        _eval(p, y, sg, True, pk, st, cen, s, jac, h)
        for i in range(N_SAMPLES):
            sg[i] = -1.0 if (magnitude and s[i] < 0.0) else 1.0
        if magnitude:
            cost, ok = _fit_magnitude(
                p, y, sg, True, lo, hi, pk, st, cen, s, jac, h, ht, a, d, q, pbest
            )
        else:
            cost, ok = _lm(p, y, sg, True, lo, hi, pk, st, cen, s, jac, h, ht, a, d, q)
        for k in range(4):
            out_p[n, k] = p[k]
        out_rms[n] = math.sqrt(max(cost, 0.0) / N_SAMPLES)
        out_ok[n] = ok


@nb.njit(cache=True, error_model="numpy")
def _profile_chunk(
    samples, idx, start, stop, pk, gbasis, ggram, ga, gn, gsigns, gr1, gb1, magnitude,
    b1_values, lo, hi, out_cost, out_logdet,
):  # fmt: skip
    """Profile cost: out_cost[n, k] = min over (M0, R1, R2) of the cost with B1 = b1_values[k]
    (warm-started along k from the grid start); out_logdet[n, k] = log det of the (M0, R1,
    R2) block of J^T J there (for the Cox-Reid adjustment)."""
    te = pk[3]
    e2lo = math.exp(-hi[2] * 1e-3 * te)
    e2hi = math.exp(-lo[2] * 1e-3 * te)
    y, sg, st, cen, s, jac, h, ht, a, d, q, p, pbest = _lm_work()
    p0 = np.empty(4)
    kmid = b1_values.shape[0] // 2
    for n in range(start, stop):
        v = idx[n]
        for i in range(N_SAMPLES):
            y[i] = samples[v, i]
        _grid_start(y, gbasis, ggram, ga, gn, gsigns, gr1, gb1, e2lo, e2hi, te, p, sg)
        for k in range(4):
            p0[k] = p[k]
        # Walk from the middle B1 outwards in both directions, warm-starting each LM.
        for direction in (1, -1):
            for k in range(4):
                p[k] = p0[k]
            k0 = kmid if direction == 1 else kmid - 1
            k1 = b1_values.shape[0] if direction == 1 else -1
            for kb in range(k0, k1, direction):
                p[3] = b1_values[kb]
                if not (math.isfinite(p[0]) and p[0] > 0.0):
                    for k in range(4):
                        p[k] = p0[k]
                    p[3] = b1_values[kb]
                if magnitude:
                    cost, _ = _fit_magnitude(
                        p, y, sg, True, lo, hi, pk, st, cen, s, jac, h, ht, a, d, q, pbest
                    )
                else:
                    cost, _ = _lm(p, y, sg, True, lo, hi, pk, st, cen, s, jac, h, ht, a, d, q)
                out_cost[n, kb] = cost
                # det of the upper-left 3x3 of J^T J (h[1:11] upper triangle, row-major)
                a00, a01, a02, a11, a12, a22 = h[1], h[2], h[3], h[5], h[6], h[8]
                det = (
                    a00 * (a11 * a22 - a12 * a12)
                    - a01 * (a01 * a22 - a12 * a02)
                    + a02 * (a01 * a12 - a11 * a02)
                )
                out_logdet[n, kb] = math.log(det) if det > 0.0 else np.nan


@nb.njit(cache=True, error_model="numpy", parallel=True)
def _profile_all(
    samples, idx, pk, gbasis, ggram, ga, gn, gsigns, gr1, gb1, magnitude, b1_values, lo, hi,
    out_cost, out_logdet, n_chunks,
):  # fmt: skip
    n = idx.shape[0]
    for c in nb.prange(n_chunks):
        a = c * n // n_chunks
        b = (c + 1) * n // n_chunks
        _profile_chunk(
            samples, idx[a:b], 0, b - a, pk, gbasis, ggram, ga, gn, gsigns, gr1, gb1,
            magnitude, b1_values, lo, hi, out_cost[a:b], out_logdet[a:b],
        )  # fmt: skip


@nb.njit(cache=True, error_model="numpy", parallel=True)
def _fit_all(
    samples, idx, pk, gbasis, ggram, ga, gn, gsigns, gr1, gb1, magnitude, b1_fixed, lo, hi,
    out_p, out_rms, out_ok, n_chunks,
):  # fmt: skip
    n = idx.shape[0]
    for c in nb.prange(n_chunks):
        a = c * n // n_chunks
        b = (c + 1) * n // n_chunks
        bf = b1_fixed[a:b] if b1_fixed.shape[0] > 0 else b1_fixed
        _fit_chunk(
            samples, idx[a:b], 0, b - a, pk, gbasis, ggram, ga, gn, gsigns, gr1, gb1,
            magnitude, bf, lo, hi, out_p[a:b], out_rms[a:b], out_ok[a:b],
        )  # fmt: skip


@nb.njit(cache=True, error_model="numpy", parallel=True)
def _refit_all(samples, idx, pk, magnitude, lo, hi, out_p, out_rms, out_ok, n_chunks):
    n = idx.shape[0]
    for c in nb.prange(n_chunks):
        a = c * n // n_chunks
        b = (c + 1) * n // n_chunks
        _refit_chunk(
            samples, idx[a:b], 0, b - a, pk, magnitude, lo, hi, out_p[a:b], out_rms[a:b],
            out_ok[a:b],
        )  # fmt: skip


# --------------------------------------------------------------------------------------
# Fast path with B1 known: variable projection over R1 alone. For a known B1 the samples
# are linear in (u, v) (processing.qalas.basis_fixed_b1), so the fit is a 1-D problem in
# log R1: a coarse table scan locates the basin, then Gauss-Newton on the projected
# problem (Kaufman) with the exact closed-form model converges in a few steps.
# --------------------------------------------------------------------------------------

_COARSE_N_R1 = 48  # log R1 rows over the bounds (12 % apart)
_COARSE_B1 = (0.5, 1.5, 101)  # nearest column (0.01 apart): the scan only finds the basin
_VP_STEP_TOL = 1e-6  # converged when a step in log R1 is below this
_VP_MAX_ITER = 40
_VP_MAX_STEP = 0.5  # largest step in log R1 (a factor 1.65 in T1)


@dataclass(frozen=True)
class QalasTable:
    """Coarse scan table of one protocol: ``rows [n_b1, n_r1, 16]`` = the basis vectors
    (gu[5], gv[5]), the inverse Gram matrix (uu, uv, vv) and the Gram matrix at log R1 ``log_r1 [n_r1]`` (R1 in
    1/s) and B1 ``b1_lo + j * b1_step``; ``negmask [n_b1, n_r1, 2]``: bit i set where sample
    i is negative at the upper / lower e2 bound (the sign patterns of magnitude data)."""

    log_r1: np.ndarray
    b1_lo: float
    b1_step: float
    rows: np.ndarray
    negmask: np.ndarray


_TABLES: dict[tuple, QalasTable] = {}


def qalas_table(protocol: QalasProtocol) -> QalasTable:
    """The fast path's scan table for ``protocol`` (cached per protocol timing)."""
    desc = protocol.describe()
    key = tuple(
        tuple(desc[k]) if isinstance(desc[k], list) else desc[k]
        for k in sorted(desc)
        if k != "source"
    )
    tab = _TABLES.get(key)
    if tab is not None:
        return tab
    lr = np.linspace(
        math.log(R1_BOUNDS_PER_S[0] * 1.0001), math.log(R1_BOUNDS_PER_S[1] / 1.0001), _COARSE_N_R1
    )
    b1 = np.linspace(*_COARSE_B1)
    rows = np.empty((b1.size, lr.size, 16))
    negmask = np.zeros((b1.size, lr.size, 2), np.int64)
    e2b = np.exp(-np.array(R2_BOUNDS_PER_S)[::-1] * 1e-3 * protocol.t2prep_ms)
    _table_kernel(np.exp(lr) * 1e-3, b1, e2b, *protocol.kernel_args(), rows, negmask)
    tab = QalasTable(lr, float(b1[0]), float(b1[1] - b1[0]), rows, negmask)
    _TABLES[key] = tab
    return tab


@nb.njit(cache=True)
def _table_kernel(r1, b1, e2b, starts, t_inv, tr, te, n, esp, alpha, kc, eta, rows, neg):
    gu = np.empty(N_SAMPLES)
    gv = np.empty(N_SAMPLES)
    dgu = np.empty(N_SAMPLES)
    dgv = np.empty(N_SAMPLES)
    for j in range(b1.shape[0]):
        log_c = math.log(math.cos(b1[j] * alpha))
        f = math.sin(b1[j] * alpha) / math.sin(alpha)
        for i in range(r1.shape[0]):
            basis_fixed_b1(
                r1[i], log_c, f, starts, t_inv, tr, te, n, esp, kc, eta, gu, gv, dgu, dgv
            )
            row = rows[j, i]
            guu = 0.0
            guv = 0.0
            gvv = 0.0
            for k in range(N_SAMPLES):
                row[k] = gu[k]
                row[5 + k] = gv[k]
                guu += gu[k] * gu[k]
                guv += gu[k] * gv[k]
                gvv += gv[k] * gv[k]
            det = guu * gvv - guv * guv
            row[10] = gvv / det  # the inverse Gram matrix (interior solution) ...
            row[11] = -guv / det
            row[12] = guu / det
            row[13] = guu  # ... and the Gram matrix (solutions on the e2 bounds)
            row[14] = guv
            row[15] = gvv
            for k in range(N_SAMPLES):
                for c in range(2):
                    if gu[k] + e2b[c] * gv[k] < 0.0:
                        neg[j, i, c] |= 1 << k


@nb.njit(cache=True, inline="always")
def _project(guu, guv, gvv, yu, yv, yy, e2lo, e2hi):
    """min over u >= 0, e2lo u <= v <= e2hi u of ||y - u gu - v gv||^2 from the Gram
    matrix and the projections (yu, yv). Returns (cost, u, v, e2 bound or 0 if inside)."""
    det = guu * gvv - guv * guv
    u = (gvv * yu - guv * yv) / det
    v = (guu * yv - guv * yu) / det
    if u > 0.0 and e2lo * u <= v <= e2hi * u:
        return yy - (u * yu + v * yv), u, v, 0.0
    cost = yy
    u = 0.0
    v = 0.0
    eb = 0.0
    for t in range(2):
        e2 = e2lo if t == 0 else e2hi
        gg = guu + 2.0 * e2 * guv + e2 * e2 * gvv
        gy = yu + e2 * yv
        if gy > 0.0 and yy - gy * gy / gg < cost:
            cost = yy - gy * gy / gg
            u = gy / gg
            v = e2 * u
            eb = e2
    return cost, u, v, eb


@nb.njit(cache=True, inline="always")
def _scan_cost(rows, j, i, m, y, yy, e2lo, e2hi):
    """Projected cost at table row (j, i) with sign pattern m (bit k: sample k negative)."""
    yu = 0.0
    yv = 0.0
    for k in range(N_SAMPLES):
        yk = -y[k] if (m >> k) & 1 else y[k]
        yu += rows[j, i, k] * yk
        yv += rows[j, i, 5 + k] * yk
    u = rows[j, i, 10] * yu + rows[j, i, 11] * yv
    v = rows[j, i, 11] * yu + rows[j, i, 12] * yv
    if u > 0.0 and e2lo * u <= v <= e2hi * u:
        return yy - (u * yu + v * yv)
    cost = yy
    for t in range(2):
        e2 = e2lo if t == 0 else e2hi
        gg = rows[j, i, 13] + 2.0 * e2 * rows[j, i, 14] + e2 * e2 * rows[j, i, 15]
        gy = yu + e2 * yv
        if gy > 0.0:
            cost = min(cost, yy - gy * gy / gg)
    return cost


@nb.njit(cache=True, error_model="numpy")
def _basis_sums(theta, ys, log_c, f, pk, gu, gv, dgu, dgv):
    """The basis at log R1 = theta (R1 in 1/s) into gu, gv, dgu, dgv, and its Gram and data
    sums. Returns (R1 in 1/ms, A', guu, guv, gvv, yu, yv) with ``yu = gu . ys``."""
    starts, t_inv, tr, te, n, esp, _alpha, kc, eta = pk
    r1 = math.exp(theta) * 1e-3
    ap, _ = basis_fixed_b1(r1, log_c, f, starts, t_inv, tr, te, n, esp, kc, eta, gu, gv, dgu, dgv)
    guu = 0.0
    guv = 0.0
    gvv = 0.0
    yu = 0.0
    yv = 0.0
    for k in range(N_SAMPLES):
        guu += gu[k] * gu[k]
        guv += gu[k] * gv[k]
        gvv += gv[k] * gv[k]
        yu += gu[k] * ys[k]
        yv += gv[k] * ys[k]
    return r1, ap, guu, guv, gvv, yu, yv


@nb.njit(cache=True, error_model="numpy")
def _vp_eval(theta, ys, yy, log_c, f, pk, e2lo, e2hi, gu, gv, dgu, dgv):
    """Projected cost at log R1 = theta (R1 in 1/s) for (sign-folded) data ys, and the
    Gauss-Newton step in theta (Kaufman's approximation). Returns (cost, step, u, v, A',
    rd) with ``-2 rd`` the cost's derivative in theta."""
    r1, ap, guu, guv, gvv, yu, yv = _basis_sums(theta, ys, log_c, f, pk, gu, gv, dgu, dgv)
    cost, u, v, eb = _project(guu, guv, gvv, yu, yv, yy, e2lo, e2hi)
    if not u > 0.0:
        return cost, 0.0, u, v, ap, 0.0
    # d = d(model)/d theta at fixed (u, v); the step is (r . d) / |d projected off G|^2.
    du = 0.0
    dv = 0.0
    yd = 0.0
    dd = 0.0
    for k in range(N_SAMPLES):
        d = r1 * (u * dgu[k] + v * dgv[k])
        du += gu[k] * d
        dv += gv[k] * d
        yd += ys[k] * d
        dd += d * d
    if eb == 0.0:
        det = guu * gvv - guv * guv
        rd = yd - (u * du + v * dv)
        pd2 = dd - (gvv * du * du - 2.0 * guv * du * dv + guu * dv * dv) / det
    else:
        gg = guu + 2.0 * eb * guv + eb * eb * gvv
        gd = du + eb * dv
        rd = yd - u * gd
        pd2 = dd - gd * gd / gg
    step = rd / pd2 if pd2 > 0.0 else 0.0
    return cost, step, u, v, ap, rd


@nb.njit(cache=True, error_model="numpy")
def _vp_fit(
    theta, y, mask, magnitude, yy, log_c, f, pk, e2lo, e2hi, tlo, thi, ys, gu, gv, dgu, dgv
):
    """Gauss-Newton on the projected problem from theta with sign pattern ``mask`` (bit i:
    sample i is negative), backtracking when the cost rises. Returns (theta, true cost
    ``||y - |model| ||^2`` for magnitude / ``||y - model||^2`` for real data folded by mask,
    u, v, A', converged, the model's own sign pattern)."""
    for k in range(N_SAMPLES):
        ys[k] = -y[k] if (mask >> k) & 1 else y[k]
    cost, step, u, v, ap, rd = _vp_eval(theta, ys, yy, log_c, f, pk, e2lo, e2hi, gu, gv, dgu, dgv)
    conv = False
    slack = 1e-13 * yy
    for _ in range(_VP_MAX_ITER):
        if not (u > 0.0 and math.isfinite(step) and math.isfinite(cost)):
            break
        step = min(max(step, -_VP_MAX_STEP), _VP_MAX_STEP)
        t_new = min(max(theta + step, tlo), thi)
        if abs(t_new - theta) < _VP_STEP_TOL:
            conv = True
            break
        accepted = False
        for _half in range(12):
            c2, s2, u2, v2, a2, rd2 = _vp_eval(
                t_new, ys, yy, log_c, f, pk, e2lo, e2hi, gu, gv, dgu, dgv
            )
            if c2 <= cost + slack and u2 > 0.0:
                accepted = True
                break
            t_new = theta + 0.5 * (t_new - theta)
        if not accepted:
            conv = abs(t_new - theta) < 1e-5  # a flat floor: at the minimum to rounding
            break
        moved = abs(t_new - theta)
        # Gauss-Newton drops the residual's curvature term: with a large residual (noise,
        # a poor model) it converges slowly. Then take the secant step on the gradient
        # (curvature from the last two gradients), which converges superlinearly anyway.
        slope = (rd - rd2) / (t_new - theta)
        if slope > 0.0 and abs(s2) > 0.25 * moved:
            s2 = rd2 / slope
        theta, cost, step, u, v, ap, rd = t_new, c2, s2, u2, v2, a2, rd2
        if moved < _VP_STEP_TOL:
            conv = True
            break
    if conv and u > 0.0 and math.isfinite(step):
        # Apply the last (sub-tolerance) step: Gauss-Newton converges about quadratically
        # here, so theta is then exact to ~step^2 at the cost of one basis evaluation.
        theta = min(max(theta + min(max(step, -_VP_MAX_STEP), _VP_MAX_STEP), tlo), thi)
    # (u, v), the true cost and the model's own signs at the final theta (the residual
    # summed explicitly: no cancellation; |model| for magnitude data).
    _, ap, guu, guv, gvv, yu, yv = _basis_sums(theta, ys, log_c, f, pk, gu, gv, dgu, dgv)
    u, v = _project(guu, guv, gvv, yu, yv, yy, e2lo, e2hi)[1:3]
    true_cost = 0.0
    own = 0
    for k in range(N_SAMPLES):
        m = u * gu[k] + v * gv[k]
        if m < 0.0:
            own |= 1 << k
        r = y[k] - abs(m) if magnitude else ys[k] - m
        true_cost += r * r
    return theta, true_cost, u, v, ap, conv, own


@nb.njit(cache=True, error_model="numpy")
def _fast_chunk(
    samples, idx, start, stop, pk, log_r1, b1_lo, b1_step, rows, neg, magnitude, b1_fixed,
    noise_var, lo, hi, out_p, out_rms, out_ok,
):  # fmt: skip
    te = pk[3]
    alpha = pk[6]
    e2lo = math.exp(-hi[2] * 1e-3 * te)
    e2hi = math.exp(-lo[2] * 1e-3 * te)
    tlo = math.log(lo[1])
    thi = math.log(hi[1])
    nr = log_r1.shape[0]
    nbt = rows.shape[0]
    h = log_r1[1] - log_r1[0]
    y = np.empty(N_SAMPLES)
    ys = np.empty(N_SAMPLES)
    gu = np.empty(N_SAMPLES)
    gv = np.empty(N_SAMPLES)
    dgu = np.empty(N_SAMPLES)
    dgv = np.empty(N_SAMPLES)
    costs = np.empty(nr)
    masks = np.empty(nr, np.int64)
    for n in range(start, stop):
        v = idx[n]
        yy = 0.0
        for i in range(N_SAMPLES):
            y[i] = samples[v, i]
            yy += y[i] * y[i]
        b1 = min(max(b1_fixed[n], lo[3]), hi[3])
        log_c = math.log(math.cos(b1 * alpha))
        f = math.sin(b1 * alpha) / math.sin(alpha)
        j = min(max(int((b1 - b1_lo) / b1_step + 0.5), 0), nbt - 1)
        ib = 0
        for i in range(nr):
            m = neg[j, i, 0] if magnitude else 0
            costs[i] = _scan_cost(rows, j, i, m, y, yy, e2lo, e2hi)
            masks[i] = m
            if magnitude and neg[j, i, 1] != m:
                c1 = _scan_cost(rows, j, i, neg[j, i, 1], y, yy, e2lo, e2hi)
                if c1 < costs[i]:
                    costs[i] = c1
                    masks[i] = neg[j, i, 1]
            if costs[i] < costs[ib]:
                ib = i
        # Parabola through the best row and its neighbours: the start of Gauss-Newton.
        ic = min(max(ib, 1), nr - 2)
        den = costs[ic - 1] - 2.0 * costs[ic] + costs[ic + 1]
        frac = 0.5 * (costs[ic - 1] - costs[ic + 1]) / den if den > 0.0 else float(ib - ic)
        frac = min(max(frac, -1.0), 1.0)
        theta0 = min(max(log_r1[ic] + frac * h, tlo), thi)
        mask = masks[ib]
        theta, cost, u, vv, ap, ok, own = _vp_fit(
            theta0, y, mask, magnitude, yy, log_c, f, pk, e2lo, e2hi, tlo, thi, ys, gu, gv,
            dgu, dgv,
        )  # fmt: skip
        if magnitude:
            tried = mask
            if own != mask:
                # The converged model has another sign pattern: refit with its own.
                r = _vp_fit(
                    theta, y, own, magnitude, yy, log_c, f, pk, e2lo, e2hi, tlo, thi, ys, gu,
                    gv, dgu, dgv,
                )  # fmt: skip
                tried = own
                if r[1] < cost:
                    theta, cost, u, vv, ap, ok, own = r
            if not (ok and cost <= max(4.0 * N_SAMPLES * noise_var, 1e-12 * yy)):
                # Near a zero crossing another pattern of the neighbouring rows may hold
                # the true minimum (the first one settled with a misfit beyond noise).
                for i in range(max(ic - 1, 0), min(ic + 2, nr)):
                    for c in range(2):
                        alt = neg[j, i, c]
                        if alt == mask or alt == tried:
                            continue
                        r = _vp_fit(
                            theta0, y, alt, magnitude, yy, log_c, f, pk, e2lo, e2hi, tlo, thi,
                            ys, gu, gv, dgu, dgv,
                        )  # fmt: skip
                        tried = alt
                        if r[1] < cost:
                            theta, cost, u, vv, ap, ok, own = r
        out_p[n, 0] = u - ap * vv
        out_p[n, 1] = math.exp(theta)
        out_p[n, 2] = -math.log(vv / u) / te * 1e3 if u > 0.0 and vv > 0.0 else np.nan
        out_p[n, 3] = b1
        out_rms[n] = math.sqrt(max(cost, 0.0) / N_SAMPLES)
        out_ok[n] = ok and u > 0.0


@nb.njit(cache=True, error_model="numpy", parallel=True)
def _fast_all(
    samples, idx, pk, log_r1, b1_lo, b1_step, rows, neg, magnitude, b1_fixed, noise_var, lo,
    hi, out_p, out_rms, out_ok, n_chunks,
):  # fmt: skip
    n = idx.shape[0]
    for c in nb.prange(n_chunks):
        a = c * n // n_chunks
        b = (c + 1) * n // n_chunks
        _fast_chunk(
            samples, idx[a:b], 0, b - a, pk, log_r1, b1_lo, b1_step, rows, neg, magnitude,
            b1_fixed[a:b], noise_var, lo, hi, out_p[a:b], out_rms[a:b], out_ok[a:b],
        )  # fmt: skip


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def _n_chunks(n: int) -> int:
    return int(max(1, min(n, nb.get_num_threads() * 16)))


def _bounds() -> tuple[np.ndarray, np.ndarray]:
    lo = np.array([0.0, R1_BOUNDS_PER_S[0], R2_BOUNDS_PER_S[0], B1_BOUNDS[0]])
    hi = np.array([np.inf, R1_BOUNDS_PER_S[1], R2_BOUNDS_PER_S[1], B1_BOUNDS[1]])
    return lo, hi


def _inside(par: np.ndarray, check_b1: bool) -> np.ndarray:
    """True where no parameter sits on a bound (relative tolerance 1e-6) and M0 > 0."""
    lo, hi = _bounds()
    tol = 1e-6
    ins = par[:, 0] > 0
    for k in (1, 2) + ((3,) if check_b1 else ()):
        ins &= (par[:, k] > lo[k] * (1 + tol)) & (par[:, k] < hi[k] * (1 - tol))
    return ins


def fit_qalas_samples(
    samples: np.ndarray,
    protocol: QalasProtocol,
    *,
    magnitude: bool = False,
    b1_fixed: np.ndarray | None = None,
    idx: np.ndarray | None = None,
    grid: QalasGrid | None = None,
    slow: bool = False,
    noise_sd: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit ``samples [n_vox, 5]`` (float32/64); returns ``(par [n, 4], rms [n], ok [n])``
    with ``par = (M0, R1 [1/s], R2 [1/s], B1)`` for the voxels ``idx`` (default: all).

    ``b1_fixed`` ``[len(idx)]``: fit with B1 fixed to these values: the fast path (variable
    projection over log R1: coarse table scan, then Gauss-Newton with the exact model)
    unless ``slow`` (grid + LM, the reference). ``noise_sd`` (per sample; None =
    noise-free) tells magnitude fits when a settled fit's misfit is suspicious enough to
    also try the other sign pattern near a zero crossing.
    """
    samples = np.ascontiguousarray(samples)
    if samples.ndim != 2 or samples.shape[1] != N_SAMPLES:
        raise ValueError(f"samples: expected [n_voxels, {N_SAMPLES}], got {samples.shape}")
    if idx is None:
        idx = np.arange(samples.shape[0], dtype=np.int64)
    idx = np.ascontiguousarray(idx, np.int64)
    n = idx.size
    bf = np.zeros(0) if b1_fixed is None else np.ascontiguousarray(b1_fixed, np.float64)
    if bf.size and bf.size != n:
        raise ValueError(f"b1_fixed: expected {n} values, got {bf.size}")
    lo, hi = _bounds()
    par = np.zeros((n, 4))
    rms = np.zeros(n)
    ok = np.zeros(n, np.bool_)
    if n == 0:
        return par, rms, ok
    pk = protocol.kernel_args()
    if bf.size and not slow:
        t = qalas_table(protocol)
        tb = (
            t.log_r1,
            t.b1_lo,
            t.b1_step,
            t.rows,
            t.negmask,
            bool(magnitude),
            bf,
            0.0 if noise_sd is None else float(noise_sd) ** 2,
        )
        if n < _SERIAL_BELOW:
            _fast_chunk(samples, idx, 0, n, pk, *tb, lo, hi, par, rms, ok)
        else:
            _fast_all(samples, idx, pk, *tb, lo, hi, par, rms, ok, _n_chunks(n))
        return par, rms, ok
    if grid is None:
        grid = make_qalas_grid(protocol, magnitude=magnitude)
    g = (grid.basis, grid.gram, grid.a_post, grid.n_cand, grid.signs, grid.r1_per_s, grid.b1)
    if n < _SERIAL_BELOW:
        _fit_chunk(samples, idx, 0, n, pk, *g, bool(magnitude), bf, lo, hi, par, rms, ok)
    else:
        _fit_all(samples, idx, pk, *g, bool(magnitude), bf, lo, hi, par, rms, ok, _n_chunks(n))
    return par, rms, ok


def _refit(samples, idx, protocol, magnitude, par, rms, ok) -> None:
    lo, hi = _bounds()
    pk = protocol.kernel_args()
    n = idx.size
    if n < _SERIAL_BELOW:
        _refit_chunk(samples, idx, 0, n, pk, bool(magnitude), lo, hi, par, rms, ok)
    else:
        _refit_all(samples, idx, pk, bool(magnitude), lo, hi, par, rms, ok, _n_chunks(n))


def _poly_basis(coords: np.ndarray, order: int) -> np.ndarray:
    """Monomials of total degree <= order of normalized coordinates ``[n, 3]`` -> ``[n, m]``."""
    cols = []
    for i in range(order + 1):
        for j in range(order + 1 - i):
            for k in range(order + 1 - i - j):
                cols.append(coords[:, 0] ** i * coords[:, 1] ** j * coords[:, 2] ** k)
    return np.stack(cols, axis=1)


def estimate_b1_field(
    samples: np.ndarray,
    mask: np.ndarray,
    protocol: QalasProtocol,
    *,
    magnitude: bool,
    noise_sd: float,
    order: int = 3,
    stride: int = 2,
    b1_values: np.ndarray | None = None,
    max_voxels: int = 200_000,
) -> tuple[np.ndarray, dict]:
    """Smooth B1 field ``[z, y, x]`` by profile likelihood over the whole volume.

    Why not per voxel: the QALAS samples barely determine B1 (the normalized Jacobian's
    smallest singular value is 0.001-0.007; the per-voxel CRLB of B1 is ~3 at a per-sample
    noise of 1 % of M0), but the field is smooth, so the information of many voxels adds up.

    For voxels on a ``stride`` sub-grid of ``mask`` (at most ``max_voxels``) the cost
    ``c_v(B1)`` minimized over (M0, T1, T2) is tabulated at ``b1_values`` (default 0.5-1.5,
    step 0.1) and interpolated with a cubic spline. The field is a polynomial of total degree
    ``order`` in normalized (z, y, x) whose coefficients minimize ``sum_v c_v(B1(x_v))``
    (Newton with the splines' derivatives and a backtracking line search). Voxels whose best
    fit is poor (RMS > 2 noise SD: partial volume, flow) do not vote. Returns the field
    (clipped to the B1 bounds) and diagnostics.
    """
    from scipy.interpolate import CubicSpline

    shape = mask.shape
    bk = np.linspace(0.5, 1.5, 11) if b1_values is None else np.asarray(b1_values, np.float64)
    sub = np.zeros(shape, bool)
    sub[::stride, ::stride, ::stride] = mask[::stride, ::stride, ::stride]
    vidx = np.flatnonzero(sub.ravel()).astype(np.int64)
    if vidx.size > max_voxels:
        vidx = vidx[np.linspace(0, vidx.size - 1, max_voxels).astype(np.int64)]
    info: dict = {"n_voxels": int(vidx.size), "order": order, "stride": stride}
    if vidx.size < 50:
        info["fallback"] = "too few voxels: B1 = 1"
        return np.ones(shape), info
    grid = make_qalas_grid(protocol, magnitude=magnitude)
    g = (grid.basis, grid.gram, grid.a_post, grid.n_cand, grid.signs, grid.r1_per_s, grid.b1)
    lo, hi = _bounds()
    cost = np.zeros((vidx.size, bk.size))
    logdet = np.zeros((vidx.size, bk.size))
    pk = protocol.kernel_args()
    samples = np.ascontiguousarray(samples)
    args = (samples, vidx, pk, *g, bool(magnitude), bk, lo, hi, cost, logdet)
    if vidx.size < _SERIAL_BELOW:
        _profile_chunk(samples, vidx, 0, vidx.size, *args[2:])
    else:
        _profile_all(*args, _n_chunks(vidx.size))
    cmin = cost.min(axis=1)
    ynorm2 = (samples[vidx].astype(np.float64) ** 2).sum(axis=1)
    noisy = noise_sd > 0
    floor = noise_sd**2 if noisy else 1e-10 * float(np.median(ynorm2))
    finite = np.isfinite(cost).all(axis=1) & np.isfinite(logdet).all(axis=1)
    good = finite & (cmin <= 4.0 * N_SAMPLES * floor)
    if good.sum() < 50:
        good = finite
    info["n_voting"] = int(good.sum())
    # -2 log of the Cox-Reid adjusted profile likelihood: the plain profile of a parameter
    # shared by many voxels, each with its own nuisance (M0, T1, T2), is biased however
    # many voxels vote (Neyman-Scott); adding log det of the nuisance information removes
    # most of it. Noise-free data: the adjustment is negligible and left out.
    dc = cost[good] / floor
    if noisy:
        dc = dc + logdet[good]
    dc = dc - dc.min(axis=1, keepdims=True)
    # Cap each voxel's cost increase (a few badly fitting voxels must not dominate).
    if noisy:
        dc = np.minimum(dc, 50.0)
    spline = CubicSpline(bk, dc, axis=1)
    zyx = np.stack(np.unravel_index(vidx[good], shape), axis=1).astype(np.float64)
    allm = np.stack(np.nonzero(mask), axis=1).astype(np.float64)
    centre = allm.mean(axis=0)
    half = np.maximum(np.abs(allm - centre).max(axis=0), 1.0)
    phi = _poly_basis((zyx - centre) / half, order)
    total = dc.sum(axis=0)
    theta = np.zeros(phi.shape[1])
    theta[0] = bk[int(np.argmin(total))]

    def objective(th: np.ndarray) -> float:
        b = np.clip(phi @ th, bk[0], bk[-1])
        return float(_spline_at(spline, b).sum())

    obj = objective(theta)
    it = 0
    for it in range(30):  # noqa: B007 (reported below)
        b = np.clip(phi @ theta, bk[0], bk[-1])
        g1 = _spline_at(spline, b, 1)
        g2 = np.maximum(_spline_at(spline, b, 2), 1e-3 * max(float(np.median(np.abs(g1))), 1e-9))
        hess = phi.T @ (phi * g2[:, None])
        grad = phi.T @ g1
        try:
            step = np.linalg.solve(hess + 1e-9 * np.trace(hess) * np.eye(len(theta)), grad)
        except np.linalg.LinAlgError:
            break
        t = 1.0
        while t > 1e-4:
            cand = theta - t * step
            oc = objective(cand)
            if oc <= obj:
                break
            t *= 0.5
        else:
            break
        change = float(np.abs(phi @ (cand - theta)).max())
        theta, obj = cand, oc
        if change < 1e-6:
            break
    info["iterations"] = it + 1
    info["coefficients"] = theta.tolist()
    zz, yy, xx = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij")
    field = np.empty(shape)
    # Evaluate slice by slice (memory: one [y*x, m] basis at a time).
    for zi in range(shape[0]):
        c = np.stack([zz[zi].ravel(), yy[zi].ravel(), xx[zi].ravel()], axis=1)
        field[zi] = (_poly_basis((c - centre) / half, order) @ theta).reshape(shape[1:])
    return np.clip(field, B1_BOUNDS[0], B1_BOUNDS[1]), info


def _spline_at(spline, b: np.ndarray, nu: int = 0) -> np.ndarray:
    """Evaluate per-voxel splines (one per row) each at its own abscissa b[row]."""
    x = spline.x
    k = np.clip(np.searchsorted(x, b, side="right") - 1, 0, x.size - 2)
    t = b - x[k]
    c = spline.c  # [4, n_intervals, n_rows]
    rows = np.arange(b.size)
    c0, c1, c2, c3 = (c[j, k, rows] for j in range(4))
    if nu == 0:
        return ((c0 * t + c1) * t + c2) * t + c3
    if nu == 1:
        return (3.0 * c0 * t + 2.0 * c1) * t + c2
    return 6.0 * c0 * t + 2.0 * c1


def crlb(
    m0, t1_ms, t2_ms, b1, protocol: QalasProtocol, noise_sd: float, *, fix_b1: bool = False
) -> np.ndarray:
    """Cramer-Rao lower bound (SD) of ``(M0, T1 [ms], T2 [ms], B1)`` for Gaussian noise of SD
    ``noise_sd`` per sample, from the model's analytic Jacobian: ``sqrt(diag((J^T J)^-1))
    * noise_sd`` in the (M0, R1, R2, B1) parametrization, mapped to T1/T2 by the delta
    method (``sd(T) = T^2 sd(R)``). ``fix_b1``: B1 known (the smoothed second pass); its
    entry is then 0. Returns ``param_shape + (4,)``.
    """
    from processing.qalas import qalas_jacobian

    _, jac = qalas_jacobian(m0, t1_ms, t2_ms, b1, protocol)
    k = 3 if fix_b1 else 4
    j = jac[..., :k]
    info = np.einsum("...ki,...kj->...ij", j, j)
    cov = np.linalg.inv(info) * noise_sd**2
    sd = np.sqrt(np.clip(np.diagonal(cov, axis1=-2, axis2=-1), 0, None))
    out = np.zeros(sd.shape[:-1] + (4,))
    out[..., :k] = sd
    t1 = np.asarray(t1_ms, np.float64)
    t2 = np.asarray(t2_ms, np.float64)
    out[..., 1] = sd[..., 1] * t1**2  # R1 in 1/ms -> T1 in ms
    out[..., 2] = sd[..., 2] * t2**2
    return out


def fit_qalas(
    acq: Acquisition,
    mask: np.ndarray | None = None,
    *,
    b1_field: str = "nominal",
    b1_field_order: int = 3,
    b1_map: np.ndarray | None = None,
    noise_sd: float | None = None,
    n_threads: int | None = None,
) -> QuantMaps:
    """Fit M0, T1, T2 and B1 in every voxel of ``mask`` of a 3D-QALAS acquisition.

    acq: an :class:`Acquisition` whose ``sequence`` is a :class:`QalasProtocol` (signal
    ``[z, 5, 1, y, x]``). mask: bool ``[z, y, x]`` (default
    :func:`processing.fit.background_mask`). b1_map: a measured flip-angle ratio map
    ``[z, y, x]`` on the same grid; B1 is fixed to it (recommended). Without one,
    ``b1_field="nominal"`` assumes B1 = 1; ``"estimate"`` (experimental) fits a smooth
    polynomial field of degree ``b1_field_order`` by adjusted profile likelihood
    (:func:`estimate_b1_field`): reliable on noise-free data only (processing/QALAS.md).
    noise_sd: per-sample noise SD if known (default: from the image corners).

    Returns :class:`QuantMaps` exactly as :func:`processing.fit.fit_mdme` does.
    """
    from processing.fit import background_mask, estimate_noise_sd

    if not isinstance(acq, Acquisition):
        raise TypeError(f"acq: expected an Acquisition, got {type(acq).__name__}")
    protocol = getattr(acq, "sequence", None)
    if not isinstance(protocol, QalasProtocol):
        raise ValueError(
            "acq.sequence: fit_qalas needs a 3D-QALAS acquisition (sequence=QalasProtocol), "
            f"got {type(protocol).__name__}"
        )
    shape = acq.shape
    if noise_sd is None:
        noise_sd = estimate_noise_sd(acq)
    elif not (math.isfinite(noise_sd) and noise_sd >= 0):
        raise ValueError(f"noise_sd: must be a finite number >= 0, got {noise_sd!r}")
    if mask is None:
        mask = background_mask(acq, noise_sd)
    else:
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ValueError(f"mask: expected shape {shape} (z, y, x), got {mask.shape}")
        mask = mask.astype(bool)
    idx = np.flatnonzero(mask.ravel()).astype(np.int64)
    samples = acq.samples().reshape(-1, N_SAMPLES)
    b1_given = None
    if b1_map is not None:
        b1m = np.asarray(b1_map, np.float64)
        if b1m.shape != shape:
            raise ValueError(f"b1_map: expected shape {shape} (z, y, x), got {b1m.shape}")
        b1_given = np.clip(np.nan_to_num(b1m.ravel()[idx], nan=1.0), *B1_BOUNDS)
    old_threads = nb.get_num_threads()
    if n_threads is not None:
        if n_threads < 1:
            raise ValueError(f"n_threads: must be >= 1, got {n_threads}")
        nb.set_num_threads(min(int(n_threads), nb.config.NUMBA_NUM_THREADS))
    try:
        if b1_field not in ("nominal", "estimate"):
            raise ValueError(f"b1_field: expected 'nominal' or 'estimate', got {b1_field!r}")
        if b1_given is None and idx.size:
            if b1_field == "estimate":
                field, _field_info = estimate_b1_field(
                    samples, mask, protocol, magnitude=acq.is_magnitude,
                    noise_sd=float(noise_sd), order=b1_field_order,
                )  # fmt: skip
                b1_given = field.ravel()[idx]
            else:
                b1_given = np.ones(idx.size)
        par, rms, ok = fit_qalas_samples(
            samples,
            protocol,
            magnitude=acq.is_magnitude,
            b1_fixed=b1_given,
            idx=idx,
            noise_sd=float(noise_sd),
        )
    finally:
        nb.set_num_threads(old_threads)

    finite = np.isfinite(par).all(axis=1) & np.isfinite(rms)
    failed_v = ~ok | ~finite | ~_inside(par, False)

    def scatter(values: np.ndarray) -> np.ndarray:
        out = np.zeros(shape, np.float32)
        out.ravel()[idx] = np.where(finite, values, 0.0)
        return out

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
        residual=scatter(rms),
        mask=mask,
        failed=failed,
        noise_sd=float(noise_sd),
    )


def warmup() -> None:
    """Compile (or load from the cache) the kernels: real and magnitude, serial and
    parallel drivers, both passes, float64 and (the fast path of fit_qalas) float32."""
    from processing.qalas import qalas_signal

    global _SERIAL_BELOW
    proto = QalasProtocol()
    t1 = np.array([800.0, 1300.0, 4000.0, 600.0])
    s = qalas_signal(100.0, t1, 80.0, 1.0, proto)
    saved = _SERIAL_BELOW
    try:
        for below in (0, 1 << 62):
            _SERIAL_BELOW = below
            for magnitude in (False, True):
                y = np.abs(s) if magnitude else s
                par, rms, ok = fit_qalas_samples(y, proto, magnitude=magnitude)
                fit_qalas_samples(y, proto, magnitude=magnitude, b1_fixed=par[:, 3])
                # fit_qalas passes float32 samples (Acquisition.samples): its own variant.
                fit_qalas_samples(
                    y.astype(np.float32), proto, magnitude=magnitude, b1_fixed=par[:, 3]
                )
                _refit(y, np.arange(4, dtype=np.int64), proto, magnitude, par, rms, ok)
    finally:
        _SERIAL_BELOW = saved
