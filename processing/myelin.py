"""Myelin partial volume (MyPV) and excess parenchymal water (EPW), after Warntjes 2016.

Model (physics.md section 4). Every voxel is a mixture of four partial-volume compartments:

* myelin (MyPV): the myelin sheath with its myelin water;
* cellular (CePV): intra/extracellular water of the remaining tissue;
* free water (FWPV): CSF-like water;
* excess parenchymal water (EPWPV): free water *inside the parenchyma* (oedema and the
  like). It has the relaxation properties of free water, so it is told apart from CSF by
  location, not by relaxation: ``EPW = max(FW - CSF fraction, 0)`` when the segmentation's
  CSF fraction is given, otherwise the free water of voxels whose FW is at most
  ``MyelinConstants.epw_max_fw`` (parenchymal voxels).

Myelin water exchanges with cellular water: within the tissue pool (myelin + cellular)
relaxation *rates* are averaged, weighted by water content (fast-exchange limit; the
effective myelin constants absorb the real, intermediate exchange). Free water does not
exchange: its *signal* adds. Mixtures are simulated through the actual acquisition
(processing.signal, the same equations as the fit) at B1 0.5-1.5 (step 0.1) and fitted
mono-exponentially with that B1 fixed (as after the fit's B1 smoothing), which gives a
lookup grid (B1, MyPV, FWPV) -> apparent (R1, R2, PD). Each voxel's measured (R1, R2, PD)
is mapped back, at its fitted B1, by weighted least squares on that grid (coarse search,
then Gauss-Newton on the interpolant, in numba). The grid spans MyPV 0..60 % and FWPV 0..100 %, so children
(little myelin) and oedema are inside it: nothing adult-only is hard-wired.

Constants. The compartment constants of Warntjes 2016 are not public (physics.md marks them
[U]). The effective constants here are *calibrated* (:func:`calibrate_constants`) so that
the 3T literature reference tissues of physics.md section 6 reproduce the published targets:
WM (T1 600 ms, T2 70 ms, PD 67 pu) -> MyPV 30 % (Warntjes, ISMRM 2011 #536) and cortical
GM (T1 1100 ms, T2 90 ms, PD 82 pu) -> MyPV 10 %, the middle of the 5-15 % reported for
adult cortex with this model (the range issue 13 states; Warntjes et al., Front Neurol
2016;7:16 show cortex at a third or less of WM). The GM anchor was 6 % until issue 13: MyPV
falls ~2.3 pu per 100 ms of GM T1, so any cortex a little slower than the anchor (T1 1150-
1300 ms, inside physics.md's 950-1300 ms) came out at 0-5 %; at 10 % the physics.md GM range
maps to ~5-14.5 %. The price: the whole-brain myelin share of the phantoms is ~17-19 % of
BPV, above the 13.7 % (157 of 1148 mL) of Warntjes 2016's controls, whose WM MyPV is lowered
by partial volume the pure-tissue phantom does not have. Free water is CSF: T1 4300 ms,
T2 2000 ms, PD 100 pu. See :class:`MyelinConstants` for every value.

Measured (benchmarks/myelin_tissues.py). Pure tissue, no fit: across physics.md section 6's
adult 3T MDME ranges WM maps to MyPV 26.8-34.4 % (25-32 % for WM T1 600-650 ms; a WM at
550 ms reads as more myelinated, 32.5-34.4 %) and cortical GM to 3.2-15 % (4.2-14.8 % with PD
on the PD-R1 relation). Phantoms 6x128x128, SNR 50, fit + PD + segmentation, MNI and
ellipsoid anatomy, real and magnitude: pure WM 28-29 % for WM T1 600-640 ms, pure GM
5.8-14.5 % for GM T1 980-1280 ms, CSF 0 %. Model voxels with MyPV 0-35 % and free water
0-30 % inside pure tissue, through the real fit at B1 0.85-1.15, come back within 0.1 pu;
in a slice made only of mixtures (no pure tissue to anchor the fit's B1 smoothing) within
~2-2.6 pu.

Tissue outside the calibration (issue 13's "off-centre" set, WM 750/60/70, GM
1350/100/84). In this model myelin raises R1 and R2 and lowers PD. Both T1 are ~25 %
longer than the references while PD barely moves; R1 carries the most weight, so the model
reads less myelin: WM ~22-23 %, GM ~5 %. That is the right answer of the model *if* these
are MDME T1 (immature or diffusely demyelinated tissue); it is the wrong one if the T1
scale of the scanner/sequence differs (inversion-recovery T1 of WM is ~800-850 ms), and
WM's R2 (60 ms: more myelin) disagrees with its R1 (less). The constants cannot tell
these apart, so nothing is re-tuned: :func:`myelin_maps` checks the medians of the
segmentation's pure WM and GM against :data:`CALIBRATION_DOMAIN` and returns
``calibration_warnings`` (processing.run copies them into the series warnings) instead of
presenting the numbers as calibrated.

Whole-brain share: the phantoms give myelin 17-19 % of BPV against 13.7 % in Warntjes
2016's controls. With WM at ~29 % and cortex at ~10 %, the share is set by the WM:GM
volume ratio and by partial volume; the phantom slab through the ventricles holds more WM
than a whole brain, and real WM MyPV maps include partial-volume and NON voxels the
phantoms do not have. The share is reported, not calibrated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache

import numba as nb
import numpy as np

from processing.acquisition import Acquisition
from processing.results import MyelinMaps, QuantMaps, TissueFractions
from processing.signal import t1_factor

__all__ = [
    "CALIBRATION_DOMAIN",
    "DEFAULT_CONSTANTS",
    "MyelinConstants",
    "MyelinError",
    "apparent_parameters",
    "calibrate_constants",
    "calibration_warnings",
    "fit_mono",
    "invert",
    "myelin_maps",
    "simulate_compartments",
]


class MyelinError(ValueError):
    """Invalid input to the myelin model; the message names the problem."""


@dataclass(frozen=True)
class MyelinConstants:
    """Compartment constants (effective, 3T). Rates in 1/s, PD as a fraction of pure water.

    pd_my, r1_my, r2_my: myelin compartment: water visible per unit myelin volume and the
        relaxation rates its water lends the tissue pool by exchange (calibrated).
    pd_ce, r1_ce, r2_ce: cellular compartment (calibrated).
    pd_fw, r1_fw, r2_fw: free water (CSF: T1 4300 ms, T2 2000 ms, PD 1).
    epw_max_fw: without a segmentation, voxels with free water up to this fraction count as
        parenchyma and their free water as EPW (CSF partial volumes above it do not).
    mypv_max: upper edge of the lookup grid (fraction).
    sigma_log_r1, sigma_log_r2, sigma_pd: measurement scales weighting the inversion
        (relative R1, relative R2, PD as a fraction); ~2-3x the in-vivo repeatability.
    """

    pd_my: float
    r1_my: float
    r2_my: float
    pd_ce: float
    r1_ce: float
    r2_ce: float
    pd_fw: float = 1.0
    r1_fw: float = 1000.0 / 4300.0
    r2_fw: float = 1000.0 / 2000.0
    epw_max_fw: float = 0.5
    mypv_max: float = 0.6
    sigma_log_r1: float = 0.03
    sigma_log_r2: float = 0.05
    sigma_pd: float = 0.02

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def calibrate_constants(
    wm: tuple[float, float, float] = (600.0, 70.0, 67.0),
    gm: tuple[float, float, float] = (1100.0, 90.0, 82.0),
    wm_mypv: float = 0.30,
    gm_mypv: float = 0.10,
) -> MyelinConstants:
    """Solve the effective myelin/cellular constants from two reference tissues.

    ``wm``/``gm`` are (T1 ms, T2 ms, PD pu) of pure tissue, ``*_mypv`` their myelin
    fraction. A pure tissue f*myelin + (1-f)*cellular has PD = f*pd_my + (1-f)*pd_ce and
    water-weighted rates R = (a_my*R_my + a_ce*R_ce) / (a_my + a_ce), a = fraction*PD: two
    tissues give two linear equations per quantity.
    """
    if not 0 <= gm_mypv < wm_mypv < 1:
        raise MyelinError(
            f"calibrate_constants: need 0 <= gm_mypv < wm_mypv < 1, got {gm_mypv}, {wm_mypv}"
        )
    (t1w, t2w, pdw), (t1g, t2g, pdg) = wm, gm
    fw_, fg_ = wm_mypv, gm_mypv
    a = np.array([[fw_, 1 - fw_], [fg_, 1 - fg_]])
    pd_my, pd_ce = np.linalg.solve(a, [pdw / 100.0, pdg / 100.0])
    if pd_my <= 0 or pd_ce <= 0:
        raise MyelinError(
            f"calibrate_constants: reference tissues give non-positive PD ({pd_my}, {pd_ce})"
        )
    w = np.array([[fw_ * pd_my, (1 - fw_) * pd_ce], [fg_ * pd_my, (1 - fg_) * pd_ce]])
    tot = w.sum(axis=1)
    r1_my, r1_ce = np.linalg.solve(w, tot * np.array([1000.0 / t1w, 1000.0 / t1g]))
    r2_my, r2_ce = np.linalg.solve(w, tot * np.array([1000.0 / t2w, 1000.0 / t2g]))
    if min(r1_my, r1_ce, r2_my, r2_ce) <= 0:
        raise MyelinError("calibrate_constants: reference tissues give non-positive rates")
    return MyelinConstants(
        pd_my=float(pd_my),
        r1_my=float(r1_my),
        r2_my=float(r2_my),
        pd_ce=float(pd_ce),
        r1_ce=float(r1_ce),
        r2_ce=float(r2_ce),
    )


#: Calibrated to WM 600/70/67 -> 30 % and GM 1100/90/82 -> 10 % (see module docstring).
DEFAULT_CONSTANTS: MyelinConstants = calibrate_constants()

#: The tissue values the constants represent: physics.md section 6's adult 3T MDME ranges
#: (compiled from Hagiwara et al. Invest Radiol 2019;54:39, Warntjes et al. MRM
#: 2008;60:320), per quantity (low, high) of the median of pure tissue. Inside them pure WM
#: maps to MyPV 26.8-34.4 % (29.6 % at the project's 600/70/68) and pure cortical GM to
#: 3.2-15 % (benchmarks/myelin_tissues.py prints the table). Outside, MyPV is an
#: extrapolation of constants calibrated on adult MDME values, and the series says so
#: (:func:`calibration_warnings`) instead of reporting it as if it were calibrated.
CALIBRATION_DOMAIN: dict[str, dict[str, tuple[float, float]]] = {
    "WM": {"t1_ms": (550.0, 650.0), "t2_ms": (60.0, 75.0), "pd_pu": (62.0, 70.0)},
    "GM": {"t1_ms": (950.0, 1300.0), "t2_ms": (80.0, 100.0), "pd_pu": (78.0, 88.0)},
}
#: Relative slack on each edge of the domain: the highest between-scanner CV of 3T MDME
#: volunteers (Hagiwara et al. 2019, physics.md section 6): T1 3.15 %, T2 5.76 %, PD 3.21 %.
#: A calibrated scanner may read that far from another; the measured PD also carries the
#: receive-field correction's ~1-2 pu (processing.pd), which tripped the bare edges.
CALIBRATION_SLACK: dict[str, float] = {"t1_ms": 0.0315, "t2_ms": 0.0576, "pd_pu": 0.0321}
#: Segmentation fraction from which a voxel counts as pure tissue for that check.
_PURE_FOR_CHECK = 0.9
_MIN_PURE_VOXELS = 50


def calibration_warnings(
    maps: QuantMaps, fractions: TissueFractions | Mapping[str, np.ndarray]
) -> list[str]:
    """Why the series' pure WM / GM lie outside :data:`CALIBRATION_DOMAIN`, widened by
    :data:`CALIBRATION_SLACK` on each edge (empty: inside).

    Pure tissue: segmentation fraction >= 0.9, fitted and not failed; medians of T1, T2 and
    PD per tissue (at least 50 voxels, else that tissue is not checked). A cluster outside
    the domain is either tissue the adult calibration does not describe (immature or
    diffusely diseased brain) or a scanner/sequence whose T1/T2/PD scale differs from MDME
    (e.g. T1 ~25 % longer, as inversion-recovery T1 is): in both cases the MyPV numbers are
    not calibrated, which the warning says.
    """
    fr = fractions.fractions if isinstance(fractions, TissueFractions) else fractions
    ok = np.asarray(maps.mask, bool) & ~np.asarray(maps.failed, bool)
    out = []
    for tissue, limits in CALIBRATION_DOMAIN.items():
        if tissue not in fr:
            continue
        pure = ok & (np.asarray(fr[tissue]) >= _PURE_FOR_CHECK)
        if int(pure.sum()) < _MIN_PURE_VOXELS:
            continue
        for q, (lo, hi) in limits.items():
            med = float(np.median(np.asarray(getattr(maps, q))[pure]))
            slack = CALIBRATION_SLACK[q]
            if not lo * (1 - slack) <= med <= hi * (1 + slack):
                out.append(
                    f"pure {tissue} {q} median {med:.1f} outside the calibrated {lo:.0f}-{hi:.0f}"
                    f" (+-{100 * slack:.1f} %)"
                )
    if out:
        out.append(
            "MyPV is extrapolated from constants calibrated on adult 3T MDME tissue values "
            "(physics.md section 6); not a calibrated myelin measure for this series"
        )
    return out


# --------------------------------------------------------------------------------------
# Forward simulation and the mono-exponential fit (numba)
# --------------------------------------------------------------------------------------

_NO_PROFILE_S = np.array([1.0])
_NO_PROFILE_W = np.array([1.0])


@nb.njit(cache=True)
def _mix_signal(my, fw, cst, td, te, tr, theta, alpha, b1, out):
    """Samples of a (myelin my, free water fw, cellular 1-my-fw) voxel. cst: see _cst_array."""
    ce = 1.0 - my - fw
    a_my = my * cst[0]
    a_ce = ce * cst[3]
    a_t = a_my + a_ce
    w_my = 0.0
    if a_t > 1e-12:
        w_my = a_my / a_t
    r1t = (w_my * cst[1] + (1.0 - w_my) * cst[4]) * 1e-3
    r2t = (w_my * cst[2] + (1.0 - w_my) * cst[5]) * 1e-3
    a_fw = fw * cst[6]
    r1f = cst[7] * 1e-3
    r2f = cst[8] * 1e-3
    ne = te.shape[0]
    for i in range(td.shape[0]):
        gt, _, _ = t1_factor(r1t, b1, td[i], tr, theta, alpha, _NO_PROFILE_S, _NO_PROFILE_W)
        gf, _, _ = t1_factor(r1f, b1, td[i], tr, theta, alpha, _NO_PROFILE_S, _NO_PROFILE_W)
        for j in range(ne):
            out[i * ne + j] = a_t * math.exp(-r2t * te[j]) * gt + a_fw * math.exp(-r2f * te[j]) * gf


@nb.njit(cache=True)
def _m0_projection(s, td, te, tr, theta, alpha, b1, r1, r2):
    """``(num, den)`` of the least-squares M0 of samples ``s`` for fixed R1, R2 (1/ms):
    M0 = num / den, and -num**2 / den is the cost with M0 eliminated."""
    ne = te.shape[0]
    num = 0.0
    den = 0.0
    for i in range(td.shape[0]):
        g, _, _ = t1_factor(r1, b1, td[i], tr, theta, alpha, _NO_PROFILE_S, _NO_PROFILE_W)
        for j in range(ne):
            hv = g * math.exp(-r2 * te[j])
            num += hv * s[i * ne + j]
            den += hv * hv
    return num, den


@nb.njit(cache=True)
def _fit_mono_one(s, td, te, tr, theta, alpha, b1, res):
    """Mono-exponential fit (M0, R1, R2) of samples s with B1 fixed. res <- (M0, R1/s, R2/s).

    Same equations as the MDME fit (processing.signal.t1_factor); bounds R1 0.05-10 /s,
    R2 0.3-100 /s. Start: R2 from the echo ratio, R1 from a log grid with M0 eliminated.
    """
    nd = td.shape[0]
    ne = te.shape[0]
    ns = nd * ne
    # R2 start from the first/last echo ratio summed over delays.
    s0 = 0.0
    s1 = 0.0
    for i in range(nd):
        s0 += abs(s[i * ne])
        s1 += abs(s[i * ne + ne - 1])
    r2 = 0.02
    if ne > 1 and s0 > 0 and s1 > 0:
        r2 = math.log(s0 / s1) / (te[ne - 1] - te[0])
    r2 = min(max(r2, 3e-4), 0.1)
    best = np.inf
    r1 = 1e-3
    for q in range(48):
        r1q = 5e-5 * math.exp(q * math.log(2e2) / 47.0)
        num, den = _m0_projection(s, td, te, tr, theta, alpha, b1, r1q, r2)
        cost = -num * num / den if den > 0 else 0.0
        if cost < best:
            best = cost
            r1 = r1q
    # Levenberg-Marquardt on (M0, R1, R2).
    p = np.empty(3)
    num, den = _m0_projection(s, td, te, tr, theta, alpha, b1, r1, r2)
    p[0] = num / den if den > 0 else 0.0
    p[1] = r1
    p[2] = r2
    lam = 1e-3
    jt = np.empty((ns, 3))
    rvec = np.empty(ns)

    def _eval(pp, jac, rr):
        c = 0.0
        for i in range(nd):
            g, gr, _ = t1_factor(pp[1], b1, td[i], tr, theta, alpha, _NO_PROFILE_S, _NO_PROFILE_W)
            for j in range(ne):
                e2 = math.exp(-pp[2] * te[j])
                k = i * ne + j
                m = pp[0] * e2 * g
                rr[k] = s[k] - m
                jac[k, 0] = e2 * g
                jac[k, 1] = pp[0] * e2 * gr
                jac[k, 2] = -te[j] * m
                c += rr[k] * rr[k]
        return c

    cost = _eval(p, jt, rvec)
    rel = 1.0
    jn = np.empty((ns, 3))
    rn = np.empty(ns)
    pn = np.empty(3)
    a = np.empty((3, 3))
    g3 = np.empty(3)
    for _ in range(60):
        for u in range(3):
            g3[u] = 0.0
            for k in range(ns):
                g3[u] += jt[k, u] * rvec[k]
            for w in range(3):
                acc = 0.0
                for k in range(ns):
                    acc += jt[k, u] * jt[k, w]
                a[u, w] = acc
        improved = False
        for _inner in range(10):
            m = a.copy()
            for u in range(3):
                m[u, u] *= 1.0 + lam
                m[u, u] += 1e-30
            d = np.linalg.solve(m, g3)
            pn[0] = p[0] + d[0]
            pn[1] = min(max(p[1] + d[1], 5e-5), 1e-2)
            pn[2] = min(max(p[2] + d[2], 3e-4), 0.1)
            cn = _eval(pn, jn, rn)
            if cn < cost:
                rel = (cost - cn) / (cost + 1e-300)
                p[:] = pn
                jt[:, :] = jn
                rvec[:] = rn
                cost = cn
                lam = max(lam * 0.3, 1e-9)
                improved = True
                break
            lam *= 10.0
        if not improved or rel < 1e-12:
            break
    res[0] = p[0]
    res[1] = p[1] * 1e3
    res[2] = p[2] * 1e3


# nogil: myelin runs on a thread beside synthesis + enhancement (processing.run)
@nb.njit(cache=True, parallel=True, nogil=True)
def _grid_kernel(b1_axis, my_axis, fw_axis, cst, td, te, tr, theta, alpha, out):
    """out[b, i, j] = apparent (log R1, log R2, PD) of mixture (my_axis[i], fw_axis[j])
    simulated at B1 = b1_axis[b] and fitted mono-exponentially with that B1 fixed."""
    ns = td.shape[0] * te.shape[0]
    nmy = my_axis.shape[0]
    for bi in nb.prange(b1_axis.shape[0] * nmy):
        b = bi // nmy
        i = bi % nmy
        s = np.empty(ns)
        res = np.empty(3)
        for j in range(fw_axis.shape[0]):
            _mix_signal(my_axis[i], fw_axis[j], cst, td, te, tr, theta, alpha, b1_axis[b], s)
            _fit_mono_one(s, td, te, tr, theta, alpha, b1_axis[b], res)
            out[b, i, j, 0] = math.log(res[1])
            out[b, i, j, 1] = math.log(res[2])
            out[b, i, j, 2] = res[0]


def _cst_array(c: MyelinConstants) -> np.ndarray:
    return np.array(
        [c.pd_my, c.r1_my, c.r2_my, c.pd_ce, c.r1_ce, c.r2_ce, c.pd_fw, c.r1_fw, c.r2_fw]
    )


@dataclass(frozen=True)
class _Seq:
    td: tuple[float, ...]
    te: tuple[float, ...]
    tr: float
    sat: float
    exc: float

    def arrays(self):
        return (
            np.asarray(self.td, np.float64),
            np.asarray(self.te, np.float64),
            float(self.tr),
            math.radians(self.sat),
            math.radians(self.exc),
        )


def _seq_from(
    acq: Acquisition | None,
    delays_ms,
    echo_times_ms,
    tr_ms,
    saturation_deg: float,
    excitation_deg: float,
) -> _Seq:
    if acq is not None:
        return _Seq(
            tuple(float(v) for v in acq.delays_ms),
            tuple(float(v) for v in acq.echo_times_ms),
            float(acq.tr_ms),
            float(acq.saturation_deg),
            float(acq.excitation_deg),
        )
    if delays_ms is None or echo_times_ms is None or tr_ms is None:
        raise MyelinError("myelin: give either acq or delays_ms, echo_times_ms and tr_ms")
    td = np.asarray(delays_ms, np.float64).ravel()
    te = np.asarray(echo_times_ms, np.float64).ravel()
    if td.size < 2 or not np.all(np.isfinite(td)) or np.any(td <= 0):
        raise MyelinError(f"delays_ms: need >= 2 positive delays, got {td.tolist()}")
    if te.size < 1 or not np.all(np.isfinite(te)) or np.any(te <= 0):
        raise MyelinError(f"echo_times_ms: need >= 1 positive echo time, got {te.tolist()}")
    if not math.isfinite(float(tr_ms)) or float(tr_ms) <= td.max():
        raise MyelinError(f"tr_ms: must exceed the longest delay {td.max()}, got {tr_ms}")
    return _Seq(
        tuple(td.tolist()),
        tuple(te.tolist()),
        float(tr_ms),
        float(saturation_deg),
        float(excitation_deg),
    )


def simulate_compartments(
    mypv,
    fwpv,
    *,
    delays_ms,
    echo_times_ms,
    tr_ms: float,
    saturation_deg: float = 120.0,
    excitation_deg: float = 90.0,
    b1: float = 1.0,
    constants: MyelinConstants = DEFAULT_CONSTANTS,
) -> np.ndarray:
    """MDME samples (delay-major, PD-fraction units: pure water M0 = 1) of model voxels.

    ``mypv``, ``fwpv``: broadcastable fractions (0..1) of myelin and free water (EPW is
    free water too); the rest is cellular. Returns ``shape + (n_delay*n_echo,)`` float64.
    """
    seq = _seq_from(None, delays_ms, echo_times_ms, tr_ms, saturation_deg, excitation_deg)
    td, te, tr, th, al = seq.arrays()
    my, fw = np.broadcast_arrays(np.asarray(mypv, np.float64), np.asarray(fwpv, np.float64))
    if np.any(my < 0) or np.any(fw < 0) or np.any(my + fw > 1 + 1e-12):
        raise MyelinError("simulate_compartments: fractions must be >= 0 with mypv + fwpv <= 1")
    out = np.empty(my.shape + (td.size * te.size,))
    flat = out.reshape(-1, out.shape[-1])
    cst = _cst_array(constants)
    for n, (a, b) in enumerate(zip(my.ravel(), fw.ravel(), strict=True)):
        _mix_signal(float(a), float(b), cst, td, te, tr, th, al, float(b1), flat[n])
    return out


def fit_mono(
    samples: np.ndarray,
    *,
    delays_ms,
    echo_times_ms,
    tr_ms: float,
    saturation_deg: float = 120.0,
    excitation_deg: float = 90.0,
    b1: float | np.ndarray = 1.0,
) -> np.ndarray:
    """Mono-exponential MDME fit with B1 fixed: ``[..., ns] -> [..., 3]`` (M0, R1 /s, R2 /s).

    ``b1``: scalar or an array broadcastable to ``samples.shape[:-1]`` (per-voxel B1).
    Signed samples (sign-restore magnitude data first).
    """
    seq = _seq_from(None, delays_ms, echo_times_ms, tr_ms, saturation_deg, excitation_deg)
    td, te, tr, th, al = seq.arrays()
    s = np.asarray(samples, np.float64)
    if s.shape[-1] != td.size * te.size:
        raise MyelinError(
            f"fit_mono: last axis {s.shape[-1]} != n_delay*n_echo {td.size * te.size}"
        )
    flat = np.ascontiguousarray(s.reshape(-1, s.shape[-1]))
    b1v = np.ascontiguousarray(np.broadcast_to(np.asarray(b1, np.float64), s.shape[:-1]).ravel())
    out = np.empty((flat.shape[0], 3))
    _fit_mono_batch(flat, b1v, td, te, tr, th, al, out)
    return out.reshape(s.shape[:-1] + (3,))


# nogil: myelin runs on a thread beside synthesis + enhancement (processing.run)
@nb.njit(cache=True, parallel=True, nogil=True)
def _fit_mono_batch(flat, b1v, td, te, tr, th, al, out):
    for n in nb.prange(flat.shape[0]):
        _fit_mono_one(flat[n], td, te, tr, th, al, b1v[n], out[n])


_N_MY = 61  # MyPV step 1 % (of 0..60 %)
_N_FW = 51  # FWPV step 2 %
_B1_AXIS = np.linspace(0.5, 1.5, 11)  # the fit's B1 bounds, step 0.1


@lru_cache(maxsize=8)
def _grid(seq: _Seq, constants: MyelinConstants) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lookup grid for one sequence timing: axes and apparent (log R1, log R2, PD) per
    (B1, MyPV, FWPV). Cached per timing (the node builds it once per protocol)."""
    td, te, tr, th, al = seq.arrays()
    my_axis = np.linspace(0.0, constants.mypv_max, _N_MY)
    fw_axis = np.linspace(0.0, 1.0, _N_FW)
    out = np.empty((_B1_AXIS.size, _N_MY, _N_FW, 3))
    _grid_kernel(_B1_AXIS, my_axis, fw_axis, _cst_array(constants), td, te, tr, th, al, out)
    return my_axis, fw_axis, out


def apparent_parameters(
    mypv: float,
    fwpv: float,
    *,
    acq: Acquisition | None = None,
    delays_ms=None,
    echo_times_ms=None,
    tr_ms: float | None = None,
    saturation_deg: float = 120.0,
    excitation_deg: float = 90.0,
    constants: MyelinConstants = DEFAULT_CONSTANTS,
) -> dict[str, float]:
    """Apparent mono-exponential T1 ms, T2 ms, PD pu of a model voxel (for docs and tests)."""
    seq = _seq_from(acq, delays_ms, echo_times_ms, tr_ms, saturation_deg, excitation_deg)
    s = simulate_compartments(
        mypv,
        fwpv,
        delays_ms=seq.td,
        echo_times_ms=seq.te,
        tr_ms=seq.tr,
        saturation_deg=seq.sat,
        excitation_deg=seq.exc,
        constants=constants,
    )
    m0, r1, r2 = fit_mono(
        s,
        delays_ms=seq.td,
        echo_times_ms=seq.te,
        tr_ms=seq.tr,
        saturation_deg=seq.sat,
        excitation_deg=seq.exc,
    )
    return {"t1_ms": 1000.0 / r1, "t2_ms": 1000.0 / r2, "pd_pu": 100.0 * m0}


# --------------------------------------------------------------------------------------
# Inversion (numba)
# --------------------------------------------------------------------------------------


@nb.njit(cache=True)
def _interp(grid, ib, wb, dmy, dfw, my, fw, val, dval_my, dval_fw):
    """Value and gradient at (my, fw) of the grid blended between B1 layers ib, ib+1
    (weight wb): bilinear in (my, fw), linear in B1; axes start at 0."""
    nmy = grid.shape[1]
    nfw = grid.shape[2]
    x = my / dmy
    yv = fw / dfw
    i = min(max(math.floor(x), 0), nmy - 2)
    j = min(max(math.floor(yv), 0), nfw - 2)
    tx = x - i
    ty = yv - j
    for c in range(3):
        v00 = (1 - wb) * grid[ib, i, j, c] + wb * grid[ib + 1, i, j, c]
        v10 = (1 - wb) * grid[ib, i + 1, j, c] + wb * grid[ib + 1, i + 1, j, c]
        v01 = (1 - wb) * grid[ib, i, j + 1, c] + wb * grid[ib + 1, i, j + 1, c]
        v11 = (1 - wb) * grid[ib, i + 1, j + 1, c] + wb * grid[ib + 1, i + 1, j + 1, c]
        val[c] = (
            (1 - tx) * (1 - ty) * v00 + tx * (1 - ty) * v10 + (1 - tx) * ty * v01 + tx * ty * v11
        )
        dval_my[c] = ((1 - ty) * (v10 - v00) + ty * (v11 - v01)) / dmy
        dval_fw[c] = ((1 - tx) * (v01 - v00) + tx * (v11 - v10)) / dfw


# nogil: myelin runs on a thread beside synthesis + enhancement (processing.run)
@nb.njit(cache=True, parallel=True, nogil=True)
def _invert_kernel(meas, b1, grid, b1_lo, db1, dmy, dfw, my_max, wts, out):
    """meas[n, 3] = (log R1, log R2, PD fraction), b1[n] -> out[n, 2] = (MyPV, FWPV)."""
    n = meas.shape[0]
    nb1 = grid.shape[0]
    nmy = grid.shape[1]
    nfw = grid.shape[2]
    n_chunks = min(n, 64)
    for ch in nb.prange(n_chunks):
        val = np.empty(3)
        dm = np.empty(3)
        df = np.empty(3)
        for v in range(ch * n // n_chunks, (ch + 1) * n // n_chunks):
            xb = (b1[v] - b1_lo) / db1
            ib = min(max(int(xb), 0), nb1 - 2)
            wb = min(max(xb - ib, 0.0), 1.0)
            # Coarse search on every 6th/10th node (feasible: my + fw <= 1).
            best = np.inf
            bi = 0
            bj = 0
            for i in range(0, nmy, 6):
                for j in range(0, nfw, 10):
                    if i * dmy + j * dfw > 1.0 + 1e-9:
                        continue
                    c = 0.0
                    for k in range(3):
                        g = (1 - wb) * grid[ib, i, j, k] + wb * grid[ib + 1, i, j, k]
                        r = (g - meas[v, k]) * wts[k]
                        c += r * r
                    if c < best:
                        best = c
                        bi = i
                        bj = j
            my = bi * dmy
            fw = bj * dfw
            # Projected Gauss-Newton on the bilinear interpolant (2 unknowns, 3 residuals).
            for _ in range(25):
                _interp(grid, ib, wb, dmy, dfw, my, fw, val, dm, df)
                a11 = 0.0
                a12 = 0.0
                a22 = 0.0
                g1 = 0.0
                g2 = 0.0
                for k in range(3):
                    w2 = wts[k] * wts[k]
                    r = meas[v, k] - val[k]
                    a11 += w2 * dm[k] * dm[k]
                    a12 += w2 * dm[k] * df[k]
                    a22 += w2 * df[k] * df[k]
                    g1 += w2 * dm[k] * r
                    g2 += w2 * df[k] * r
                a11 *= 1.0 + 1e-6
                a22 *= 1.0 + 1e-6
                det = a11 * a22 - a12 * a12
                if det <= 1e-300:
                    break
                d1 = (a22 * g1 - a12 * g2) / det
                d2 = (a11 * g2 - a12 * g1) / det
                # Damp large steps to stay within the cells the gradient describes.
                lim = 6.0
                sc = max(abs(d1) / (lim * dmy), abs(d2) / (lim * dfw), 1.0)
                nmy_ = min(max(my + d1 / sc, 0.0), my_max)
                nfw_ = min(max(fw + d2 / sc, 0.0), 1.0)
                if nmy_ + nfw_ > 1.0:  # project onto my + fw = 1
                    ex = (nmy_ + nfw_ - 1.0) / 2.0
                    nmy_ = max(nmy_ - ex, 0.0)
                    nfw_ = 1.0 - nmy_
                step = abs(nmy_ - my) + abs(nfw_ - fw)
                my = nmy_
                fw = nfw_
                if step < 1e-6:
                    break
            out[v, 0] = my
            out[v, 1] = fw


def invert(
    t1_ms: np.ndarray,
    t2_ms: np.ndarray,
    pd_pu: np.ndarray,
    b1: np.ndarray | float = 1.0,
    *,
    acq: Acquisition | None = None,
    delays_ms=None,
    echo_times_ms=None,
    tr_ms: float | None = None,
    saturation_deg: float = 120.0,
    excitation_deg: float = 90.0,
    constants: MyelinConstants = DEFAULT_CONSTANTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Map measured (T1 ms, T2 ms, PD pu) arrays to (MyPV, FWPV) fractions (float64, 0..1).

    ``b1``: the fit's flip-angle ratio (scalar or broadcastable array); the lookup grid is
    simulated and fitted at B1 0.5-1.5 and interpolated linearly in between.

    Non-finite or non-positive inputs give NaN.
    """
    seq = _seq_from(acq, delays_ms, echo_times_ms, tr_ms, saturation_deg, excitation_deg)
    t1, t2, pd = np.broadcast_arrays(
        np.asarray(t1_ms, np.float64), np.asarray(t2_ms, np.float64), np.asarray(pd_pu, np.float64)
    )
    ok = np.isfinite(t1) & np.isfinite(t2) & np.isfinite(pd) & (t1 > 0) & (t2 > 0)
    meas = np.empty((int(ok.sum()), 3))
    meas[:, 0] = np.log(1000.0 / t1[ok])
    meas[:, 1] = np.log(1000.0 / t2[ok])
    meas[:, 2] = pd[ok] / 100.0
    my_axis, fw_axis, grid = _grid(seq, constants)
    wts = np.array(
        [1.0 / constants.sigma_log_r1, 1.0 / constants.sigma_log_r2, 1.0 / constants.sigma_pd]
    )
    res = np.empty((meas.shape[0], 2))
    if meas.shape[0]:
        b1v = np.broadcast_to(np.asarray(b1, np.float64), t1.shape)[ok]
        b1v = np.clip(np.nan_to_num(b1v, nan=1.0), _B1_AXIS[0], _B1_AXIS[-1])
        _invert_kernel(
            meas,
            np.ascontiguousarray(b1v),
            grid,
            _B1_AXIS[0],
            _B1_AXIS[1] - _B1_AXIS[0],
            my_axis[1],
            fw_axis[1],
            constants.mypv_max,
            wts,
            res,
        )
    my = np.full(t1.shape, np.nan)
    fw = np.full(t1.shape, np.nan)
    my[ok] = res[:, 0]
    fw[ok] = res[:, 1]
    return my, fw


def myelin_maps(
    maps: QuantMaps,
    icmask: np.ndarray,
    voxel_volume_ml: float,
    *,
    acq: Acquisition | None = None,
    delays_ms=None,
    echo_times_ms=None,
    tr_ms: float | None = None,
    saturation_deg: float = 120.0,
    excitation_deg: float = 90.0,
    fractions: TissueFractions | Mapping[str, np.ndarray] | None = None,
    constants: MyelinConstants = DEFAULT_CONSTANTS,
) -> MyelinMaps:
    """MyPV and EPW maps (percent of voxel volume) and their volumes in mL.

    Parameters
    ----------
    maps: fitted maps; uses ``t1_ms``, ``t2_ms``, ``pd_pu`` (percent units) and ``mask``.
    icmask: boolean intracranial mask ``[z, y, x]``; outside it both maps are 0.
    voxel_volume_ml: one voxel's volume in mL.
    acq or (delays_ms, echo_times_ms, tr_ms, saturation_deg, excitation_deg): the sequence
        timing the lookup grid is simulated with (grids are cached per timing).
    fractions: optional segmentation; its CSF fraction separates CSF from EPW, and its
        pure WM/GM are checked against :data:`CALIBRATION_DOMAIN`
        (``calibration_warnings`` of the result; unchecked without it).
    constants: compartment constants (default :data:`DEFAULT_CONSTANTS`).
    """
    shape = np.shape(maps.t1_ms)
    icm = np.asarray(icmask, bool)
    if icm.shape != shape:
        raise MyelinError(f"icmask: shape {icm.shape} differs from the maps {shape}")
    vv = float(voxel_volume_ml)
    if not math.isfinite(vv) or vv <= 0:
        raise MyelinError(f"voxel_volume_ml: must be a finite number > 0, got {voxel_volume_ml!r}")
    seq = _seq_from(acq, delays_ms, echo_times_ms, tr_ms, saturation_deg, excitation_deg)
    sel = icm & np.asarray(maps.mask, bool)
    mypv = np.zeros(shape, np.float32)
    epw = np.zeros(shape, np.float32)
    if sel.any():
        my, fw = invert(
            np.asarray(maps.t1_ms)[sel],
            np.asarray(maps.t2_ms)[sel],
            np.asarray(maps.pd_pu)[sel],
            np.asarray(maps.b1)[sel],
            delays_ms=seq.td,
            echo_times_ms=seq.te,
            tr_ms=seq.tr,
            saturation_deg=seq.sat,
            excitation_deg=seq.exc,
            constants=constants,
        )
        my = np.nan_to_num(my)
        fw = np.nan_to_num(fw)
        if fractions is not None:
            fr = fractions.fractions if isinstance(fractions, TissueFractions) else fractions
            csf = np.asarray(fr["CSF"])  # float64 on sel only: no whole-grid copy
            if csf.shape != shape:
                raise MyelinError(
                    f"fractions['CSF']: shape {csf.shape} differs from the maps {shape}"
                )
            e = np.maximum(fw - csf[sel].astype(np.float64), 0.0)
        else:
            e = np.where(fw <= constants.epw_max_fw, fw, 0.0)
        mypv[sel] = (100.0 * my).astype(np.float32)
        epw[sel] = (100.0 * e).astype(np.float32)
    return MyelinMaps(
        mypv=mypv,
        epw=epw,
        myelin_volume_ml=float(np.sum(mypv, dtype=np.float64) / 100.0 * vv),
        epw_volume_ml=float(np.sum(epw, dtype=np.float64) / 100.0 * vv),
        constants=constants.as_dict(),
        calibration_warnings=[] if fractions is None else calibration_warnings(maps, fractions),
    )
