"""Per-patient CSF nulls (FLAIR, DIR) on several brain phantoms (not a test).

For each phantom (MNI anatomy, SNR 50 as in issue 2, B1 0.8-1.2, coil field, real or
magnitude, default tissues) it fits with the B1-smoothing pass, measures the series' WM and
CSF T1 as processing.run does (run.class_t1_ms on the raw-sample segmentation, no truth) and
prints: the CSF T1 estimate against the median fitted T1 of truly pure (>= 99 %) CSF (fit
"failures" included: the images show them), and the
median signed per-patient DIR (WM, CSF) and FLAIR (CSF) signal as a fraction of GM.

    python benchmarks/csf_null.py
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from processing import fit, pd, run, segmentation, synthesis
from processing.phantom import make_phantom

CASES = [  # (seed, shape, magnitude)
    (11, (8, 160, 160), False),
    (12, (8, 160, 160), False),
    (13, (8, 160, 160), True),
    (16, (12, 192, 192), False),
    (17, (12, 192, 192), True),
    (18, (16, 224, 224), False),
    (19, (12, 192, 192), False),
    (11, (6, 96, 96), False),
]


def main() -> None:
    print(
        "seed shape           data  CSF T1 est / pure-CSF median   DIR WM/GM  DIR CSF/GM  FLAIR CSF/GM"
    )
    for seed, shape, mag in CASES:
        ph = make_phantom(shape, seed=seed, snr=50.0, b1_range=(0.8, 1.2), coil=True, magnitude=mag)
        acq, t = ph.acq, ph.truth
        maps = pd.correct_pd(
            fit.fit_mdme(acq, b1_smoothing=True), voxel_size_mm=acq.voxel_size_mm, acq=acq
        )
        ok = maps.mask & ~maps.failed
        pure = {k: t.pure_mask(k) & ok for k in ("WM", "GM")}
        pure["CSF"] = (t.fractions["CSF"] >= 0.99) & maps.mask
        r1 = np.where(maps.mask, 1.0 / np.maximum(maps.t1_ms, 1e-3), 0.0)
        r2 = np.where(maps.mask, 1.0 / np.maximum(maps.t2_ms, 1e-3), 0.0)
        meas = run.class_t1_ms(maps, segmentation.segment(acq, maps))
        tm = synthesis.per_patient_dir(maps, meas["WM"], meas["CSF"])
        d = maps.pd_pu * synthesis.dir_weight(
            r1, r2, tm.tr_ms, tm.te_ms, tm.ti1_ms, tm.ti2_ms, signed=True
        )
        gm = abs(np.median(d[pure["GM"]]))
        fl = synthesis.resolve_spec(
            dataclasses.replace(synthesis.PRESETS["FLAIR"], null_t1_ms=(meas["CSF"],))
        )
        s = maps.pd_pu * synthesis.ir_weight(r1, r2, fl.tr_ms, fl.te_ms, fl.ti_ms, signed=True)
        ref = np.median(maps.t1_ms[pure["CSF"]])
        print(
            f"{seed:4d} {shape!s:15s} {'mag ' if mag else 'real'}  "
            f"{meas['CSF']:6.0f} / {ref:6.0f} (n={int(pure['CSF'].sum())})"
            f"{abs(np.median(d[pure['WM']])) / gm:14.4f}{abs(np.median(d[pure['CSF']])) / gm:12.4f}"
            f"{abs(np.median(s[pure['CSF']])) / np.median(s[pure['GM']]):14.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
