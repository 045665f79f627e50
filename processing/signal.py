"""MDME forward model and its analytic derivatives (physics.md section 1).

    S(TD, TE) = M0 * exp(-R2*TE) * g(R1, B1; TD)
    g = [1 - (1 - cos(B1*theta)) * exp(-R1*TD) - cos(B1*theta) * exp(-R1*TR)]
        / [1 - cos(B1*theta) * cos(B1*alpha) * exp(-R1*TR)]

Magnitude data: ``|S + n|`` with complex Gaussian noise of SD sigma per channel is Rician;
its expectation ``E|S + n| = sigma*sqrt(pi/2)*L_1/2(-A^2/(2 sigma^2))`` (A = |S|) lies above A
(the noise floor, 1.25 sigma at A = 0). :func:`rician_mean_scalar` gives it and its slope
for the fit's magnitude model (processing.fit).

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
from typing import Any

import numba as nb
import numpy as np

__all__ = [
    "IDEAL_PROFILE",
    "gaussian_slice_profile",
    "mdme_jacobian",
    "mdme_signal",
    "rician_mean",
    "rician_mean_scalar",
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


# nogil: called from the QC thread beside synthesis + enhancement (processing.run)
@nb.njit(cache=True, nogil=True)
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


def kernel_protocol(
    delays_ms: Any,
    echo_times_ms: Any,
    tr_ms: float,
    saturation_deg: float,
    excitation_deg: float,
    profile: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, float, float, float, np.ndarray, np.ndarray]:
    """An MDME protocol as the numba kernels take it: ``(td, te, tr, theta, alpha, ps, pw)``,
    delays and echo times float64 ms, TR ms, saturation and excitation angles in radians,
    slice-profile scales and weights float64."""
    return (
        np.ascontiguousarray(delays_ms, np.float64),
        np.ascontiguousarray(echo_times_ms, np.float64),
        float(tr_ms),
        math.radians(saturation_deg),
        math.radians(excitation_deg),
        np.ascontiguousarray(profile[0], np.float64),
        np.ascontiguousarray(profile[1], np.float64),
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
    proto = kernel_protocol(
        delays_ms, echo_times_ms, tr_ms, saturation_deg, excitation_deg, profile
    )
    ns = proto[0].size * proto[1].size
    out = np.empty((m0v.size, ns))
    jac = np.empty((m0v.size, ns, 4))
    _signal_kernel(m0v, r1v, r2v, b1v, *proto, bool(magnitude), out, jac)
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


# Polynomial coefficients (lowest order first) of Abramowitz & Stegun 9.8.1-9.8.4.
_I0_SMALL = (1.0, 3.5156229, 3.0899424, 1.2067492, 0.2659732, 0.0360768, 0.0045813)
_I1_SMALL = (0.5, 0.87890594, 0.51498869, 0.15084934, 0.02658733, 0.00301532, 0.00032411)
_I0_LARGE = (
    0.39894228, 0.01328592, 0.00225319, -0.00157565, 0.00916281,
    -0.02057706, 0.02635537, -0.01647633, 0.00392377,
)  # fmt: skip
_I1_LARGE = (
    0.39894228, -0.03988024, -0.00362018, 0.00163801, -0.01031555,
    0.02282967, -0.02895312, 0.01787654, -0.00420059,
)  # fmt: skip


@nb.njit(cache=True, fastmath=False, inline="always")
def _horner(t: float, coeffs) -> float:
    acc = 0.0
    for k in range(len(coeffs) - 1, -1, -1):
        acc = acc * t + coeffs[k]
    return acc


@nb.njit(cache=True, fastmath=False, inline="always")
def _bessel_i0e_i1e(u: float):
    """exp(-u)*I0(u) and exp(-u)*I1(u) for u >= 0 (Abramowitz & Stegun 9.8.1-9.8.4, the
    polynomials of Numerical Recipes' bessi0/bessi1; relative error < 2e-7)."""
    if u < 3.75:
        t = (u / 3.75) ** 2
        e = math.exp(-u)
        return _horner(t, _I0_SMALL) * e, u * _horner(t, _I1_SMALL) * e
    t = 3.75 / u
    r = 1.0 / math.sqrt(u)
    return _horner(t, _I0_LARGE) * r, _horner(t, _I1_LARGE) * r


_SQRT_HALF_PI = math.sqrt(0.5 * math.pi)


@nb.njit(cache=True, fastmath=False, inline="always")
def rician_mean_scalar(a: float, sigma: float):
    """Expected magnitude of a signal of amplitude ``|a|`` in complex Gaussian noise of SD
    ``sigma`` per channel, and its derivative with respect to ``a``: ``(E, dE/da)``.

    ``E = sigma*sqrt(pi/2)*[(1+2u)*I0e(u) + 2u*I1e(u)]``, ``u = a^2/(4 sigma^2)``;
    ``dE/d|a| = sqrt(pi/2)*|a|/(2 sigma)*[I0e(u) + I1e(u)]`` (I0e, I1e: exponentially scaled
    Bessel functions). E is even and smooth in a (dE/da = 0 at a = 0), so the fitted model
    has no kink at the zero crossing. Above 40 sigma the asymptote ``|a| + sigma^2/(2|a|)``
    is used (relative difference < 1e-7). ``sigma <= 0`` gives ``(|a|, sign(a))``.
    """
    sg = -1.0 if a < 0.0 else 1.0
    aa = a * sg
    if not sigma > 0.0:
        return aa, sg
    x = aa / sigma
    if x > 40.0:
        inv = sigma / aa
        return aa + 0.5 * sigma * inv, sg * (1.0 - 0.5 * inv * inv)
    u = 0.25 * x * x
    i0, i1 = _bessel_i0e_i1e(u)
    e = sigma * _SQRT_HALF_PI * ((1.0 + 2.0 * u) * i0 + 2.0 * u * i1)
    return e, sg * _SQRT_HALF_PI * 0.5 * x * (i0 + i1)


@nb.vectorize(cache=True)
def _rician_mean_v(a: float, sigma: float) -> float:
    return rician_mean_scalar(a, sigma)[0]


def rician_mean(amplitude, sigma: float) -> np.ndarray:
    """Expected magnitude ``E|S + n|`` of noise-free signals ``amplitude`` (any shape, any
    sign) with complex Gaussian noise of SD ``sigma`` per channel. float64, same shape."""
    return _rician_mean_v(np.asarray(amplitude, np.float64), float(sigma))


def sample_axes(signal_flat: np.ndarray, n_delays: int, n_echoes: int) -> np.ndarray:
    """Reshape a delay-major ``[..., n_delay*n_echo]`` array to ``[..., delay, echo]``."""
    return signal_flat.reshape(signal_flat.shape[:-1] + (n_delays, n_echoes))
