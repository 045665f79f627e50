"""PD in percent units: receive-field estimate against phantom ground truth.

Ground truth: processing.phantom with its documented 3T tissues (WM 600/70/68, GM
1100/90/82, CSF 4300/2000/100, lesion 1200/130/85: T1 ms / T2 ms / PD pu), a smooth receive
field spanning 0.7-1.3 and B1 0.8-1.2. "Truth maps" are built without a fit
(M0 = coil * sum f_k PD_k, fraction-weighted R1); "fitted maps" come from fit_mdme on a
4x64x64 phantom at SNR 50, real (phase-corrected) signal.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from processing.pd import (
    PD_A_3T,
    PD_B_3T_S,
    PDCorrectionError,
    correct_pd,
    estimate_receive_field,
    pd_from_r1,
)
from processing.phantom import COMPARTMENTS, make_phantom, mni_available, truth_quantmaps

ANATOMY = "mni" if mni_available() else "ellipsoid"


def mixture_pd(truth) -> np.ndarray:
    return sum(truth.fractions[c] * truth.tissues[c].pd_pu for c in COMPARTMENTS)


def field_cv(field: np.ndarray, truth) -> float:
    """Coefficient of variation of estimated/true field inside the head (0 = exact shape)."""
    r = field[truth.head] / truth.coil[truth.head]
    return float(r.std() / r.mean())


def test_3t_constants_reproduce_the_tissue_table() -> None:
    # physics.md section 6 mid-range values the constants were derived from
    assert pd_from_r1(1000 / 600, PD_A_3T, PD_B_3T_S) == pytest.approx(68.0, abs=1.0)
    assert pd_from_r1(1000 / 1100) == pytest.approx(82.0, abs=1.0)
    assert pd_from_r1(1000 / 4300) == pytest.approx(100.0, abs=1.0)


@pytest.mark.parametrize("relation", ["fit", "fixed"])
@pytest.mark.parametrize("anatomy", sorted({ANATOMY, "ellipsoid"}))
def test_pd_on_truth_maps_within_1pu(relation: str, anatomy: str) -> None:
    ph = make_phantom((4, 64, 64), snr=None, anatomy=anatomy, seed=1)
    t = ph.truth
    maps = truth_quantmaps(t)
    out = correct_pd(maps, voxel_size_mm=ph.acq.voxel_size_mm, relation=relation)
    want = mixture_pd(t)
    for c in ("WM", "GM"):
        m = t.pure_mask(c)
        err = out.pd_pu[m] - want[m]
        assert abs(float(np.median(err))) < 1.0, c
        assert float(np.percentile(np.abs(err), 95)) < 1.0, c
    assert field_cv(out.receive_field, t) < 0.01
    # scale: pure CSF at 100 pu
    assert float(np.median(out.pd_pu[t.pure_mask("CSF")])) == pytest.approx(100.0, abs=1.0)


def test_fitted_relation_is_robust_to_other_tissue_values() -> None:
    tissues = {"WM": {"t1_ms": 800.0, "pd_pu": 60.0}, "GM": {"t1_ms": 1300.0, "pd_pu": 88.0}}
    ph = make_phantom((4, 64, 64), snr=None, anatomy=ANATOMY, seed=1, tissues=tissues)
    t = ph.truth
    maps = truth_quantmaps(t)
    fit = correct_pd(maps, voxel_size_mm=ph.acq.voxel_size_mm, relation="fit")
    fixed = correct_pd(maps, voxel_size_mm=ph.acq.voxel_size_mm, relation="fixed")
    want = mixture_pd(t)
    errs = {}
    for name, out in (("fit", fit), ("fixed", fixed)):
        errs[name] = max(
            abs(float(np.median(out.pd_pu[t.pure_mask(c)] - want[t.pure_mask(c)])))
            for c in ("WM", "GM")
        )
    assert errs["fit"] < 1.0
    assert field_cv(fit.receive_field, t) < 0.01
    # the a, b relation does not hold for these tissues, and it shows
    assert errs["fixed"] > 2.0 * errs["fit"]


def test_uniform_coil_gives_a_flat_field_and_oblique_works() -> None:
    ph = make_phantom((4, 64, 64), snr=None, anatomy=ANATOMY, coil=False, oblique=True)
    out = correct_pd(truth_quantmaps(ph.truth), voxel_size_mm=ph.acq.voxel_size_mm)
    assert field_cv(out.receive_field, ph.truth) < 0.005


@pytest.fixture(scope="module")
def fitted():
    from processing.fit import fit_mdme

    ph = make_phantom((4, 64, 64), snr=50.0, anatomy=ANATOMY, seed=1)
    return ph, fit_mdme(ph.acq, n_threads=1)


def test_pd_on_fitted_maps(fitted) -> None:
    ph, maps = fitted
    t = ph.truth
    out = correct_pd(maps, voxel_size_mm=ph.acq.voxel_size_mm)
    want = mixture_pd(t)
    for c in ("WM", "GM", "CSF"):
        m = t.pure_mask(c) & ~maps.failed
        err = float(np.median(out.pd_pu[m] - want[m]))
        assert abs(err) < 2.5, f"{c}: median PD error {err:.2f} pu"
    assert field_cv(out.receive_field, t) < 0.02


def test_returns_a_new_quantmaps_and_keeps_the_input(fitted) -> None:
    ph, maps = fitted
    before = maps.pd_pu.copy()
    out = correct_pd(maps, voxel_size_mm=ph.acq.voxel_size_mm)
    assert out is not maps and maps.receive_field is None
    assert np.array_equal(maps.pd_pu, before)
    assert out.pd_pu.dtype == np.float32 and out.receive_field.dtype == np.float32
    assert np.all(out.pd_pu[~maps.mask] == 0) and np.isfinite(out.pd_pu).all()
    np.testing.assert_array_equal(out.t1_ms, maps.t1_ms)


def test_without_csf_the_relation_sets_the_scale() -> None:
    ph = make_phantom((4, 64, 64), snr=None, anatomy=ANATOMY, seed=1)
    t = ph.truth
    maps = truth_quantmaps(t)
    no_csf = dataclasses.replace(maps, mask=maps.mask & (maps.r1_per_s > 0.45))
    fit = estimate_receive_field(no_csf, voxel_size_mm=ph.acq.voxel_size_mm)
    assert not fit.csf_reference and fit.n_csf == 0
    out = correct_pd(no_csf, voxel_size_mm=ph.acq.voxel_size_mm)
    for c in ("WM", "GM"):
        m = t.pure_mask(c)
        assert abs(float(np.median(out.pd_pu[m])) - t.tissues[c].pd_pu) < 2.0


def test_bad_input_is_named() -> None:
    ph = make_phantom((2, 32, 32), snr=None, anatomy="ellipsoid")
    maps = truth_quantmaps(ph.truth)
    empty = dataclasses.replace(maps, mask=np.zeros_like(maps.mask))
    with pytest.raises(PDCorrectionError, match="tissue voxels"):
        correct_pd(empty)
    seconds = dataclasses.replace(maps, t1_ms=maps.t1_ms / 1000.0)  # T1 in s, not ms
    with pytest.raises(PDCorrectionError, match="ms"):
        correct_pd(seconds)
    with pytest.raises(PDCorrectionError, match="relation"):
        correct_pd(maps, relation="magic")
    with pytest.raises(PDCorrectionError, match="a, b"):
        correct_pd(maps, a=-1.0)
