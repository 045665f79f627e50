"""Fit quality control (processing.qc) on phantoms with known corruption.

The phantom's ``corrupt_delay`` scales one delay image by 0.5-0.8 and shifts it 2-4 voxels
along y (flow / motion between dynamics); the clean phantom has the same anatomy and noise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from processing.fit import fit_mdme
from processing.pd import correct_pd
from processing.phantom import make_phantom
from processing.qc import QCError, fit_qc
from processing.segmentation import segment


def _qc(**kw):
    ph = make_phantom((4, 64, 64), seed=2, snr=50.0, **kw)
    maps = correct_pd(fit_mdme(ph.acq, b1_smoothing=True))
    return ph, maps, fit_qc(ph.acq, maps, segment(ph.acq, maps))


@pytest.mark.parametrize("magnitude", [False, True])
def test_clean_phantom_passes(magnitude: bool) -> None:
    _ph, _maps, q = _qc(magnitude=magnitude)
    assert q["status"] == "pass", q["reasons"]
    assert not q["motion_or_corruption"] and not q["delay_outlier"]
    assert 0.8 < q["residual_to_noise"] < 1.3
    assert max(q["delay_residual_to_noise"]) < 1.5
    assert q["failed_fraction"] < 0.05
    assert 0.75 < q["b1_p1"] < q["b1_p99"] < 1.25  # phantom B1 field spans 0.8-1.2
    for t in ("WM", "GM", "CSF"):
        assert q["tissues"][t]["t1_ms_in_range"], q["tissues"][t]
    json.dumps(q)  # plain JSON types only


@pytest.mark.parametrize("delay", [0, 1, 2, 3])
def test_corrupted_delay_is_flagged(delay: int) -> None:
    _ph, _maps, q = _qc(corrupt_delay=delay)
    assert q["motion_or_corruption"], q
    assert q["status"] == "fail"
    assert any("corrupted" in r for r in q["reasons"]), q["reasons"]
    json.dumps(q)


def test_last_delay_corruption_is_localized() -> None:
    """A bad long-delay image stands out on its own (the fit cannot absorb it)."""
    _ph, _maps, q = _qc(corrupt_delay=3)
    assert q["delay_outlier"] and q["delay_outlier_index"] == 3


def test_failed_fits_and_bad_input() -> None:
    ph, maps, q0 = _qc()
    maps.failed = maps.mask.copy()
    maps.failed[:, :, : maps.failed.shape[2] // 2] = False  # about half the fits failed
    q = fit_qc(ph.acq, maps)
    assert q["failed_fraction"] > 0.2 and q["status"] == "fail"
    assert q0["failed_fraction"] < q["failed_fraction"]
    bad = correct_pd(fit_mdme(ph.acq))
    bad.t1_ms = np.zeros((1, 2, 3), np.float32)
    with pytest.raises(QCError, match=r"maps\.t1_ms"):
        fit_qc(ph.acq, bad)
