"""3D-QALAS fit throughput on a 1 mm 256 x 256 x 176 phantom (the head only is fitted).

Prints fitted voxels/s, per-stage timings and peak memory (RSS high-water mark) for:
the fit with a B1 map (B1 fixed), and the default fit (profile-likelihood B1 field + fit).

    PYTHONPATH=$PWD python benchmarks/qalas_fit.py [--shape 176 256 256] [--snr 50]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", type=int, nargs=3, default=(176, 256, 256), help="z y x")
    ap.add_argument("--snr", type=float, default=50.0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import numba as nb

    from processing.fit import estimate_noise_sd
    from processing.qalas_fit import estimate_b1_field, fit_qalas, fit_qalas_samples, warmup
    from processing.qalas_phantom import make_qalas_phantom

    if args.threads:
        nb.set_num_threads(args.threads)
    t = time.perf_counter()
    warmup()
    print(f"warmup (compile or cache load): {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    ph = make_qalas_phantom(tuple(args.shape), voxel_size_mm=(1.0, 1.0, 1.0), snr=args.snr)
    print(f"phantom {tuple(args.shape)} 1 mm, SNR {args.snr}: {time.perf_counter() - t:.1f} s")
    acq, truth = ph.acq, ph.truth
    head = truth.head
    n = int(head.sum())
    print(f"head voxels fitted: {n:,} of {head.size:,}; threads {nb.get_num_threads()}")
    rss0 = _rss_gib()

    stages: dict[str, float] = {}
    t = time.perf_counter()
    samples = acq.samples().reshape(-1, 5)
    idx = np.flatnonzero(head.ravel())
    stages["samples"] = time.perf_counter() - t
    t = time.perf_counter()
    noise = estimate_noise_sd(acq)
    stages["noise"] = time.perf_counter() - t
    t = time.perf_counter()
    field, info = estimate_b1_field(
        samples, head, acq.sequence, magnitude=acq.is_magnitude, noise_sd=noise
    )
    stages["b1_field"] = time.perf_counter() - t
    t = time.perf_counter()
    _, _, ok = fit_qalas_samples(
        samples, acq.sequence, magnitude=acq.is_magnitude, b1_fixed=field.ravel()[idx], idx=idx
    )
    stages["fit_b1_fixed"] = time.perf_counter() - t
    for k, v in stages.items():
        print(f"  stage {k:14s} {v:7.2f} s")
    print(
        f"B1 field: {info.get('n_voting', 0):,} voting voxels, {info.get('iterations')} Newton "
        f"iterations; median |B1 error| {np.median(np.abs(field - truth.b1)[head]):.4f}"
    )
    print(f"fit (B1 fixed): {n / stages['fit_b1_fixed']:,.0f} fitted voxels/s, ok {ok.mean():.4f}")
    total = sum(stages.values())
    print(f"whole QALAS fit (noise + B1 field + fit): {total:.1f} s = {n / total:,.0f} voxels/s")
    t = time.perf_counter()
    maps = fit_qalas(acq, head, b1_map=truth.b1)
    dt = time.perf_counter() - t
    print(f"fit_qalas with a B1 map: {dt:.1f} s = {n / dt:,.0f} fitted voxels/s")
    wm = truth.pure_mask("WM") & head
    print(f"WM median T1 {np.median(maps.t1_ms[wm]):.1f} ms (truth {truth.tissues['WM'].t1_ms})")
    print(f"peak RSS {_rss_gib():.2f} GiB (after phantom: {rss0:.2f} GiB)")


if __name__ == "__main__":
    main()
