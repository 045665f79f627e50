"""Vendor rule tables, grid sorting and the precise errors of normalization.

Inputs come from the scanner emulator (a 3x16x16 acquisition simulated with
processing.signal.mdme_signal, parameters below), pydicom's and pydicom-data's real MR
files, and, when present, the real vendor headers in ../shared/testdata/vendor.
"""

from __future__ import annotations

import copy
import gzip
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from dicom_node import emulator, ingest, series
from dicom_node.registry import State
from dicom_node.vendors import (
    NormalizationError,
    detect,
    expected_count,
    frame_images,
    frame_records,
    load_rules,
    normalize,
)
from processing.acquisition import Acquisition
from processing.signal import mdme_signal

SHARED_VENDOR = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "vendor"


def acquisition(nz: int = 3, tr: float = 3000.0) -> Acquisition:
    """T1 600-2000 ms, T2 60-150 ms, M0 800-1200, B1 1; TR 3000 ms; delays TR/3 x 1..2
    (1000, 2000 ms: on the interleave grid); TE 15/90 ms; 16x16 in-plane."""
    rng = np.random.default_rng(3)
    shape = (nz, 16, 16)
    t1, t2 = rng.uniform(600, 2000, shape), rng.uniform(60, 150, shape)
    m0 = rng.uniform(800, 1200, shape)
    td = np.array([tr / nz, 2 * tr / nz])
    te = np.array([15.0, 90.0])
    s = mdme_signal(m0, t1, t2, 1.0, td, te, tr, 120.0, 90.0)
    s = s.reshape(*shape, 2, 2).transpose(0, 3, 4, 1, 2).astype(np.float32)
    aff = np.diag([1.0, 1.0, 5.0, 1.0])
    return Acquisition(s, td, te, tr, 120.0, 90.0, (5.0, 1.0, 1.0), aff)


@pytest.fixture(scope="module")
def acq() -> Acquisition:
    return acquisition()


@pytest.mark.parametrize("layout", ["ge", "philips", "siemens"])
def test_shuffled_and_duplicated_files_give_the_same_result(acq, layout):
    dss = emulator.make_datasets(acq, layout)
    ref = normalize(dss)
    rng = np.random.default_rng(0)
    shuffled = [dss[i] for i in rng.permutation(len(dss))]
    # identical resends (same SOP Instance UID, same content, separate objects)
    dup = shuffled + [copy.deepcopy(dss[i]) for i in (0, 5, 7)] + [dss[3]]
    for variant in (shuffled, dup):
        got = normalize(variant)
        np.testing.assert_array_equal(got.signal, ref.signal)
        np.testing.assert_array_equal(got.delays_ms, ref.delays_ms)
        np.testing.assert_array_equal(got.affine, ref.affine)


def test_conflicting_duplicate_is_an_error(acq):
    dss = emulator.make_datasets(acq, "ge")
    bad = copy.deepcopy(dss[2])
    bad.PixelData = bytes(len(bad.PixelData))
    with pytest.raises(NormalizationError, match="different content") as ei:
        normalize([*dss, bad])
    assert ei.value.kind == "duplicate"
    assert ei.value.details["sop_uids"] == [dss[2].SOPInstanceUID]
    # two different instances in the same grid cell
    other = copy.deepcopy(dss[2])
    other.SOPInstanceUID = "1.2.3.4.5"
    with pytest.raises(NormalizationError, match="more than one image") as ei:
        normalize([*dss, other])
    assert ei.value.kind == "duplicate"
    assert ei.value.duplicates[0][0] == _cell(dss[2])


def _cell(ds) -> tuple[int, int, int, str]:
    """(slice, delay, echo, part) of an emulated GE image of :func:`acquisition`."""
    z = round((float(ds.ImagePositionPatient[2]) - 0.0) / 5.0)
    d = round(float(ds.InversionTime) / 1000.0) - 1
    e = int(ds.EchoNumbers) - 1
    part = "M" if int(ds[0x0043, 0x102F].value) == 0 else "P"
    return (z, d, e, part)


def test_missing_file_names_the_cell(acq):
    dss = emulator.make_datasets(acq, "ge")
    for k in (0, 13, len(dss) - 1):
        rest = dss[:k] + dss[k + 1 :]
        with pytest.raises(NormalizationError) as ei:
            normalize(rest)
        err = ei.value
        assert err.kind == "missing"
        assert err.missing == [_cell(dss[k])], (k, err.missing)
        assert str(_cell(dss[k])) in str(err)


def test_missing_whole_slice_is_reported(acq):
    a5 = acquisition(nz=5, tr=5000.0)
    dss = emulator.make_datasets(a5, "siemens_xa_enhanced")
    with pytest.raises(NormalizationError, match=r"missing slice\(s\) at 10.00 mm") as ei:
        normalize([dss[0], dss[1], dss[3], dss[4]])
    assert ei.value.details["missing_slice_positions_mm"] == [10.0]


def test_expected_count_and_short_series(acq):
    dss = emulator.make_datasets(acq, "ge")
    assert expected_count(dss[0]) == len(dss) == 3 * 2 * 2 * 2
    # a whole delay missing leaves a full (smaller) grid: the header count catches it
    first_delay = [d for d in dss if float(d.InversionTime) == 1000.0]
    with pytest.raises(NormalizationError, match="announces 24 instances but 12") as ei:
        normalize(first_delay)
    assert ei.value.kind == "missing"
    assert ei.value.details == {"expected": 24, "received": 12}
    # one delay missing of three: the grid is full but the count is short
    a3 = acquisition(nz=4, tr=4000.0)  # delays 1000, 2000 -> add a third via TR/4 x 3
    a3 = Acquisition(
        np.concatenate([a3.signal, a3.signal[:, :1]], axis=1),
        [1000.0, 2000.0, 3000.0],
        a3.echo_times_ms,
        4000.0,
        120.0,
        90.0,
        a3.voxel_size_mm,
        a3.affine,
    )
    d3 = emulator.make_datasets(a3, "ge")
    with pytest.raises(
        NormalizationError,
        match=r"announces 48 instances but 32 distinct ones arrived \(grid 4 slices x 2 delays",
    ):
        normalize([d for d in d3 if float(d.InversionTime) != 3000.0])
    enh = emulator.make_datasets(acq, "philips_enhanced")[0]
    assert expected_count(enh) == 1  # one instance holds every slice, delay and echo
    xa = emulator.make_datasets(acq, "siemens_xa_enhanced")
    assert expected_count(xa[0]) is None  # one file per slice: the count is unknown
    partial = emulator.make_datasets(acq, "philips_enhanced")[0]
    del partial.PerFrameFunctionalGroupsSequence[0]  # one frame short: not a whole grid
    partial.NumberOfFrames = int(partial.NumberOfFrames) - 1
    assert expected_count(partial) is None
    enh.ConcatenationUID = "1.2.3"
    enh.InConcatenationNumber = 1
    enh.InConcatenationTotalNumber = 3
    assert expected_count(enh) == 3


def test_mixed_series_is_an_error(acq):
    a = emulator.make_datasets(acq, "ge", seed=1)
    b = emulator.make_datasets(acq, "ge", seed=2)
    with pytest.raises(NormalizationError, match="mixed series: 2 SeriesInstanceUIDs") as ei:
        normalize(a + b[:3])
    assert ei.value.kind == "mixed_series"


def test_inconsistent_tr_flip_and_geometry(acq):
    dss = emulator.make_datasets(acq, "siemens")
    bad = copy.deepcopy(dss)
    bad[4].RepetitionTime = "2500"
    with pytest.raises(NormalizationError, match="inconsistent RepetitionTime"):
        normalize(bad)
    bad = copy.deepcopy(dss)
    bad[1].FlipAngle = "70"
    with pytest.raises(NormalizationError, match="inconsistent FlipAngle"):
        normalize(bad)
    bad = copy.deepcopy(dss)
    bad[2].ImageOrientationPatient = [1, 0, 0, 0, 0.99, 0.141]
    with pytest.raises(NormalizationError, match="inconsistent ImageOrientationPatient") as ei:
        normalize(bad)
    assert ei.value.kind == "geometry" and dss[2].SOPInstanceUID in str(ei.value)


def test_orientation_jitter_is_snapped(acq):
    # GE quirk: IOP differs by ~1e-8 between slices
    dss = emulator.make_datasets(acq, "ge")
    ref = normalize(dss)
    jit = copy.deepcopy(dss)
    for i, ds in enumerate(jit):
        iop = [float(v) for v in ds.ImageOrientationPatient]
        iop[1] += 1e-8 * (i % 3)
        ds.ImageOrientationPatient = [f"{v:.12g}" for v in iop]
    got = normalize(jit)
    np.testing.assert_array_equal(got.signal, ref.signal)
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-7)


def test_delay_fallbacks_and_rule_overrides(acq):
    dss = emulator.make_datasets(acq, "ge")
    # GE's TriggerTime holds slice timing: not in the GE rule, InversionTime wins
    assert normalize(dss).delay_source == "InversionTime"
    stripped = copy.deepcopy(dss)
    for ds in stripped:
        del ds.InversionTime
    with pytest.raises(NormalizationError, match="no usable delay source for ge") as ei:
        normalize(stripped)
    assert "InversionTime: absent on 24/24 frames" in str(ei.value)
    assert ei.value.kind == "delay"
    # a site that trusts TriggerTime says so in TOML; here it is slice timing (0, 1000, 2000)
    rules = load_rules({"ge": {"delay_sources": ["InversionTime", "TriggerTime"]}})
    with pytest.raises(NormalizationError, match="TriggerTime: zero or negative"):
        normalize(stripped, rules)
    # interleave with explicit offsets: dynamic index 1 -> offset 1, 2 -> offset 2
    xa = emulator.make_datasets(acq, "siemens_xa_enhanced")
    got = normalize(xa)
    assert got.delay_source == "interleave: TR/3 x TemporalPositionIndex"
    np.testing.assert_allclose(got.delays_ms, [1000.0, 2000.0])
    # a TOML override of the offsets changes the computed delays
    rules = load_rules({"siemens": {"interleave_offsets": [2, 1]}})  # dynamics swapped
    got2 = normalize(xa, rules)
    np.testing.assert_allclose(got2.delays_ms, [1000.0, 2000.0])
    np.testing.assert_array_equal(got2.signal[:, 0], got.signal[:, 1])
    np.testing.assert_array_equal(got2.signal[:, 1], got.signal[:, 0])
    rules = load_rules({"siemens": {"interleave_n_slices": 6}})
    np.testing.assert_allclose(normalize(xa, rules).delays_ms, [500.0, 1000.0])


def test_load_rules_errors_name_the_field():
    with pytest.raises(ValueError, match=r"vendors\.ge\.delay_tag: unknown rule field"):
        load_rules({"ge": {"delay_tag": ["InversionTime"]}})
    with pytest.raises(ValueError, match=r"vendors\.philips\.delay_sources"):
        load_rules({"philips": {"delay_sources": "InversionTime"}})
    rules = load_rules({"canon": {"manufacturer_patterns": ["canon|toshiba"]}})
    assert rules["canon"].delay_sources == rules["generic"].delay_sources
    assert rules["ge"] == load_rules()["ge"]


def test_bad_rule_values_are_named():
    with pytest.raises(
        ValueError, match=r"vendors\.ge\.delay_sources: unknown DICOM attribute 'NotATag'"
    ):
        load_rules({"ge": {"delay_sources": ["NotATag"]}})
    with pytest.raises(ValueError, match=r"vendors\.siemens\.phase_reference"):
        load_rules({"siemens": {"phase_reference": "median"}})
    with pytest.raises(ValueError, match=r"vendors\.philips\.interleave_offsets"):
        load_rules({"philips": {"interleave_offsets": [0, 1]}})
    assert load_rules({"ge": {"delay_sources": ["(0019,10A7)", "interleave"]}})


def test_compressed_transfer_syntax_decodes(acq):
    dss = emulator.make_datasets(acq, "siemens")
    ref = normalize(dss)
    comp = copy.deepcopy(dss)
    for ds in comp:
        ds.compress(RLELossless)  # pydicom's own RLE encoder; decoded by its pixel handlers
    assert comp[0].file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(normalize(comp).signal, ref.signal)


def test_not_mdme_and_ge_output_maps(acq):
    dss = emulator.make_datasets(acq, "ge")
    out = copy.deepcopy(dss)
    for ds in out:
        ds.ImageType = ["DERIVED", "PRIMARY", "MULTI_QMAP", "ENCRYPTED"]
    det = detect(out)
    assert not det.is_mdme and "MULTI_QMAP" in det.reason
    with pytest.raises(NormalizationError, match="not MDME") as ei:
        normalize(out)
    assert ei.value.kind == "not_mdme"
    ct = copy.deepcopy(dss[0])
    ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    assert "CT Image Storage" in detect([ct]).reason


# ----------------------------------------------------------------------------- real data
def _pydicom_files() -> list[Path]:
    return sorted(Path(p) for p in pydicom.data.get_testdata_files())


def test_every_pydicom_data_file_is_classified_with_a_reason():
    files = _pydicom_files()
    assert len(files) > 100  # pydicom's test files + the pydicom-data store
    n_mr = 0
    for path in files:
        try:
            ds = ingest.read_file(path)
        except Exception as exc:  # skipped by ingest with this reason
            assert str(exc)
            continue
        g = ingest.SeriesGroup(str(ds.get("SeriesInstanceUID", "")), [ds], [path])
        outcome = series.classify(g.datasets)
        assert outcome.reason, path
        assert outcome.state in (State.IGNORED, State.QUARANTINED, State.FAILED)
        if ds.get("Modality") == "MR":
            n_mr += 1
            assert outcome.state == State.IGNORED, (path, outcome.reason)
            expected_count(ds)  # must not raise
    assert n_mr >= 10


def test_pydicom_data_folders_group_and_classify(tmp_path):
    skipped: list[ingest.SkippedFile] = []
    root = Path(pydicom.data.get_testdata_file("MR_small.dcm")).parent
    groups = ingest.read_paths([root], skipped=skipped)
    assert groups and skipped
    assert all(s.reason for s in skipped)
    for g in groups:
        outcome = series.classify(g.datasets)
        assert outcome.reason and outcome.state in (State.IGNORED, State.QUARANTINED)


def _vendor_files() -> list[Path]:
    if not SHARED_VENDOR.is_dir():
        pytest.skip(f"real vendor headers not present at {SHARED_VENDOR}")
    return sorted(p for p in SHARED_VENDOR.rglob("*") if p.is_file() and p.name != "README.md")


def test_every_vendor_sample_is_classified_with_a_reason():
    files = _vendor_files()
    outcomes = {}
    first_dataset = {}
    for folder in sorted({p.parent for p in files}):
        skipped: list[ingest.SkippedFile] = []
        groups = ingest.read_paths([folder], skipped=skipped)
        assert {s.path.name for s in skipped} <= {"LICENSE"}, skipped
        for g in groups:
            o = series.classify(g.datasets)
            assert o.reason
            outcomes[folder.name] = o
            first_dataset[folder.name] = g.datasets[0]
    assert set(outcomes) == {
        "ge_mprage",
        "philips_classic_multiecho",
        "philips_enh_fmap",
        "philips_enh_multiecho",
        "siemens_xa10_enh",
    }
    for name, o in outcomes.items():
        assert o.state == State.IGNORED, (name, o.reason)
    assert outcomes["ge_mprage"].vendor == "ge"
    assert outcomes["siemens_xa10_enh"].vendor == "siemens"
    assert outcomes["philips_enh_multiecho"].vendor == "philips"
    assert "2 echo time(s)" in outcomes["philips_enh_multiecho"].reason
    assert expected_count(first_dataset["ge_mprage"]) == 130  # GE: series total


def _read_gz(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(gzip.decompress(path.read_bytes())))


def test_philips_enhanced_212_frames_parse_and_scale_like_classic():
    _vendor_files()
    enh = _read_gz(next((SHARED_VENDOR / "philips_enh_multiecho").glob("*.gz")))
    frames = frame_records([enh])
    assert len(frames) == 212
    te = [round(float(f.get("EchoTime")), 2) for f in frames]
    parts = [f.get("ComplexImageComponent") for f in frames]
    pos = {tuple(round(float(v), 3) for v in f.get("ImagePositionPatient")) for f in frames}
    assert sorted(set(te)) == [2.3, 4.6] and te.count(2.3) == 106
    assert parts.count("MAGNITUDE") == 106 and parts.count("PHASE") == 106
    assert len(pos) == 53
    # Philips floating-point scale: the classic files of the same acquisition must decode
    # to the same floats as the matching enhanced frames (per-frame (2005,140F) item).
    imgs = frame_images([enh])
    by_key = {}
    for f, part, img in imgs:
        ipp = tuple(round(float(v), 3) for v in f.get("ImagePositionPatient"))
        by_key[ipp, round(float(f.get("EchoTime")), 2), part] = img
    n = 0
    for path in sorted((SHARED_VENDOR / "philips_classic_multiecho").glob("*.gz")):
        c = _read_gz(path)
        ((_, part, img),) = frame_images([c])
        key = (
            tuple(round(float(v), 3) for v in c.ImagePositionPatient),
            round(float(c.EchoTime), 2),
            part,
        )
        # FP = SV / SS for RI = 0: the definition, computed independently here
        fp = c.pixel_array / float(c[0x2005, 0x100E].value)
        np.testing.assert_allclose(img, fp, rtol=1e-12)
        np.testing.assert_allclose(by_key[key], img, rtol=1e-6)
        n += 1
    assert n == 16
    # the whole enhanced series through normalize, accepted with a 1-delay rule override:
    rules = load_rules(
        {"philips": {"min_delays": 1, "mdme_markers": [["SeriesDescription", "Field"]]}}
    )
    acq = normalize([enh], rules)
    assert acq.signal.shape == (53, 1, 2, 80, 80)
    assert not acq.is_magnitude
    assert acq.delay_source.startswith("interleave")
    np.testing.assert_allclose(acq.voxel_size_mm, (3.0, 3.0, 3.0), rtol=1e-4)


def test_background_phase_reference_recovers_long_t1_sign():
    """processing.phase on a CSF-like voxel (T1 4300 ms, T2 2000 ms, B1 1.3, TR 4000 ms,
    delays 150/580/1900/3850 ms) where the sum over delays is negative, under a known
    background phase of 2.5 rad (echo 1) and -1 rad (echo 2)."""
    from processing.phase import real_from_complex, real_from_magnitude_phase

    td, te = np.array([150.0, 580.0, 1900.0, 3850.0]), np.array([20.0, 100.0])
    t1 = np.array([[[4300.0, 900.0]]])  # (z, y, x) = (1, 1, 2): CSF-like and WM-like
    s = mdme_signal(100.0, t1, 2000.0, 1.3, td, te, 4000.0, 120.0, 90.0)
    s = s.reshape(1, 1, 2, 4, 2).transpose(0, 3, 4, 1, 2)  # [z, d, e, y, x]
    assert s[0, :, 0, 0, 0].sum() < 0  # the published "sum" reference fails here
    assert s[0, :, 0, 0, 1].sum() > 0
    phi = np.array([2.5, -1.0])[None, None, :, None, None]
    c = s * np.exp(1j * phi)
    got = real_from_magnitude_phase(np.abs(c), np.angle(c))
    np.testing.assert_allclose(got, s, rtol=0, atol=1e-4)
    np.testing.assert_allclose(real_from_complex(c.real, c.imag), s, rtol=0, atol=1e-4)
    flipped = real_from_magnitude_phase(np.abs(c), np.angle(c), reference="sum")
    np.testing.assert_allclose(flipped[..., 0], -s[..., 0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(flipped[..., 1], s[..., 1], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="reference: expected one of"):
        real_from_complex(c.real, c.imag, reference="median")


def test_ge_first_te_on_every_echo_quirk(acq):
    dss = emulator.make_datasets(acq, "ge")
    ref = normalize(dss)
    quirk = copy.deepcopy(dss)
    for ds in quirk:
        ds.EchoTime = "15"
        ds.EchoNumbers = 1
    with pytest.raises(NormalizationError, match="fallback_echo_times_ms") as ei:
        normalize(quirk)
    assert "2 images per (slice, delay, part) but only one EchoTime (15 ms)" in str(ei.value)
    rules = load_rules({"ge": {"fallback_echo_times_ms": [15, 90]}})
    got = normalize(quirk[::-1], rules)  # order comes from InstanceNumber, not file order
    np.testing.assert_array_equal(got.signal, ref.signal)
    np.testing.assert_array_equal(got.echo_times_ms, [15.0, 90.0])
    assert got.metadata["echo_source"] == "fallback: instance order"
