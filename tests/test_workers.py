"""workers: the embedded process pool and the Dask backend run processing.run.run on an
Acquisition that travels to the worker (no shared filesystem), with the same result."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.config import WorkerSettings
from dicom_node.workers import Workers
from processing.phantom import make_phantom
from processing.run import ProcessingSettings, run

SETTINGS = ProcessingSettings(contrasts=("T1W",), segmentation=False, myelin=False, enhance=False)


@pytest.fixture(scope="module")
def acq():  # 2 x 16 x 16 ellipsoid phantom, SNR 50
    return make_phantom((2, 16, 16), seed=5, snr=50.0, anatomy="ellipsoid").acq


def test_embedded_pool_matches_in_process(acq) -> None:
    w = Workers(WorkerSettings(backend="embedded", processes=1))
    w.start(wait_warm=True)
    try:
        remote = w.submit(run, acq, SETTINGS).result(timeout=300)
    finally:
        w.stop()
    local = run(acq, SETTINGS)
    np.testing.assert_array_equal(remote.maps.t1_ms, local.maps.t1_ms)
    assert remote.maps.mask.any()


@pytest.mark.slow
def test_dask_backend_same_shape(acq) -> None:
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=40,
    )
    try:
        w = Workers(WorkerSettings(backend="dask", scheduler_address=cluster.scheduler_address))
        w.start()
        try:
            remote = w.submit(run, acq, SETTINGS).result(timeout=300)
        finally:
            w.stop()
    finally:
        cluster.close()
    local = run(acq, SETTINGS)
    np.testing.assert_array_equal(remote.maps.t1_ms, local.maps.t1_ms)
