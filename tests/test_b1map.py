"""B1-map series: vendor conventions (dicom_node.vendors.b1map), resampling onto the
QALAS grid (processing.b1map) and the fit with a B1 map (processing.run).

Phantom: MNI anatomy 24 x 48 x 48 (4.8 mm isotropic, axial), seed 3, SNR 100, real data,
B1 field 0.85-1.15 (the phantom's smooth field). B1-map grid: 6 mm, tilted 25 deg / -10
deg against the QALAS grid, covering its field of view (``qalas_emulator.b1_map_grid``).
"""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.qalas_emulator import b1_map_grid, make_b1_map_datasets
from dicom_node.registry import State
from dicom_node.series import B1_MAP_REASON, classify
from dicom_node.vendors.b1map import B1MapUnitError, b1_series_info, read_b1_map
from processing.b1map import B1Map, resample_b1_map, resample_to_grid
from processing.phantom import b1_field_on_grid
from processing.qalas_phantom import make_qalas_phantom

STUDY = {"StudyInstanceUID": "2.25.1234"}
FOR_UID = "2.25.5678"


@pytest.fixture(scope="module")
def phantom():
    return make_qalas_phantom((24, 48, 48), seed=3, snr=100.0, magnitude=False)


@pytest.fixture(scope="module")
def b1_grid(phantom):
    shape, affine = b1_map_grid(phantom.acq, voxel_mm=6.0, oblique=True)
    values = b1_field_on_grid(phantom.truth, np.asarray(phantom.acq.affine), shape, affine)
    return shape, affine, values


def _map_images(datasets):
    """The datasets of the series that holds the map (Siemens writes two series)."""
    by_series: dict[str, list] = {}
    for ds in datasets:
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return by_series


@pytest.mark.parametrize(
    "vendor, conversion",
    [
        ("siemens", "value / (10 x 80 deg)"),
        ("philips", "value / 100 (percent of nominal)"),
        ("ge", "value / 100 (percent of nominal)"),
    ],
)
def test_each_vendor_convention_reads_back_the_field(b1_grid, vendor, conversion):
    shape, affine, values = b1_grid
    datasets = make_b1_map_datasets(
        values, affine, vendor, study=STUDY, frame_of_reference_uid=FOR_UID
    )
    series = _map_images(datasets)
    assert len(series) == (2 if vendor == "siemens" else 1)
    maps = []
    for dss in series.values():
        cls = classify(dss)
        assert cls.state == State.IGNORED and cls.reason.startswith(B1_MAP_REASON), cls.reason
        info = b1_series_info(dss)
        assert (
            info.frame_of_reference_uid == FOR_UID and info.study_uid == STUDY["StudyInstanceUID"]
        )
        if info.has_map:
            maps.append(read_b1_map(dss))
    assert len(maps) == 1  # the Siemens anatomical series is a companion, not a map
    (b1,) = maps
    assert b1.source["conversion"] == conversion
    assert b1.values.shape == shape
    np.testing.assert_allclose(b1.affine, affine, atol=1e-4)
    body = values > 0
    # quantization: Siemens 0.1 deg of 80 deg (0.00125), Philips/GE 0.1 % steps
    assert float(np.max(np.abs(b1.values[body] - values[body]))) <= 7e-4


def test_unknown_manufacturer_is_not_used(b1_grid):
    _shape, affine, values = b1_grid
    datasets = make_b1_map_datasets(
        values, affine, "unknown", study=STUDY, frame_of_reference_uid=FOR_UID
    )
    assert classify(datasets).state == State.IGNORED  # kept, not quarantined
    with pytest.raises(B1MapUnitError, match="unit unknown"):
        read_b1_map(datasets)


def test_siemens_without_a_preparation_flip_or_map_marker_is_not_used(b1_grid):
    _shape, affine, values = b1_grid
    datasets = make_b1_map_datasets(
        values, affine, "siemens", study=STUDY, frame_of_reference_uid=FOR_UID
    )
    fa_map = [ds for ds in datasets if "FLIP ANGLE MAP" in list(ds.ImageType)]
    for ds in fa_map:  # VE-line headers: the readout's excitation angle in FlipAngle
        ds.FlipAngle = "8"
    with pytest.raises(B1MapUnitError, match="not a preparation flip"):
        read_b1_map(fa_map)
    for ds in fa_map:
        ds.FlipAngle = "80"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        del ds.ImageComments
    with pytest.raises(B1MapUnitError, match="which images are the flip-angle map"):
        read_b1_map(fa_map)


def test_implausible_values_are_an_unknown_unit(b1_grid):
    _shape, affine, values = b1_grid
    datasets = make_b1_map_datasets(
        values, affine, "philips", study=STUDY, frame_of_reference_uid=FOR_UID
    )
    for ds in datasets:  # a ratio stored where the rule expects percent
        ds.RescaleSlope = "0.001"
    with pytest.raises(B1MapUnitError, match="outside"):
        read_b1_map(datasets)


def test_resampling_reproduces_a_linear_field_exactly_on_an_oblique_grid(phantom):
    """Trilinear interpolation is exact for a linear field: any error is geometry."""
    shape, affine = b1_map_grid(phantom.acq, voxel_mm=7.0, oblique=True)
    nz, ny, nx = shape
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    world = [
        affine[r, 0] * i + affine[r, 1] * j + affine[r, 2] * k + affine[r, 3] for r in range(3)
    ]
    grad = np.array([0.002, -0.001, 0.0015])  # per mm, LPS

    def field(p):
        return 1.0 + grad[0] * p[0] + grad[1] * p[1] + grad[2] * p[2]

    out = resample_to_grid(field(world), affine, phantom.acq.shape, np.asarray(phantom.acq.affine))
    taff = np.asarray(phantom.acq.affine)
    tz, ty, tx = phantom.acq.shape
    k, j, i = np.meshgrid(np.arange(tz), np.arange(ty), np.arange(tx), indexing="ij")
    expected = field(
        [taff[r, 0] * i + taff[r, 1] * j + taff[r, 2] * k + taff[r, 3] for r in range(3)]
    )
    covered = np.isfinite(out)
    assert covered[phantom.truth.head].all()
    assert float(np.max(np.abs(out[covered] - expected[covered]))) < 1e-5
    # a target grid beyond the map: not covered (NaN), never extrapolated
    shifted = taff.copy()
    shifted[:3, 3] += 500.0
    assert np.isnan(resample_to_grid(field(world), affine, (2, 4, 4), shifted)).all()


def test_resampled_phantom_field_matches_the_truth(phantom, b1_grid):
    _shape, affine, values = b1_grid
    grid = resample_b1_map(B1Map(values, affine), phantom.acq.shape, np.asarray(phantom.acq.affine))
    head = phantom.truth.head
    err = np.abs(grid[head] - phantom.truth.b1[head])
    assert float(np.isnan(err).mean()) < 0.01
    assert float(np.nanmedian(err)) < 1e-3
    assert float(np.nanpercentile(err, 99)) < 6e-3


def test_run_fixes_b1_to_the_map_and_names_it(phantom, b1_grid):
    from processing.run import ProcessingSettings, run

    _shape, affine, values = b1_grid
    settings = ProcessingSettings(segmentation=False, myelin=False, enhance=False)
    b1 = B1Map(values, affine, {"series_uid": "2.25.42", "description": "tfl_b1map"})
    with_map = run(phantom.acq, settings, b1)
    without = run(phantom.acq, settings)
    assert with_map.provenance["b1_map"]["series_uid"] == "2.25.42"
    assert "b1_map" not in without.provenance
    assert any("B1 map series 2.25.42" in w for w in with_map.warnings)
    assert any("no B1 map given" in w for w in without.warnings)
    tr = phantom.truth
    for comp in ("WM", "GM"):
        t1 = tr.tissues[comp].t1_ms
        errs = []
        for res in (with_map, without):
            pure = tr.pure_mask(comp) & tr.head & ~res.maps.failed
            errs.append(abs(float(np.median(res.maps.t1_ms[pure])) / t1 - 1))
        assert errs[0] < errs[1], (comp, errs)
        assert errs[0] <= 0.01, (comp, errs)


# --------------------------------------------------------------------------- matching
def _register(reg, tmp_path, datasets, name):
    """Write and register a series' files (RECEIVING) as the SCP would."""
    from dicom_node.emulator import write_datasets

    paths = write_datasets(datasets, tmp_path / name)
    for ds, p in zip(datasets, paths, strict=True):
        reg.add_instance(
            sop_uid=str(ds.SOPInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            study_uid=str(ds.StudyInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            path=str(p),
            size=p.stat().st_size,
        )


def _finish(reg, series_uid, state):
    reg.transition(series_uid, State.COMPLETE)
    reg.enqueue(series_uid)
    job_id, _, _ = reg.claim_job()
    reg.finish_job(job_id, series_uid, state, "test")


def test_matching_waits_then_takes_the_same_frame_of_reference(tmp_path, phantom, b1_grid):
    """A QALAS series with no B1 map yet waits (until its last instance + b1_map_wait_s);
    a B1 map of another FrameOfReferenceUID is named and not used; one of the same frame
    of reference is used; a B1 map processed after its QALAS series is reported late."""
    import pydicom

    from dicom_node.b1match import match_b1_map, qalas_series_processed_before
    from dicom_node.qalas_emulator import make_qalas_datasets
    from dicom_node.registry import Registry

    def load(paths):
        return [pydicom.dcmread(p) for p in paths]

    _shape, affine, values = b1_grid
    qalas = make_qalas_datasets(phantom.acq, "ge", seed=3)
    study = {"StudyInstanceUID": str(qalas[0].StudyInstanceUID)}
    reg = Registry(tmp_path / "registry.sqlite3")
    try:
        _register(reg, tmp_path, qalas, "qalas")
        uid = str(qalas[0].SeriesInstanceUID)
        row = reg.series(uid)
        wait = match_b1_map(reg, uid, 10.0, 2.0, row.last_received + 1.0, load)
        assert wait is not None and wait.wait_until == pytest.approx(row.last_received + 10.0)
        other_for = make_b1_map_datasets(
            values, affine, "philips", study=study, frame_of_reference_uid="2.25.999", seed=1
        )
        _register(reg, tmp_path, other_for, "b1_other_for")
        # a B1-map series still being received extends the wait by its quiet period
        b1_row = reg.series(str(other_for[0].SeriesInstanceUID))
        pending = match_b1_map(reg, uid, 10.0, 2.0, row.last_received + 11.0, load)
        assert pending.wait_until == pytest.approx(b1_row.last_received + 12.0)
        _finish(reg, str(other_for[0].SeriesInstanceUID), State.IGNORED)
        late = row.last_received + 100.0
        none = match_b1_map(reg, uid, 10.0, 2.0, late, load)
        assert none.wait_until is None and none.b1_map is None
        assert any("FrameOfReferenceUID" in n for n in none.notes), none.notes
        assert any("synthmr retry" in n for n in none.notes), none.notes
        same_for = make_b1_map_datasets(
            values, affine, "siemens", study=study,
            frame_of_reference_uid=str(qalas[0].FrameOfReferenceUID), seed=2,
        )  # fmt: skip
        _register(reg, tmp_path, same_for, "b1_same_for")
        for s in {str(ds.SeriesInstanceUID) for ds in same_for}:
            _finish(reg, s, State.IGNORED)
        found = match_b1_map(reg, uid, 10.0, 2.0, late, load)
        fa_uid = next(
            str(ds.SeriesInstanceUID) for ds in same_for if "FLIP ANGLE MAP" in list(ds.ImageType)
        )
        assert found.b1_map is not None and found.b1_map.source["series_uid"] == fa_uid
        assert qalas_series_processed_before(reg, fa_uid) == []
        _finish(reg, uid, State.EXPORTED)
        assert qalas_series_processed_before(reg, fa_uid) == [uid]
    finally:
        reg.close()
