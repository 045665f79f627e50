"""Promise 6 of DESIGN.md: the first series after start is as fast as the tenth.

After ``processing.run.warmup()`` (what every worker runs at start-up), processing real
normalized series of every kind compiles no new numba specialization: a new signature means
a series paid for a compile (~15 s on this machine for the fit kernels).
"""

from __future__ import annotations

import importlib
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
    from dicom_node import emulator, ingest
    from processing import phase, run
    from processing.phantom import make_phantom

    phase.warmup()  # the node process (normalization), dicom_node.service.Node.start
    run.warmup()  # every worker, dicom_node.workers.warm_worker
    before = _signatures()
    for layout, magnitude_only in (("ge", False), ("ge", True), ("philips_enhanced", False)):
        ph = make_phantom((6, 64, 64), seed=5, snr=50.0)
        folder = tmp_path / f"{layout}_{magnitude_only}"
        emulator.write_series(ph.acq, layout, folder, with_phase=not magnitude_only)
        outcome = ingest.classify_and_normalize(ingest.read_paths([folder])[0])
        assert outcome.acquisition is not None, outcome.reason
        res = run.run(outcome.acquisition)
        assert not [w for w in res.warnings if "failed" in w], res.warnings
    after = _signatures()
    new = {k: (before.get(k, 0), v) for k, v in after.items() if v != before.get(k, 0)}
    assert new == {}, f"compiled after warm-up (before, after): {new}"
