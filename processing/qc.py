"""Fit quality control per series: ``fit_qc(acq, maps, fractions=None) -> dict``.

Every value is a plain float / int / bool / str (JSON-serializable) so the figures go
straight into the structured report, the logs and Prometheus.

Checks
------
* ``failed_fraction``: fitted voxels whose fit failed (LM did not converge or hit a bound).
* ``residual_to_noise``: median RMS fit residual over the expected RMS residual of pure
  noise, ``noise_sd * sqrt((n_samples - 4) / n_samples)`` (4 fitted parameters); ~1 for a
  good fit, larger when the model does not explain the data (motion, flow, wrong delays).
* ``b1_p1`` / ``b1_p99``: the flip-angle ratio range; at 3T expect about 0.6-1.4.
* Per tissue (WM, GM, CSF): median T1, T2, PD of pure voxels (fraction >= 0.9 when a
  segmentation is given, else the series' own tissue centres) against the 3T ranges of
  physics.md section 6 widened by ``RANGE_TOLERANCE``, with in-range flags.
* Corrupted delay / motion: the model is evaluated from the fitted maps and the residual is
  split per delay image. The per-delay residual (median over voxels, in units of its noise
  expectation: noise variance x (1 - leverage) of each sample) is ~1 for every delay on
  clean data. When one delay image is scaled, shifted or replaced (flow, motion, a wrong
  delay in the header), residual energy appears: ``delay_outlier`` when the worst delay
  exceeds ``DELAY_OUTLIER_MIN`` and ``DELAY_OUTLIER_RATIO`` x the median of the others
  (its index is indicative only: the fit spreads a bad image over neighbouring delays),
  and ``motion_or_corruption`` when that happens or the median residual exceeds
  ``RESIDUAL_FLAG`` x noise.
* ``status``: ``"fail"`` when nothing could be fitted, more than 20 % of the fits failed,
  or ``motion_or_corruption``; ``"warn"`` for more than 5 % failed fits, B1 outside
  0.6-1.4 or a tissue median out of range; else ``"pass"``. ``reasons`` lists what triggered it.
"""

from __future__ import annotations

import math
from typing import Any

import numba as nb
import numpy as np

from processing.acquisition import Acquisition
from processing.results import QuantMaps, TissueFractions
from processing.segmentation import tissue_centres
from processing.sequence_model import acquisition_jacobian
from processing.signal import mdme_jacobian

__all__ = [
    "DELAY_OUTLIER_MIN",
    "DELAY_OUTLIER_RATIO",
    "EXPECTED_3T",
    "RESIDUAL_FLAG",
    "QCError",
    "fit_qc",
]

#: 3T MDME ranges (physics.md section 6): tissue -> quantity -> (low, high).
#: CSF T2 is poorly determined at TE <= 100 ms; the fit's upper bound is 3333 ms.
EXPECTED_3T: dict[str, dict[str, tuple[float, float]]] = {
    "WM": {"t1_ms": (550.0, 650.0), "t2_ms": (60.0, 75.0), "pd_pu": (62.0, 70.0)},
    "GM": {"t1_ms": (950.0, 1300.0), "t2_ms": (80.0, 100.0), "pd_pu": (78.0, 88.0)},
    "CSF": {"t1_ms": (3500.0, 4500.0), "t2_ms": (1000.0, 3400.0), "pd_pu": (90.0, 110.0)},
}

#: Relative tolerance on the expected ranges: the between-scanner CV at 3T is up to ~6 %
#: (Hagiwara 2019), so a median just outside a literature range is not yet a problem.
RANGE_TOLERANCE = 0.05

#: A delay is an outlier when its mean squared residual exceeds this multiple of what noise
#: alone leaves (leverage-corrected)...
DELAY_OUTLIER_MIN = 2.0
#: ...and this multiple of the median of the other delays.
DELAY_OUTLIER_RATIO = 1.5
#: Median fit residual (x the noise expectation) above which the series is flagged as
#: corrupted even when no single delay stands out (the fit spreads a bad image over all).
RESIDUAL_FLAG = 1.3

_MAX_QC_VOXELS = 200_000  # subsample for the model evaluation (the statistics are medians)


class QCError(ValueError):
    """Invalid input to the QC; the message names the problem."""


def _f(v: float) -> float:
    """Plain float; NaN stays NaN (JSON writers map it to null)."""
    return float(v)


def _tissue_medians(
    maps: QuantMaps, sel: np.ndarray, fractions: TissueFractions | None
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if fractions is not None:
        for t in ("WM", "GM", "CSF"):
            fr = np.asarray(fractions.fractions[t])
            pure = sel & (fr >= 0.9)
            n = int(pure.sum())
            out[t] = {"n_voxels": n}
            for q in ("t1_ms", "t2_ms", "pd_pu"):
                vals = np.asarray(getattr(maps, q))[pure]
                out[t][q] = _f(np.median(vals)) if n else float("nan")
        return out
    cen = tissue_centres(maps, sel)
    for t in ("WM", "GM", "CSF"):
        out[t] = {
            "n_voxels": int(cen[t]["n_voxels"]),
            **{q: _f(cen[t][q]) for q in ("t1_ms", "t2_ms", "pd_pu")},
        }
    return out


def fit_qc(
    acq: Acquisition,
    maps: QuantMaps,
    fractions: TissueFractions | None = None,
    *,
    expected: dict[str, dict[str, tuple[float, float]]] | None = None,
) -> dict[str, Any]:
    """Quality figures and flags of one fitted series (see the module docstring).

    Parameters
    ----------
    acq: the acquisition that was fitted.
    maps: its :class:`QuantMaps` (``pd_pu`` in percent units for meaningful PD checks).
    fractions: optional segmentation; pure voxels (fraction >= 0.9) give the tissue medians
        and the intracranial mask restricts the statistics.
    expected: tissue ranges (default :data:`EXPECTED_3T`).
    """
    if not isinstance(acq, Acquisition):
        raise QCError(f"acq: expected an Acquisition, got {type(acq).__name__}")
    shape = acq.shape
    for name in ("t1_ms", "t2_ms", "pd_pu", "b1", "m0", "residual", "mask"):
        s = np.shape(getattr(maps, name))
        if s != shape:
            raise QCError(f"maps.{name}: shape {s} differs from the acquisition grid {shape}")
    expected = expected or EXPECTED_3T
    mask = np.asarray(maps.mask, bool)
    failed = (
        np.asarray(maps.failed, bool) & mask if maps.failed is not None else np.zeros_like(mask)
    )
    region = mask.copy()
    if fractions is not None:
        region &= np.asarray(fractions.icmask, bool)
    n_fit = int(region.sum())
    ns = acq.n_delays * acq.n_echoes
    qc: dict[str, Any] = {
        "n_fitted": n_fit,
        "n_samples": int(ns),
        "failed_fraction": _f(failed[region].mean()) if n_fit else float("nan"),
    }
    if n_fit == 0:
        qc.update(status="fail", reasons=["no fitted voxels"], delay_outlier=False)
        return qc

    good = region & ~failed
    noise = float(maps.noise_sd)
    if not (math.isfinite(noise) and noise > 0):
        noise = float("nan")
    qc["noise_sd"] = _f(noise)
    med_res = float(np.median(np.asarray(maps.residual)[good])) if good.any() else float("nan")
    qc["median_residual"] = _f(med_res)
    # Free parameters per voxel: MDME (M0, R1, R2, B1); 3D-QALAS fixes B1 (map or nominal).
    n_free = 4 if acq.sequence is None else 3
    dof = max(ns - n_free, 1) / ns
    qc["residual_to_noise"] = (
        _f(med_res / (noise * math.sqrt(dof))) if math.isfinite(noise) else float("nan")
    )

    b1 = np.asarray(maps.b1, np.float64)[good]
    b1 = b1[np.isfinite(b1)]
    qc["b1_p1"] = _f(np.percentile(b1, 1)) if b1.size else float("nan")
    qc["b1_p99"] = _f(np.percentile(b1, 99)) if b1.size else float("nan")
    qc["b1_in_range"] = bool(b1.size and qc["b1_p1"] >= 0.6 and qc["b1_p99"] <= 1.4)

    # Tissue medians against the expected ranges.
    tissues = _tissue_medians(maps, good, fractions)
    reasons = _check_tissue_ranges(tissues, expected)
    qc["tissues"] = tissues
    qc["tissues_in_range"] = not reasons

    scale = noise if math.isfinite(noise) else max(med_res / math.sqrt(dof), 1e-12)
    per_delay = _delay_residuals(acq, maps, good, scale)
    qc["delay_residual_to_noise"] = [float(v) for v in per_delay]
    worst = int(np.argmax(per_delay))
    others = float(np.median(np.delete(per_delay, worst))) if per_delay.size > 1 else 1.0
    ratio = float(per_delay[worst] / max(others, 1e-12))
    qc["delay_outlier_ratio"] = ratio
    outlier = bool(per_delay[worst] > DELAY_OUTLIER_MIN and ratio > DELAY_OUTLIER_RATIO)
    qc["delay_outlier"] = outlier
    qc["delay_outlier_index"] = worst if outlier else -1
    qc["delay_outlier_ms"] = float(acq.delays_ms[worst]) if outlier else float("nan")
    rtn = qc["residual_to_noise"]
    qc["motion_or_corruption"] = bool(outlier or (math.isfinite(rtn) and rtn > RESIDUAL_FLAG))

    qc["status"], qc["reasons"] = _verdict(qc, acq, per_delay, worst, ratio, reasons)
    return qc


def _check_tissue_ranges(
    tissues: dict[str, dict[str, Any]], expected: dict[str, dict[str, tuple[float, float]]]
) -> list[str]:
    """Mark each tissue median in or out of its expected range (in place); the reasons of
    those out of range."""
    reasons: list[str] = []
    for t, vals in tissues.items():
        for q, (lo, hi) in expected.get(t, {}).items():
            v = vals.get(q, float("nan"))
            ok = bool(
                math.isfinite(v) and lo * (1 - RANGE_TOLERANCE) <= v <= hi * (1 + RANGE_TOLERANCE)
            )
            vals[f"{q}_in_range"] = ok
            vals[f"{q}_expected"] = [float(lo), float(hi)]
            if not ok:
                reasons.append(f"{t} {q} {v:.4g} outside {lo:g}-{hi:g}")
    return reasons


def _delay_residuals(
    acq: Acquisition, maps: QuantMaps, good: np.ndarray, scale: float
) -> np.ndarray:
    """Residual energy per delay over the well-fitted voxels, in units of its pure-noise
    expectation (~1 for noise only): a corrupted delay image or motion between dynamics
    stands out."""
    idx = np.flatnonzero(good.ravel())
    if idx.size > _MAX_QC_VOXELS:
        idx = idx[:: idx.size // _MAX_QC_VOXELS + 1]
    m0 = np.asarray(maps.m0, np.float64).ravel()[idx]
    t1 = np.asarray(maps.t1_ms, np.float64).ravel()[idx]
    t2 = np.asarray(maps.t2_ms, np.float64).ravel()[idx]
    b1v = np.asarray(maps.b1, np.float64).ravel()[idx]
    if acq.sequence is None:
        model, jac = mdme_jacobian(
            m0,
            t1,
            t2,
            b1v,
            acq.delays_ms,
            acq.echo_times_ms,
            acq.tr_ms,
            acq.saturation_deg,
            acq.excitation_deg,
        )
    else:
        model, jac = acquisition_jacobian(acq, m0, t1, t2, b1v)
    chosen = np.zeros(acq.shape, bool)
    chosen.flat[idx] = True  # idx is ascending: the rows come in its order
    samples = acq.masked_samples(chosen)
    # Expected residual of pure noise per sample: 1 - leverage of that sample in a fit of
    # (M0, R1, R2) (columns normalized first; leverage does not depend on scaling). B1 is
    # left out: the default pipeline smooths B1 and refits with it fixed, and with B1 free
    # the short delays' high B1 leverage would make their expectation tiny and unstable.
    # Median over voxels (robust to partial-volume edges), mean over echoes; pure noise
    # gives ~1 (the chi-square median/mean factor is divided out).
    if acq.n_echoes <= _MAX_KERNEL_ECHOES:
        # numba, in the same operation order as the numpy below (bit-identical; the 3 x 3
        # inverses stay numpy's LAPACK): 0.5 s less CPU per 30 x 256 x 256 series
        gram = np.empty((idx.size, 3, 3))
        jac = np.ascontiguousarray(jac)  # one kernel specialization (C layout) for all
        _normalized_gram(jac, gram)
        inv = np.linalg.inv(gram)
        z = np.empty((idx.size, acq.n_delays))
        model = np.ascontiguousarray(model)
        _delay_chi2(samples, model, jac, inv, float(scale), bool(acq.is_magnitude), z)
    else:
        z = _delay_chi2_numpy(samples, model, jac, scale, acq)
    chi2_median = (
        float(np.median(np.random.default_rng(0).chisquare(acq.n_echoes, 20000))) / acq.n_echoes
    )
    return np.median(z, axis=0) / chi2_median


def _delay_chi2_numpy(
    samples: np.ndarray, model: np.ndarray, jac: np.ndarray, scale: float, acq: Acquisition
) -> np.ndarray:
    """``[voxel, delay]`` residual energy over its noise expectation, mean over echoes
    (what :func:`_delay_chi2` computes; kept for more echoes than its echo sum handles)."""
    samples = samples.astype(np.float64)
    if acq.is_magnitude:  # restore the sign from the voxel's own fit
        samples = np.where(model < 0, -samples, samples)
    r2 = ((samples - model) / scale) ** 2
    jac = jac[:, :, :3]
    jn = jac / np.maximum(np.linalg.norm(jac, axis=1, keepdims=True), 1e-300)
    jtj = np.einsum("nki,nkj->nij", jn, jn) + 1e-9 * np.eye(3)
    lev = np.einsum("nki,nij,nkj->nk", jn, np.linalg.inv(jtj), jn)
    expect = np.clip(1.0 - lev, 0.05, 1.0)
    return (r2 / expect).reshape(-1, acq.n_delays, acq.n_echoes).mean(axis=2)


#: numpy sums a short contiguous axis as first + (0 + second + third ...) (its pairwise sum
#: is a plain loop below 8 elements); :func:`_delay_chi2` repeats that order up to here
_MAX_KERNEL_ECHOES = 8


@nb.njit(cache=True, inline="always")
def _normalized_columns(jac, n, jn):
    """jn[k, i] = the (M0, R1, R2) column i of ``jac[n, k, 4]`` over its norm (max 1e-300,
    summed in numpy's order: sequential in k); shared by both kernels below."""
    ns = jac.shape[1]
    for i in range(3):
        acc = jac[n, 0, i] * jac[n, 0, i]
        for k in range(1, ns):
            acc += jac[n, k, i] * jac[n, k, i]
        norm = math.sqrt(acc)
        if norm < 1e-300:  # np.maximum: NaN stays NaN
            norm = 1e-300
        for k in range(ns):
            jn[k, i] = jac[n, k, i] / norm


# nogil: the QC runs on a thread beside synthesis + enhancement (processing.run)
@nb.njit(cache=True, nogil=True)
def _normalized_gram(jac, gram):
    """gram[n] = Jn^T Jn + 1e-9 I of the normalized (M0, R1, R2) columns of ``jac[n, k, 4]``
    (:func:`_normalized_columns`)."""
    nv, ns = jac.shape[0], jac.shape[1]
    jn = np.empty((ns, 3))
    for n in range(nv):
        _normalized_columns(jac, n, jn)
        for i in range(3):
            for j in range(3):
                acc = 0.0
                for k in range(ns):
                    acc += jn[k, i] * jn[k, j]
                gram[n, i, j] = acc + (1e-9 if i == j else 0.0)


@nb.njit(cache=True, nogil=True)
def _delay_chi2(samples, model, jac, inv, scale, magnitude, z):
    """z[n, d]: mean over echoes of ((sample - model) / scale)^2 / clip(1 - leverage,
    0.05, 1), leverage = jn_k^T inv jn_k with the normalized columns of ``jac``; the same
    operations and order as :func:`_delay_chi2_numpy`."""
    nv, ns = jac.shape[0], jac.shape[1]
    nd = z.shape[1]
    ne = ns // nd
    jn = np.empty((ns, 3))
    q = np.empty(ns)
    for n in range(nv):
        _normalized_columns(jac, n, jn)
        for k in range(ns):
            lev = 0.0
            for i in range(3):
                for j in range(3):
                    lev += jn[k, i] * inv[n, i, j] * jn[k, j]
            expect = 1.0 - lev
            if expect < 0.05:  # np.clip: NaN stays NaN
                expect = 0.05
            elif expect > 1.0:
                expect = 1.0
            s = np.float64(samples[n, k])
            if magnitude and model[n, k] < 0:
                s = -s
            r = (s - model[n, k]) / scale
            q[k] = r * r / expect
        for d in range(nd):
            rest = 0.0
            for e in range(1, ne):
                rest += q[d * ne + e]
            z[n, d] = (q[d * ne] + rest) / ne


def _verdict(
    qc: dict[str, Any],
    acq: Acquisition,
    per_delay: np.ndarray,
    worst: int,
    ratio: float,
    reasons: list[str],
) -> tuple[str, list[str]]:
    """(status, reasons): "fail" for failed fits > 20 % or motion/corruption, "warn" for
    failed fits > 5 %, B1 out of range or a tissue out of range, else "pass"."""
    outlier = qc["delay_outlier"]
    status = "pass"
    fail: list[str] = []
    if qc["failed_fraction"] > 0.2:
        fail.append(f"{100 * qc['failed_fraction']:.1f} % of fits failed")
    if qc["motion_or_corruption"] and not outlier:
        msg = (
            f"median residual {qc['residual_to_noise']:.2f} x noise: the model does not explain "
            "the data (motion, flow or a corrupted delay image)"
        )
        if acq.sequence is None:
            fail.append(msg)
        else:
            # 3D-QALAS fits with B1 fixed (often nominal: no map), which alone leaves a
            # misfit of this size: report it, do not hold the series.
            reasons.append(msg + "; with QALAS also a B1 different from the one assumed")
    if outlier:
        fail.append(
            f"delay {worst} ({acq.delays_ms[worst]:g} ms): residual {per_delay[worst]:.2f} x the "
            f"noise expectation, {ratio:.1f} x the other delays (corrupted image or motion)"
        )
    warn: list[str] = []
    if 0.05 < qc["failed_fraction"] <= 0.2:
        warn.append(f"{100 * qc['failed_fraction']:.1f} % of fits failed")
    if not qc["b1_in_range"]:
        warn.append(f"B1 range {qc['b1_p1']:.2f}-{qc['b1_p99']:.2f} outside 0.6-1.4")
    warn.extend(reasons)
    if fail:
        status = "fail"
    elif warn:
        status = "warn"
    return status, fail + warn
