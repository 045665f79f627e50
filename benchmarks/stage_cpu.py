"""Wall and CPU seconds of the node's normalization and of each processing stage, in one
process (no node, no PACS): what issue 14's stage profile costs, also on a loaded machine.

    PYTHONPATH=$PWD python benchmarks/stage_cpu.py [--shape 30 256 256] [--repeat 3]

Prints, per repeat: ``series.classify`` of a GE magnitude + phase series (emulator, read
back with pydicom as the node does) with its process CPU, then ``processing.run`` on the
same phantom with its stage timings (wall) and the process's user / system CPU, and the
load average. CPU includes numba's and onnxruntime's threads. Run it as the node runs:
``synthmr serve`` sets ``NUMPY_MADVISE_HUGEPAGE=0`` (dicom_node.cli); set it here too
(the default here is numpy's, so both can be compared):

    NUMPY_MADVISE_HUGEPAGE=0 PYTHONPATH=$PWD python benchmarks/stage_cpu.py
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node import emulator, series
from dicom_node.pipeline import load_datasets
from processing import phase
from processing import run as run_mod
from processing.phantom import make_phantom


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", type=int, nargs=3, default=(30, 256, 256))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    ph = make_phantom(tuple(args.shape), seed=5, snr=50.0)
    phase.warmup()
    run_mod.warmup()
    hp = os.environ.get("NUMPY_MADVISE_HUGEPAGE", "numpy default")
    print(f"shape {tuple(args.shape)}, NUMPY_MADVISE_HUGEPAGE={hp}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(p) for p in emulator.write_series(ph.acq, "ge", Path(tmp), with_phase=True)]
        for i in range(args.repeat):
            datasets = load_datasets(paths)
            (u0, s0), t = _cpu(), time.perf_counter()
            cls = series.classify(datasets)
            (u1, s1), wall = _cpu(), time.perf_counter() - t
            if cls.acquisition is None:
                raise SystemExit(f"normalization failed: {cls.reason}")
            print(
                f"[{i + 1}] normalize (classify, {len(paths)} files): wall {wall:.2f} s, "
                f"user {u1 - u0:.2f} s, sys {s1 - s0:.2f} s; load {os.getloadavg()[0]:.1f}"
            )
            del datasets, cls
            (u0, s0), t = _cpu(), time.perf_counter()
            result = run_mod.run(ph.acq)
            (u1, s1), wall = _cpu(), time.perf_counter() - t
            stages = " ".join(f"{k} {v:.2f}" for k, v in result.timings_s.items())
            print(
                f"[{i + 1}] processing.run: wall {wall:.2f} s, user {u1 - u0:.2f} s, sys "
                f"{s1 - s0:.2f} s; load {os.getloadavg()[0]:.1f}\n    stages (wall s): {stages}",
                flush=True,
            )


if __name__ == "__main__":
    main()
