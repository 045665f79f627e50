"""GM/WM myelin (MyPV) across tissue values and anatomy (not a test; prints numbers).

1. The model on pure tissue (processing.myelin.invert, no fit, B1 1.0) across physics.md
   section 6's adult 3T MDME ranges (compiled there from Hagiwara et al. Invest Radiol
   2019;54:39 and Warntjes et al. MRM 2008;60:320): WM T1 550-650 ms, T2 60-75 ms,
   PD 62-70 pu; cortical GM T1 950-1300 ms, T2 80-100 ms, PD 78-88 pu; plus the off-centre
   set's values (WM 750/60/70, GM 1350/100/84). PD both at the range's ends and from the
   relation 1/PD = 0.918 + 0.332 s * R1 (processing.pd).
2. Phantoms: each case a phantom (MNI or procedural ellipsoid anatomy), SNR 50, real or
   magnitude data, noise seeds as given, through fit (two passes) -> PD -> segmentation ->
   myelin, as processing.run runs them. Prints the median MyPV of pure WM and GM, the
   whole-brain myelin share of BPV (Warntjes et al. Front Neurol 2016;7:16 controls: 157
   of 1148 mL, 13.7 %) and the calibration warnings of the result
   (processing.myelin.calibration_warnings; "-" for none).

    python benchmarks/myelin_tissues.py [--shape 6 128 128] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from processing import myelin, segmentation
from processing.fit import fit_mdme
from processing.pd import correct_pd
from processing.phantom import make_phantom

SEQ = {"delays_ms": (150.0, 580.0, 1900.0, 3850.0), "echo_times_ms": (20.0, 100.0), "tr_ms": 4000.0}

# name: (anatomy, magnitude, WM (T1, T2, PD), GM (T1, T2, PD))
CASES = {
    "project": ("mni", False, (600, 70, 68), (1100, 90, 82)),
    "off-centre": ("mni", False, (750, 60, 70), (1350, 100, 84)),
    "GM short": ("ellipsoid", False, (560, 65, 65), (980, 82, 79)),
    "GM long": ("ellipsoid", True, (640, 74, 69), (1280, 98, 87)),
    "GM wet": ("mni", True, (620, 72, 69), (1150, 92, 86)),
}


def pd_relation(t1_ms: float) -> float:
    return 100.0 / (0.918 + 0.332 * 1000.0 / t1_ms)


def pure_tissue_table() -> None:
    print("1. pure tissue, B1 1.0: MyPV % (T2 ms / PD pu), PD 'rel' from the PD-R1 relation")
    for tissue, t1s, t2s, pds in (
        ("WM", (550, 600, 650, 750), (60, 70, 75), (62, 66, 70)),
        ("GM", (950, 1100, 1200, 1300, 1350), (80, 90, 100), (78, 82, 88)),
    ):
        for t1 in t1s:
            cells = []
            for t2 in t2s:
                for pd in (*pds, pd_relation(t1)):
                    my, _ = myelin.invert(
                        np.array([t1]), np.array([t2]), np.array([pd]), 1.0, **SEQ
                    )
                    tag = "rel" if pd not in pds else f"{pd:.0f}"
                    cells.append(f"{t2}/{tag} {100 * my[0]:4.1f}")
            print(f"  {tissue} T1 {t1:5d}: " + "  ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(6, 128, 128))
    ap.add_argument("--seeds", type=int, nargs="+", default=(0, 1, 2))
    args = ap.parse_args()
    pure_tissue_table()
    print("\n2. phantoms, SNR 50: median MyPV of pure WM / GM, myelin share of BPV, warnings")
    for name, (anatomy, mag, wm, gm) in CASES.items():
        kind = "magnitude" if mag else "real"
        print(f" {name}: {anatomy} {kind}, WM {wm} GM {gm}")
        for seed in args.seeds:
            tissues = {"WM": wm, "GM": gm}
            ph = make_phantom(
                tuple(args.shape),
                seed=seed,
                snr=50.0,
                magnitude=mag,
                tissues=tissues,
                anatomy=anatomy,
            )
            maps = correct_pd(fit_mdme(ph.acq, b1_smoothing=True))
            icm = segmentation.intracranial_mask(maps, ph.acq)
            fr = segmentation.segment(ph.acq, maps, icmask=icm)
            bpv = segmentation.volumes(fr, ph.acq.voxel_volume_ml)["BPV"]
            mm = myelin.myelin_maps(maps, icm, ph.acq.voxel_volume_ml, acq=ph.acq, fractions=fr)
            med = [float(np.median(mm.mypv[ph.truth.pure_mask(c) & icm])) for c in ("WM", "GM")]
            flags = "; ".join(w for w in mm.calibration_warnings if w.startswith("pure")) or "-"
            print(
                f"    seed {seed}: WM {med[0]:4.1f} %  GM {med[1]:4.1f} %  "
                f"brain {100 * mm.myelin_volume_ml / bpv:4.1f} %  warnings: {flags}"
            )


if __name__ == "__main__":
    main()
