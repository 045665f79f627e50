"""Read-ahead of a series' spool files while it arrives (dicom_node.prefetch): the job gets
the datasets already parsed, a replaced file is read again, the budget stops the cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

import dicom_node.service as service
from dicom_node.config import load_settings
from dicom_node.pipeline import load_datasets
from dicom_node.prefetch import SeriesPrefetch
from dicom_node.registry import State
from dicom_node.series import JobOutcome
from tests.conftest import make_mr_file, wait_for, write_config


def _series(folder: Path, n: int) -> tuple[str, list[str]]:
    uid = generate_uid()
    study = generate_uid()
    paths = [
        str(make_mr_file(folder / f"{i}.dcm", series_uid=uid, study_uid=study, instance_number=i))
        for i in range(1, n + 1)
    ]
    return uid, paths


def test_cached_datasets_used_and_replaced_instance_reread(tmp_path: Path) -> None:
    uid, paths = _series(tmp_path / "in", 4)
    prefetch = SeriesPrefetch(lambda s: paths if s == uid else [], 1 << 20)
    prefetch.start()
    try:
        for i in range(1, 5):
            prefetch.instance_stored(uid, i, 4)
        wait_for(lambda: prefetch.read_files == 4, 10.0, 0.02, "prefetch to read the series")
        assert prefetch.cached_bytes() == sum(os.path.getsize(p) for p in paths)
        # the sender re-sends instance 2 with other pixels (the spool renames a new file in)
        new = pydicom.dcmread(paths[1])
        new.PixelData = np.full((8, 8), 7, dtype=np.uint16).tobytes()
        new.save_as(paths[1] + ".tmp", enforce_file_format=True)
        os.replace(paths[1] + ".tmp", paths[1])
        cached = prefetch.take(uid)
        assert prefetch.cached_bytes() == 0 and prefetch.take(uid) == {}
        datasets = load_datasets(paths, cached)
    finally:
        prefetch.stop()
    # instances 1, 3, 4: the very datasets read ahead; instance 2: read again
    assert [ds is cached[p][1] for ds, p in zip(datasets, paths, strict=True)] == [
        True,
        False,
        True,
        True,
    ]
    assert datasets == [pydicom.dcmread(p) for p in paths]  # what the job read before
    assert set(datasets[1].pixel_array.ravel()) == {7}


def test_budget_leaves_a_large_series_to_its_job(tmp_path: Path) -> None:
    uid, paths = _series(tmp_path / "in", 4)
    size = os.path.getsize(paths[0])
    # 3 files fit, the expected 4 do not: nothing is kept, and nothing read again
    prefetch = SeriesPrefetch(lambda s: paths[:1], 3 * size)
    prefetch.start()
    try:
        prefetch.instance_stored(uid, 1, 4)
        time.sleep(4 * SeriesPrefetch.BATCH_S)
        prefetch.instance_stored(uid, 2, 4)
        time.sleep(4 * SeriesPrefetch.BATCH_S)
        assert prefetch.read_files == 0 and prefetch.cached_bytes() == 0
        assert prefetch.take(uid) == {}
    finally:
        prefetch.stop()


def test_node_job_takes_the_cache_and_quarantine_drops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = service.Node(load_settings(write_config(tmp_path), env={}))
    node.prefetch.start()
    taken: dict[str, object] = {}

    def fake_job(series_uid: str, paths: list[str], *args: object, **kw: object) -> JobOutcome:
        taken.update(kw["cached"])  # type: ignore[call-overload]
        return JobOutcome(State.IGNORED, "test: not processed")

    monkeypatch.setattr(service, "run_series_job", fake_job)
    try:
        series = {}
        for name in ("a", "b"):
            uid, paths = _series(tmp_path / name, 2)
            for p in paths:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
                n, expected = node.registry.add_instance(
                    sop_uid=str(ds.SOPInstanceUID),
                    series_uid=uid,
                    study_uid=str(ds.StudyInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    path=p,
                    size=os.path.getsize(p),
                )
                node.scp.on_instance(uid, n, expected)  # the SCP's hook after each store
            series[name] = (uid, paths)
        wait_for(lambda: node.prefetch.read_files == 4, 10.0, 0.02, "prefetch to read the series")
        (a, a_paths), (b, _) = series["a"], series["b"]
        node.registry.transition(a, State.COMPLETE, reason="test")
        node.registry.enqueue(a)
        job_id, claimed, _ = node.registry.claim_job()
        assert claimed == a
        node._run_job(job_id, a)
        assert sorted(taken) == sorted(a_paths)  # the job got series a's datasets
        assert node.registry.series(a).state == State.IGNORED
        before = node.prefetch.cached_bytes()
        assert before > 0  # series b's
        node.registry.transition(b, State.QUARANTINED, reason="test")
        assert node.prefetch.cached_bytes() == 0
    finally:
        node.prefetch.stop()
        node.registry.close()
        node.spool.close()
