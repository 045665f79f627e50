"""MDME forward model and its analytic derivatives (physics.md section 1).

    S(TD, TE) = M0 * exp(-R2*TE) * g(R1, B1; TD)
    g = [1 - (1 - cos(B1*theta)) * exp(-R1*TD) - cos(B1*theta) * exp(-R1*TR)]
        / [1 - cos(B1*theta) * cos(B1*alpha) * exp(-R1*TR)]

Units: times in ms, R1 and R2 in 1/ms inside the kernels (callers convert from 1/s),
angles in radians inside the kernels. B1 is the ratio of actual to nominal flip angle and
scales both the saturation (theta) and the excitation (alpha) pulses.

Slice profile: the effective flip angle varies across the slice. A profile is a set of
isochromats ``(scale_k, weight_k)``; the signal is ``sum_k weight_k * g(R1, B1*scale_k)``.
The trivial profile ``([1.0], [1.0])`` is the ideal rectangular slice.

The scalar kernels are numba ``njit(cache=True)`` so the fit can inline them; the array
wrappers (:func:`mdme_signal`, :func:`mdme_jacobian`) are for tests, simulation and the
phantom.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

__all__ = [
    "IDEAL_PROFILE",
    "gaussian_slice_profile",
    "mdme_jacobian",
    "mdme_signal",
    "sample_axes",
    "t1_factor",
]

#: Ideal rectangular slice profile: one isochromat at the nominal flip angle.
IDEAL_PROFILE: tuple[np.ndarray, np.ndarray] = (
    np.array([1.0], dtype=np.float64),
    np.array([1.0], dtype=np.float64),
)


def gaussian_slice_profile(n: int = 9, fwhm_fraction: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Isochromats across a slice with a Gaussian-like flip-angle profile.

    Returns ``(scales, weights)``: flip-angle scale factors (1 at the slice centre, falling
    off towards the edges) and normalized weights (equal slice thickness per isochromat).
    ``fwhm_fraction`` is the profile FWHM in units of the nominal slice thickness.
    """
    if n < 1:
        raise ValueError("gaussian_slice_profile: n must be >= 1")
    pos = (np.arange(n) + 0.5) / n - 0.5  # slice positions in units of thickness
    sigma = fwhm_fraction / 2.3548
    scales = np.exp(-0.5 * (pos / sigma) ** 2)
    weights = np.full(n, 1.0 / n)
    return scales.astype(np.float64), weights.astype(np.float64)


@nb.njit(cache=True, fastmath=False, inline="always")
def _g_single(r1: float, b1: float, td: float, tr: float, theta: float, alpha: float):
    """g and dg/dR1, dg/dB1 for one isochromat. r1 in 1/ms, angles in rad."""
    ct = math.cos(b1 * theta)
    ca = math.cos(b1 * alpha)
    dct = -theta * math.sin(b1 * theta)
    dca = -alpha * math.sin(b1 * alpha)
    ed = math.exp(-r1 * td)
    er = math.exp(-r1 * tr)
    num = 1.0 - (1.0 - ct) * ed - ct * er
    den = 1.0 - ct * ca * er
    dnum_r1 = (1.0 - ct) * td * ed + ct * tr * er
    dden_r1 = ct * ca * tr * er
    dnum_b1 = dct * (ed - er)
    dden_b1 = -er * (dct * ca + ct * dca)
    inv = 1.0 / den
    g = num * inv
    dg_r1 = (dnum_r1 - g * dden_r1) * inv
    dg_b1 = (dnum_b1 - g * dden_b1) * inv
    return g, dg_r1, dg_b1


@nb.njit(cache=True, fastmath=False)
def t1_factor(
    r1: float,
    b1: float,
    td: float,
    tr: float,
    theta: float,
    alpha: float,
    prof_scale: np.ndarray,
    prof_weight: np.ndarray,
):
    """Slice-profile-weighted g and its derivatives (dg/dR1 [ms], dg/dB1)."""
    g = 0.0
    gr = 0.0
    gb = 0.0
    for k in range(prof_scale.shape[0]):
        s = prof_scale[k]
        w = prof_weight[k]
        a, b, c = _g_single(r1, b1 * s, td, tr, theta, alpha)
        g += w * a
        gr += w * b
        gb += w * s * c
    return g, gr, gb


@nb.njit(cache=True)
def _signal_kernel(
    m0, r1, r2, b1, td, te, tr, theta, alpha, prof_scale, prof_weight, magnitude, out, jac
):
    """Fill out[n, k] (k = delay-major sample) and jac[n, k, 4] (dM0, dR1, dR2, dB1)."""
    nd = td.shape[0]
    ne = te.shape[0]
    for n in range(m0.shape[0]):
        for i in range(nd):
            g, gr, gb = t1_factor(r1[n], b1[n], td[i], tr, theta, alpha, prof_scale, prof_weight)
            for j in range(ne):
                e2 = math.exp(-r2[n] * te[j])
                s = m0[n] * e2 * g
                k = i * ne + j
                sign = 1.0
                if magnitude and s < 0.0:
                    sign = -1.0
                out[n, k] = sign * s
                jac[n, k, 0] = sign * e2 * g
                jac[n, k, 1] = sign * m0[n] * e2 * gr
                jac[n, k, 2] = -sign * te[j] * s
                jac[n, k, 3] = sign * m0[n] * e2 * gb


def _prep(m0, t1_ms, t2_ms, b1):
    m0, t1_ms, t2_ms, b1 = np.broadcast_arrays(
        np.asarray(m0, np.float64),
        np.asarray(t1_ms, np.float64),
        np.asarray(t2_ms, np.float64),
        np.asarray(b1, np.float64),
    )
    shape = m0.shape
    return (
        shape,
        np.ascontiguousarray(m0.ravel()),
        np.ascontiguousarray(1.0 / t1_ms.ravel()),
        np.ascontiguousarray(1.0 / t2_ms.ravel()),
        np.ascontiguousarray(b1.ravel()),
    )


def mdme_jacobian(
    m0,
    t1_ms,
    t2_ms,
    b1,
    delays_ms,
    echo_times_ms,
    tr_ms: float,
    saturation_deg: float = 120.0,
    excitation_deg: float = 90.0,
    *,
    magnitude: bool = False,
    profile: tuple[np.ndarray, np.ndarray] = IDEAL_PROFILE,
) -> tuple[np.ndarray, np.ndarray]:
    """Signal and Jacobian for broadcastable parameter arrays.

    Returns ``(signal, jac)`` with ``signal`` of shape ``param_shape + (n_delay*n_echo,)``
    (delay-major) and ``jac`` of shape ``param_shape + (n_delay*n_echo, 4)`` holding the
    derivatives with respect to ``(M0, R1 [1/ms], R2 [1/ms], B1)``.
    """
    shape, m0v, r1v, r2v, b1v = _prep(m0, t1_ms, t2_ms, b1)
    td = np.ascontiguousarray(delays_ms, dtype=np.float64)
    te = np.ascontiguousarray(echo_times_ms, dtype=np.float64)
    ns = td.size * te.size
    out = np.empty((m0v.size, ns))
    jac = np.empty((m0v.size, ns, 4))
    _signal_kernel(
        m0v,
        r1v,
        r2v,
        b1v,
        td,
        te,
        float(tr_ms),
        math.radians(saturation_deg),
        math.radians(excitation_deg),
        np.ascontiguousarray(profile[0], np.float64),
        np.ascontiguousarray(profile[1], np.float64),
        bool(magnitude),
        out,
        jac,
    )
    return out.reshape(shape + (ns,)), jac.reshape(shape + (ns, 4))


def mdme_signal(
    m0,
    t1_ms,
    t2_ms,
    b1,
    delays_ms,
    echo_times_ms,
    tr_ms: float,
    saturation_deg: float = 120.0,
    excitation_deg: float = 90.0,
    *,
    magnitude: bool = False,
    profile: tuple[np.ndarray, np.ndarray] = IDEAL_PROFILE,
) -> np.ndarray:
    """MDME signal for broadcastable parameter arrays (T1/T2 in ms, B1 ratio).

    Returns float64 ``param_shape + (n_delay*n_echo,)``, delay-major (sample
    ``k = delay_index * n_echo + echo_index``). ``magnitude=True`` returns ``|S|``.
    """
    return mdme_jacobian(
        m0,
        t1_ms,
        t2_ms,
        b1,
        delays_ms,
        echo_times_ms,
        tr_ms,
        saturation_deg,
        excitation_deg,
        magnitude=magnitude,
        profile=profile,
    )[0]


def sample_axes(signal_flat: np.ndarray, n_delays: int, n_echoes: int) -> np.ndarray:
    """Reshape a delay-major ``[..., n_delay*n_echo]`` array to ``[..., delay, echo]``."""
    return signal_flat.reshape(signal_flat.shape[:-1] + (n_delays, n_echoes))
