"""Promise 6 of DESIGN.md: the first series after start is as fast as the tenth.

After ``processing.run.warmup()`` (what every worker runs at start-up), processing real
normalized series of every kind compiles no new numba specialization: a new signature means
a series paid for a compile (~15 s on this machine for the fit kernels).
"""

from __future__ import annotations

import importlib
import json
import pkgutil

import pytest

import processing


def _signatures() -> dict[str, int]:
    """Number of compiled signatures of every numba dispatcher in ``processing``."""
    out: dict[str, int] = {}
    for info in pkgutil.iter_modules(processing.__path__):
        mod = importlib.import_module(f"processing.{info.name}")
        for name, obj in vars(mod).items():
            if hasattr(obj, "signatures") and hasattr(obj, "py_func"):
                out[f"{info.name}.{name}"] = len(obj.signatures)
    return out


def test_no_compile_after_warmup(tmp_path) -> None:
    """GE magnitude+phase, GE magnitude-only and Philips Enhanced series of a 6 x 64 x 64
    phantom (SNR 50, seed 5), written by the emulator, read and normalized as the node does,
    then the whole pipeline (default settings)."""
    pytest.importorskip("nilearn")
    from dicom_node import emulator, ingest, series
    from processing import phase, run
    from processing.phantom import make_phantom

    phase.warmup()  # the node process (normalization), dicom_node.service.Node.start
    run.warmup()  # every worker, dicom_node.workers.warm_worker
    before = _signatures()
    for layout, magnitude_only in (("ge", False), ("ge", True), ("philips_enhanced", False)):
        ph = make_phantom((6, 64, 64), seed=5, snr=50.0)
        folder = tmp_path / f"{layout}_{magnitude_only}"
        emulator.write_series(ph.acq, layout, folder, with_phase=not magnitude_only)
        outcome = series.classify(ingest.read_paths([folder])[0].datasets)
        assert outcome.acquisition is not None, outcome.reason
        res = run.run(outcome.acquisition)
        assert not [w for w in res.warnings if "failed" in w], res.warnings
    after = _signatures()
    new = {k: (before.get(k, 0), v) for k, v in after.items() if v != before.get(k, 0)}
    assert new == {}, f"compiled after warm-up (before, after): {new}"


def _new_signatures_of_run(acq) -> dict[str, list[str]]:
    """In a worker: run the pipeline on ``acq`` and return the numba signatures it added."""
    from processing import run

    def sigs() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for info in pkgutil.iter_modules(processing.__path__):
            mod = importlib.import_module(f"processing.{info.name}")
            for name, obj in vars(mod).items():
                if hasattr(obj, "signatures") and hasattr(obj, "py_func"):
                    out[f"{info.name}.{name}"] = [str(s) for s in obj.signatures]
        return out

    before = sigs()
    run.run(acq)
    after = sigs()
    return {k: [s for s in v if s not in before.get(k, [])] for k, v in after.items()
            if v != before.get(k, [])}  # fmt: skip


def test_no_compile_in_a_worker_after_its_warmup(tmp_path) -> None:
    """The node's own path: the normalized series is pickled to a spawned worker that ran
    warm_worker. Unpickled arrays used to come back writeable, a numba type the warm-up (on
    the constructor's read-only arrays) never compiled: 18 s of "fit" on the first series.
    GE magnitude+phase, 6 x 64 x 64 phantom, SNR 50, seed 5."""
    pytest.importorskip("nilearn")
    from dicom_node import emulator, ingest, series
    from dicom_node.config import WorkerSettings
    from dicom_node.workers import Workers
    from processing.phantom import make_phantom

    ph = make_phantom((6, 64, 64), seed=5, snr=50.0)
    emulator.write_series(ph.acq, "ge", tmp_path, with_phase=True)
    acq = series.classify(ingest.read_paths([tmp_path])[0].datasets).acquisition
    assert acq is not None
    workers = Workers(WorkerSettings(backend="embedded", processes=1))
    workers.start(wait_warm=True)
    try:
        new = workers.submit(_new_signatures_of_run, acq).result(timeout=600)
    finally:
        workers.stop()
    assert new == {}, f"compiled in the worker after its warm-up: {new}"


@pytest.mark.slow
def test_node_on_an_empty_cache_is_warming_until_its_worker_is_warm(cold_start_node) -> None:
    """Issue 14: a node started with an empty numba cache (NUMBA_CACHE_DIR a fresh folder)
    answers /readyz 503 "warming" while its worker compiles, then 200 "ready"; the worker
    left its kernels in that cache, so ``synthmr warmup`` afterwards compiles nothing; the
    worker's compiling was done by a throwaway process, the worker itself compiled nothing.

    The node is started when the session starts (tests/conftest.py ``cold_start_node``),
    so its minute of compiling runs beside the other tests; here its answers are read."""
    cold = cold_start_node
    assert cold is not None  # the fixture starts the node whenever this test is selected
    assert cold.done.wait(1300), "the cold-start node and its warmup ran for over 1300 s"
    assert cold.exited is None, cold.exited
    seen = cold.seen
    assert seen and seen[-1] == (200, "ready"), seen[-5:]
    warming = [s for s in seen if s[0] == 503]
    assert warming, "never reported not-ready although the cache was empty"
    assert all(s == (503, "warming") for s in warming), set(warming)
    cache = cold.cache
    assert list(cache.rglob("*.nbi")), "the worker wrote no numba cache index"
    # the worker compiled nothing itself (it would keep ~480 MiB of compiler memory): a
    # throwaway process compiled, the worker loaded (dicom_node.warm_cache)
    events = [json.loads(line) for line in cold.log.read_text().splitlines() if line[:1] == "{"]
    (warm,) = [e for e in events if e.get("event") == "worker_warm"]
    assert warm["cache_missed"], warm
    assert warm["compiled_in_throwaway"] > 0 and warm["compiled_in_worker"] == 0, warm
    r = cold.warmup  # `synthmr warmup` with that cache, run once the node was ready
    assert r is not None
    assert r.returncode == 0, r.stderr[-3000:]
    assert " 0 specializations compiled" in r.stdout, r.stdout
    assert str(cache) in r.stdout, r.stdout
