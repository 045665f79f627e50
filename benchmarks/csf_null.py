"""Per-patient CSF and WM nulls, and what the delivered images show (not a test).

For each brain phantom (MNI anatomy, SNR 50 as in issue 2, B1 0.8-1.2, coil field, real or
magnitude, default or other tissue values) it runs the whole pipeline
(``processing.run.run``: fit with B1 smoothing, segmentation, per-patient FLAIR and DIR,
ONNX enhancement) and prints two kinds of figures, both as a fraction of GM:

* ``null``: the median *signed* per-patient DIR (WM, CSF) and FLAIR (CSF) signal
  synthesized from the fitted maps over truly pure (>= 99 %) tissue. This says whether the
  TIs sit on the series' own fitted T1s (fit "failures" included: the images show them).
* ``image``: the mean of the delivered magnitude images over pure tissue: plain synthetic
  (DIR, FLAIR), tissue mixture (DIR_MIX, FLAIR_MIX, processing.mixture) and AI-enhanced
  (FLAIR_AI). This is what a radiologist sees.

Against the truth (the conventional image of each voxel's true mixture at the series' own
TIs) it prints, for DIR/DIR_MIX and FLAIR/FLAIR_MIX: the lesion ratio (lesion/GM of the
image over that of the truth, DIR; lesion/WM contrast ratio, FLAIR; 1.0 = kept) and the
NRMSE over the brain after matching GM (plain -> mixture).

    python benchmarks/csf_null.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from processing import run, synthesis
from processing.phantom import COMPARTMENTS, make_phantom

#: Other tissue values (T1 ms, T2 ms, PD pu) inside the 3T ranges of physics.md section 6.
OTHER = {"WM": (560, 66, 66), "GM": (1250, 96, 85), "CSF": (3900, 1800, 100)}
#: Further tissue values (T1 ms, T2 ms, PD pu), at the long end of the 3T ranges.
LONG = {
    "WM": (700, 75, 70),
    "GM": (1300, 100, 86),
    "CSF": (4500, 2200, 100),
    "LESION": (1500, 160, 88),
}
CASES = [  # (seed, shape, magnitude, tissues[, more make_phantom options])
    (11, (8, 160, 160), False, None),
    (12, (8, 160, 160), False, None),
    (13, (8, 160, 160), True, None),
    (16, (12, 192, 192), False, None),
    (17, (12, 192, 192), True, None),
    (18, (16, 224, 224), False, None),
    (19, (12, 192, 192), False, None),
    (21, (10, 128, 128), True, OTHER),
    (22, (10, 200, 200), False, OTHER),
    (11, (6, 96, 96), False, None),
    (41, (8, 160, 160), False, None, {"oblique": True}),
    (42, (10, 128, 128), False, None, {"anatomy": "ellipsoid"}),
    (43, (8, 144, 144), True, LONG),
]


def truth_image(truth, img) -> np.ndarray:
    """Conventional magnitude image (IR or DIR timing of ``img``) of each voxel's true
    mixture, PD units, unit coil."""
    out = np.zeros(truth.fractions["WM"].shape)
    for c in COMPARTMENTS:
        p = truth.tissues[c]
        r1, r2 = np.array(1.0 / p.t1_ms), np.array(1.0 / p.t2_ms)
        if img.ti2_ms is not None:
            w = synthesis.dir_weight(
                r1, r2, img.tr_ms, img.te_ms, img.ti_ms, img.ti2_ms, signed=True
            )
        else:
            w = synthesis.ir_weight(r1, r2, img.tr_ms, img.te_ms, img.ti_ms, signed=True)
        out += truth.fractions[c] * p.pd_pu * float(w)
    return np.abs(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first three phantoms only")
    args = ap.parse_args(argv)
    print(
        "                                null (median signed)     "
        "image: mean over pure tissue / GM                               "
        "lesion ratio          NRMSE"
    )
    print(
        "seed shape         data tissues  DIR WM DIR CSF FLAIR CSF   "
        "DIR WM   MIX WM  DIR CSF  MIX CSF FLAIR CSF  MIX CSF   AI CSF   "
        "DIR   MIX FLAIR   MIX   DIR      FLAIR"
    )
    rows = []
    for seed, shape, mag, tissues, *more in CASES[:3] if args.quick else CASES:
        ph = make_phantom(
            shape, seed=seed, snr=50.0, b1_range=(0.8, 1.2), coil=True, magnitude=mag,
            tissues=tissues, **(more[0] if more else {}),
        )  # fmt: skip
        t = ph.truth
        # FLAIR_MIX is opt-in in the node (it dims some lesions); requested here to show it
        res = run.run(ph.acq, run.ProcessingSettings(mixture_contrasts=("DIR", "FLAIR")))
        maps = res.maps
        pure = {k: t.pure_mask(k) & maps.mask for k in ("WM", "GM", "LESION")}
        pure["CSF"] = (t.fractions["CSF"] >= 0.99) & maps.mask
        ok = maps.mask & ~maps.failed
        r1 = np.where(maps.mask, 1.0 / np.maximum(maps.t1_ms, 1e-3), 0.0)
        r2 = np.where(maps.mask, 1.0 / np.maximum(maps.t2_ms, 1e-3), 0.0)
        tm = res.dir_parameters
        d = maps.pd_pu * synthesis.dir_weight(
            r1, r2, tm["tr_ms"], tm["te_ms"], tm["ti1_ms"], tm["ti2_ms"], signed=True
        )
        gm_d = abs(np.median(d[pure["GM"] & ok]))
        fl = res.synthetic["FLAIR"]
        s = maps.pd_pu * synthesis.ir_weight(r1, r2, fl.tr_ms, fl.te_ms, fl.ti_ms, signed=True)
        null = [
            abs(np.median(d[pure["WM"] & ok])) / gm_d,
            abs(np.median(d[pure["CSF"]])) / gm_d,
            abs(np.median(s[pure["CSF"]])) / np.median(s[pure["GM"] & ok]),
        ]
        img = {k: np.asarray(v.image, np.float64) for k, v in res.synthetic.items()}

        def frac(name: str, tissue: str, img=img, pure=pure) -> float:
            if name not in img:
                return float("nan")
            return float(img[name][pure[tissue]].mean() / img[name][pure["GM"]].mean())

        image = [
            frac("DIR", "WM"),
            frac("DIR_MIX", "WM"),
            frac("DIR", "CSF"),
            frac("DIR_MIX", "CSF"),
            frac("FLAIR", "CSF"),
            frac("FLAIR_MIX", "CSF"),
            frac("FLAIR_AI", "CSF"),
        ]
        lesion, err = [], []
        brain = t.head & maps.mask
        for base, ref_tissue in (("DIR", "GM"), ("FLAIR", "WM")):
            ref = truth_image(t, res.synthetic[base])
            want = ref[pure["LESION"]].mean() / ref[pure[ref_tissue]].mean()
            for name in (base, f"{base}_MIX"):
                if name not in img or pure["LESION"].sum() < 10:
                    lesion.append(float("nan"))
                    err.append(float("nan"))
                    continue
                got = img[name][pure["LESION"]].mean() / img[name][pure[ref_tissue]].mean()
                lesion.append(got / want if base == "DIR" else (got - 1) / (want - 1))
                g = ref[pure["GM"]].mean() / img[name][pure["GM"]].mean()
                e = img[name][brain] * g - ref[brain]
                err.append(float(np.sqrt(np.mean(e**2) / np.mean(ref[brain] ** 2))))
        rows.append(null + image + lesion + err)
        print(
            f"{seed:4d} {shape!s:14s}{'mag ' if mag else 'real'} "
            f"{'/'.join(more[0]) if more else ('other' if tissues else 'default'):8s}"
            + "".join(f"{v:8.4f}" for v in null)
            + " "
            + "".join(f"{v:9.4f}" for v in image)
            + " "
            + "".join(f"{v:6.2f}" for v in lesion)
            + " "
            + f"{err[0]:5.2f}->{err[1]:4.2f} {err[2]:5.2f}->{err[3]:4.2f}",
            flush=True,
        )
    a = np.array(rows)
    print("max" + " " * 33 + "".join(f"{v:8.4f}" for v in a[:, :3].max(0)) + " "
          + "".join(f"{v:9.4f}" for v in a[:, 3:10].max(0)))  # fmt: skip
    print("min lesion ratio" + " " * 104 + "".join(f"{v:6.2f}" for v in np.nanmin(a[:, 10:14], 0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
