"""Digital brain phantom: truth consistency, mixture signal, noise, geometry, bad input.

Sizes are small (4-12 slices of 64x64) so the file runs in seconds on 2 cores.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from processing import phantom as phantom_mod
from processing.phantom import (
    COMPARTMENTS,
    DEFAULT_TISSUES,
    PhantomError,
    TissueParams,
    make_phantom,
    mni_available,
    simulate_voxels,
    truth_quantmaps,
)
from processing.signal import mdme_signal

PROTOCOL = {
    "delays_ms": (150.0, 580.0, 1900.0, 3850.0),
    "echo_times_ms": (20.0, 100.0),
    "tr_ms": 4000.0,
    "saturation_deg": 120.0,
    "excitation_deg": 90.0,
}
ANATOMIES = ["mni", "ellipsoid"] if mni_available() else ["ellipsoid"]


@pytest.fixture(scope="module", params=ANATOMIES)
def noiseless(request: pytest.FixtureRequest) -> phantom_mod.Phantom:
    return make_phantom((4, 64, 64), snr=None, anatomy=request.param, seed=2)


def test_fractions_sum_to_one_inside_head_and_zero_outside(noiseless: phantom_mod.Phantom) -> None:
    t = noiseless.truth
    total = sum(t.fractions[c] for c in COMPARTMENTS)
    assert t.head.sum() > 1000
    np.testing.assert_allclose(total[t.head], 1.0, atol=1e-5)
    assert np.all(total[~t.head] == 0)
    for c in COMPARTMENTS:
        f = t.fractions[c]
        assert f.dtype == np.float32 and f.shape == (4, 64, 64)
        assert f.min() >= 0 and f.max() <= 1.0 + 1e-6
        assert t.pure_mask(c).sum() > 0, f"no pure {c} voxel"


def test_truth_maps_hold_the_dominant_tissue_values(noiseless: phantom_mod.Phantom) -> None:
    t = noiseless.truth
    for c in COMPARTMENTS:
        m = t.pure_mask(c)
        tp = t.tissues[c]
        assert np.all(t.t1_ms[m] == np.float32(tp.t1_ms))
        assert np.all(t.t2_ms[m] == np.float32(tp.t2_ms))
        assert np.all(t.pd_pu[m] == np.float32(tp.pd_pu))
        assert np.all(t.label[m] == COMPARTMENTS.index(c))
    assert np.all(t.t1_ms[~t.head] == 0) and np.all(t.label[~t.head] == -1)
    assert np.array_equal(
        t.pure, t.head & (np.max(np.stack(list(t.fractions.values())), 0) >= 0.95)
    )


def test_signal_is_the_mixture_of_compartment_signals(noiseless: phantom_mod.Phantom) -> None:
    """Reference: processing.signal.mdme_signal per compartment, summed with the fractions."""
    acq, t = noiseless.acq, noiseless.truth
    rng = np.random.default_rng(0)
    zz, yy, xx = np.nonzero(t.head)
    pick = rng.choice(zz.size, 300, replace=False)
    for i in pick:
        z, y, x = zz[i], yy[i], xx[i]
        expected = np.zeros(8)
        for c in COMPARTMENTS:
            tp = t.tissues[c]
            m0 = t.fractions[c][z, y, x] * tp.pd_pu * t.coil[z, y, x]
            expected += mdme_signal(m0, tp.t1_ms, tp.t2_ms, t.b1[z, y, x], **PROTOCOL)
        got = acq.signal[z, :, :, y, x].ravel()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
    assert np.all(acq.signal.transpose(1, 2, 0, 3, 4)[:, :, ~t.head] == 0)


def test_partial_volume_is_not_a_signal_of_mixed_parameters() -> None:
    # 50 % WM + 50 % CSF, unit coil and B1: signals add; fraction-weighted T1/T2/PD differ.
    wm, csf = DEFAULT_TISSUES["WM"], DEFAULT_TISSUES["CSF"]
    frac = np.array([[0.5, 0.5]])
    mix = simulate_voxels(
        frac,
        [wm.t1_ms, csf.t1_ms],
        [wm.t2_ms, csf.t2_ms],
        [wm.pd_pu, csf.pd_pu],
        1.0,
        1.0,
        **PROTOCOL,
    ).ravel()
    ref = 0.5 * mdme_signal(wm.pd_pu, wm.t1_ms, wm.t2_ms, 1.0, **PROTOCOL) + 0.5 * mdme_signal(
        csf.pd_pu, csf.t1_ms, csf.t2_ms, 1.0, **PROTOCOL
    )
    np.testing.assert_allclose(mix, ref, rtol=1e-10)
    averaged = mdme_signal(
        0.5 * (wm.pd_pu + csf.pd_pu),
        1.0 / (0.5 / wm.t1_ms + 0.5 / csf.t1_ms),
        1.0 / (0.5 / wm.t2_ms + 0.5 / csf.t2_ms),
        1.0,
        **PROTOCOL,
    )
    assert np.max(np.abs(averaged - mix)) > 3.0  # clearly different model


def test_simulate_voxels_accepts_per_voxel_tissues() -> None:
    """Per-voxel jittered tissue values ([n, K]) against mdme_signal voxel by voxel."""
    rng = np.random.default_rng(3)
    n = 20
    frac = rng.dirichlet([1.0, 1.0, 1.0], size=n)
    t1 = rng.uniform(500, 4500, size=(n, 3))
    t2 = rng.uniform(60, 2000, size=(n, 3))
    pd = rng.uniform(60, 100, size=(n, 3))
    b1 = rng.uniform(0.8, 1.2, size=n)
    coil = rng.uniform(0.7, 1.3, size=n)
    got = simulate_voxels(frac, t1, t2, pd, b1, coil, **PROTOCOL)
    assert got.shape == (n, 4, 2)
    for i in range(n):
        want = sum(
            mdme_signal(frac[i, k] * pd[i, k] * coil[i], t1[i, k], t2[i, k], b1[i], **PROTOCOL)
            for k in range(3)
        )
        np.testing.assert_allclose(got[i].ravel(), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(PhantomError, match="t1_ms"):
        simulate_voxels(frac, t1[:, :2], t2, pd, b1, coil, **PROTOCOL)


def test_noise_sd_matches_snr_and_is_seeded() -> None:
    snr = 40.0
    real = make_phantom((2, 64, 64), snr=snr, seed=5, anatomy="ellipsoid")
    bg = ~real.truth.head
    vals = real.acq.signal[:, :, :, bg[0]]  # background of slice 0 footprint
    sd = float(np.std(real.acq.signal.transpose(1, 2, 0, 3, 4)[:, :, bg]))
    assert abs(sd - 100.0 / snr) / (100.0 / snr) < 0.03
    assert vals.min() < 0  # real, signed output
    again = make_phantom((2, 64, 64), snr=snr, seed=5, anatomy="ellipsoid")
    other = make_phantom((2, 64, 64), snr=snr, seed=6, anatomy="ellipsoid")
    assert np.array_equal(real.acq.signal, again.acq.signal)
    assert not np.array_equal(real.acq.signal, other.acq.signal)


def test_magnitude_background_is_rayleigh() -> None:
    snr = 40.0
    ph = make_phantom((2, 64, 64), snr=snr, seed=1, magnitude=True, anatomy="ellipsoid")
    assert ph.acq.is_magnitude and ph.acq.signal.min() >= 0
    bg = ph.acq.signal.transpose(1, 2, 0, 3, 4)[:, :, ~ph.truth.head]
    sigma = 100.0 / snr
    assert abs(float(bg.mean()) - sigma * math.sqrt(math.pi / 2)) / sigma < 0.05


def test_b1_and_coil_fields_span_their_ranges_smoothly() -> None:
    ph = make_phantom((6, 64, 64), snr=None, b1_range=(0.7, 1.25), anatomy="ellipsoid")
    t = ph.truth
    b1, coil = t.b1[t.head], t.coil[t.head]
    assert b1.min() == pytest.approx(0.7, abs=1e-5) and b1.max() == pytest.approx(1.25, abs=1e-5)
    assert coil.min() == pytest.approx(0.7, abs=1e-5) and coil.max() == pytest.approx(1.3, abs=1e-5)
    # smooth: neighbouring in-plane voxels (3.6 mm apart) differ by < 7 % of the range
    for f, span in ((t.b1, 0.55), (t.coil, 0.6)):
        for axis in (1, 2):
            assert np.abs(np.diff(f, axis=axis)).max() < 0.07 * span
    flat = make_phantom((2, 32, 32), snr=None, coil=False, anatomy="ellipsoid")
    assert np.all(flat.truth.coil == 1.0)


def test_oblique_rotates_the_grid_not_the_head() -> None:
    straight = make_phantom((40, 48, 48), snr=None, lesions=False, anatomy="ellipsoid")
    oblique = make_phantom((40, 48, 48), snr=None, lesions=False, oblique=True, anatomy="ellipsoid")
    a = oblique.acq.affine
    cols = a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)
    np.testing.assert_allclose(cols.T @ cols, np.eye(3), atol=1e-9)  # orthonormal directions
    np.testing.assert_allclose(
        np.linalg.norm(a[:3, :3], axis=0), oblique.acq.voxel_size_mm[::-1], rtol=1e-9
    )
    tilt = math.degrees(math.acos(abs(cols[2, 2])))
    assert 15.0 < tilt < 30.0  # slice normal tilted away from S
    assert np.allclose(straight.acq.affine[:3, :3], np.diag(straight.acq.voxel_size_mm[::-1]))
    # the same head in patient space: equal intracranial volume (grid covers the whole head)
    vol = [float(p.truth.head.sum()) * p.acq.voxel_volume_ml for p in (straight, oblique)]
    assert abs(vol[0] - vol[1]) / vol[0] < 0.03


def test_default_geometry_and_speed_of_any_matrix() -> None:
    ph = make_phantom((3, 50, 70), snr=20.0, anatomy="ellipsoid")
    assert ph.acq.signal.shape == (3, 4, 2, 50, 70)
    assert ph.acq.voxel_size_mm == pytest.approx((4.0, 230.0 / 50, 230.0 / 70))
    assert ph.acq.delay_source == "phantom"
    assert ph.acq.metadata["noise_sd"] == pytest.approx(5.0)


def test_corrupt_delay_changes_only_that_delay() -> None:
    clean = make_phantom((2, 48, 48), snr=None, seed=4, anatomy="ellipsoid")
    bad = make_phantom((2, 48, 48), snr=None, seed=4, corrupt_delay=2, anatomy="ellipsoid")
    for k in range(4):
        same = np.array_equal(clean.acq.signal[:, k], bad.acq.signal[:, k])
        assert same == (k != 2)
    info = bad.truth.corrupted
    assert info is not None and info["delay_index"] == 2 and 0.5 <= info["scale"] <= 0.8
    ratio = np.abs(bad.acq.signal[:, 2]).sum() / np.abs(clean.acq.signal[:, 2]).sum()
    assert ratio == pytest.approx(info["scale"], rel=0.02)


def test_tissue_overrides_and_lesions() -> None:
    ph = make_phantom(
        (6, 64, 64),
        snr=None,
        anatomy="ellipsoid",
        tissues={"WM": {"t1_ms": 800.0, "pd_pu": 60.0}, "LESION": TissueParams(1500, 150, 90)},
    )
    t = ph.truth
    assert t.tissues["WM"] == TissueParams(800.0, DEFAULT_TISSUES["WM"].t2_ms, 60.0)
    assert np.all(t.t1_ms[t.pure_mask("WM")] == 800.0)
    assert t.tissues["LESION"].pd_pu == 90
    assert 1 <= len(t.lesion_centres_mm) <= 4
    les = t.fractions["LESION"] > 0.5
    assert les.sum() > 0
    # lesions sit in WM: their neighbourhood is mostly WM, not CSF
    assert t.fractions["CSF"][les].mean() < 0.2
    none = make_phantom((6, 64, 64), snr=None, anatomy="ellipsoid", lesions=False)
    assert none.truth.fractions["LESION"].max() == 0 and none.truth.lesion_centres_mm == []


@pytest.mark.skipif(not mni_available(), reason="nilearn/nibabel not installed")
def test_mni_anatomy_has_brain_like_tissue_proportions() -> None:
    ph = make_phantom((12, 64, 64), snr=None, lesions=False, anatomy="mni")
    t = ph.truth
    n = t.head.sum()
    share = {c: float(t.fractions[c].sum() / n) for c in ("WM", "GM", "CSF")}
    assert 0.25 < share["WM"] < 0.50
    assert 0.35 < share["GM"] < 0.60
    assert 0.05 < share["CSF"] < 0.25
    # ventricles: pure CSF exists near the middle of the head, not only at the surface
    _z, y, x = np.nonzero(t.pure_mask("CSF"))
    assert np.any((np.abs(y - 32) < 10) & (np.abs(x - 32) < 10))


def test_missing_nilearn_falls_back_to_ellipsoid_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(phantom_mod, "mni_available", lambda: False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ph = phantom_mod.make_phantom((2, 32, 32), snr=None, anatomy="mni")
    assert ph.truth.anatomy == "ellipsoid"
    assert any("nilearn" in str(w.message) for w in rec)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"shape": (4, 64)}, "shape"),
        ({"shape": (0, 8, 8)}, "shape"),
        ({"snr": -1.0}, "snr"),
        ({"b1_range": (1.2, 0.8)}, "b1_range"),
        ({"corrupt_delay": 4}, "corrupt_delay"),
        ({"anatomy": "banana"}, "anatomy"),
        ({"tissues": {"FAT": {"t1_ms": 380}}}, "FAT"),
        ({"tissues": {"WM": {"t1_ms": -5}}}, "WM"),
        ({"tissues": {"WM": {"t1": 600}}}, "t1"),
        ({"voxel_size_mm": (1, 1)}, "voxel_size_mm"),
    ],
)
def test_bad_input_names_the_problem(kwargs: dict, word: str) -> None:
    args = {"shape": (2, 16, 16), "anatomy": "ellipsoid", **kwargs}
    with pytest.raises(PhantomError, match=word):
        make_phantom(**args)


def test_truth_quantmaps_modes(noiseless: phantom_mod.Phantom) -> None:
    t = noiseless.truth
    w = truth_quantmaps(t)
    d = truth_quantmaps(t, mixed="dominant")
    for c in ("WM", "GM", "CSF"):
        m = t.pure_mask(c) & (t.fractions[c] == 1.0)
        np.testing.assert_allclose(w.t1_ms[m], t.tissues[c].t1_ms, rtol=1e-5)
    m = t.pure
    np.testing.assert_allclose(d.t1_ms[m], t.t1_ms[m])
    np.testing.assert_allclose(d.m0[m], (t.pd_pu * t.coil)[m], rtol=1e-6)
    assert np.array_equal(w.mask, t.head) and w.receive_field is None
    with pytest.raises(PhantomError, match="mixed"):
        truth_quantmaps(t, mixed="average")
