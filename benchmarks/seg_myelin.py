"""Timing and accuracy of segmentation + myelin on a 256x256x30 phantom.

Usage: ``python benchmarks/seg_myelin.py [--shape 30,256,256] [--snr 50] [--threads N]``

Prints the segmentation time (mask + centres + unmixing + volumes) and the myelin time
(lookup grid, cached per sequence timing, plus inversion), warm (numba compiled, grid
built once before timing, as in the running node) and the cold grid build separately, then
the volume errors against the phantom truth and the myelin figures per pure tissue.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from processing import myelin, qc, segmentation
from processing.fit import fit_mdme
from processing.pd import correct_pd
from processing.phantom import make_phantom


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="30,256,256")
    ap.add_argument("--snr", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--magnitude", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split(","))
    t = time.perf_counter()
    ph = make_phantom(shape, seed=args.seed, snr=args.snr, magnitude=args.magnitude)
    print(f"phantom {shape}: {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    maps = correct_pd(fit_mdme(ph.acq, b1_smoothing=True))
    print(f"fit + pd: {time.perf_counter() - t:.2f} s")
    acq, vv = ph.acq, ph.acq.voxel_volume_ml

    # Warm-up on a tiny phantom with the same timing (compiles numba, builds the grid).
    t = time.perf_counter()
    small = make_phantom((2, 32, 32), seed=1, snr=args.snr, anatomy="ellipsoid")
    sm = correct_pd(fit_mdme(small.acq))
    segmentation.segment(small.acq, sm)
    print(f"warm-up (compile/cache load + grid build): {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    myelin.myelin_maps(sm, sm.mask, 1.0, acq=small.acq)
    print(f"myelin grid (cached after first use): {time.perf_counter() - t:.2f} s")

    t_seg, t_my = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        icm = segmentation.intracranial_mask(maps, acq)
        fr = segmentation.segment(acq, maps, icmask=icm)
        vol = segmentation.volumes(fr, vv)
        t_seg.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mm = myelin.myelin_maps(maps, icm, vv, acq=acq, fractions=fr)
        t_my.append(time.perf_counter() - t0)
    tot = [a + b for a, b in zip(t_seg, t_my, strict=True)]
    print(
        f"segmentation: {np.median(t_seg):.2f} s   myelin: {np.median(t_my):.2f} s   together: "
        f"median {np.median(tot):.2f} s, best {min(tot):.2f} s of {args.repeat} "
        f"({int(icm.sum())} intracranial voxels, {numba.get_num_threads()} threads)"
    )
    t0 = time.perf_counter()
    q = qc.fit_qc(acq, maps, fr)
    print(
        f"qc: {time.perf_counter() - t0:.2f} s  status {q['status']}  residual/noise "
        f"{q['residual_to_noise']:.2f}  per-delay {[round(v, 2) for v in q['delay_residual_to_noise']]}"
    )

    truth = dict(ph.truth.fractions)
    truth["NON"] = truth.pop("LESION")
    tv = segmentation.volumes(truth, vv)
    for k in ("WM", "GM", "CSF", "NON", "BPV", "ICV"):
        print(
            f"  {k:4s} {vol[k]:9.2f} mL  truth {tv[k]:9.2f} mL  error {100 * (vol[k] - tv[k]) / tv[k]:+6.2f} %"
        )
    print(f"  BPF  {vol['BPF']:.4f}  truth {tv['BPF']:.4f}  error {vol['BPF'] - tv['BPF']:+.4f}")
    for c in ("WM", "GM", "CSF"):
        p = ph.truth.pure_mask(c) & icm
        print(f"  MyPV pure {c}: median {np.median(mm.mypv[p]):5.1f} %  (n={int(p.sum())})")
    print(
        f"  myelin volume {mm.myelin_volume_ml:.1f} mL = {100 * mm.myelin_volume_ml / vol['BPV']:.1f} % "
        f"of BPV ({100 * mm.myelin_volume_ml / vol['ICV']:.1f} % of ICV); EPW {mm.epw_volume_ml:.1f} mL"
    )


if __name__ == "__main__":
    main()
