"""processing.run after the segmentation: myelin + QC run on a thread while synthesis +
enhancement run in the caller, and the result reads as if they had run one after the
other (warnings and timings in stage order). Phantom: ellipsoid 2 x 24 x 24, seed 1,
SNR 50 (what the worker's warm-up runs)."""

from __future__ import annotations

import threading

import pytest

from processing import run as run_mod
from processing.phantom import make_phantom
from processing.run import ProcessingSettings, run


@pytest.fixture(scope="module")
def acq():
    return make_phantom((2, 24, 24), seed=1, snr=50.0, anatomy="ellipsoid").acq


def test_myelin_runs_while_the_synthesis_runs(acq, monkeypatch) -> None:
    """The myelin stage waits (up to 20 s) for the synthesis to have started: one after the
    other it would wait in vain and fail."""
    synthesis_started = threading.Event()
    synthesize = run_mod.synthesis.synthesize_all
    myelin_maps = run_mod.myelin.myelin_maps

    def synthesize_all(*args, **kwargs):
        synthesis_started.set()
        return synthesize(*args, **kwargs)

    def myelin_after_synthesis(*args, **kwargs):
        if not synthesis_started.wait(20.0):
            raise RuntimeError("the synthesis did not start while myelin ran")
        return myelin_maps(*args, **kwargs)

    monkeypatch.setattr(run_mod.synthesis, "synthesize_all", synthesize_all)
    monkeypatch.setattr(run_mod.myelin, "myelin_maps", myelin_after_synthesis)
    result = run(acq, ProcessingSettings(enhance=False))
    assert not [w for w in result.warnings if "myelin model failed" in w], result.warnings
    assert result.myelin is not None and "MYELIN" in result.volumes_ml
    assert result.qc.get("status") in ("pass", "warn", "fail") and "error" not in result.qc


def test_warnings_and_timings_in_stage_order(acq, monkeypatch) -> None:
    """Myelin and QC fail (each a warning) on the thread, the synthesis adds a warning
    later than both: the result lists myelin's, then the synthesis's, then QC's, and the
    timings in stage order."""

    def myelin_fails(*args, **kwargs):
        raise RuntimeError("no myelin here")

    def qc_fails(*args, **kwargs):
        raise RuntimeError("no QC here")

    stage = run_mod._synthesis_stage
    both_failed = threading.Event()

    def synthesis_last(acq, result, *args):
        out = stage(acq, result, *args)
        both_failed.wait(20.0)  # the thread's warnings exist before this one
        result.warnings.append("synthesis done")
        return out

    def qc_fails_then_signals(*args, **kwargs):
        both_failed.set()
        qc_fails()

    monkeypatch.setattr(run_mod.myelin, "myelin_maps", myelin_fails)
    monkeypatch.setattr(run_mod.qc_mod, "fit_qc", qc_fails_then_signals)
    monkeypatch.setattr(run_mod, "_synthesis_stage", synthesis_last)
    result = run(acq, ProcessingSettings(enhance=False))
    mine = [w for w in result.warnings if w.startswith(("myelin model", "synthesis", "QC"))]
    assert mine == [
        "myelin model failed: no myelin here",
        "synthesis done",
        "QC failed: no QC here",
    ]
    assert result.qc == {"status": "fail", "error": "no QC here"}
    assert list(result.timings_s)[-3:] == ["myelin", "synthesis", "qc"], result.timings_s


class _Stop(BaseException):
    pass


def test_an_error_on_the_thread_is_raised_by_run(acq, monkeypatch) -> None:
    """What the stages do not turn into a warning (a BaseException) reaches run's caller."""

    def qc_stops(*args, **kwargs):
        raise _Stop("stop")

    monkeypatch.setattr(run_mod.qc_mod, "fit_qc", qc_stops)
    with pytest.raises(_Stop):
        run(acq, ProcessingSettings(enhance=False))


def test_a_large_grid_runs_myelin_and_qc_first_with_the_same_result(acq, monkeypatch) -> None:
    """Above CONCURRENT_MAX_VOXELS (lowered here to 1) myelin + QC run before the synthesis
    in the caller's thread: no thread is started, the synthesis sees the myelin done, and
    maps, contrasts, warnings and stage order equal the concurrent run's."""
    import numpy as np

    concurrent = run(acq, ProcessingSettings(enhance=False))
    monkeypatch.setattr(run_mod, "CONCURRENT_MAX_VOXELS", 1)
    stage = run_mod._synthesis_stage
    seen: dict[str, object] = {}

    def synthesis_records(acq, result, *args):
        seen["thread"] = threading.current_thread()
        seen["myelin_done"] = result.myelin is not None and result.qc is not None
        return stage(acq, result, *args)

    monkeypatch.setattr(run_mod, "_synthesis_stage", synthesis_records)
    started: list[str] = []
    start = threading.Thread.start

    def record_start(self):
        started.append(self.name)
        return start(self)

    monkeypatch.setattr(threading.Thread, "start", record_start)
    sequential = run(acq, ProcessingSettings(enhance=False))
    assert "myelin-qc" not in started
    assert seen["thread"] is threading.main_thread() and seen["myelin_done"]
    assert sequential.warnings == concurrent.warnings
    assert list(sequential.timings_s) == list(concurrent.timings_s)
    assert sequential.volumes_ml == concurrent.volumes_ml
    for name, image in concurrent.synthetic.items():
        assert np.array_equal(sequential.synthetic[name].image, image.image), name
    assert np.array_equal(sequential.myelin.mypv, concurrent.myelin.mypv)


def test_run_taking_lets_the_samples_go_before_the_synthesis(monkeypatch) -> None:
    """run_taking on a large grid (CONCURRENT_MAX_VOXELS lowered to 1): once myelin and QC
    are done the acquisition's samples are unreachable (the enhancement's voxels gathered)
    before the synthesis starts, and the result equals run's, FLAIR_AI and provenance
    included. Ellipsoid phantom 2 x 24 x 24, seed 1, SNR 50."""
    import gc
    import weakref

    import numpy as np

    settings = ProcessingSettings(contrasts=("T1W", "FLAIR"))
    monkeypatch.setattr(run_mod, "CONCURRENT_MAX_VOXELS", 1)
    kept = run(make_phantom((2, 24, 24), seed=1, snr=50.0, anatomy="ellipsoid").acq, settings)
    held = [make_phantom((2, 24, 24), seed=1, snr=50.0, anatomy="ellipsoid").acq]
    samples = weakref.ref(held[0].signal)
    stage = run_mod._synthesis_stage
    alive_at_synthesis: list[bool] = []

    def synthesis_records(*args):
        gc.collect()
        alive_at_synthesis.append(samples() is not None)
        return stage(*args)

    monkeypatch.setattr(run_mod, "_synthesis_stage", synthesis_records)
    taken = run_mod.run_taking(held, settings)
    assert held == [] and alive_at_synthesis == [False]
    assert "FLAIR_AI" in kept.synthetic and list(taken.synthetic) == list(kept.synthetic)
    for name, image in kept.synthetic.items():
        assert np.array_equal(taken.synthetic[name].image, image.image), name
    assert taken.warnings == kept.warnings
    assert taken.provenance == kept.provenance
