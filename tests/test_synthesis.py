"""Synthetic contrasts: equations vs an event-stepped Bloch simulation, TI nulling, DIR solver,
presets, image scaling, per-patient DIR on phantom truth and on fitted maps.

Phantom: processing.phantom with its documented 3T tissues (WM 600/70/68, GM 1100/90/82,
CSF 4300/2000/100, lesion 1200/130/85: T1 ms / T2 ms / PD pu), 4x64x64 voxels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processing.pd import correct_pd
from processing.phantom import make_phantom, mni_available, truth_quantmaps
from processing.run import ContrastOverride
from processing.synthesis import (
    PRESETS,
    ContrastKind,
    ContrastSpec,
    SynthesisError,
    dir_times,
    dir_weight,
    ir_weight,
    per_patient_dir,
    resolve_spec,
    se_weight,
    synthesize,
    synthesize_all,
    ti_null,
    tissue_t1_from_histogram,
)

ANATOMY = "mni" if mni_available() else "ellipsoid"


def bloch_steady_state_mz(t1: float, tr: float, inversions_before_exc: tuple[float, ...]) -> float:
    """Mz just before excitation, by stepping ideal pulses through 30 repetitions.

    The 90-degree excitation (readout, TE << TR) leaves Mz = 0; each inversion at time
    ``TR - TI`` flips Mz; free relaxation ``Mz -> 1 - (1 - Mz) exp(-t/T1)`` in between.
    """
    events = sorted(tr - ti for ti in inversions_before_exc)
    mz = 0.0
    for _ in range(30):
        t, mz = 0.0, 0.0  # after excitation
        for te in events:
            mz = 1.0 - (1.0 - mz) * math.exp(-(te - t) / t1)
            mz = -mz
            t = te
        mz = 1.0 - (1.0 - mz) * math.exp(-(tr - t) / t1)
    return mz


@pytest.mark.parametrize("t1", [380.0, 600.0, 1100.0, 4300.0])
def test_equations_match_bloch_simulation(t1: float) -> None:
    r1, r2, te = np.array(1.0 / t1), np.array(1.0 / 90.0), 100.0
    e2 = math.exp(-te / 90.0)
    assert float(se_weight(r1, r2, 4500.0, te)) == pytest.approx(
        bloch_steady_state_mz(t1, 4500.0, ()) * e2, abs=1e-9
    )
    ir = bloch_steady_state_mz(t1, 15000.0, (2851.0,))
    assert float(ir_weight(r1, r2, 15000.0, te, 2851.0, signed=True)) == pytest.approx(
        ir * e2, abs=1e-9
    )
    assert float(ir_weight(r1, r2, 15000.0, te, 2851.0)) == pytest.approx(abs(ir) * e2, abs=1e-9)
    dr = bloch_steady_state_mz(t1, 15000.0, (3693.0, 413.0))
    assert float(dir_weight(r1, r2, 15000.0, te, 3693.0, 413.0, signed=True)) == pytest.approx(
        dr * e2, abs=1e-9
    )


def test_ti_null_numbers() -> None:
    assert ti_null(4300.0, 15000.0) == pytest.approx(2851.0, abs=1.0)
    assert ti_null(4300.0, 10000.0) == pytest.approx(2580.0, abs=1.0)
    assert ti_null(380.0, 6000.0) == pytest.approx(263.4, abs=1.0)  # STIR fat null
    # it nulls: the Bloch steady state at that TI is zero
    assert bloch_steady_state_mz(4300.0, 15000.0, (ti_null(4300.0, 15000.0),)) == pytest.approx(
        0, abs=1e-9
    )


def test_dir_times_numbers() -> None:
    ti1, ti2 = dir_times(4300.0, 600.0, 15000.0)
    assert ti1 == pytest.approx(3693.0, abs=1.0) and ti2 == pytest.approx(413.0, abs=1.0)
    ti1, ti2 = dir_times(4300.0, 830.0, 15000.0)
    assert ti1 == pytest.approx(4019.0, abs=1.0) and ti2 == pytest.approx(562.0, abs=1.0)


@settings(max_examples=40, deadline=None)
@given(
    csf=st.floats(3000.0, 5000.0),
    tissue=st.floats(500.0, 1400.0),
    tr=st.floats(8000.0, 20000.0),
)
def test_dir_times_null_both_tissues(csf: float, tissue: float, tr: float) -> None:
    ti1, ti2 = dir_times(csf, tissue, tr)
    assert 0 < ti2 < ti1 < tr
    for t1 in (csf, tissue):
        assert abs(bloch_steady_state_mz(t1, tr, (ti1, ti2))) < 1e-6


def test_dir_times_rejects_swapped_t1() -> None:
    with pytest.raises(SynthesisError, match="longer"):
        dir_times(600.0, 4300.0, 15000.0)


def test_presets_and_overrides() -> None:
    assert set(PRESETS) == {"T1W", "T2W", "PDW", "FLAIR", "T1FLAIR", "STIR", "PSIR", "DIR"}
    flair = resolve_spec("FLAIR")
    assert flair.kind is ContrastKind.IR and flair.ti_ms == pytest.approx(ti_null(4300.0, 15000.0))
    assert flair.description == "SYNTHETIC FLAIR TR15000 TE100 TI2851"
    # changing TR keeps the CSF null (TI recomputed) ...
    assert resolve_spec("flair", {"tr_ms": 10000}).ti_ms == pytest.approx(2580.0, abs=1.0)
    # ... unless TI is given
    assert resolve_spec("FLAIR", ContrastOverride(tr_ms=10000, ti_ms=2500)).ti_ms == 2500
    d = resolve_spec("DIR")
    assert (d.ti_ms, d.ti2_ms) == pytest.approx(dir_times(4300.0, 600.0, 15000.0))
    assert d.description == "SYNTHETIC DIR TR15000 TE100 TI3693/413"
    assert resolve_spec("STIR").ti_ms == pytest.approx(263.4, abs=1.0)
    assert resolve_spec("T1W").ti_ms is None
    assert resolve_spec("T2-FLAIR").name == "FLAIR"


@pytest.mark.parametrize(
    ("spec", "override", "word"),
    [
        ("NOPE", None, "unknown contrast"),
        ("FLAIR", {"ti_ms": 20000}, "TI < TR"),
        ("FLAIR", {"tr": 5}, "unknown keys"),
        ("DIR", {"ti2_ms": 5000}, "TI2 < TI1"),
        (ContrastSpec("X", ContrastKind.IR, 5000, 10), None, "needs ti_ms"),
        ("T1W", {"tr_ms": -1}, "TR > 0"),
    ],
)
def test_bad_specs_are_named(spec, override, word: str) -> None:
    with pytest.raises(SynthesisError, match=word):
        resolve_spec(spec, override)


@pytest.fixture(scope="module")
def truth_case():
    ph = make_phantom((4, 64, 64), snr=None, anatomy=ANATOMY, seed=1)
    maps = correct_pd(
        truth_quantmaps(ph.truth, mixed="dominant"), voxel_size_mm=ph.acq.voxel_size_mm
    )
    return ph, maps


def medians(img: np.ndarray, truth, failed=None) -> dict[str, float]:
    ok = np.ones(img.shape, bool) if failed is None else ~failed
    return {
        c: float(np.median(img[truth.pure_mask(c) & ok])) for c in ("WM", "GM", "CSF", "LESION")
    }


def test_flair_nulls_csf_on_truth_maps(truth_case) -> None:
    ph, maps = truth_case
    m = medians(synthesize(maps, "FLAIR").image, ph.truth)
    assert m["CSF"] < 0.02 * m["GM"]
    assert m["LESION"] > m["GM"] > m["WM"] > m["CSF"]


def test_per_patient_dir_nulls_wm_and_csf_on_truth_maps(truth_case) -> None:
    ph, maps = truth_case
    est = tissue_t1_from_histogram(maps)
    assert est["WM"] == pytest.approx(600.0, rel=0.02)
    assert est["GM"] == pytest.approx(1100.0, rel=0.02)
    assert est["CSF"] == pytest.approx(4300.0, rel=0.02)
    timing = per_patient_dir(maps)
    assert timing.source == "histogram" and timing.nulled == "WM"
    m = medians(synthesize(maps, timing.spec()).image, ph.truth)
    assert m["WM"] < 0.03 * m["GM"] and m["CSF"] < 0.03 * m["GM"]
    assert m["LESION"] > m["GM"]
    # null GM instead: GM and CSF dark, WM bright
    gm = per_patient_dir(maps, null="GM")
    m = medians(synthesize(maps, gm.spec()).image, ph.truth)
    assert m["GM"] < 0.03 * m["WM"] and m["CSF"] < 0.03 * m["WM"]


def test_histogram_finds_other_tissue_values() -> None:
    tissues = {"WM": {"t1_ms": 800.0}, "GM": {"t1_ms": 1400.0}, "CSF": {"t1_ms": 3800.0}}
    ph = make_phantom((4, 64, 64), snr=None, anatomy=ANATOMY, tissues=tissues)
    est = tissue_t1_from_histogram(truth_quantmaps(ph.truth, mixed="dominant"))
    for c, v in (("WM", 800.0), ("GM", 1400.0), ("CSF", 3800.0)):
        assert est[c] == pytest.approx(v, rel=0.02), c
        assert est[f"{c}_peak"] == 1.0


def test_classic_contrast_orderings(truth_case) -> None:
    ph, maps = truth_case
    t1w = medians(synthesize(maps, "T1W").image, ph.truth)
    assert t1w["WM"] > t1w["GM"] > t1w["CSF"]
    t2w = medians(synthesize(maps, "T2W").image, ph.truth)
    assert t2w["CSF"] > t2w["GM"] > t2w["WM"]
    psir = synthesize(maps, "PSIR")
    p = medians(psir.image, ph.truth)
    assert psir.signed and psir.image.min() < 0
    assert p["WM"] > p["GM"] > p["CSF"] and p["CSF"] < 0
    assert psir.window_center == 0.0


def test_image_scale_is_one_factor_for_the_whole_volume(truth_case) -> None:
    _ph, maps = truth_case
    img = synthesize(maps, "T2W")
    assert img.image.dtype == np.float32
    assert np.array_equal(img.image, np.rint(img.image))
    assert img.image.min() >= 0 and img.image.max() <= 65535
    # image / scale is PD * weighting in pu, on every slice (computed here independently)
    r1 = np.where(maps.mask, 1.0 / np.where(maps.mask, maps.t1_ms, 1.0), 0.0)
    r2 = np.where(maps.mask, 1.0 / np.where(maps.mask, maps.t2_ms, 1.0), 0.0)
    phys = maps.pd_pu * se_weight(r1, r2, 4500.0, 100.0)
    for z in range(maps.mask.shape[0]):
        np.testing.assert_allclose(img.image[z] / img.scale, phys[z], atol=0.6 / img.scale + 1e-3)
    inside = np.abs(img.image[maps.mask])
    assert np.percentile(inside, 99.5) == pytest.approx(16000.0, rel=0.01)
    # a fixed scale is honoured
    fixed = synthesize(maps, "T2W", scale=100.0)
    assert fixed.scale == 100.0
    np.testing.assert_allclose(fixed.image, np.rint(phys * 100.0), atol=1.0)
    lo, hi = np.percentile(img.image[maps.mask], [1, 99])
    assert img.window_center == pytest.approx((lo + hi) / 2) and img.window_width == pytest.approx(
        hi - lo
    )
    assert "exp(-TR/T1)" in img.equation and img.kind == "SE"


def test_synthesize_all_uses_overrides_and_patient_dir(truth_case) -> None:
    _, maps = truth_case
    timing = per_patient_dir(maps, wm_t1_ms=650.0, csf_t1_ms=4000.0)
    assert timing.source == "given"
    out = synthesize_all(
        maps,
        ["T1W", "FLAIR", "DIR"],
        {"T1W": ContrastOverride(tr_ms=600.0), "FLAIR": {"te_ms": 120.0}},
        dir_timing=timing,
    )
    assert list(out) == ["T1W", "FLAIR", "DIR"]
    assert out["T1W"].tr_ms == 600.0 and out["T1W"].description == "SYNTHETIC T1W TR600 TE10"
    assert out["FLAIR"].te_ms == 120.0
    assert (out["DIR"].ti_ms, out["DIR"].ti2_ms) == pytest.approx(dir_times(4000.0, 650.0, 15000.0))
    assert (timing.ti1_ms, timing.ti2_ms) == pytest.approx((out["DIR"].ti_ms, out["DIR"].ti2_ms))
    assert timing.as_dict()["nulled"] == "WM"
    # a TR override of the per-patient DIR keeps both nulls
    longer = synthesize_all(maps, ["DIR"], {"DIR": {"tr_ms": 12000.0}}, dir_timing=timing)["DIR"]
    assert (longer.ti_ms, longer.ti2_ms) == pytest.approx(dir_times(4000.0, 650.0, 12000.0))


def test_bad_maps_or_scale_are_named(truth_case) -> None:
    _, maps = truth_case
    with pytest.raises(SynthesisError, match="scale"):
        synthesize(maps, "T1W", scale=0.0)
    with pytest.raises(SynthesisError, match="null"):
        per_patient_dir(maps, null="CSF")
    with pytest.raises(SynthesisError, match="maps"):
        per_patient_dir(None)


@pytest.fixture(scope="module")
def fitted_case():
    from processing.fit import fit_mdme

    ph = make_phantom((4, 64, 64), snr=50.0, anatomy=ANATOMY, seed=1)
    maps = correct_pd(fit_mdme(ph.acq, n_threads=1), voxel_size_mm=ph.acq.voxel_size_mm)
    return ph, maps


def test_nulling_on_fitted_maps(fitted_case) -> None:
    """At SNR 50 a fitted CSF T1 scatters +-15 %, so a magnitude image of a nulled tissue is
    noise-bright (the 'granular CSF' of synthetic FLAIR). The null itself is tested on the
    signed signal, whose median over pure voxels must be ~0."""
    ph, maps = fitted_case
    t, failed = ph.truth, maps.failed
    r1 = np.where(maps.mask, 1.0 / np.where(maps.mask, maps.t1_ms, 1.0), 0.0)
    r2 = np.where(maps.mask, 1.0 / np.where(maps.mask, maps.t2_ms, 1.0), 0.0)
    flair = resolve_spec("FLAIR")
    signed = medians(
        maps.pd_pu * ir_weight(r1, r2, 15000.0, 100.0, flair.ti_ms, signed=True), t, failed
    )
    assert abs(signed["CSF"]) < 0.05 * signed["GM"]
    mag = medians(synthesize(maps, flair).image, t, failed)
    assert mag["LESION"] > mag["GM"] > mag["WM"] > mag["CSF"]

    timing = per_patient_dir(maps)
    assert timing.tissue_t1_ms == pytest.approx(600.0, rel=0.06)
    assert timing.csf_t1_ms == pytest.approx(4300.0, rel=0.06)
    d = medians(
        maps.pd_pu * dir_weight(r1, r2, 15000.0, 100.0, timing.ti1_ms, timing.ti2_ms, signed=True),
        t,
        failed,
    )
    assert abs(d["WM"]) < 0.06 * abs(d["GM"]) and abs(d["CSF"]) < 0.06 * abs(d["GM"])
    dmag = medians(synthesize(maps, timing.spec()).image, t, failed)
    assert dmag["LESION"] > dmag["GM"] > dmag["WM"]
