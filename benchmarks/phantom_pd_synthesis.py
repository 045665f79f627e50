"""Speed and memory of processing.phantom, processing.pd and processing.synthesis (not a test).

Prints wall-clock seconds (median of the repeats) for:
- make_phantom at the default 256x256x30 (MNI anatomy, real and magnitude), first call
  (loads and smooths the MNI maps) and later calls;
- correct_pd and synthesize_all (8 presets + per-patient DIR) on truth maps of that size;
and the process's peak resident memory. Also, on a fitted 8x160x160 phantom at SNR 50,
the median PD error in pure WM/GM/CSF.

    python benchmarks/phantom_pd_synthesis.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from processing.pd import correct_pd
from processing.phantom import COMPARTMENTS, make_phantom, truth_quantmaps
from processing.synthesis import PRESETS, per_patient_dir, synthesize_all


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    t = time.perf_counter()
    ph = make_phantom()
    print(f"make_phantom 30x256x256 mni real, first call: {time.perf_counter() - t:.2f} s")
    dt, ph = timed(lambda: make_phantom(seed=1), args.repeats)
    print(f"make_phantom 30x256x256 mni real: {dt:.2f} s")
    dt, _ = timed(lambda: make_phantom(seed=1, magnitude=True, oblique=True), args.repeats)
    print(f"make_phantom 30x256x256 mni magnitude oblique: {dt:.2f} s")
    dt, _ = timed(lambda: make_phantom(seed=1, anatomy="ellipsoid"), args.repeats)
    print(f"make_phantom 30x256x256 ellipsoid real: {dt:.2f} s")

    maps = truth_quantmaps(ph.truth)
    dt, pdm = timed(lambda: correct_pd(maps, voxel_size_mm=ph.acq.voxel_size_mm), args.repeats)
    print(f"correct_pd 30x256x256: {dt:.2f} s")

    def synth():
        timing = per_patient_dir(pdm)
        return synthesize_all(pdm, list(PRESETS), dir_timing=timing)

    dt, _ = timed(synth, args.repeats)
    print(f"per_patient_dir + synthesize_all (8 contrasts) 30x256x256: {dt:.2f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory so far: {peak:.0f} MiB")

    from processing.fit import fit_mdme

    small = make_phantom((8, 160, 160), seed=1, snr=50.0)
    q = correct_pd(fit_mdme(small.acq), voxel_size_mm=small.acq.voxel_size_mm)
    tr = small.truth
    mix = sum(tr.fractions[c] * tr.tissues[c].pd_pu for c in COMPARTMENTS)
    for c in ("WM", "GM", "CSF"):
        m = tr.pure_mask(c) & ~q.failed
        print(
            f"fitted 8x160x160 SNR 50: {c} median PD error {np.median(q.pd_pu[m] - mix[m]):+.2f} pu"
        )


if __name__ == "__main__":
    main()
