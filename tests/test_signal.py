"""processing.signal: analytic Jacobian vs finite differences, zero crossing (physics.md §1)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from processing.signal import IDEAL_PROFILE, gaussian_slice_profile, mdme_jacobian, mdme_signal

TD = np.array([150.0, 580.0, 1900.0, 3850.0])
TE = np.array([20.0, 100.0])
TR = 4000.0


@pytest.mark.parametrize("magnitude", [False, True])
@pytest.mark.parametrize(
    "profile", [IDEAL_PROFILE, gaussian_slice_profile(7)], ids=["ideal", "gauss"]
)
def test_jacobian_matches_central_differences(magnitude, profile):
    rng = np.random.default_rng(5)
    n = 200
    m0 = rng.uniform(30, 150, n)
    t1 = rng.uniform(300, 4500, n)
    t2 = rng.uniform(40, 2000, n)
    b1 = rng.uniform(0.6, 1.4, n)
    kw = dict(magnitude=magnitude, profile=profile)
    s, jac = mdme_jacobian(m0, t1, t2, b1, TD, TE, TR, **kw)
    assert s.shape == (n, 8) and jac.shape == (n, 8, 4)
    # Parameters of the Jacobian: M0, R1 [1/ms], R2 [1/ms], B1.
    params = [m0, 1.0 / t1, 1.0 / t2, b1]
    fd = np.empty_like(jac)
    for k in range(4):
        h = 1e-6 * np.abs(params[k])
        up = [p.copy() for p in params]
        dn = [p.copy() for p in params]
        up[k] += h
        dn[k] -= h
        su = mdme_signal(up[0], 1 / up[1], 1 / up[2], up[3], TD, TE, TR, **kw)
        sd = mdme_signal(dn[0], 1 / dn[1], 1 / dn[2], dn[3], TD, TE, TR, **kw)
        fd[..., k] = (su - sd) / (2 * h[:, None])
    scale = np.abs(jac).max(axis=1, keepdims=True) + 1e-12
    err = np.abs(fd - jac) / scale
    if magnitude:
        # |S| has a kink at S = 0: skip samples within the FD step of the zero crossing.
        err = np.where(np.abs(s)[..., None] > 1e-3, err, 0.0)
    assert err.max() < 1e-5, err.max()


def test_magnitude_is_abs_of_real():
    s = mdme_signal(80.0, 900.0, 90.0, 1.1, TD, TE, TR)
    np.testing.assert_allclose(
        mdme_signal(80.0, 900.0, 90.0, 1.1, TD, TE, TR, magnitude=True), np.abs(s)
    )
    assert s[0] < 0 < s[-1]  # short delay negative, long delay positive


@pytest.mark.parametrize(("t1", "expected"), [(600.0, 243.0), (1100.0, 432.0)])
def test_zero_crossing(t1, expected):
    """TD0 = T1 ln[1.5 / (1 + 0.5 exp(-TR/T1))] at B1 = 1, theta 120: the signal vanishes."""
    td0 = t1 * math.log(1.5 / (1.0 + 0.5 * math.exp(-TR / t1)))
    assert abs(td0 - expected) < 0.5
    s = mdme_signal(
        100.0, t1, 80.0, 1.0, np.array([td0 - 1.0, td0, td0 + 1.0]), np.array([10.0]), TR
    )
    assert abs(s[1]) < 1e-9
    assert s[0] < 0 < s[2]


def test_ideal_profile_equals_single_isochromat_and_profile_lowers_effective_flip():
    a = mdme_signal(80.0, 900.0, 90.0, 1.0, TD, TE, TR)
    b = mdme_signal(80.0, 900.0, 90.0, 1.0, TD, TE, TR, profile=(np.array([1.0]), np.array([1.0])))
    np.testing.assert_array_equal(a, b)
    c = mdme_signal(80.0, 900.0, 90.0, 1.0, TD, TE, TR, profile=gaussian_slice_profile(9))
    # Weaker saturation at the slice edges: the short-delay sample is less negative.
    assert c[0] > a[0]


def test_fully_relaxed_signal_is_m0():
    # TD -> TR, very short T1 and TE: g -> 1, so S -> M0.
    s = mdme_signal(100.0, 1.0, 1e6, 1.0, np.array([3000.0]), np.array([1e-6]), TR)
    assert abs(s[0] - 100.0) < 1e-6


def test_rician_mean_matches_monte_carlo_and_its_slope():
    """E|A + n| for complex Gaussian n (SD sigma per channel), against 400k draws; the
    analytic slope against central differences; sigma 0 gives |A|."""
    from processing.signal import rician_mean, rician_mean_scalar

    sigma = 1.7
    rng = np.random.default_rng(0)
    n = rng.normal(0, sigma, (2, 400_000))
    for a in (0.0, 0.8, 2.5, 6.0, 15.0, 80.0):
        mc = np.abs(a + n[0] + 1j * n[1]).mean()
        assert rician_mean(a, sigma) == pytest.approx(mc, rel=3e-3)
        assert rician_mean(-a, sigma) == rician_mean(a, sigma)
        e1, _ = rician_mean_scalar(a + 1e-5, sigma)
        e0, _ = rician_mean_scalar(a - 1e-5, sigma)
        assert rician_mean_scalar(a, sigma)[1] == pytest.approx((e1 - e0) / 2e-5, abs=1e-5)
    assert rician_mean(0.0, sigma) == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=1e-6)
    assert rician_mean(-3.0, 0.0) == 3.0
