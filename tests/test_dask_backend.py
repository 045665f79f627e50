"""The Dask backend of dicom_node.workers on a real distributed LocalCluster.

Cluster: 2 worker processes x 1 thread, scheduler and workers on 127.0.0.1, no dashboard.
Input: a small procedural phantom (processing.phantom.make_phantom, ellipsoid anatomy,
shape (2, 24, 24), seed 3, SNR 40, complex data); processing.run.run with enhancement off
(no ONNX file needed) and segmentation/myelin off (keep the test fast; the point is where the
job runs, not what it computes).

1. The job run through ``Workers(backend="dask")`` returns maps bitwise equal to the same job
   run through ``Workers(backend="embedded")`` (a spawned process pool) and in process.
2. A worker process is killed (SIGKILL, os.kill by PID) in the middle of a job: the scheduler
   reruns the job on a live worker and the result is again bitwise equal.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from dicom_node.config import WorkerSettings  # noqa: E402
from dicom_node.workers import Workers  # noqa: E402
from processing.phantom import make_phantom  # noqa: E402
from processing.run import ProcessingSettings, run  # noqa: E402

pytestmark = [pytest.mark.slow]

MAP_FIELDS = ("t1_ms", "t2_ms", "pd_pu", "b1", "m0", "residual", "mask", "failed")


def _settings() -> ProcessingSettings:
    return ProcessingSettings(enhance=False, segmentation=False, myelin=False)


@pytest.fixture(scope="module")
def acq() -> Any:
    return make_phantom((2, 24, 24), seed=3, snr=40.0, anatomy="ellipsoid").acq


@pytest.fixture(scope="module")
def embedded_result(acq: Any) -> Any:
    w = Workers(WorkerSettings(backend="embedded", processes=1))
    w.start(wait_warm=True)
    try:
        return w.submit(run, acq, _settings()).result(timeout=300)
    finally:
        w.stop()


@pytest.fixture(scope="module")
def cluster() -> Any:
    from distributed import LocalCluster

    c = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        worker_dashboard_address=None,
        protocol="tcp://",
    )
    try:
        yield c
    finally:
        c.close(timeout=30)


@pytest.fixture
def dask_workers(cluster: Any) -> Any:
    w = Workers(WorkerSettings(backend="dask", scheduler_address=cluster.scheduler_address))
    w.start()
    try:
        yield w
    finally:
        w.stop()


def _assert_same_maps(a: Any, b: Any) -> None:
    for name in MAP_FIELDS:
        x, y = getattr(a.maps, name), getattr(b.maps, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
            n = int(np.count_nonzero(~(diff == 0) & ~np.isnan(diff)))
            raise AssertionError(f"{name} differs in {n} voxels, max |diff| {np.nanmax(diff)}")
    assert a.provenance == b.provenance


def test_dask_equals_embedded(acq: Any, embedded_result: Any, dask_workers: Any) -> None:
    # The fit really ran (not an empty result): most voxels of the phantom head are fitted.
    assert embedded_result.maps.mask.sum() > 0.2 * embedded_result.maps.mask.size
    fut = dask_workers.submit(run, acq, _settings())
    result = fut.result(timeout=300)
    _assert_same_maps(result, embedded_result)
    # It did run on a cluster worker, not in this process.
    assert isinstance(fut, distributed.Future)
    # and equals the job run in this process (was tests/test_workers.py's
    # test_dask_backend_same_shape, which started a cluster of its own for this check)
    local = run(acq, _settings())
    np.testing.assert_array_equal(result.maps.t1_ms, local.maps.t1_ms)


def test_worker_killed_mid_job_is_retried(
    acq: Any, embedded_result: Any, dask_workers: Any, cluster: Any, tmp_path: Path
) -> None:
    marker_dir = str(tmp_path)

    # Defined here so cloudpickle ships it by value (the worker cannot import this test file).
    def job(acq: Any, settings: Any, marker_dir: str) -> tuple[int, Any]:
        import os
        import time
        from pathlib import Path

        from processing.run import run

        d = Path(marker_dir)
        first = not any(d.glob("started-*"))
        (d / f"started-{os.getpid()}").write_text("")
        result = run(acq, settings)
        if first:
            # The first attempt stays in the middle of the job until the test kills it.
            (d / "first-computed").write_text(str(os.getpid()))
            time.sleep(120)
        return os.getpid(), result

    fut = dask_workers.submit(job, acq, _settings(), marker_dir)
    deadline = time.monotonic() + 120
    while not (tmp_path / "first-computed").exists():
        assert time.monotonic() < deadline, "the job never started"
        assert not fut.done(), fut
        time.sleep(0.1)
    victim = int((tmp_path / "first-computed").read_text())
    worker_pids = set(dask_workers._client.run(os.getpid).values())
    assert victim in worker_pids  # the job runs in a cluster worker process
    os.kill(victim, signal.SIGKILL)

    pid, result = fut.result(timeout=120)
    assert pid != victim
    assert len(list(tmp_path.glob("started-*"))) == 2  # exactly one retry
    _assert_same_maps(result, embedded_result)
