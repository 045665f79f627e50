"""Partial-volume tissue segmentation (WM / GM / CSF / NON), intracranial mask, volumes.

Method (physics.md section 5, option b): signals mix linearly, fitted (T1, T2, PD) do not.
So each voxel's raw MDME samples are unmixed directly:

    y = S / C  ~=  sum_k f_k * PD_k * exp(-TE / T2_k) * g(T1_k, B1; TD)     f_k >= 0

with ``C`` the receive field (signal units per PD percent unit, from ``maps.receive_field``
or ``maps.m0 / maps.pd_pu``), ``B1`` the voxel's fitted flip-angle ratio and
``(T1_k, T2_k, PD_k)`` the tissue reference points ("centres"). The constrained least
squares (``sum f = 1``) is solved exactly in numba by enumerating the faces of the simplex
(at most 2^5 - 1 tiny KKT systems per voxel).

Refinement (on a voxel subsample, ``refine_iterations`` times): (1) each tissue centre is
re-fitted in signal space from its nearly pure voxels after subtracting the other tissues'
share (:func:`_refine_centres`); (2) B1 is re-estimated by a per-voxel search of the
unmixing residual around the fit's B1 (coarse +-12 %, then fine +-3 %, parabolic
interpolation) and smoothed in-plane (sigma 4 mm). The fit's B1 is biased in
partial-volume voxels (a mixture is not mono-exponential) and the unmixing is sensitive to
it: on the phantom a 2 % B1 bias moved ~3 % of volume between WM, GM and CSF.

Noise bias: with plain constrained least squares noise always pushes pure voxels into the
simplex interior (the bound f <= 1 clips one way only), and GM lies between WM and CSF, so
pure GM drains into WM+CSF. Each class beyond the first costs ``sparsity`` noise variances
(an information criterion, default 4), which removes that bias.

Classes:

* WM, GM, CSF: centres estimated from the series itself by a flat-kernel mean shift
  (mode seeking) in (log T1, log T2, PD) space, started from 3T literature values
  (physics.md section 6). Subject- and site-specific, and so usable for per-patient DIR
  timing (``TissueFractions.centres[...]["t1_ms"]``).
* NON: tissue that WM/GM/CSF mixtures do not explain (lesions, oedema, ...). A fourth
  basis with a lesion-like reference point (:data:`NON_REFERENCE`) is only admitted in voxels
  where the three-class residual exceeds the noise (chi-square test on the samples) *and*
  the fourth class at least halves that residual. This keeps ordinary partial-volume voxels
  free of spurious NON. Known limitation: a small lesion next to CSF can be explained by a
  WM+CSF mixture within noise (two echoes barely show bi-exponential decay) and is then
  counted as WM/GM/CSF.
* Extracranial: on the outermost shell of the intracranial mask a zero-signal class
  (air / bone) is also allowed, i.e. ``sum f <= 1`` there, so that voxels only partly inside
  the skull are not counted as a whole voxel of CSF. Inside the shell ``sum f = 1``.

Magnitude data: the sign of each delay is restored from the voxel's own mono-exponential
fit (the mixture has the same sign as its fit except near the zero crossing, where the
samples are small anyway).

Volumes follow West et al. 2012: BPV = WM + GM + NON, ICV = BPV + CSF, BPF = BPV / ICV.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numba as nb
import numpy as np
from scipy import ndimage, optimize

from processing._threads import CONCURRENT_MAX_VOXELS, both
from processing.acquisition import Acquisition
from processing.results import TISSUES, QuantMaps, TissueFractions
from processing.sequence_model import acquisition_jacobian, acquisition_signal, single_thread
from processing.signal import IDEAL_PROFILE, mdme_jacobian, mdme_signal, t1_factor

__all__ = [
    "LITERATURE_CENTRES",
    "NON_REFERENCE",
    "SegmentationError",
    "intracranial_mask",
    "measured_t1_ms",
    "segment",
    "tissue_centres",
    "volumes",
]

#: 3T MDME starting points (physics.md section 6): T1 ms, T2 ms, PD pu.
LITERATURE_CENTRES: dict[str, dict[str, float]] = {
    "WM": {"t1_ms": 600.0, "t2_ms": 70.0, "pd_pu": 67.0},
    "GM": {"t1_ms": 1100.0, "t2_ms": 90.0, "pd_pu": 82.0},
    "CSF": {"t1_ms": 4300.0, "t2_ms": 2000.0, "pd_pu": 100.0},
}

#: Reference point of the NON class (lesion-like tissue, middle of the MS-lesion range).
NON_REFERENCE: dict[str, float] = {"t1_ms": 1300.0, "t2_ms": 140.0, "pd_pu": 85.0}

# Mean-shift half-widths: log-T1, log-T2 (CSF T2 is poorly determined at TE <= 100 ms,
# hence wider) and PD in pu. About 2-3 x the within-tissue spread at 3T.
_BW_LOGT1 = 0.15
_BW_LOGT2 = {"WM": 0.15, "GM": 0.15, "CSF": 0.6}
_BW_PD = 6.0
_MIN_VOXELS_FOR_CENTRE = 20
# Basis table over B1 (linear interpolation error ~1e-6 at this step).
_B1_LO, _B1_STEP, _B1_N = 0.3, 0.0025, 681
# B1 search offsets (relative) and the in-plane smoothing of the searched B1 (mm, sigma).
_B1_SEARCH_COARSE = np.linspace(-0.12, 0.12, 9)
_B1_SEARCH_FINE = np.linspace(-0.03, 0.03, 7)
# Voxels in the per-voxel B1 search (a smooth field: sigma 4 mm in-plane). 60k instead of
# 120k halves its cost (0.8 -> 0.4 s on 30x256x256) with volumes unchanged within 0.05 %.
_B1_SUBSAMPLE = 60_000
_B1_SMOOTH_SIGMA_MM = 4.0
_REFINE_SUBSAMPLE = 25_000


class SegmentationError(ValueError):
    """Invalid input to the segmentation; the message names the problem."""


def _check_maps(maps: QuantMaps) -> tuple[int, int, int]:
    shape = np.shape(maps.t1_ms)
    if len(shape) != 3:
        raise SegmentationError(f"maps.t1_ms: expected [z, y, x], got shape {shape}")
    for name in ("t2_ms", "pd_pu", "b1", "m0", "mask"):
        s = np.shape(getattr(maps, name))
        if s != shape:
            raise SegmentationError(f"maps.{name}: shape {s} differs from maps.t1_ms {shape}")
    return shape  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# Intracranial mask
# --------------------------------------------------------------------------------------


def intracranial_mask(maps: QuantMaps, acq: Acquisition | None = None) -> np.ndarray:
    """Boolean intracranial mask ``[z, y, x]`` from the quantitative maps.

    Brain and CSF have PD above ~40 pu and T1 above ~400 ms at 3T, while air, bone and
    most of the scalp do not (fat T1 ~380 ms). The largest 3-D connected component of that
    set is kept, holes are filled slice by slice, and the mask is grown by one voxel
    in-plane into voxels with signal so that partial-volume voxels at the skull are
    included (the segmentation treats that outer shell as possibly partly extracranial).
    ``acq`` is accepted for future use (e.g. a noise floor from the raw images).
    """
    _check_maps(maps)
    fitted = np.asarray(maps.mask, bool)
    failed = np.asarray(maps.failed, bool) if maps.failed is not None else np.zeros_like(fitted)
    # NaN compares False and +inf True, as after nan_to_num: no float64 copies needed
    pd = np.asarray(maps.pd_pu)
    t1 = np.asarray(maps.t1_ms)
    core_full = fitted & (pd > 40.0) & (t1 > 400.0)
    if not core_full.any():
        return np.zeros(fitted.shape, bool)
    # Every step below is in-plane (opening, hole filling, one-voxel growth) or a 3-D
    # labelling of `core`, so it runs on the bounding box of `core` padded by 2 voxels
    # in-plane: the same result as on the whole grid, without full-volume temporaries
    # (a 1 mm head fills a third of its 256 x 256 x 176 field of view).
    nz_idx = np.nonzero(core_full)
    box = (
        slice(int(nz_idx[0].min()), int(nz_idx[0].max()) + 1),
        slice(max(int(nz_idx[1].min()) - 2, 0), int(nz_idx[1].max()) + 3),
        slice(max(int(nz_idx[2].min()) - 2, 0), int(nz_idx[2].max()) + 3),
    )
    core = core_full[box]
    # A 2-D opening separates the brain from thin bridges to scalp tissue.
    st2 = ndimage.generate_binary_structure(2, 1)[None]
    opened = ndimage.binary_opening(core, structure=st2)
    if opened.any():
        core = opened
    lab, n = ndimage.label(core, structure=ndimage.generate_binary_structure(3, 1))
    if n > 1:
        sizes = ndimage.sum_labels(core, lab, index=np.arange(1, n + 1))
        core = lab == (1 + int(np.argmax(sizes)))
    filled = np.stack([ndimage.binary_fill_holes(s) for s in core])
    signal = fitted[box] & ~failed[box] & (pd[box] > 5.0)
    grown = np.zeros(fitted.shape, bool)
    grown[box] = ndimage.binary_dilation(filled, structure=st2) & (signal | filled)
    return grown


# --------------------------------------------------------------------------------------
# Tissue centres
# --------------------------------------------------------------------------------------


def tissue_centres(
    maps: QuantMaps,
    icmask: np.ndarray | None = None,
    *,
    initial: Mapping[str, Mapping[str, float]] | None = None,
    max_iter: int = 30,
) -> dict[str, dict[str, float]]:
    """Series-specific WM/GM/CSF reference points (T1 ms, T2 ms, PD pu).

    Flat-kernel mean shift per tissue in (log T1, log T2, PD), started from ``initial``
    (default :data:`LITERATURE_CENTRES`): the centre moves to the median of the voxels in
    its window until it stops, i.e. it climbs to the nearest density mode, which is the
    pure-tissue cluster (partial-volume voxels spread out between clusters). Each result
    also carries ``n_voxels`` (window population) and ``estimated`` (False when too few
    voxels were found and the starting point was kept).
    """
    _check_maps(maps)
    init = {k: dict(v) for k, v in (initial or LITERATURE_CENTRES).items()}
    for t in ("WM", "GM", "CSF"):
        if t not in init:
            raise SegmentationError(f"initial centres: missing tissue {t!r}")
        for key in ("t1_ms", "t2_ms", "pd_pu"):
            v = float(init[t].get(key, float("nan")))
            if not math.isfinite(v) or v <= 0:
                raise SegmentationError(f"initial centres: {t}.{key} must be > 0, got {v}")
    sel = np.asarray(maps.mask, bool).copy()  # never write into the caller's maps
    if maps.failed is not None:
        sel &= ~np.asarray(maps.failed, bool)
    if icmask is not None:
        sel &= np.asarray(icmask, bool)
    # Selected voxels in their own dtype (no whole-grid float64 copies), float64 only for
    # the (subsampled) voxels used: the same values as converting first.
    t1 = np.asarray(maps.t1_ms)[sel]
    t2 = np.asarray(maps.t2_ms)[sel]
    pd = np.asarray(maps.pd_pu)[sel]
    use = np.flatnonzero(np.isfinite(t1) & np.isfinite(t2) & np.isfinite(pd) & (t1 > 0) & (t2 > 0))
    if use.size > 100_000:  # a deterministic subsample is plenty for a mode
        use = use[:: use.size // 100_000 + 1]
    lt1 = np.log(t1[use].astype(np.float64))
    lt2 = np.log(t2[use].astype(np.float64))
    data = (lt1, lt2, pd[use].astype(np.float64))
    out: dict[str, dict[str, float]] = {}
    for t in ("WM", "GM", "CSF"):
        c = np.array([math.log(init[t]["t1_ms"]), math.log(init[t]["t2_ms"]), init[t]["pd_pu"]])
        bw = np.array([_BW_LOGT1, _BW_LOGT2[t], _BW_PD])
        c, n_in, estimated = _mean_shift(data, c, bw, max_iter)
        out[t] = _centre(c, n_in, estimated)
    if initial is None:
        _parenchyma_modes(data, out, max_iter)
    return out


def _centre(c: np.ndarray, n_voxels: int, estimated: bool) -> dict[str, float]:
    """(log T1, log T2, PD) -> the centre dict of :func:`tissue_centres`."""
    return {
        "t1_ms": float(math.exp(c[0])),
        "t2_ms": float(math.exp(c[1])),
        "pd_pu": float(c[2]),
        "n_voxels": float(n_voxels),
        "estimated": bool(estimated),
    }


def _mean_shift(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
    c: np.ndarray,
    bw: np.ndarray,
    max_iter: int,
) -> tuple[np.ndarray, int, bool]:
    """Flat-kernel mean shift in (log T1, log T2, PD) from ``c``: window medians until the
    centre stops, then a few passes with a window 3 x narrower to pin the mode.
    Returns (centre, population of the last window, whether any window held enough voxels).
    """
    lt1, lt2, pd = data
    n_in = 0
    estimated = False
    for width in (bw, bw / 3.0):
        # Partial-volume tails make the wide window's median drift along the mixing lines
        # towards the other tissues; the narrow passes pin the mode.
        if width is not bw and not estimated:
            break
        for _ in range(max_iter):
            d2 = ((lt1 - c[0]) / width[0]) ** 2 + ((lt2 - c[1]) / width[1]) ** 2
            d2 += ((pd - c[2]) / width[2]) ** 2
            win = d2 <= 1.0
            if int(win.sum()) < _MIN_VOXELS_FOR_CENTRE:
                break
            n_in = int(win.sum())
            new = np.array([np.median(lt1[win]), np.median(lt2[win]), np.median(pd[win])])
            estimated = True
            done = np.all(np.abs(new - c) < 1e-3 * np.array([1.0, 1.0, 10.0]))
            c = new
            if done:
                break
    return c, n_in, estimated


def _parenchyma_modes(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
    out: dict[str, dict[str, float]],
    max_iter: int,
) -> None:
    """Replace the WM/GM centres by the series' two main parenchymal density modes when the
    literature starts did not find them (in place).

    The literature starts are adult 3T values; an infant's WM (T1 ~1000-2000 ms, long T2)
    or another field strength lies outside their windows, and the GM start then climbs to
    the WM cluster. Mean shift from seeds spread over the parenchymal log-T1 quantiles
    finds every mode; the two most populated ones, ordered by T1, are WM and GM. They
    replace the literature-started centres only when those failed: one of them not
    estimated, or both on the same mode.
    """
    wm, gm = out["WM"], out["GM"]
    bw = np.array([_BW_LOGT1, _BW_LOGT2["WM"], _BW_PD])
    same = (
        abs(math.log(wm["t1_ms"] / gm["t1_ms"])) < bw[0] / 2
        and abs(wm["pd_pu"] - gm["pd_pu"]) < bw[2] / 2
    )
    if wm["estimated"] and gm["estimated"] and not same:
        return
    lt1, lt2, pd = data
    par = lt1 < math.log(2500.0)  # parenchyma: CSF-dominated voxels are not candidates
    if int(par.sum()) < 4 * _MIN_VOXELS_FOR_CENTRE:
        return
    sub = (lt1[par], lt2[par], pd[par])
    modes: list[tuple[np.ndarray, int]] = []
    for q in np.linspace(5, 95, 10):
        seed_t1 = float(np.percentile(sub[0], q))
        near = np.abs(sub[0] - seed_t1) < bw[0]
        c0 = np.array([seed_t1, np.median(sub[1][near]), np.median(sub[2][near])])
        c, _n, ok = _mean_shift(sub, c0, bw, max_iter)
        if not ok:
            continue
        d2 = ((sub[0] - c[0]) / bw[0]) ** 2 + ((sub[1] - c[1]) / bw[1]) ** 2
        mass = int((d2 + ((sub[2] - c[2]) / bw[2]) ** 2 <= 1.0).sum())
        if all(np.max(np.abs(c - m) / bw) > 0.5 for m, _ in modes):
            modes.append((c, mass))
    if len(modes) < 2:
        return
    top = sorted(sorted(modes, key=lambda m: -m[1])[:2], key=lambda m: m[0][0])
    for t, (c, mass) in zip(("WM", "GM"), top, strict=True):
        out[t] = _centre(c, mass, True)


# --------------------------------------------------------------------------------------
# Per-voxel unmixing (numba)
# --------------------------------------------------------------------------------------


# The per-voxel helpers below (but _solve_small) are inlined into the kernel: as calls,
# their array arguments' overhead cost more than their arithmetic (30 x 256 x 256: the five
# unmixings of a series 0.79 -> 0.45 s CPU; the same operations in the same order, so the
# same bits; ~1.5 s more compile time when numba's cache is cold).
@nb.njit(cache=True)
def _solve_small(a: np.ndarray, b: np.ndarray, n: int) -> bool:
    """In-place Gaussian elimination with partial pivoting on a[:n,:n] x = b[:n]."""
    for col in range(n):
        piv = col
        big = abs(a[col, col])
        for r in range(col + 1, n):
            if abs(a[r, col]) > big:
                big = abs(a[r, col])
                piv = r
        if big < 1e-13:
            return False
        if piv != col:
            for c in range(n):
                tmp = a[col, c]
                a[col, c] = a[piv, c]
                a[piv, c] = tmp
            tmp = b[col]
            b[col] = b[piv]
            b[piv] = tmp
        for r in range(col + 1, n):
            f = a[r, col] / a[col, col]
            if f != 0.0:
                for c in range(col, n):
                    a[r, c] -= f * a[col, c]
                b[r] -= f * b[col]
    for r in range(n - 1, -1, -1):
        s = b[r]
        for c in range(r + 1, n):
            s -= a[r, c] * b[c]
        b[r] = s / a[r, r]
    return True


@nb.njit(cache=True, inline="always")
def _simplex_ls(
    gram: np.ndarray,
    rhs: np.ndarray,
    yy: float,
    m: int,
    f_out: np.ndarray,
    kkt: np.ndarray,
    vec: np.ndarray,
    idx: np.ndarray,
    pen: float,
) -> float:
    """min ||y - A f||^2 + pen * (#active - 1) s.t. f >= 0, sum f = 1 (first m columns).

    ``gram = A^T A``, ``rhs = A^T y``, ``yy = y^T y``. Every face of the simplex is solved
    as an equality-constrained LS (KKT); the best feasible face solution is the optimum
    (the problem is convex). ``pen`` > 0 adds an information-criterion cost per extra
    active class, so a voxel only leaves a vertex (pure tissue) or an edge when the data
    ask for it: without it, noise always pushes pure voxels into the simplex interior
    (the bound f <= 1 clips one way only), biasing every volume towards mixtures.
    Returns the squared residual of the chosen face; fills ``f_out[:m]``.
    ``kkt`` (6x6), ``vec`` (6) and ``idx`` (5, int) are scratch buffers.
    """
    best = np.inf
    best_res = 0.0
    for face in range(1, 1 << m):
        q = 0
        for k in range(m):
            if face & (1 << k):
                idx[q] = k
                q += 1
        # Closed forms for vertices and edges (most voxels end there).
        if q == 1:
            k = idx[0]
            obj = yy - 2.0 * rhs[k] + gram[k, k]
            if obj < best:
                best = obj
                best_res = obj
                for u in range(m):
                    f_out[u] = 0.0
                f_out[k] = 1.0
            continue
        if q == 2:
            i0 = idx[0]
            j0 = idx[1]
            den = gram[i0, i0] - 2.0 * gram[i0, j0] + gram[j0, j0]
            if den <= 1e-300:
                continue
            t = (rhs[i0] - rhs[j0] - gram[i0, j0] + gram[j0, j0]) / den
            if t <= 0.0 or t >= 1.0:
                continue  # the optimum of this edge is one of its vertices
            u = 1.0 - t
            obj = (
                yy
                - 2.0 * (t * rhs[i0] + u * rhs[j0])
                + t * t * gram[i0, i0]
                + 2.0 * t * u * gram[i0, j0]
                + u * u * gram[j0, j0]
            )
            if obj + pen < best:
                best = obj + pen
                best_res = obj
                for w in range(m):
                    f_out[w] = 0.0
                f_out[i0] = t
                f_out[j0] = u
            continue
        for i in range(q):
            for j in range(q):
                kkt[i, j] = gram[idx[i], idx[j]]
            kkt[i, q] = 1.0
            kkt[q, i] = 1.0
            vec[i] = rhs[idx[i]]
        kkt[q, q] = 0.0
        vec[q] = 1.0
        if not _solve_small(kkt, vec, q + 1):
            continue
        feasible = True
        for i in range(q):
            if vec[i] < -1e-10:
                feasible = False
                break
        if not feasible:
            continue
        obj = yy
        for i in range(q):
            obj -= 2.0 * vec[i] * rhs[idx[i]]
            for j in range(q):
                obj += vec[i] * vec[j] * gram[idx[i], idx[j]]
        if obj + pen * (q - 1) < best:
            best = obj + pen * (q - 1)
            best_res = obj
            for k in range(m):
                f_out[k] = 0.0
            for i in range(q):
                f_out[idx[i]] = max(vec[i], 0.0)
    return max(best_res, 0.0)


@nb.njit(cache=True)
def _basis_table(c_r1, c_r2, c_pd, td, te, tr, theta, alpha, ps, pw, b1_lo, db, nb1):
    """table[b, k, s]: signal of pure tissue k (PD units) at B1 = b1_lo + b*db, sample s.

    Tabulating the basis over B1 (and interpolating linearly per voxel) replaces 16
    slice-profile-weighted t1_factor evaluations per voxel by a few multiply-adds.
    """
    nd = td.shape[0]
    ne = te.shape[0]
    nk = c_r1.shape[0]
    table = np.empty((nb1, nk, nd * ne))
    for b in range(nb1):
        b1 = b1_lo + b * db
        for k in range(nk):
            for i in range(nd):
                g, _, _ = t1_factor(c_r1[k], b1, td[i], tr, theta, alpha, ps, pw)
                for j in range(ne):
                    table[b, k, i * ne + j] = c_pd[k] * math.exp(-c_r2[k] * te[j]) * g
    return table


@nb.njit(cache=True, inline="always")
def _fill_basis(table, b1_lo, db, b1v, a):
    """a[s, k] (k < 4) <- basis at B1 = b1v by linear interpolation; a[:, 4] = 0."""
    nb1 = table.shape[0]
    x = (b1v - b1_lo) / db
    i0 = min(max(int(x), 0), nb1 - 2)
    w = min(max(x - i0, 0.0), 1.0)
    for k in range(4):
        for s in range(table.shape[2]):
            a[s, k] = (1.0 - w) * table[i0, k, s] + w * table[i0 + 1, k, s]
    for s in range(table.shape[2]):
        a[s, 4] = 0.0


@nb.njit(cache=True, inline="always")
def _gram(a, yv, cols, m, gram, rhs):
    ns = yv.shape[0]
    for p in range(m):
        for q in range(p, m):
            acc = 0.0
            for s in range(ns):
                acc += a[s, cols[p]] * a[s, cols[q]]
            gram[p, q] = acc
            gram[q, p] = acc
        acc = 0.0
        for s in range(ns):
            acc += a[s, cols[p]] * yv[s]
        rhs[p] = acc


@nb.njit(cache=True, inline="always")
def _unmix_one(
    yv, a, shell_v, sig2, chi2_thr, sparsity, cols, gram, rhs, f3, f4, kkt, vec, idx, res, best
):
    """Unmix one voxel's signed samples ``yv`` on basis ``a``. res <- WM GM CSF NON rms,
    only when the three-class squared residual is below ``best`` (the B1 search keeps
    nothing else: the NON test is skipped for a B1 that is not kept).

    Returns the three-class squared residual (the B1 search criterion).
    """
    ns = yv.shape[0]
    cols[0] = 0
    cols[1] = 1
    cols[2] = 2
    m3 = 3
    if shell_v:  # zero-signal extracranial class
        cols[3] = 4
        m3 = 4
    yy = 0.0
    for s in range(ns):
        yy += yv[s] * yv[s]
    pen = sparsity * sig2
    # Two passes through one call site of _simplex_ls (it is inlined: one copy of its code):
    # the three (or, on the shell, four) classes, then, if their residual is too large,
    # NON as an extra column, kept only if it clearly helps.
    r3 = 0.0
    rr = 0.0
    m = m3
    f = f3
    for stage in range(2):
        if stage == 1:
            if not r3 > chi2_thr * sig2:
                break
            cols[m3] = 3
            m = m3 + 1
            f = f4
        _gram(a, yv, cols, m, gram, rhs)
        f[:] = 0.0
        r = _simplex_ls(gram, rhs, yy, m, f, kkt, vec, idx, pen)
        if stage == 0:
            r3 = r
            if not r3 < best:
                return r3
            res[0] = f3[0]
            res[1] = f3[1]
            res[2] = f3[2]
            res[3] = 0.0
            rr = r3
        elif r < 0.25 * r3:  # residual norm at least halved
            res[0] = f4[0]
            res[1] = f4[1]
            res[2] = f4[2]
            res[3] = f4[m3]
            rr = r
    res[4] = math.sqrt(rr / ns)
    return r3


@nb.njit(cache=True, parallel=True)
def _unmix_kernel(y, b1, shell, noise, table, b1_lo, db, chi2_thr, sparsity, b1_offsets, out):
    """Unmix every voxel; out[v] = WM GM CSF NON rms_residual B1_used.

    y: [n, ns] signed samples / receive field (PD units). b1, noise (SD in PD units), shell:
    [n]. For each relative B1 offset in ``b1_offsets`` the three-class fit is tried and the
    B1 with the lowest residual kept (one offset 0.0 = use the given B1).
    """
    n, ns = y.shape
    n_chunks = min(n, 64)
    for ch in nb.prange(n_chunks):
        # Scratch buffers once per chunk: per-voxel allocation would dominate the cost.
        a = np.empty((ns, 5))
        cols = np.empty(5, np.int64)
        gram = np.zeros((5, 5))
        rhs = np.zeros(5)
        f3 = np.zeros(5)
        f4 = np.zeros(5)
        kkt = np.empty((6, 6))
        vec = np.empty(6)
        idx = np.empty(5, np.int64)
        res = np.empty(5)
        n_off = b1_offsets.shape[0]
        rr = np.empty(n_off)
        for v in range(ch * n // n_chunks, (ch + 1) * n // n_chunks):
            best = np.inf
            ib = 0
            sig2 = noise[v] * noise[v]
            for c in range(n_off):
                bv = b1[v] * (1.0 + b1_offsets[c])
                _fill_basis(table, b1_lo, db, bv, a)
                r3 = _unmix_one(
                    y[v], a, shell[v], sig2, chi2_thr, sparsity, cols, gram, rhs, f3, f4, kkt,
                    vec, idx, res, best,
                )  # fmt: skip
                rr[c] = r3
                if r3 < best:
                    best = r3
                    ib = c
                    for k in range(5):
                        out[v, k] = res[k]
                    out[v, 5] = bv
            if 0 < ib < n_off - 1:
                # Parabolic interpolation of the residual between search steps.
                den = rr[ib - 1] - 2.0 * rr[ib] + rr[ib + 1]
                if den > 0.0:
                    shift = 0.5 * (rr[ib - 1] - rr[ib + 1]) / den
                    step = b1_offsets[ib + 1] - b1_offsets[ib]
                    out[v, 5] = b1[v] * (1.0 + b1_offsets[ib] + shift * step)


def _receive_field(maps: QuantMaps, sel: np.ndarray, fitted: np.ndarray) -> np.ndarray:
    """Signal units per PD pu at the voxels of ``sel`` (``[n]``, finite, > 0), derived
    from its ``fitted`` voxels.

    With ``maps.receive_field`` only the voxels of ``sel`` are read (no whole-grid
    temporaries); without it, the ratio m0 / PD is filled from the nearest fitted voxel.
    """
    m0 = np.asarray(maps.m0)[sel].astype(np.float64)
    pd = np.asarray(maps.pd_pu)[sel].astype(np.float64)
    good = np.asarray(fitted)[sel] & np.isfinite(m0) & np.isfinite(pd) & (pd > 1.0) & (m0 > 0)
    if not good.any():
        raise SegmentationError(
            "maps: no voxel with a positive m0 and pd_pu to derive the receive field"
        )
    ratio = np.where(good, m0 / np.where(good, pd, 1.0), np.nan)
    if maps.receive_field is not None:
        rf_all = np.asarray(maps.receive_field)
        if rf_all.shape != sel.shape:
            raise SegmentationError(
                f"maps.receive_field: shape {rf_all.shape} differs from maps.m0 {sel.shape}"
            )
        rf = rf_all[sel].astype(np.float64)
        okrf = good & np.isfinite(rf) & (rf > 0)
        if okrf.any():
            # Smooth field, scaled so that PD = m0 / C reproduces maps.pd_pu.
            scale = float(np.median(ratio[okrf] / rf[okrf]))
            c = rf * scale
            fill = float(np.median(c[okrf]))
            return np.where(np.isfinite(c) & (c > 0), c, fill)
    full = np.full(sel.shape, np.nan)
    full[sel] = ratio
    valid = np.zeros(sel.shape, bool)
    valid[sel] = good
    return _fill_nearest(full, valid, sel & np.asarray(fitted, bool))[sel]


def _fill_nearest(
    values: np.ndarray, valid: np.ndarray, region: np.ndarray | None = None
) -> np.ndarray:
    """Copy of ``values`` with every invalid voxel replaced by its nearest valid voxel.

    With ``region``, only its bounding box is filled (the rest is copied as is), which
    keeps the distance transform small for a head in a large field of view.
    """
    out = np.asarray(values, np.float64).copy()
    if region is not None and region.any():
        box = tuple(slice(a.min(), a.max() + 1) for a in np.nonzero(region))
    else:
        box = tuple(slice(0, n) for n in out.shape)
    v = valid[box]
    if v.all() or not v.any():
        return out
    idx = ndimage.distance_transform_edt(~v, return_distances=False, return_indices=True)
    out[box] = out[box][tuple(idx)]
    return out


def segment(
    acq: Acquisition,
    maps: QuantMaps,
    *,
    centres: Mapping[str, Mapping[str, float]] | None = None,
    icmask: np.ndarray | None = None,
    profile: tuple[np.ndarray, np.ndarray] = IDEAL_PROFILE,
    non_reference: Mapping[str, float] | None = None,
    chi2_threshold: float = 25.0,
    sparsity: float = 4.0,
    extracranial_shell: bool = True,
    refine_iterations: int = 2,
) -> TissueFractions:
    """WM/GM/CSF/NON partial-volume fractions by unmixing the raw MDME samples.

    Parameters
    ----------
    acq: the acquisition the maps were fitted from.
    maps: fitted maps (``b1`` per voxel; ``pd_pu`` in percent units; ``receive_field`` used
        when set). ``noise_sd`` (signal units) sets the NON test; when NaN it is estimated
        from the fit residuals.
    centres: WM/GM/CSF reference points ``{"WM": {"t1_ms", "t2_ms", "pd_pu"}, ...}``;
        default: :func:`tissue_centres` estimated from this series.
    icmask: intracranial mask; default :func:`intracranial_mask`.
    profile: slice profile used by the fit (isochromat scales, weights).
    non_reference: reference point of NON (default :data:`NON_REFERENCE`).
    chi2_threshold: squared residual norm, in noise variances, above which NON is tried
        (25 ~ p < 0.001 for 8 samples and 2 free fractions).
    sparsity: cost, in noise variances, of each class beyond the first in a voxel (an
        information criterion; 2 ~ AIC). It removes the noise-driven bias of pure voxels
        towards mixtures (GM lies between WM and CSF, so noise drains pure GM into
        WM+CSF); 4 lets ~5 % of pure voxels leave their vertex by chance and measured best
        on the phantoms (volumes within ~2 %); 0 gives the plain constrained least squares.
    extracranial_shell: allow a zero-signal (bone/air) class on the outermost in-plane
        shell of the mask, for voxels only partly inside the skull.
    refine_iterations: alternate this many times, on a voxel subsample, between unmixing,
        re-estimating each centre in signal space (:func:`_refine_centres`, only when
        ``centres`` is None) and re-estimating B1 by a per-voxel search smoothed in-plane
        (:func:`_smooth_b1`). 0 uses the centres and the fit's B1 as given.

    Returns
    -------
    TissueFractions with float32 ``[z, y, x]`` fractions for WM, GM, CSF, NON (sum 1 inside
    the mask, <= 1 on its outermost in-plane shell where the rest is extracranial), the
    mask and the centres used (plus ``"NON"``).
    """
    shape = _check_maps(maps)
    if not isinstance(acq, Acquisition):
        raise SegmentationError(f"acq: expected an Acquisition, got {type(acq).__name__}")
    if acq.shape != shape:
        raise SegmentationError(f"acq: grid {acq.shape} differs from the maps {shape}")
    if icmask is None:
        icmask = intracranial_mask(maps, acq)
    icmask = np.asarray(icmask, bool)
    if icmask.shape != shape:
        raise SegmentationError(f"icmask: shape {icmask.shape} differs from the maps {shape}")
    auto_centres = centres is None
    non = {k: float(v) for k, v in (non_reference or NON_REFERENCE).items()}
    if centres is None:
        # The centres' mean shift (numpy only) and the unmixing problem's set-up need
        # nothing of each other: on a grid small enough for both sets of temporaries the
        # mean shift runs on a second thread meanwhile (same results either way).
        icm = icmask

        def estimate() -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
            found = tissue_centres(maps, icm)
            # CSF is nearly pure water everywhere and its fitted T2 is very noisy, so its
            # parameter-space mode is unreliable: start it from the literature and let the
            # signal-space refinement below move it to this series' value.
            found["CSF"] = dict(LITERATURE_CENTRES["CSF"])
            return found, _checked_centres(found)

        (centres, cen), problem = both(
            estimate,
            lambda: _UnmixProblem.build(acq, maps, icm, non, profile, extracranial_shell),
            concurrent=icmask.size <= CONCURRENT_MAX_VOXELS,
        )
    else:
        cen = _checked_centres(centres)
        problem = _UnmixProblem.build(acq, maps, icmask, non, profile, extracranial_shell)
    out_centres: dict[str, dict[str, float]] = {t: dict(centres[t]) for t in ("WM", "GM", "CSF")}
    out_centres["NON"] = dict(non)
    problem.chi2_threshold, problem.sparsity = float(chi2_threshold), float(sparsity)
    b1 = np.ascontiguousarray(problem.b1_map[problem.sel])
    if refine_iterations > 0:
        cen, b1 = _refine(problem, cen, b1, refine_iterations, auto_centres, profile)
    out = problem.unmix(cen, None, b1, np.zeros(1))
    if auto_centres:
        for t in _ORDER:
            out_centres[t].update(cen[t])
    fractions = {t: np.zeros(shape, np.float32) for t in TISSUES}
    for k, t in enumerate(TISSUES):
        fractions[t][problem.sel] = out[:, k].astype(np.float32)
    return TissueFractions(fractions=fractions, icmask=icmask, centres=out_centres)


_ORDER = ("WM", "GM", "CSF")


def _checked_centres(centres: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """WM/GM/CSF centres as floats; each needs finite positive t1_ms, t2_ms and pd_pu."""
    cen = {}
    for t in _ORDER:
        if t not in centres:
            raise SegmentationError(f"centres: missing tissue {t!r}")
        cen[t] = {k: float(centres[t][k]) for k in ("t1_ms", "t2_ms", "pd_pu")}
        if not all(math.isfinite(v) and v > 0 for v in cen[t].values()):
            raise SegmentationError(f"centres: {t} needs finite positive t1_ms, t2_ms, pd_pu")
    return cen


@dataclass
class _UnmixProblem:
    """The intracranial voxels' samples (receive field divided out, signs restored for
    magnitude data) and everything the unmixing kernel needs besides the centres."""

    acq: Acquisition
    sel: np.ndarray  # [z, y, x] bool: the voxels unmixed (the intracranial mask)
    y: np.ndarray  # [n, ns] samples
    noise_pu: np.ndarray  # [n] noise SD per voxel, in the samples' units
    shell_sel: np.ndarray  # [n] bool: outermost in-plane shell (extracranial class allowed)
    b1_map: np.ndarray  # [z, y, x] B1, unfitted voxels filled from the nearest fitted one
    non: dict[str, float]
    td: np.ndarray
    te: np.ndarray
    seq: tuple[float, float, float]  # TR ms, saturation deg, excitation deg
    ps: np.ndarray
    pw: np.ndarray
    chi2_threshold: float = 25.0
    sparsity: float = 4.0

    @classmethod
    def build(
        cls,
        acq: Acquisition,
        maps: QuantMaps,
        icmask: np.ndarray,
        non: dict[str, float],
        profile: tuple[np.ndarray, np.ndarray],
        extracranial_shell: bool,
    ) -> _UnmixProblem:
        # Every intracranial voxel is unmixed, fitted or not (unfitted voxels borrow B1 and
        # the receive field from their nearest fitted neighbour), so volumes do not lose
        # voxels.
        sel = icmask
        fitted = np.asarray(maps.mask, bool)
        if maps.failed is not None:
            fitted = fitted & ~np.asarray(maps.failed, bool)
        if not (sel & fitted).any():
            raise SegmentationError(
                "maps: no successfully fitted voxel inside the intracranial mask"
            )
        c_sel = _receive_field(maps, sel, fitted)  # [n]
        y = acq.masked_samples(sel).astype(np.float64) / c_sel[:, None]
        ns = y.shape[1]
        noise_sd = float(maps.noise_sd)
        if not math.isfinite(noise_sd) or noise_sd <= 0:
            # RMS residual of a 4-parameter fit over ns samples -> per-sample SD.
            res = np.asarray(maps.residual, np.float64)[sel & fitted]
            res = res[np.isfinite(res)]
            noise_sd = float(np.median(res)) * math.sqrt(ns / max(ns - 4, 1)) if res.size else 0.0
        noise_pu = np.ascontiguousarray(np.maximum(noise_sd / c_sel, 1e-6))
        # Shell: in-plane border of the mask, where part of the voxel may be extracranial.
        st2 = ndimage.generate_binary_structure(2, 1)[None]
        shell = icmask & ~ndimage.binary_erosion(icmask, structure=st2, border_value=0)
        if not extracranial_shell:
            shell[:] = False
        b1_all = np.asarray(maps.b1, np.float64)
        b1_ok = fitted & np.isfinite(b1_all) & (b1_all > 0.3) & (b1_all < 2.0)
        b1_map = _fill_nearest(b1_all, b1_ok, sel)
        td = np.ascontiguousarray(acq.delays_ms, np.float64)
        te = np.ascontiguousarray(acq.echo_times_ms, np.float64)
        seq = (float(acq.tr_ms), float(acq.saturation_deg), float(acq.excitation_deg))
        if acq.is_magnitude:
            # Restore each delay's sign from the voxel's own mono-exponential fit.
            t1f = np.asarray(maps.t1_ms, np.float64)[sel]
            t1f = np.where(np.isfinite(t1f) & (t1f > 0), t1f, 1000.0)
            if acq.sequence is None:
                sgn = mdme_signal(1.0, t1f, 1e6, b1_map[sel], td, te, *seq, profile=profile)
            else:
                sgn = acquisition_signal(acq, 1.0, t1f, 1e6, b1_map[sel])
            y = np.where(sgn < 0, -y, y)
        return cls(
            acq=acq,
            sel=sel,
            y=np.ascontiguousarray(y),
            noise_pu=noise_pu,
            shell_sel=np.ascontiguousarray(shell[sel]),
            b1_map=b1_map,
            non=non,
            td=td,
            te=te,
            seq=seq,
            ps=np.ascontiguousarray(profile[0], np.float64),
            pw=np.ascontiguousarray(profile[1], np.float64),
        )

    def unmix(
        self, c: dict[str, dict[str, float]], rows: np.ndarray | None, b1v: np.ndarray, offsets
    ) -> np.ndarray:
        """Fractions (WM, GM, CSF, NON), extracranial share and B1 per voxel (``rows``:
        a subset, None = all) for the centres ``c``; ``offsets``: B1 search offsets."""
        acq, non, seq = self.acq, self.non, self.seq
        c_r1 = np.array([1.0 / c[t]["t1_ms"] for t in _ORDER] + [1.0 / non["t1_ms"]])
        c_r2 = np.array([1.0 / c[t]["t2_ms"] for t in _ORDER] + [1.0 / non["t2_ms"]])
        c_pd = np.array([c[t]["pd_pu"] for t in _ORDER] + [non["pd_pu"]])
        if acq.sequence is None:
            table = _basis_table(
                c_r1, c_r2, c_pd, self.td, self.te, seq[0], math.radians(seq[1]),
                math.radians(seq[2]), self.ps, self.pw, _B1_LO, _B1_STEP, _B1_N,
            )  # fmt: skip
        else:
            b1_grid = _B1_LO + _B1_STEP * np.arange(_B1_N)
            table = np.ascontiguousarray(
                acquisition_signal(acq, c_pd, 1.0 / c_r1, 1.0 / c_r2, b1_grid[:, None])
            )
        yy_ = self.y if rows is None else np.ascontiguousarray(self.y[rows])
        res = np.empty((yy_.shape[0], 6))
        _unmix_kernel(
            yy_,
            np.ascontiguousarray(b1v),
            self.shell_sel if rows is None else np.ascontiguousarray(self.shell_sel[rows]),
            self.noise_pu if rows is None else np.ascontiguousarray(self.noise_pu[rows]),
            table,
            _B1_LO,
            _B1_STEP,
            self.chi2_threshold,
            self.sparsity,
            np.asarray(offsets, np.float64),
            res,
        )
        return res


def _refine(
    problem: _UnmixProblem,
    cen: dict[str, dict[str, float]],
    b1: np.ndarray,
    refine_iterations: int,
    auto_centres: bool,
    profile: tuple[np.ndarray, np.ndarray],
) -> tuple[dict[str, dict[str, float]], np.ndarray]:
    """Alternate on a voxel subsample: unmix -> re-estimate the centres (if automatic) ->
    re-estimate B1 by a per-voxel search, smoothed in-plane. The fit's B1 is biased in
    partial-volume voxels (a mixture is not mono-exponential) and its smoothing spreads
    that bias; the unmixing is sensitive to it (a 2 % B1 error moves several % of volume
    between WM, GM and CSF)."""
    acq, y, shell_sel = problem.acq, problem.y, problem.shell_sel
    n = y.shape[0]
    rows = np.arange(0, n, max(1, n // _REFINE_SUBSAMPLE))
    rows_b1 = np.arange(0, n, max(1, n // _B1_SUBSAMPLE))
    zero = np.zeros(1)
    for it in range(refine_iterations):
        if auto_centres:
            out = problem.unmix(cen, rows, b1[rows], zero)
            cen = _refine_centres(
                y[rows], b1[rows], out, cen, problem.non, shell_sel[rows], problem.td,
                problem.te, problem.seq, profile,
                acq=acq if acq.sequence is not None else None,
            )  # fmt: skip
            if acq.sequence is not None:
                cen = _refine_csf_vertex(problem, cen, b1, rows[out[:, 2] >= _CSF_VERTEX_MIN])
        if acq.sequence is not None:
            # 3D-QALAS samples carry almost no B1 information (processing/QALAS.md):
            # keep the fit's B1 field rather than a per-voxel search.
            continue
        offsets = _B1_SEARCH_COARSE if it == 0 else _B1_SEARCH_FINE
        out = problem.unmix(cen, rows_b1, b1[rows_b1], offsets)
        b1 = np.ascontiguousarray(
            _smooth_b1(out[:, 5], rows_b1, problem.sel, problem.b1_map, acq.voxel_size_mm)
        )
    return cen, b1


# --------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------


def volumes(
    fractions: TissueFractions | Mapping[str, np.ndarray], voxel_volume_ml: float
) -> dict[str, float]:
    """Tissue volumes in mL: WM, GM, CSF, NON, BPV = WM+GM+NON, ICV = BPV+CSF, BPF = BPV/ICV.

    ``fractions``: a :class:`TissueFractions` or a mapping tissue -> fraction array.
    ``voxel_volume_ml``: volume of one voxel in mL (``Acquisition.voxel_volume_ml``).
    BPF is a fraction (0..1); NaN when ICV is 0.
    """
    fr = fractions.fractions if isinstance(fractions, TissueFractions) else fractions
    vv = float(voxel_volume_ml)
    if not math.isfinite(vv) or vv <= 0:
        raise SegmentationError(
            f"voxel_volume_ml: must be a finite number > 0, got {voxel_volume_ml!r}"
        )
    vol: dict[str, float] = {}
    for t in TISSUES:
        if t not in fr:
            raise SegmentationError(f"fractions: missing tissue {t!r}")
        vol[t] = float(np.sum(np.asarray(fr[t], np.float64))) * vv
    vol["BPV"] = vol["WM"] + vol["GM"] + vol["NON"]
    vol["ICV"] = vol["BPV"] + vol["CSF"]
    vol["BPF"] = vol["BPV"] / vol["ICV"] if vol["ICV"] > 0 else float("nan")
    return vol


_REFINE_MIN_FRACTION = 0.85
_REFINE_MAX_VOXELS = 2_500


def _refine_centres(
    ys: np.ndarray,
    b1: np.ndarray,
    out: np.ndarray,
    cen: dict[str, dict[str, float]],
    non: dict[str, float],
    shell: np.ndarray,
    td: np.ndarray,
    te: np.ndarray,
    seq: tuple[float, float, float],
    profile: tuple[np.ndarray, np.ndarray],
    *,
    acq: Acquisition | None = None,
) -> dict[str, dict[str, float]]:
    """Re-estimate each tissue centre from its nearly pure voxels, in signal space.

    For tissue k, voxels with f_k >= 0.85 (not on the shell) give the pure-k signal
    ``p = (y - sum_{j != k} f_j a_j(B1)) / f_k``; one (PD, T1, T2) is fitted jointly to all
    of them, each at its own B1. Averaging signals rather than fitted parameters removes the
    noise of single-voxel fits (large for CSF, whose T2 is poorly determined) and the
    contamination subtraction removes the partial-volume pull towards other tissues.
    """
    names = ("WM", "GM", "CSF")
    ref = [cen[t] for t in names] + [non]
    new = {t: dict(cen[t]) for t in names}
    for k, t in enumerate(names):
        if acq is not None and t == "CSF":
            # 3D-QALAS barely constrains a CSF-like T2 (T2-prep 100 ms << T2) and, with a
            # 4.5 s cycle, couples CSF's T1 and PD: the joint fit runs to its bounds (T1
            # 8000 ms, PD 5-137 pu on phantoms). Keep the literature CSF centre.
            continue
        pick = np.flatnonzero((out[:, k] >= _REFINE_MIN_FRACTION) & ~shell)
        if pick.size < _MIN_VOXELS_FOR_CENTRE:
            continue
        if pick.size > _REFINE_MAX_VOXELS:
            pick = pick[:: pick.size // _REFINE_MAX_VOXELS + 1]
        bk = b1[pick]
        p = ys[pick].copy()
        for j, c in enumerate(ref):
            if j == k:
                continue
            fj = out[pick, j]
            if not np.any(fj > 0):
                continue
            if acq is not None:
                a = acquisition_signal(acq, c["pd_pu"], c["t1_ms"], c["t2_ms"], bk)
            else:
                a = mdme_signal(
                    c["pd_pu"], c["t1_ms"], c["t2_ms"], bk, td, te, *seq, profile=profile
                )
            p -= fj[:, None] * a
        p /= out[pick, k][:, None]

        def resid(x: np.ndarray, p=p, bk=bk) -> np.ndarray:
            if acq is not None:
                m = acquisition_signal(acq, math.exp(x[0]), math.exp(x[1]), math.exp(x[2]), bk)
            else:
                m = mdme_signal(
                    math.exp(x[0]), math.exp(x[1]), math.exp(x[2]), bk, td, te, *seq,
                    profile=profile,
                )  # fmt: skip
            return (m - p).ravel()

        def jac(x: np.ndarray, p=p, bk=bk) -> np.ndarray:
            # d/dlog PD = S; d/dlog T = -R * dS/dR (analytic, from processing.signal).
            pd_, t1_, t2_ = np.exp(x)
            if acq is not None:
                m, j = acquisition_jacobian(acq, pd_, t1_, t2_, bk)
            else:
                m, j = mdme_jacobian(pd_, t1_, t2_, bk, td, te, *seq, profile=profile)
            out = np.empty(m.shape + (3,))
            out[..., 0] = m
            out[..., 1] = -j[..., 1] / t1_
            out[..., 2] = -j[..., 2] / t2_
            return out.reshape(-1, 3)

        x0 = np.log([cen[t]["pd_pu"], cen[t]["t1_ms"], cen[t]["t2_ms"]])
        lo = np.log([5.0, 100.0, 10.0])
        hi = np.log([150.0, 8000.0, 5000.0])
        sol = optimize.least_squares(
            resid, np.clip(x0, lo + 1e-6, hi - 1e-6), jac=jac, bounds=(lo, hi), x_scale=0.1
        )
        if sol.success and np.all(np.isfinite(sol.x)):
            pd_, t1_, t2_ = np.exp(sol.x)
            new[t].update(
                pd_pu=float(pd_), t1_ms=float(t1_), t2_ms=float(t2_), n_voxels=float(pick.size)
            )
    return new


# 3D-QALAS CSF vertex search: voxels unmixed as >= this CSF fraction (first pass) take part;
# at most _CSF_VERTEX_MAX of them; each voxel's cost is capped at _CSF_VERTEX_CAP noise
# variances (noise-only or unexplained voxels inside the mask then weigh no more than that).
_CSF_VERTEX_MIN = 0.8
_CSF_VERTEX_MAX = 3_000
_CSF_VERTEX_CAP = 30.0


def _refine_csf_vertex(
    problem: _UnmixProblem,
    cen: dict[str, dict[str, float]],
    b1: np.ndarray,
    rows: np.ndarray,
) -> dict[str, dict[str, float]]:
    """3D-QALAS: the CSF reference point that best explains the CSF-dominated voxels.

    Why not :func:`_refine_centres`: QALAS's five samples barely separate CSF's T1, T2 and
    PD, so with a wrong CSF start (the literature 4300/2000/100) the unmixing calls a pure
    CSF voxel "90 % CSF + 10 % GM", the subtraction then extrapolates the CSF signal beyond
    the data and the joint fit converges to a far vertex (T1 5200 ms, T2 on its 5000 ms
    bound, PD 126 pu for a 3800/1500/98 CSF): CSF volume -7 to -9 %. Here the CSF point is
    chosen by the unmixing's own criterion summed over the voxels (Nelder-Mead in log PD,
    log T1, log T2): squared residual plus the sparsity cost of every class beyond the
    first, in noise variances, capped per voxel. The sparsity cost is what identifies the
    vertex: a pure voxel is free at the true CSF point and pays for a mixture at any point
    farther out along the GM-CSF line. 3800/1500/98 phantom: 3790/1384/102 (PD carries the
    receive-field scale, like the WM/GM centres), CSF volume within 1 %.
    """
    if rows.size < _MIN_VOXELS_FOR_CENTRE:
        return cen
    if rows.size > _CSF_VERTEX_MAX:
        rows = rows[:: rows.size // _CSF_VERTEX_MAX + 1]
    rows = rows[~problem.shell_sel[rows]]
    b1v = np.ascontiguousarray(b1[rows])
    noise = problem.noise_pu[rows]
    ns = problem.y.shape[1]
    zero = np.zeros(1)

    def cost(x: np.ndarray) -> float:
        c = dict(cen)
        c["CSF"] = {"pd_pu": math.exp(x[0]), "t1_ms": math.exp(x[1]), "t2_ms": math.exp(x[2])}
        out = problem.unmix(c, rows, b1v, zero)
        active = (out[:, :4] > 0).sum(axis=1)
        per_voxel = ns * (out[:, 4] / noise) ** 2 + problem.sparsity * (active - 1)
        return float(np.minimum(per_voxel, _CSF_VERTEX_CAP).sum())

    c0 = cen["CSF"]
    x0 = np.log([c0["pd_pu"], c0["t1_ms"], c0["t2_ms"]])
    with single_thread():  # ~200 small unmixings: parallel launches would dominate
        sol = _nelder_mead(cost, x0, rows.size)
    lo, hi = np.log([5.0, 100.0, 10.0]), np.log([150.0, 8000.0, 5000.0])
    if not np.all(np.isfinite(sol.x)) or np.any(sol.x < lo) or np.any(sol.x > hi):
        return cen
    pd_, t1_, t2_ = np.exp(sol.x)
    new = {t: dict(v) for t, v in cen.items()}
    new["CSF"].update(
        pd_pu=float(pd_), t1_ms=float(t1_), t2_ms=float(t2_), n_voxels=float(rows.size)
    )
    return new


def _nelder_mead(cost, x0: np.ndarray, n_voxels: int) -> optimize.OptimizeResult:
    """Nelder-Mead in (log PD, log T1, log T2) from ``x0`` (15 % initial steps)."""
    return optimize.minimize(
        cost,
        x0,
        method="Nelder-Mead",
        options={
            "xatol": 2e-3,
            "fatol": 1e-3 * n_voxels,
            "initial_simplex": x0 + 0.15 * np.vstack([np.zeros(3), np.eye(3)]),
        },
    )


def _smooth_b1(
    b1_found: np.ndarray,
    rows: np.ndarray,
    sel: np.ndarray,
    b1_map: np.ndarray,
    voxel_size_mm: tuple[float, float, float],
) -> np.ndarray:
    """B1 at the voxels of ``sel`` (``[n]``) from per-voxel searched values at ``rows`` of
    ``sel``: in-plane normalized Gaussian smoothing (sigma ``_B1_SMOOTH_SIGMA_MM``) over
    the bounding box of ``sel``; voxels out of reach keep ``b1_map``."""
    nz = np.nonzero(sel)
    lo = [int(a.min()) for a in nz]
    box = tuple(slice(a, int(b.max()) + 1) for a, b in zip(lo, nz, strict=True))
    box_shape = tuple(b.stop - b.start for b in box)
    # num / den only on the box (the filters never see the rest of the grid)
    at = tuple(a[rows] - o for a, o in zip(nz, lo, strict=True))
    num = np.zeros(box_shape)
    den = np.zeros(box_shape)
    num[at] = b1_found
    den[at] = 1.0
    sig = (0.0, _B1_SMOOTH_SIGMA_MM / voxel_size_mm[1], _B1_SMOOTH_SIGMA_MM / voxel_size_mm[2])
    # the two filters release the GIL: one on a second thread (the same values)
    num_b, den_b = both(
        lambda: ndimage.gaussian_filter(num, sig, mode="constant", truncate=3.0),
        lambda: ndimage.gaussian_filter(den, sig, mode="constant", truncate=3.0),
        concurrent=sel.size <= CONCURRENT_MAX_VOXELS,
    )
    ok = den_b > 1e-3 * den_b.max()
    in_box = sel[box]
    b1_box = b1_map[box][in_box]
    ok_sel = ok[in_box]
    return np.where(ok_sel, num_b[in_box] / np.where(ok_sel, den_b[in_box], 1.0), b1_box)


def measured_t1_ms(fractions: TissueFractions) -> dict[str, float]:
    """The series' own WM, GM and CSF T1 (ms) used by the segmentation, e.g. for the
    per-patient DIR timing (processing.synthesis)."""
    return {t: float(fractions.centres[t]["t1_ms"]) for t in ("WM", "GM", "CSF")}
