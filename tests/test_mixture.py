"""Tissue-mixture synthesis (processing.mixture): the conventional image of each voxel's
estimated WM/GM/CSF mixture, and what it does to the per-patient DIR of a simulated brain."""

from __future__ import annotations

import numpy as np
import pytest

from processing import mixture, run, synthesis
from processing.phantom import COMPARTMENTS, make_phantom
from processing.results import QuantMaps, TissueFractions

# Stated class parameters (T1 ms, T2 ms, PD pu) and a per-patient DIR nulling CSF and WM.
CLASSES = {
    "WM": {"t1_ms": 620.0, "t2_ms": 70.0, "pd_pu": 68.0},
    "GM": {"t1_ms": 1150.0, "t2_ms": 92.0, "pd_pu": 83.0},
    "CSF": {"t1_ms": 4200.0, "t2_ms": 1900.0, "pd_pu": 100.0},
}
TI1, TI2 = synthesis.dir_times(4200.0, 620.0, 15000.0)
DIR = synthesis.ContrastSpec("DIR", synthesis.ContrastKind.DIR, 15000.0, 100.0, TI1, TI2)
PSIR = synthesis.ContrastSpec("PSIR", synthesis.ContrastKind.PSIR, 4000.0, 10.0, 500.0)


def signed(spec, t1, t2, pd):
    r1, r2 = np.array(1.0 / t1), np.array(1.0 / t2)
    if spec.kind is synthesis.ContrastKind.DIR:
        return pd * float(
            synthesis.dir_weight(
                r1, r2, spec.tr_ms, spec.te_ms, spec.ti_ms, spec.ti2_ms, signed=True
            )
        )
    return pd * float(synthesis.ir_weight(r1, r2, spec.tr_ms, spec.te_ms, spec.ti_ms, signed=True))


def one_row(fractions: list[dict[str, float]], own=(1300.0, 140.0, 85.0), icmask=None):
    """1 x 1 x n maps and fractions; every voxel's own fit is ``own`` (T1, T2, PD)."""
    n = len(fractions)
    shape = (1, 1, n)
    full = np.ones(shape, np.float32)
    maps = QuantMaps(
        t1_ms=full * own[0],
        t2_ms=full * own[1],
        pd_pu=full * own[2],
        b1=full,
        m0=full * own[2],
        residual=full * 0,
        mask=np.ones(shape, bool),
        failed=np.zeros(shape, bool),
        noise_sd=1.0,
    )
    fr = {
        k: np.array([f.get(k, 0.0) for f in fractions], np.float32).reshape(shape)
        for k in ("WM", "GM", "CSF", "NON")
    }
    ic = np.ones(shape, bool) if icmask is None else np.asarray(icmask).reshape(shape)
    return maps, TissueFractions(fr, ic)


OWN = (1300.0, 140.0, 85.0)  # every test voxel's own fit (T1 ms, T2 ms, PD pu)


def test_the_nulled_classes_are_found_from_the_contrast():
    assert mixture.nulled_classes(DIR, CLASSES) == ("WM", "CSF")
    flair = synthesis.ContrastSpec(
        "FLAIR", synthesis.ContrastKind.IR, 15000.0, 100.0, synthesis.ti_null(4200.0, 15000.0)
    )
    assert mixture.nulled_classes(flair, CLASSES) == ("CSF",)
    t1w = synthesis.resolve_spec("T1W")
    assert mixture.nulled_classes(t1w, CLASSES) == ()
    assert mixture.nulled_classes(PSIR, CLASSES) == ()  # TI 500: nothing near its null


def test_nulled_classes_are_black_and_the_rest_keeps_its_own_fit():
    maps, fr = one_row([{"WM": 1}, {"GM": 1}, {"CSF": 1}], own=OWN)
    s = mixture.mixture_signal(maps, fr, DIR, CLASSES).ravel()
    # black to the root-finder tolerance of dir_times (GM is ~10 pu)
    assert s[0] == pytest.approx(0.0, abs=1e-6) and s[2] == pytest.approx(0.0, abs=1e-6)
    # a GM voxel is not nulled: it is drawn from its own fit, as in plain synthesis
    assert s[1] == pytest.approx(abs(signed(DIR, *OWN)), rel=1e-6)
    assert s[1] > 1.0


def test_only_the_nulled_share_is_replaced_before_the_magnitude():
    """WM 0.3 + GM 0.5 + CSF 0.2 under the DIR: |0.3 S_WM + 0.2 S_CSF + 0.5 S_own|; under a
    PSIR that nulls nothing the voxel is its own (signed) fit."""
    f = {"WM": 0.3, "GM": 0.5, "CSF": 0.2}
    maps, fr = one_row([f], own=OWN)
    s_wm, s_csf = signed(DIR, *CLASSES["WM"].values()), signed(DIR, *CLASSES["CSF"].values())
    want = 0.3 * s_wm + 0.2 * s_csf + 0.5 * signed(DIR, *OWN)
    got = float(mixture.mixture_signal(maps, fr, DIR, CLASSES).ravel()[0])
    assert got == pytest.approx(abs(want), rel=1e-6)
    got_psir = float(mixture.mixture_signal(maps, fr, PSIR, CLASSES).ravel()[0])
    assert got_psir == pytest.approx(signed(PSIR, *OWN), rel=1e-6)
    assert got_psir < 0  # the sign is kept


def test_unexplained_tissue_and_scalp_are_rendered_from_the_voxels_own_fit():
    """NON (lesion) 0.6 + WM 0.4: the WM share is black, the rest is the voxel's own fit;
    outside the intracranial mask the voxel is its own fit whatever the fractions say."""
    maps, fr = one_row([{"NON": 0.6, "WM": 0.4}, {"WM": 1.0}], own=OWN, icmask=[True, False])
    s = mixture.mixture_signal(maps, fr, DIR, CLASSES).ravel()
    s_own = signed(DIR, *OWN)
    assert s[0] == pytest.approx(abs(0.6 * s_own + 0.4 * signed(DIR, *CLASSES["WM"].values())))
    assert s[1] == pytest.approx(abs(s_own), rel=1e-6)


def test_missing_or_broken_class_parameters_are_named():
    with pytest.raises(synthesis.SynthesisError, match="no parameters for CSF"):
        mixture.class_parameters({"WM": CLASSES["WM"], "GM": CLASSES["GM"]})
    with pytest.raises(synthesis.SynthesisError, match="GM parameters not usable"):
        mixture.class_parameters({**CLASSES, "GM": {"t1_ms": float("nan"), "t2_ms": 1, "pd_pu": 1}})
    got = mixture.class_parameters({**CLASSES, "WM": {**CLASSES["WM"], "class_t1_ms": 640.0}})
    assert got["WM"]["t1_ms"] == 640.0  # the measured class T1 (what the DIR nulls) wins


def truth_image(truth, img) -> np.ndarray:
    """Conventional magnitude image (img's timing) of each voxel's true mixture (pu)."""
    out = np.zeros(truth.fractions["WM"].shape)
    for c in COMPARTMENTS:
        p = truth.tissues[c]
        spec = synthesis.ContrastSpec(
            img.name, synthesis.ContrastKind(img.kind), img.tr_ms, img.te_ms, img.ti_ms, img.ti2_ms
        )
        out += truth.fractions[c] * signed(spec, p.t1_ms, p.t2_ms, p.pd_pu)
    return np.abs(out)


@pytest.fixture(scope="module")
def phantom_run():
    """6 x 128 x 128 MNI brain, SNR 50, B1 0.8-1.2, coil field, lesions, magnitude data,
    seed 31, tissues off the literature centres (T1 ms, T2 ms, PD pu): WM 640/72/69,
    GM 1180/94/84, CSF 4000/1800/100, lesion 1300/140/86. FLAIR_MIX is requested too."""
    tissues = {
        "WM": (640.0, 72.0, 69.0),
        "GM": (1180.0, 94.0, 84.0),
        "CSF": (4000.0, 1800.0, 100.0),
        "LESION": (1300.0, 140.0, 86.0),
    }
    ph = make_phantom((6, 128, 128), seed=31, snr=50.0, magnitude=True, tissues=tissues)
    settings = run.ProcessingSettings(mixture_contrasts=("DIR", "FLAIR"))
    return ph, run.run(ph.acq, settings)


def test_per_patient_dir_mixture_nulls_wm_and_csf_and_keeps_lesions(phantom_run):
    """Issue 4: in the per-patient DIR the mean WM and CSF signal is < 3 % of GM. The plain
    per-voxel DIR cannot do it at SNR 50 (fitted-T1 scatter through a steep null); the
    tissue-mixture DIR does, keeps lesions and is closer to the conventional DIR."""
    ph, res = phantom_run
    t, maps = ph.truth, res.maps
    plain, mix = res.synthetic["DIR"], res.synthetic["DIR_MIX"]
    assert (mix.ti_ms, mix.ti2_ms, mix.scale) == (plain.ti_ms, plain.ti2_ms, plain.scale)
    assert mix.parameters["method"] == "tissue mixture"
    pure = {k: t.pure_mask(k) & maps.mask for k in ("WM", "GM", "LESION")}
    pure["CSF"] = (t.fractions["CSF"] >= 0.99) & maps.mask
    assert min(int(m.sum()) for m in pure.values()) >= 30

    def over_gm(img, tissue):
        return img[pure[tissue]].mean() / img[pure["GM"]].mean()

    got = {k: over_gm(mix.image, k) for k in ("WM", "CSF")}
    plain_got = {k: over_gm(plain.image, k) for k in ("WM", "CSF")}
    print(f"mean / GM: DIR_MIX {got}, plain DIR {plain_got}")
    assert got["WM"] < 0.03 and got["CSF"] < 0.03
    assert plain_got["CSF"] > 0.15  # the grain the mixture removes

    ref = truth_image(t, mix)
    lesion_rel = over_gm(mix.image, "LESION") / (
        ref[pure["LESION"]].mean() / ref[pure["GM"]].mean()
    )
    # Lesions keep their own fit except for the share unmixed as CSF or WM (a lesion can
    # look like GM + a little CSF within noise): lesion/GM 79-100 % of the truth on the
    # phantoms of benchmarks/csf_null.py.
    print(f"lesion/GM, DIR_MIX over truth: {lesion_rel:.3f}")
    assert 0.75 < lesion_rel < 1.15
    brain = t.head & maps.mask

    def nrmse(img):
        g = ref[pure["GM"]].mean() / img[pure["GM"]].mean()
        return np.sqrt(np.mean((img[brain] * g - ref[brain]) ** 2) / np.mean(ref[brain] ** 2))

    print(
        f"NRMSE against the conventional DIR: plain {nrmse(plain.image):.3f}, mixture {nrmse(mix.image):.3f}"
    )
    assert nrmse(mix.image) < 0.6 * nrmse(plain.image)


def test_flair_mixture_on_request_keeps_csf_black(phantom_run):
    ph, res = phantom_run
    flair, mix = res.synthetic["FLAIR"], res.synthetic["FLAIR_MIX"]
    csf = (ph.truth.fractions["CSF"] >= 0.99) & res.maps.mask
    gm = ph.truth.pure_mask("GM") & res.maps.mask
    ratio = mix.image[csf].mean() / mix.image[gm].mean()
    print(
        f"FLAIR_MIX CSF / GM {ratio:.4f}; plain {flair.image[csf].mean() / flair.image[gm].mean():.4f}"
    )
    assert ratio < 0.02


def test_mixture_needs_the_segmentation_and_is_on_by_default_for_dir_only():
    ph = make_phantom((2, 48, 48), seed=2, snr=50.0)
    res = run.run(ph.acq)
    assert "DIR_MIX" in res.synthetic and "FLAIR_MIX" not in res.synthetic
    res2 = run.run(ph.acq, run.ProcessingSettings(segmentation=False, myelin=False))
    assert "DIR" in res2.synthetic and "DIR_MIX" not in res2.synthetic
    assert not any("mixture" in w for w in res2.warnings)
