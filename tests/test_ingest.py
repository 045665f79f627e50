"""Folder processing: read_paths + series.classify on a mixed folder.

The MDME series is emulated (GE and Philips layouts) from a 3x16x16 acquisition simulated
with processing.signal.mdme_signal: T1 700-1800 ms, T2 60-140 ms, M0 900-1100, B1 1,
TR 3000 ms, delays 1000/2000 ms, TE 15/90 ms. The non-MDME series is pydicom's real
MR_small.dcm; a text file and a truncated file stand for junk.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node import emulator, ingest, series
from dicom_node.registry import State
from dicom_node.vendors import load_rules, normalize
from processing.acquisition import Acquisition
from processing.signal import mdme_signal


def acquisition() -> Acquisition:
    rng = np.random.default_rng(11)
    shape = (3, 16, 16)
    t1, t2 = rng.uniform(700, 1800, shape), rng.uniform(60, 140, shape)
    m0 = rng.uniform(900, 1100, shape)
    td, te = np.array([1000.0, 2000.0]), np.array([15.0, 90.0])
    s = mdme_signal(m0, t1, t2, 1.0, td, te, 3000.0, 120.0, 90.0)
    s = s.reshape(*shape, 2, 2).transpose(0, 3, 4, 1, 2).astype(np.float32)
    return Acquisition(s, td, te, 3000.0, 120.0, 90.0, (5.0, 1.0, 1.0), np.diag([1, 1, 5.0, 1]))


@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, Acquisition]:
    acq = acquisition()
    emulator.write_series(acq, "ge", tmp_path / "mdme" / "ge")
    emulator.write_series(acq, "philips_enhanced", tmp_path / "mdme" / "philips", seed=1)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(pydicom.data.get_testdata_file("MR_small.dcm"), other / "mr_small.dcm")
    (other / "notes.txt").write_text("not a DICOM file\n")
    (other / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    return tmp_path, acq


def test_mixed_folder(folder, capsys):
    root, acq = folder
    skipped: list[ingest.SkippedFile] = []
    groups = ingest.read_paths([root], progress=True, skipped=skipped)
    assert "reading 28/28 files" in capsys.readouterr().err
    assert {s.path.name for s in skipped} == {"notes.txt", "broken.dcm"}
    reasons = {s.path.name: s.reason for s in skipped}
    assert "not DICOM" in reasons["notes.txt"]
    assert "no SeriesInstanceUID" in reasons["broken.dcm"]
    assert len(groups) == 3
    outcomes = {g.series_uid: (g, series.classify(g.datasets)) for g in groups}
    by_state: dict[State, list[tuple[ingest.SeriesGroup, series.Classified]]] = {}
    for g, o in outcomes.values():
        by_state.setdefault(o.state, []).append((g, o))
    assert len(by_state[State.COMPLETE]) == 2
    ((_, not_mdme),) = by_state[State.IGNORED]
    assert not_mdme.acquisition is None
    assert "no MDME marker" in not_mdme.reason
    g_ge, ge = next(x for x in by_state[State.COMPLETE] if x[1].vendor == "ge")
    g_ph, ph = next(x for x in by_state[State.COMPLETE] if x[1].vendor == "philips")
    assert ge.grid == (3, 2, 2, "MP") and ge.acquisition.delay_source == "InversionTime"
    assert ph.grid == (3, 2, 2, "MP") and ph.acquisition.delay_source == "(2001,101B)"
    assert ge.expected_instances == 24 and len(g_ge.datasets) == 24
    assert ph.expected_instances == 1 and len(g_ph.datasets) == 1  # one whole-volume instance
    assert "grid 3 slices x 2 delays" in ge.summary()
    diff = np.abs(ge.acquisition.signal - ph.acquisition.signal).max()
    assert diff <= 4 * np.spacing(np.float32(np.abs(acq.signal).max()))
    assert ge.acquisition.metadata["series_instance_uid"] == g_ge.series_uid


def test_missing_file_gives_precise_error_and_others_still_work(folder):
    root, _ = folder
    victim = sorted((root / "mdme" / "ge").iterdir())[5]
    ds = pydicom.dcmread(victim)
    victim.unlink()
    outcomes = [series.classify(g.datasets) for g in ingest.read_paths([root])]
    err = next(o for o in outcomes if o.state == State.QUARANTINED)
    assert err.error is not None and err.error.kind == "missing"
    z = round(float(ds.ImagePositionPatient[2]) / 5.0)
    d = round(float(ds.InversionTime) / 1000.0) - 1
    part = "M" if ds[0x0043, 0x102F].value == 0 else "P"
    assert err.error.missing == [(z, d, int(ds.EchoNumbers) - 1, part)]
    assert "missing grid cell" in err.reason
    assert err.missing == [f"slice={z} delay={d} echo={int(ds.EchoNumbers) - 1} part={part}"]
    assert sum(o.state == State.COMPLETE for o in outcomes) == 1


def test_files_and_gzip(tmp_path):
    acq = acquisition()
    paths = emulator.write_series(acq, "siemens", tmp_path / "s")
    gz_dir = tmp_path / "gz"
    gz_dir.mkdir()
    for p in paths:
        (gz_dir / (p.name + ".gz")).write_bytes(gzip.compress(p.read_bytes()))
    (g_plain,) = ingest.read_paths(paths)  # explicit file list
    (g_gz,) = ingest.read_paths([gz_dir])
    a = series.classify(g_plain.datasets).acquisition
    b = series.classify(g_gz.datasets).acquisition
    np.testing.assert_array_equal(a.signal, b.signal)
    np.testing.assert_array_equal(
        a.signal, normalize(emulator.make_datasets(acq, "siemens")).signal
    )
    skipped: list[ingest.SkippedFile] = []
    assert ingest.read_paths([tmp_path / "nope"], skipped=skipped) == []
    assert skipped[0].reason == "does not exist"


def test_site_rules_change_classification(folder):
    root, _ = folder
    groups = ingest.read_paths([root / "mdme" / "ge"])
    # a site that distrusts InversionTime and has no other source: the error says so
    o = series.classify(groups[0].datasets, load_rules({"ge": {"delay_sources": ["TriggerTime"]}}))
    assert o.state == State.QUARANTINED and "TriggerTime: zero or negative" in o.reason
