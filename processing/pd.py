"""Proton density in percent units: receive-field correction (physics.md section 2).

The fit gives ``M0 = C(r) * PD``, with C the (unknown, smooth) receive field. In brain
tissue PD follows R1 (Fatouros et al. 1991; used by Warntjes et al. MRM 2008):

    1/PD_rel = a + b * R1          (PD_rel = PD / 100, R1 in 1/s, b in s)

so in tissue voxels ``M0 / PD_pred(R1)`` samples C(r). A low-order 3-D polynomial of
log C is fitted robustly (iteratively reweighted least squares, Tukey biweight), which
absorbs voxels that break the relation (lesions, partial volume). Then ``PD = M0 / C`` and
the global scale is fixed by pure CSF: the median PD of voxels with R1 < 0.3 /s and
T2 > 1000 ms is 100.
Because of that final rescale, a and b only need the right *shape* (ratio of tissue PDs)
to within a few percent; a bias of the relation that is the same everywhere cancels.

Two ways to use the relation (``relation=``):
    "fit" (default): log PD(R1) in tissue is learned as a quadratic in R1 *jointly* with the
    field, from the series itself. This needs no constants and stays right when a patient's
    or site's tissue PDs do not follow a, b: on the phantom with WM/GM PD 60/88 pu (T1 800/
    1300 ms) "fixed" is off by up to 4.6 pu in GM while "fit" stays within 0.3 pu (median).
    The field and the R1 dependence separate because WM and GM interleave at a scale no
    low-order polynomial can follow.
    "fixed": the physics.md recipe, PD_pred(R1) from a, b.

Constants (3T):
    a = 0.918, b = 0.332 s: the line through the mid-range 3T MDME WM (R1 1.667 /s, PD 68 pu)
    and cortical GM (R1 0.909 /s, PD 82 pu) values of physics.md section 6. It predicts CSF
    (R1 0.233 /s) at 100.4 pu and an MS lesion (R1 0.83 /s) at 84 pu, both inside the table's
    ranges. The 1.5T constants (a = 0.935, b = 0.341 s) are [L, unverified]; at 3T R1 of
    tissue is lower (longer T1) while PD is unchanged, which lowers b/a slightly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from processing import fit as fit_mod
from processing.acquisition import Acquisition
from processing.results import QuantMaps

__all__ = [
    "PD_A_3T",
    "PD_B_3T_S",
    "PDCorrectionError",
    "ReceiveFieldFit",
    "correct_pd",
    "estimate_receive_field",
    "pd_from_r1",
]

#: Intercept of 1/PD_rel = a + b*R1 at 3T (dimensionless; see module docstring).
PD_A_3T: float = 0.918
#: Slope of 1/PD_rel = a + b*R1 at 3T, seconds (R1 in 1/s).
PD_B_3T_S: float = 0.332
#: Tissue voxels used to estimate C(r): 0.5 < R1 < 2.5 /s (physics.md section 2).
TISSUE_R1_RANGE_PER_S: tuple[float, float] = (0.5, 2.5)
#: Pure CSF for the 100 pu reference: R1 < 0.3 /s (CSF T1 ~4300 ms -> 0.23 /s).
CSF_R1_MAX_PER_S: float = 0.3
#: Pure CSF also needs T2 > 1000 ms: a CSF voxel with 10-15 % tissue still fits R1 < 0.3 /s
#: (CSF dominates the long delays) but with 5-10 % less M0; its apparent T2 collapses to
#: ~650 ms (the tissue's signal is gone at TE 100), pure CSF fits to >= 1000 ms even at SNR
#: 50. Measured on a 4x64x64 phantom: tissue PD bias +5.1 % (R1 only) -> +1.5 % at SNR 200.
CSF_T2_MIN_MS: float = 1000.0
#: Fewest pure-CSF voxels to trust their median; else the relation's absolute scale is kept.
MIN_CSF_VOXELS: int = 20
#: Tukey biweight tuning constant (95 % efficiency under Gaussian residuals).
_TUKEY_C = 4.685


class PDCorrectionError(ValueError):
    """The maps do not allow a receive-field estimate (the message says why)."""


@dataclass(frozen=True)
class ReceiveFieldFit:
    """Result of :func:`estimate_receive_field`.

    field: C(r), float32 ``[z, y, x]`` in M0 units per pu (so ``PD = M0 / field``), over the
    whole grid. order: polynomial order used. coefficients: of the normalized monomials.
    csf_scale: factor the global scale (CSF, or the relation without CSF) applied to PD.
    n_tissue / n_csf: voxels used. csf_reference: whether the median pure-CSF PD set 100 pu.
    a, b_s: the tissue-relation constants used.
    """

    field: np.ndarray
    order: int
    coefficients: np.ndarray
    csf_scale: float
    n_tissue: int
    n_csf: int
    csf_reference: bool
    a: float
    b_s: float


def pd_from_r1(
    r1_per_s: np.ndarray | float, a: float = PD_A_3T, b_s: float = PD_B_3T_S
) -> np.ndarray:
    """PD in pu predicted by the tissue relation ``1/PD_rel = a + b*R1`` (R1 in 1/s)."""
    return 100.0 / (a + b_s * np.asarray(r1_per_s, dtype=np.float64))


def _exponents(order: int, z_order: int) -> list[tuple[int, int, int]]:
    """Monomial exponents (ix, iy, iz) with total degree <= order and iz <= z_order."""
    return [
        (i, j, k)
        for k in range(min(order, z_order) + 1)
        for j in range(order + 1 - k)
        for i in range(order + 1 - k - j)
    ]


def _axes(
    shape: tuple[int, int, int], voxel_size_mm: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred physical coordinates per axis, divided by a common half-extent (so |u| <= 1)."""
    c = [
        (np.arange(n) - (n - 1) / 2.0) * float(v) for n, v in zip(shape, voxel_size_mm, strict=True)
    ]
    half = max(max(float(np.abs(a).max()) for a in c), 1e-9)
    return c[2] / half, c[1] / half, c[0] / half  # x, y, z


#: In-plane 4-neighbourhood (slices are thick: do not erode across them).
_INPLANE_CROSS = np.zeros((3, 3, 3), bool)
_INPLANE_CROSS[1, 1, :] = _INPLANE_CROSS[1, :, 1] = True


def estimate_receive_field(
    maps: QuantMaps,
    *,
    a: float = PD_A_3T,
    b_s: float = PD_B_3T_S,
    tissue_r1_range_per_s: tuple[float, float] = TISSUE_R1_RANGE_PER_S,
    csf_r1_max_per_s: float = CSF_R1_MAX_PER_S,
    csf_t2_min_ms: float = CSF_T2_MIN_MS,
    order: int = 3,
    voxel_size_mm: tuple[float, float, float] | None = None,
    relation: str = "fit",
    iterations: int = 12,
    max_samples: int = 100_000,
) -> ReceiveFieldFit:
    """Estimate the receive field C(r) from ``maps.m0`` and ``maps.t1_ms``.

    Parameters
    ----------
    maps:
        fitted maps; uses ``m0``, ``t1_ms``, ``mask`` and ``failed``.
    a, b_s:
        tissue relation ``1/PD_rel = a + b*R1`` (b in s).
    tissue_r1_range_per_s:
        voxels whose R1 (1/s) lies in this open interval sample C.
    csf_r1_max_per_s, csf_t2_min_ms:
        voxels with R1 below this and T2 above that are pure CSF; their median PD is set
        to 100 pu (without enough long-T2 voxels, R1 alone selects them).
    order:
        total degree of the polynomial in (x, y, z); the z degree is also capped at
        ``n_slices - 1``, and the order is lowered when there are fewer than 20 voxels
        per coefficient.
    voxel_size_mm:
        ``(z, y, x)`` spacing so the polynomial lives in physical space (pass
        ``acq.voxel_size_mm``); None treats voxels as isotropic.
    relation:
        ``"fixed"``: PD(R1) in tissue follows ``a + b*R1`` (physics.md recipe).
        ``"fit"``: learn log PD(R1) as a quadratic in R1 jointly with the field, from the
        series itself (robust when the tissue PDs do not follow a, b; a and b then only
        set the scale when no pure CSF is present).
    iterations:
        IRLS iterations (Tukey biweight on the log residuals).
    max_samples:
        tissue voxels used at most (an even stride through them), for speed.
    """
    # Whole-grid arrays stay in their own dtype (float32): float64 only for the voxels
    # used, converted exactly, so the same values as converting first (40 x 512 x 512:
    # each whole-grid float64 copy is 80 MiB of the worker's peak).
    m0 = np.asarray(maps.m0)
    shape = m0.shape
    if m0.ndim != 3:
        raise PDCorrectionError(f"maps.m0: expected a [z, y, x] array, got shape {shape}")
    if not (a > 0 and b_s >= 0):
        raise PDCorrectionError(f"a, b_s: expected a > 0 and b >= 0, got a={a}, b={b_s}")
    if order < 0:
        raise PDCorrectionError(f"order: must be >= 0, got {order}")
    if relation not in ("fixed", "fit"):
        raise PDCorrectionError(f"relation: expected 'fixed' or 'fit', got {relation!r}")
    vs = (1.0, 1.0, 1.0) if voxel_size_mm is None else tuple(float(v) for v in voxel_size_mm)
    valid = np.asarray(maps.mask, bool) & ~np.asarray(maps.failed, bool)
    t1 = np.asarray(maps.t1_ms)
    valid &= np.isfinite(m0) & (m0 > 0) & np.isfinite(t1) & (t1 > 0)
    v_idx = np.flatnonzero(valid)  # R1 is needed on the valid voxels only
    r1_v = 1000.0 / t1.ravel()[v_idx].astype(np.float64)
    lo, hi = tissue_r1_range_per_s
    pos = np.flatnonzero((r1_v > lo) & (r1_v < hi))  # tissue voxels, as positions in v_idx
    n_tissue = int(pos.size)
    if n_tissue < 10:
        raise PDCorrectionError(
            f"only {n_tissue} tissue voxels with {lo} < R1 < {hi} /s in the mask: cannot estimate "
            "the receive field (is the mask empty, or are T1 values not in ms?)"
        )
    if pos.size > max_samples:
        pos = pos[:: -(-pos.size // max_samples)]
    idx = v_idx[pos]
    r1_s = r1_v[pos]
    m0_s = m0.ravel()[idx].astype(np.float64)
    if relation == "fixed":
        y_obs = np.log(m0_s) - np.log(pd_from_r1(r1_s, a, b_s))
    else:
        y_obs = np.log(m0_s)

    ux, uy, uz = _axes(shape, vs)
    kk, jj, ii = np.unravel_index(idx, shape)
    z_order = shape[0] - 1
    while order > 0 and len(_exponents(order, z_order)) * 20 > idx.size:
        order -= 1
    exps = _exponents(order, z_order)
    design = np.stack([ux[ii] ** p * uy[jj] ** q * uz[kk] ** r for p, q, r in exps], axis=1)
    n_spatial = len(exps)
    if relation == "fit":
        # log PD(R1) = c1*v + c2*v^2 (+ the constant in the spatial part), v centred R1
        v = (r1_s - 0.5 * (lo + hi)) / (0.5 * (hi - lo))
        design = np.concatenate([design, v[:, None], (v * v)[:, None]], axis=1)
    scale = np.maximum(np.sqrt(np.mean(design**2, axis=0)), 1e-12)  # conditioning
    design = design / scale

    coef = _irls(design, y_obs, iterations)
    coef = coef / scale
    coef = coef[:n_spatial]

    field = _log_field(coef, exps, shape, ux, uy, uz)
    np.exp(field, out=field)

    csf = v_idx[r1_v < csf_r1_max_per_s]  # flat indices, in C order
    t2 = np.asarray(maps.t2_ms).ravel()[csf].astype(np.float64)
    csf_long = csf[t2 > csf_t2_min_ms]
    if csf_long.size >= MIN_CSF_VOXELS:
        csf = csf_long
    n_csf = int(csf.size)
    use_csf = n_csf >= MIN_CSF_VOXELS
    ref = csf if use_csf else idx
    csf_scale = _pd_scale(
        m0.ravel()[ref].astype(np.float64), field.ravel()[ref], use_csf, r1_s, a, b_s
    )
    field /= csf_scale
    return ReceiveFieldFit(
        field=field.astype(np.float32),
        order=order,
        coefficients=coef,
        csf_scale=csf_scale,
        n_tissue=n_tissue,
        n_csf=n_csf,
        csf_reference=use_csf,
        a=float(a),
        b_s=float(b_s),
    )


def _irls(design: np.ndarray, y_obs: np.ndarray, iterations: int) -> np.ndarray:
    """Least squares of ``design @ coef = y_obs``, iteratively reweighted with Tukey's
    biweight on the residuals (robust to lesions, vessels and partial volume)."""
    w = np.ones(design.shape[0])
    coef = np.zeros(design.shape[1])
    for _ in range(max(1, iterations)):
        # weighted normal equations: ~20 columns of unit RMS, well conditioned, and 10x
        # faster than an SVD of the tall matrix; lstsq if they are singular
        xtw = design.T * w
        try:
            coef = np.linalg.solve(xtw @ design, xtw @ y_obs)
        except np.linalg.LinAlgError:
            sw = np.sqrt(w)
            coef = np.linalg.lstsq(design * sw[:, None], y_obs * sw, rcond=None)[0]
        res = y_obs - design @ coef
        mad = 1.4826 * float(np.median(np.abs(res - np.median(res))))
        if mad < 1e-9:  # exact data: nothing to reweight
            break
        u = res / (_TUKEY_C * mad)
        w_new = np.where(np.abs(u) < 1.0, (1.0 - u * u) ** 2, 0.0)
        if np.max(np.abs(w_new - w)) < 1e-4:
            break
        w = w_new
    return coef


def _log_field(
    coef: np.ndarray,
    exps: list[tuple[int, int, int]],
    shape: tuple[int, ...],
    ux: np.ndarray,
    uy: np.ndarray,
    uz: np.ndarray,
) -> np.ndarray:
    """log C(r) on the [z, y, x] grid from the polynomial coefficients."""
    # separable evaluation: one (y, x) plane per z power, then combined along z
    planes: dict[int, np.ndarray] = {}
    for c, (p, q, r) in zip(coef, exps, strict=True):
        plane = planes.setdefault(r, np.zeros(shape[1:], dtype=np.float64))
        plane += c * np.outer(uy**q, ux**p)
    log_c = np.zeros(shape, dtype=np.float64)
    for r, plane in planes.items():
        log_c += (uz**r)[:, None, None] * plane[None]
    return log_c


def _pd_scale(
    m0: np.ndarray,
    field: np.ndarray,
    csf: bool,
    r1_s: np.ndarray,
    a: float,
    b_s: float,
) -> float:
    """The factor that makes pure CSF 100 pu (``csf``: ``m0`` and ``field`` are at its
    voxels), or, without pure CSF, keeps the tissue relation's absolute scale (``m0``,
    ``field`` and ``r1_s`` at the sampled tissue voxels); 1 when the reference is not
    positive."""
    pd_ref = np.median(m0 / field)
    if csf:
        # All of R1 < 0.3 /s (the recipe). Keeping only the lowest-R1 half would remove
        # partial-volume voxels, but in noisy fits M0 and R1 errors of CSF are correlated
        # (a longer T1 extrapolates a larger M0), so that selection biases PD by ~-5 % at
        # SNR 50; the whole set is off by only +0.4 % (truth) to +2 % (fits) instead.
        scale_to = 100.0
    else:
        # no pure CSF: keep the tissue relation's absolute scale
        scale_to = float(np.median(pd_from_r1(r1_s, a, b_s)))
    if pd_ref > 0:
        return scale_to / float(pd_ref)
    return 1.0


def correct_pd(
    maps: QuantMaps,
    *,
    acq: Acquisition | None = None,
    a: float = PD_A_3T,
    b_s: float = PD_B_3T_S,
    tissue_r1_range_per_s: tuple[float, float] = TISSUE_R1_RANGE_PER_S,
    csf_r1_max_per_s: float = CSF_R1_MAX_PER_S,
    csf_t2_min_ms: float = CSF_T2_MIN_MS,
    order: int = 3,
    voxel_size_mm: tuple[float, float, float] | None = None,
    relation: str = "fit",
) -> QuantMaps:
    """Return new QuantMaps with ``pd_pu = M0 / C`` (percent units) and ``receive_field = C``.

    See :func:`estimate_receive_field` for the parameters. PD is 0 outside ``mask`` and
    clipped to [0, 200] pu (values beyond come only from failed fits or non-brain voxels).
    The input is not modified.
    """
    fit = estimate_receive_field(
        maps,
        a=a,
        b_s=b_s,
        tissue_r1_range_per_s=tissue_r1_range_per_s,
        csf_r1_max_per_s=csf_r1_max_per_s,
        csf_t2_min_ms=csf_t2_min_ms,
        order=order,
        voxel_size_mm=voxel_size_mm,
        relation=relation,
    )
    field = fit.field
    if acq is not None and fit.csf_reference:
        ref = pooled_csf_pd(acq, maps, field, csf_r1_max_per_s, csf_t2_min_ms)
        if ref is not None:
            field = field * (ref / 100.0)
    # PD on the mask's finite voxels only (0 elsewhere), in float64 there: the same values
    # as whole-grid float64 temporaries, without them
    m0 = np.asarray(maps.m0)
    sel = np.flatnonzero(np.asarray(maps.mask, bool) & np.isfinite(m0))
    pd = np.zeros(m0.shape, np.float32)
    pd.ravel()[sel] = np.clip(m0.ravel()[sel].astype(np.float64) / field.ravel()[sel], 0.0, 200.0)
    return dataclasses.replace(maps, pd_pu=pd, receive_field=field.astype(np.float32))


def pooled_csf_pd(
    acq: Acquisition,
    maps: QuantMaps,
    field: np.ndarray,
    csf_r1_max_per_s: float = CSF_R1_MAX_PER_S,
    csf_t2_min_ms: float = CSF_T2_MIN_MS,
) -> float | None:
    """PD (in the units of ``M0 / field``) of interior CSF from one fit of pooled samples.

    Why: a single CSF voxel at clinical SNR fits M0 with a bias of a few percent (its T1
    is poorly determined and correlated with M0: Cramér–Rao ~12-20 % at SNR 50), and
    border voxels hold some tissue. Averaging the field-corrected raw samples of interior
    CSF (the R1/T2 region, denoised, eroded by one voxel in-plane) gives one high-SNR
    sample vector whose fit is nearly unbiased. Returns None when too few voxels.
    """
    mask = np.asarray(maps.mask, bool)
    m_idx = np.flatnonzero(mask)  # R1 on the mask's voxels only (no whole-grid float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r1 = 1000.0 / np.asarray(maps.t1_ms).ravel()[m_idx].astype(np.float64)
    region = np.zeros(mask.shape, bool)
    region.ravel()[m_idx] = r1 < csf_r1_max_per_s
    region &= np.asarray(maps.t2_ms) > csf_t2_min_ms
    smooth = ndimage.gaussian_filter(region.astype(np.float32), (0.0, 1.0, 1.0)) > 0.6
    core = ndimage.binary_erosion(smooth, structure=_INPLANE_CROSS) & region
    if int(core.sum()) < MIN_CSF_VOXELS:
        core = region
    n = int(core.sum())
    if n < MIN_CSF_VOXELS:
        return None
    sig = acq.signal  # [z, d, e, y, x]
    zz, yy, xx = np.nonzero(core)
    samples = sig[zz, :, :, yy, xx].astype(np.float64) / field[zz, yy, xx][:, None, None]
    pooled = samples.mean(axis=0)[None, :, :, None, None].astype(np.float32)
    if acq.is_magnitude:
        pooled = np.abs(pooled)
    one = Acquisition(
        signal=pooled,
        delays_ms=acq.delays_ms,
        echo_times_ms=acq.echo_times_ms,
        tr_ms=acq.tr_ms,
        saturation_deg=acq.saturation_deg,
        excitation_deg=acq.excitation_deg,
        voxel_size_mm=acq.voxel_size_mm,
        affine=acq.affine,
        is_magnitude=acq.is_magnitude,
    )
    noise = maps.noise_sd if np.isfinite(maps.noise_sd) and maps.noise_sd > 0 else 1.0
    fitted = fit_mod.fit_mdme(one, mask=np.ones((1, 1, 1), bool), noise_sd=noise / np.sqrt(n))
    ref = float(fitted.m0[0, 0, 0])
    return ref if np.isfinite(ref) and ref > 0 and not bool(fitted.failed[0, 0, 0]) else None
