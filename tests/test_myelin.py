"""Four-compartment myelin model (processing.myelin).

Ground truth: voxels simulated from the model with stated fractions, passed through the
real MDME fit (processing.fit), and the digital phantom (processing.phantom) whose WM, GM
and CSF values are the 3T literature points of physics.md section 6.
"""

from __future__ import annotations

import numpy as np
import pytest

from processing.acquisition import Acquisition
from processing.fit import fit_mdme
from processing.myelin import (
    CALIBRATION_DOMAIN,
    DEFAULT_CONSTANTS,
    MyelinError,
    apparent_parameters,
    calibrate_constants,
    invert,
    myelin_maps,
    simulate_compartments,
)
from processing.pd import correct_pd
from processing.phantom import make_phantom
from processing.segmentation import intracranial_mask, segment

TD = (150.0, 580.0, 1900.0, 3850.0)
TE = (20.0, 100.0)
TR = 4000.0
SEQ = {"delays_ms": TD, "echo_times_ms": TE, "tr_ms": TR}


def test_calibration_reproduces_reference_tissues() -> None:
    """Calibrated to WM 600/70/67 -> 30 % and GM 1100/90/82 -> 10 % (module docstring)."""
    wm = apparent_parameters(0.30, 0.0, **SEQ)
    gm = apparent_parameters(0.10, 0.0, **SEQ)
    water = apparent_parameters(0.0, 1.0, **SEQ)
    for got, want in (
        (wm, (600.0, 70.0, 67.0)),
        (gm, (1100.0, 90.0, 82.0)),
        (water, (4300.0, 2000.0, 100.0)),
    ):
        assert got["t1_ms"] == pytest.approx(want[0], rel=2e-3)
        assert got["t2_ms"] == pytest.approx(want[1], rel=2e-3)
        assert got["pd_pu"] == pytest.approx(want[2], rel=2e-3)
    # More myelin -> faster relaxation and less visible water, monotonically.
    prev = apparent_parameters(0.0, 0.0, **SEQ)
    for my in (0.1, 0.2, 0.35):
        cur = apparent_parameters(my, 0.0, **SEQ)
        assert cur["t1_ms"] < prev["t1_ms"] and cur["pd_pu"] < prev["pd_pu"]
        prev = cur
    with pytest.raises(MyelinError, match="gm_mypv < wm_mypv"):
        calibrate_constants(wm_mypv=0.05, gm_mypv=0.1)


@pytest.mark.parametrize("b1", [0.85, 1.0, 1.15])
def test_recovers_known_mypv_through_the_real_fit(b1: float) -> None:
    """MyPV 0-35 % x free water (CSF + EPW) 0-30 %, noise-free, uniform B1, PD scale 100.

    The 8x5 block of model voxels sits in a 24x24 slice of pure model WM (MyPV 30 %) and
    GM (6 %), as partial-volume voxels sit in a brain, and everything goes through
    fit_mdme with its B1 smoothing pass (as in processing.run); MyPV must come back within
    1.5 pu.
    """
    my_v = np.linspace(0.0, 0.35, 8)
    fw_v = np.array([0.0, 0.05, 0.1, 0.2, 0.3])
    my_b, fw_b = np.meshgrid(my_v, fw_v, indexing="ij")
    my = np.full((24, 24), 0.30)
    my[:, 12:] = 0.06
    fw = np.zeros((24, 24))
    block = (slice(8, 16), slice(9, 14))
    my[block] = my_b
    fw[block] = fw_b
    s = simulate_compartments(my, fw, b1=b1, **SEQ) * 100.0  # pure water M0 = 100 pu
    sig = s.reshape(1, 24, 24, len(TD), len(TE)).transpose(0, 3, 4, 1, 2)
    acq = Acquisition(
        signal=np.ascontiguousarray(sig, np.float32),
        delays_ms=TD,
        echo_times_ms=TE,
        tr_ms=TR,
        saturation_deg=120.0,
        excitation_deg=90.0,
        voxel_size_mm=(4.0, 1.0, 1.0),
        affine=np.diag([1.0, 1.0, 4.0, 1.0]),
    )
    maps = fit_mdme(acq, np.ones(acq.shape, bool), b1_smoothing=True, noise_sd=1e-3)
    maps.pd_pu = maps.m0.copy()  # unit receive field: M0 is already in pu
    mm = myelin_maps(maps, np.ones(acq.shape, bool), 0.1, acq=acq)
    err = np.abs(mm.mypv[0] - 100.0 * my)
    assert err.max() < 1.5, f"max MyPV error {err.max():.2f} pu at B1 {b1}"
    # Without a segmentation, free water in parenchymal voxels (FW <= 50 %) is EPW.
    np.testing.assert_allclose(mm.epw[0], 100.0 * fw, atol=1.0)
    assert mm.myelin_volume_ml == pytest.approx(float(mm.mypv.sum()) / 100.0 * 0.1, rel=1e-6)


def test_phantom_tissue_myelin() -> None:
    """MNI phantom 4x64x64, SNR 50: pure WM 25-32 %, GM 5-15 %, CSF < 1 %."""
    ph = make_phantom((4, 64, 64), seed=1, snr=50.0)
    maps = correct_pd(fit_mdme(ph.acq, b1_smoothing=True))
    icm = intracranial_mask(maps, ph.acq)
    fr = segment(ph.acq, maps, icmask=icm)
    mm = myelin_maps(maps, icm, ph.acq.voxel_volume_ml, acq=ph.acq, fractions=fr)
    med = {c: float(np.median(mm.mypv[ph.truth.pure_mask(c) & icm])) for c in ("WM", "GM", "CSF")}
    assert 25.0 <= med["WM"] <= 32.0, med
    assert 5.0 <= med["GM"] <= 15.0, med
    assert med["CSF"] < 1.0, med
    # CSF is not EPW when the segmentation says it is CSF.
    assert float(np.median(mm.epw[ph.truth.pure_mask("CSF") & icm])) < 1.0
    assert mm.constants["pd_my"] == pytest.approx(DEFAULT_CONSTANTS.pd_my)


def test_immature_brain_has_less_myelin() -> None:
    """A child-like phantom (WM T1 900, T2 85, PD 78; GM 1300/95/86) gets far less MyPV."""
    tissues = {"WM": (900.0, 85.0, 78.0), "GM": (1300.0, 95.0, 86.0)}
    ph = make_phantom((4, 64, 64), seed=3, snr=50.0, tissues=tissues, anatomy="ellipsoid")
    maps = correct_pd(fit_mdme(ph.acq, b1_smoothing=True))
    icm = intracranial_mask(maps, ph.acq)
    mm = myelin_maps(maps, icm, ph.acq.voxel_volume_ml, acq=ph.acq)
    wm = float(np.median(mm.mypv[ph.truth.pure_mask("WM") & icm]))
    assert 3.0 < wm < 20.0, wm
    assert float(mm.mypv.min()) >= 0.0


def test_bad_input_names_the_problem() -> None:
    with pytest.raises(MyelinError, match="give either acq or delays_ms"):
        invert(np.array([600.0]), np.array([70.0]), np.array([67.0]))
    with pytest.raises(MyelinError, match="tr_ms"):
        invert(
            np.array([600.0]),
            np.array([70.0]),
            np.array([67.0]),
            delays_ms=TD,
            echo_times_ms=TE,
            tr_ms=1000.0,
        )
    with pytest.raises(MyelinError, match="fractions must be"):
        simulate_compartments(0.7, 0.5, **SEQ)
    my, fw = invert(
        np.array([np.nan, 600.0]), np.array([70.0, 70.0]), np.array([67.0, 67.0]), **SEQ
    )
    assert np.isnan(my[0]) and my[1] == pytest.approx(0.30, abs=0.01) and fw[1] < 0.01


def test_cortex_slower_than_the_anchor_stays_in_the_published_range() -> None:
    """Issue 13: procedural phantom 4x64x64, SNR 50, GM 1200/95/85 and WM 620/72/69 (inside
    physics.md's 3T ranges, away from the calibration tissues): pure GM MyPV within the 5-15 %
    of adult cortex (the 6 % anchor gave ~3 %), pure WM within 25-32 %."""
    tissues = {"WM": (620.0, 72.0, 69.0), "GM": (1200.0, 95.0, 85.0)}
    ph = make_phantom((4, 64, 64), seed=4, snr=50.0, tissues=tissues, anatomy="ellipsoid")
    maps = correct_pd(fit_mdme(ph.acq, b1_smoothing=True))
    icm = intracranial_mask(maps, ph.acq)
    fr = segment(ph.acq, maps, icmask=icm)
    mm = myelin_maps(maps, icm, ph.acq.voxel_volume_ml, acq=ph.acq, fractions=fr)
    med = {c: float(np.median(mm.mypv[ph.truth.pure_mask(c) & icm])) for c in ("WM", "GM")}
    assert 5.0 <= med["GM"] <= 15.0, med
    assert 25.0 <= med["WM"] <= 32.0, med


@pytest.mark.parametrize(
    "tissues, flagged",
    [
        ({"WM": (620.0, 72.0, 69.0), "GM": (1200.0, 95.0, 85.0)}, set()),
        ({"WM": (750.0, 60.0, 70.0), "GM": (1350.0, 100.0, 84.0)}, {"WM t1_ms"}),
    ],
    ids=["inside", "off-centre"],
)
def test_tissue_outside_the_calibration_is_flagged(tissues, flagged) -> None:
    """Procedural phantom 4x64x64, SNR 50, through fit, PD, segmentation and myelin.
    Tissue inside physics.md section 6's 3T MDME ranges (WM 620/72/69, GM 1200/95/85)
    gives no calibration warning; the off-centre set (WM 750/60/70, GM 1350/100/84: both
    T1 ~25 % longer, as inversion-recovery T1 are) is outside the values the constants
    were calibrated on, and the result says so, naming at least WM T1 (750 ms against
    550-650 +- 3.15 %; GM's 1350 ms sits at the widened edge, 1340 ms)."""
    ph = make_phantom((4, 64, 64), seed=4, snr=50.0, tissues=tissues, anatomy="ellipsoid")
    maps = correct_pd(fit_mdme(ph.acq, b1_smoothing=True))
    icm = intracranial_mask(maps, ph.acq)
    fr = segment(ph.acq, maps, icmask=icm)
    mm = myelin_maps(maps, icm, ph.acq.voxel_volume_ml, acq=ph.acq, fractions=fr)
    named = {
        f"{t} {q}"
        for t, lim in CALIBRATION_DOMAIN.items()
        for q in lim
        if any(w.startswith(f"pure {t} {q} ") for w in mm.calibration_warnings)
    }
    # other off-centre values sit near the widened edges: they may be named too
    assert flagged <= named and (named or not flagged), mm.calibration_warnings
    assert bool(mm.calibration_warnings) == bool(flagged)
    # without a segmentation nothing is checked (and nothing claimed)
    bare = myelin_maps(maps, icm, ph.acq.voxel_volume_ml, acq=ph.acq)
    assert bare.calibration_warnings == []


def test_pure_tissue_mypv_across_the_calibrated_ranges() -> None:
    """The model on pure tissue (no fit, B1 1.0) across physics.md section 6's 3T MDME
    ranges, PD from the relation 1/PD = 0.918 + 0.332 s * R1 (processing.pd): WM T1
    600-650 ms (T2 60-75) gives MyPV 25-32 %, cortical GM T1 950-1300 ms (T2 80-100) 4-15 %,
    and MyPV falls monotonically with T1 (myelin shortens T1)."""

    def pd(t1: float) -> float:
        return 100.0 / (0.918 + 0.332 * 1000.0 / t1)

    for t1s, t2s, lo, hi in (
        ((600.0, 625.0, 650.0), (60.0, 70.0, 75.0), 25.0, 32.0),
        ((950.0, 1100.0, 1200.0, 1300.0), (80.0, 90.0, 100.0), 4.0, 15.0),
    ):
        for t2 in t2s:
            t1 = np.array(t1s)
            my, _ = invert(t1, np.full(t1.shape, t2), pd(t1), 1.0, **SEQ)
            assert np.all((100 * my >= lo) & (100 * my <= hi)), (t2, 100 * my)
            assert np.all(np.diff(my) < 0), my
