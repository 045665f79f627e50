"""GM/WM myelin (MyPV) on phantoms with varied anatomy and tissue values (not a test).

Each case: a phantom (MNI or procedural ellipsoid anatomy; tissue values from the project's
defaults to the edges of physics.md section 6's 3T ranges), SNR 50, real or magnitude data,
through fit (two passes) -> PD -> segmentation -> myelin, as processing.run runs them.
Prints the median MyPV of pure WM and GM per case for the default constants and for the
earlier calibration (GM anchor 6 %), and the whole-brain myelin share of BPV.

    python benchmarks/myelin_tissues.py [--shape 6 128 128]
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

# name: (anatomy, magnitude, WM (T1, T2, PD), GM (T1, T2, PD))
CASES = {
    "project": ("mni", False, (600, 70, 68), (1100, 90, 82)),
    "off-centre": ("mni", False, (750, 60, 70), (1350, 100, 84)),
    "GM short": ("ellipsoid", False, (560, 65, 65), (980, 82, 79)),
    "GM long": ("ellipsoid", True, (640, 74, 69), (1280, 98, 87)),
    "GM wet": ("mni", True, (620, 72, 69), (1150, 92, 86)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(6, 128, 128))
    args = ap.parse_args()
    old = myelin.calibrate_constants(gm_mypv=0.06)
    for seed, (name, (anatomy, mag, wm, gm)) in enumerate(CASES.items()):
        tissues = {"WM": wm, "GM": gm}
        ph = make_phantom(
            tuple(args.shape), seed=seed, snr=50.0, magnitude=mag, tissues=tissues, anatomy=anatomy
        )
        maps = correct_pd(fit_mdme(ph.acq, b1_smoothing=True))
        icm = segmentation.intracranial_mask(maps, ph.acq)
        fr = segmentation.segment(ph.acq, maps, icmask=icm)
        bpv = segmentation.volumes(fr, ph.acq.voxel_volume_ml)["BPV"]
        cells = []
        for label, cst in (("default", myelin.DEFAULT_CONSTANTS), ("GM anchor 6 %", old)):
            mm = myelin.myelin_maps(
                maps, icm, ph.acq.voxel_volume_ml, acq=ph.acq, fractions=fr, constants=cst
            )
            med = [float(np.median(mm.mypv[ph.truth.pure_mask(c) & icm])) for c in ("WM", "GM")]
            cells.append(
                f"{label}: WM {med[0]:4.1f} % GM {med[1]:4.1f} % "
                f"(brain {100 * mm.myelin_volume_ml / bpv:4.1f} %)"
            )
        kind = "magnitude" if mag else "real"
        print(f"{name:10s} {anatomy:9s} {kind:9s} WM {wm} GM {gm}\n    " + "\n    ".join(cells))


if __name__ == "__main__":
    main()
