"""Synthetic MPRAGE: closed-form steady state vs a pulse-by-pulse simulation; contrast."""

from __future__ import annotations

import math

import numpy as np
import pytest

from processing.mprage import MprageParams, mprage_signal, synthesize_mprage
from processing.results import QuantMaps


def _brute_force(t1: float, t2: float, p: MprageParams, n_cycles: int = 30) -> float:
    """Every pulse, n_cycles from equilibrium, ideal spoiling (independent of the algebra)."""
    alpha = math.radians(p.flip_deg)
    mz = 1.0
    lead = p.ti_ms - p.centre_index * p.echo_spacing_ms
    sample = 0.0
    for _ in range(n_cycles):
        mz = -p.inversion_efficiency * mz
        t = 0.0
        mz = 1 + (mz - 1) * math.exp(-lead / t1)
        t += lead
        for k in range(p.n_pulses):
            if k == p.centre_index:
                sample = mz * math.sin(alpha) * math.exp(-p.te_ms / t2)
            mz *= math.cos(alpha)
            mz = 1 + (mz - 1) * math.exp(-p.echo_spacing_ms / t1)
            t += p.echo_spacing_ms
        mz = 1 + (mz - 1) * math.exp(-(p.tr_ms - t) / t1)
    return sample


@pytest.mark.parametrize(
    "params", [MprageParams(), MprageParams(ti_ms=1000, flip_deg=7, centre_index=0)]
)
def test_mprage_matches_pulse_by_pulse_simulation(params):
    for t1, t2 in ((830, 70), (1330, 90), (4300, 2000), (400, 50)):
        assert mprage_signal(t1, t2, params) == pytest.approx(
            _brute_force(t1, t2, params), abs=1e-9
        )


def test_mprage_contrast_and_errors():
    wm, gm, csf = (
        abs(float(mprage_signal(t1, t2))) * pd
        for t1, t2, pd in ((830, 70, 70), (1330, 90, 80), (4300, 2000, 100))
    )
    assert wm > 1.2 * gm > 1.2 * csf
    with pytest.raises(ValueError, match="ti_ms"):
        MprageParams(ti_ms=100)
    with pytest.raises(ValueError, match="tr_ms"):
        MprageParams(tr_ms=1500)
    shape = (2, 3, 4)
    maps = QuantMaps(
        t1_ms=np.full(shape, 830, np.float32),
        t2_ms=np.full(shape, 70, np.float32),
        pd_pu=np.full(shape, 70, np.float32),
        b1=np.ones(shape, np.float32),
        m0=np.ones(shape, np.float32),
        residual=np.zeros(shape, np.float32),
        mask=np.ones(shape, bool),
        failed=np.zeros(shape, bool),
    )
    img = synthesize_mprage(maps)
    assert img.image.shape == shape and img.image.max() == 16000
    assert "SYNTHETIC MPRAGE" in img.description
