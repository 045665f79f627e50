"""Scanner emulator -> vendor normalization round trip (issue 3 done-when criteria).

Ground truth: a 5x32x32 acquisition simulated with processing.signal.mdme_signal
(T1 500-2500 ms, T2 50-200 ms, M0 500-1500, B1 0.9-1.1, seed 1; TR 4000 ms; delays
800/1600/2400/3200 ms = TR/5 x 1..4 so the interleave-only layout can carry them;
TE 20/100 ms; saturation 120 deg, excitation 90 deg), axial or oblique (17 deg about x).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dicom_node import emulator
from dicom_node.vendors import normalize
from processing.acquisition import Acquisition
from processing.signal import mdme_signal

LAYOUTS = list(emulator.VENDOR_LAYOUTS)
EXPECTED_DELAY_SOURCE = {
    "ge": "InversionTime",
    "siemens": "TriggerTime",
    "siemens_xa_enhanced": "interleave",
    "philips": "(2001,101B)",
    "philips_enhanced": "(2001,101B)",
}


def small_acquisition(
    oblique: bool = False, delays=(800.0, 1600.0, 2400.0, 3200.0), nz: int = 5
) -> Acquisition:
    rng = np.random.default_rng(1)
    shape = (nz, 32, 32)
    t1 = rng.uniform(500, 2500, shape)
    t2 = rng.uniform(50, 200, shape)
    m0 = rng.uniform(500, 1500, shape)
    b1 = rng.uniform(0.9, 1.1, shape)
    td = np.asarray(delays, dtype=float)
    te = np.array([20.0, 100.0])
    s = mdme_signal(m0, t1, t2, b1, td, te, 4000.0, 120.0, 90.0)
    s = s.reshape(*shape, td.size, 2).transpose(0, 3, 4, 1, 2).astype(np.float32)
    aff = np.diag([0.9, 0.9, 3.0, 1.0])
    aff[:3, 3] = [-14.0, -20.0, 5.0]
    if oblique:
        a = np.deg2rad(17.0)
        rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        aff[:3, :3] = rot @ aff[:3, :3]
    return Acquisition(s, td, te, 4000.0, 120.0, 90.0, (3.0, 0.9, 0.9), aff, delay_source="sim")


@pytest.fixture(scope="module", params=[False, True], ids=["axial", "oblique"])
def normalized(request):
    acq = small_acquisition(oblique=request.param)
    out = {}
    for layout, phase in itertools.product(LAYOUTS, (True, False)):
        out[layout, phase] = normalize(emulator.make_datasets(acq, layout, with_phase=phase))
    return acq, out


def test_all_layouts_agree_and_match_truth(normalized):
    acq, out = normalized
    peak = float(np.abs(acq.signal).max())
    # emulator quantization step: the power of two with peak/q <= 65000
    q = 2.0 ** np.ceil(np.log2(peak / 65000))
    for phase in (True, False):
        ref = out["ge", phase]
        truth = acq.signal if phase else np.abs(acq.signal)
        assert ref.is_magnitude is (not phase)
        # signed signal recovered by phase correction: negative short-delay samples survive
        if phase:
            assert float(truth.min()) < -50
            sure = np.abs(truth) > 1.0
            np.testing.assert_array_equal(np.sign(ref.signal[sure]), np.sign(truth[sure]))
        err = float(np.abs(ref.signal - truth).max())
        # magnitude rounding q/2 plus 1 mrad phase rounding (second order in the real part)
        assert err <= q / 2 + 1e-6 * peak, err
        for layout in LAYOUTS:
            got = out[layout, phase]
            diff = float(np.abs(got.signal - ref.signal).max())
            # same quantized values: equal within float32 rounding of the peak
            assert diff <= 4 * np.spacing(np.float32(peak)), (layout, phase, diff)
            assert got.signal.shape == acq.signal.shape
            np.testing.assert_allclose(got.delays_ms, acq.delays_ms, rtol=0, atol=1e-6)
            np.testing.assert_allclose(got.echo_times_ms, acq.echo_times_ms, rtol=0, atol=1e-9)
            np.testing.assert_allclose(got.affine, acq.affine, rtol=0, atol=1e-6)
            np.testing.assert_allclose(got.voxel_size_mm, acq.voxel_size_mm, rtol=1e-6)
            assert got.tr_ms == acq.tr_ms
            assert got.excitation_deg == 90.0 and got.saturation_deg == 120.0
            assert got.delay_source.startswith(EXPECTED_DELAY_SOURCE[layout]), got.delay_source
            assert got.metadata["vendor"] == layout.split("_")[0]


def test_fitted_maps_agree_across_layouts(normalized):
    fit = pytest.importorskip("processing.fit")
    _, out = normalized
    for phase in (True, False):
        full = np.ones(out["ge", phase].shape, dtype=bool)
        ref = fit.fit_mdme(out["ge", phase], mask=full)
        for layout in ("siemens_xa_enhanced", "philips", "philips_enhanced"):
            got = fit.fit_mdme(out[layout, phase], mask=full)
            for name in ("t1_ms", "t2_ms", "b1", "m0"):
                a, b = getattr(ref, name), getattr(got, name)
                m = ref.mask & got.mask
                assert m.sum() > 0.9 * m.size
                rel = np.abs(a[m] - b[m]) / np.maximum(np.abs(a[m]), 1e-6)
                assert float(rel.max()) <= 1e-4, (layout, phase, name, float(rel.max()))


def test_off_grid_delays_use_enhanced_inversion_times():
    # the phantom's delays are not multiples of TR/n_slices: XA writes per-frame InversionTimes
    acq = small_acquisition(delays=(150.0, 580.0, 1900.0, 3850.0), nz=3)
    got = normalize(emulator.make_datasets(acq, "siemens_xa_enhanced"))
    assert got.delay_source == "InversionTime"
    np.testing.assert_allclose(got.delays_ms, acq.delays_ms)
    ref = normalize(emulator.make_datasets(acq, "ge"))
    assert float(np.abs(got.signal - ref.signal).max()) <= 4 * np.spacing(
        np.float32(np.abs(ref.signal).max())
    )


def test_layout_headers_are_vendor_flavoured():
    acq = small_acquisition(nz=3)
    ge = emulator.make_datasets(acq, "ge")
    assert "MAGIC" in ge[0].ImageType
    assert {int(d[0x0043, 0x102F].value) for d in ge} == {0, 1}
    assert len(ge) == 3 * 4 * 2 * 2 and all(int(d.ImagesInAcquisition) == len(ge) for d in ge)
    sie = emulator.make_datasets(acq, "siemens")
    assert sie[0].SequenceName == "*mdme2d1"
    assert {d.ImageType[2] for d in sie} == {"M", "P"}
    assert "InversionTime" not in sie[0]
    ph = emulator.make_datasets(acq, "philips")
    mags = [d for d in ph if d.ImageType[3] == "M"]
    # RescaleSlope differs per slice/dynamic, the floating-point value must not
    assert len({str(d.RescaleSlope) for d in mags}) > 5
    assert sorted(int(d.InstanceNumber) for d in ph) == list(range(1, len(ph) + 1))
    assert [int(d.InstanceNumber) for d in ph] != list(range(1, len(ph) + 1))
    pe = emulator.make_datasets(acq, "philips_enhanced")
    assert len(pe) == 1 and int(pe[0].NumberOfFrames) == 3 * 4 * 2 * 2
    fg = pe[0].PerFrameFunctionalGroupsSequence[0]
    assert fg.MRImageFrameTypeSequence[0].ComplexImageComponent in ("MAGNITUDE", "PHASE")
    assert (0x2001, 0x101B) in fg[0x2005, 0x140F].value[0]
    xa = emulator.make_datasets(acq, "siemens_xa_enhanced")
    assert len(xa) == 3 and xa[0].PulseSequenceName == "*mdme2d1"
    for ds in (*ge[:1], *sie[:1], *ph[:1], *pe, *xa[:1]):
        assert str(ds.PatientName) == "SYNTHMR^PHANTOM"
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0


def test_uids_deterministic_from_seed():
    acq = small_acquisition(nz=3)
    a = [d.SOPInstanceUID for d in emulator.make_datasets(acq, "siemens", seed=4)]
    b = [d.SOPInstanceUID for d in emulator.make_datasets(acq, "siemens", seed=4)]
    c = [d.SOPInstanceUID for d in emulator.make_datasets(acq, "siemens", seed=5)]
    assert a == b
    assert not set(a) & set(c)
    assert len(set(a)) == len(a)
    custom = emulator.make_datasets(
        acq,
        "ge",
        patient={"PatientName": "TEST^SUBJECT", "PatientID": "T-1"},
        study={"StudyInstanceUID": "1.2.826.0.1.3680043.2.1", "AccessionNumber": "A1"},
    )
    assert {str(d.PatientName) for d in custom} == {"TEST^SUBJECT"}
    assert {d.StudyInstanceUID for d in custom} == {"1.2.826.0.1.3680043.2.1"}
    assert custom[0].AccessionNumber == "A1" and custom[0].PatientID == "T-1"


def test_write_series_roundtrip(tmp_path):
    from dicom_node import ingest, series
    from dicom_node.registry import State

    acq = small_acquisition(nz=3, oblique=True)
    paths = emulator.write_series(acq, "philips", tmp_path, with_phase=True, seed=2)
    assert len(paths) == 48 and all(p.exists() for p in paths)
    groups = ingest.read_paths([tmp_path])
    assert len(groups) == 1
    outcome = series.classify(groups[0].datasets)
    assert outcome.state == State.COMPLETE, outcome.reason
    ref = normalize(emulator.make_datasets(acq, "philips", with_phase=True, seed=2))
    np.testing.assert_array_equal(outcome.acquisition.signal, ref.signal)


def test_emulator_errors_name_the_problem():
    acq = small_acquisition(nz=3)
    with pytest.raises(emulator.EmulatorError, match="unknown layout 'toshiba'"):
        emulator.make_datasets(acq, "toshiba")
    flipped = Acquisition(
        acq.signal,
        acq.delays_ms,
        acq.echo_times_ms,
        acq.tr_ms,
        120.0,
        90.0,
        acq.voxel_size_mm,
        np.diag([0.9, 0.9, -3.0, 1.0]),
    )
    with pytest.raises(emulator.EmulatorError, match="right-handed"):
        emulator.make_datasets(flipped, "ge")


@pytest.mark.integration
@pytest.mark.parametrize("with_phase", [True, False], ids=["mag+phase", "magnitude"])
def test_emulated_files_pass_dciodvfy(tmp_path, with_phase):
    """Every layout's instances are valid IODs for dicom3tools' dciodvfy (no Error lines)."""
    import subprocess

    acq = small_acquisition(nz=3)
    off_grid = small_acquisition(delays=(150.0, 580.0, 1900.0, 3850.0), nz=3)
    for layout in [*LAYOUTS, "xa_off_grid"]:
        src, lay = (off_grid, "siemens_xa_enhanced") if layout == "xa_off_grid" else (acq, layout)
        paths = emulator.write_series(src, lay, tmp_path / layout, with_phase=with_phase)
        for p in paths[:2]:  # a magnitude and (classic) a phase image / two enhanced files
            r = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True, timeout=60)
            errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
            assert r.returncode == 0 and not errors, (layout, p.name, errors[:5])
