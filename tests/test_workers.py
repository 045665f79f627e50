"""workers: the embedded process pool runs processing.run.run on an Acquisition that travels
to the worker (no shared filesystem), with the same result; the Dask backend's equality
(to the embedded pool and to the in-process run) is tests/test_dask_backend.py's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

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
    """Also streamed (Workers.submit_streamed): the maps, the segmentation (without the
    maps) and the synthetic contrasts arrive as parts of their own before the task
    returns the rest (without them), and no hand-off file is left."""
    from dicom_node.handoff import _directory
    from dicom_node.series import process_handing_over

    w = Workers(WorkerSettings(backend="embedded", processes=1))
    w.start(wait_warm=True)
    try:
        remote = w.submit(run, acq, SETTINGS).result(timeout=300)
        task = w.submit_streamed(process_handing_over, acq, SETTINGS, None)
        events = [task.events.get(timeout=300) for _ in range(4)]
        task.close()
    finally:
        w.stop()
    local = run(acq, SETTINGS)
    np.testing.assert_array_equal(remote.maps.t1_ms, local.maps.t1_ms)
    assert remote.maps.mask.any()
    parts = dict(events)
    assert sorted(parts) == ["done", "maps", "segmentation", "synthesis"]
    np.testing.assert_array_equal(parts["maps"].maps.t1_ms, local.maps.t1_ms)
    assert parts["segmentation"].maps is None
    rest = parts["done"].result()
    handed = parts["synthesis"].synthetic
    assert rest.maps is None and rest.synthetic == {} and list(handed) == ["T1W"]
    np.testing.assert_array_equal(handed["T1W"].image, local.synthetic["T1W"].image)
    assert not list(_directory().glob(f"synthmr-handoff-{os.getpid()}-*"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_workers_exit_when_the_node_is_killed(tmp_path) -> None:
    """kill -9 of the node (OOM killer) must not leave its worker processes behind."""
    script = (
        "import sys, time\n"
        "from dicom_node.config import WorkerSettings\n"
        "from dicom_node.workers import Workers\n"
        "w = Workers(WorkerSettings(backend='embedded', processes=2))\n"
        "w.start(wait_warm=False)\n"
        "print(' '.join(str(p) for p in w._pool._processes), flush=True)\n"
        "time.sleep(600)\n"
    )
    root = Path(__file__).resolve().parents[1]
    node = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=root,
        env=dict(os.environ, PYTHONPATH=str(root)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        children = [int(p) for p in node.stdout.readline().split()]  # type: ignore[union-attr]
        assert len(children) == 2 and all(_alive(p) for p in children)
        os.kill(node.pid, signal.SIGKILL)
        node.wait(10)
        end = time.time() + 30  # the watchdog polls every second; warm-up may be running
        while time.time() < end and any(_alive(p) for p in children):
            time.sleep(0.2)
        left = [p for p in children if _alive(p)]
        for p in left:  # do not leak them from the test either
            os.kill(p, signal.SIGKILL)
        assert not left, f"workers {left} outlived the killed node"
    finally:
        if node.poll() is None:
            node.kill()


def _warm_slowly(settings: object) -> None:
    """A worker initializer that takes as long as a numba compile on a loaded machine."""
    time.sleep(600)


def test_stop_does_not_wait_for_a_worker_still_warming() -> None:
    """Workers.stop while a worker is still in its initializer (SIGTERM soon after start,
    on a machine where the compile takes a minute) ends in bounded time, and the task
    queued behind the warm-up ends too (so its job thread is released; the series stays
    PROCESSING and is re-run at the next start)."""
    w = Workers(WorkerSettings(backend="embedded", processes=1), warm=_warm_slowly)
    w.start(wait_warm=False)
    pids = list(w._pool._processes)  # type: ignore[union-attr]
    task = w.submit(int, "7")
    stopper = threading.Thread(target=w.stop, daemon=True)
    stopper.start()
    stopper.join(120)
    left = [p for p in pids if _alive(p)]
    for p in left:  # do not leak them from the test either
        os.kill(p, signal.SIGKILL)
    assert not stopper.is_alive(), "Workers.stop waited for the initializer"
    assert not left, f"workers {left} outlived stop"
    assert task.done() and (task.cancelled() or task.exception() is not None)
    assert not w.warm
