"""SHA-256 of fit_mdme's maps on small phantoms, to prove a refactor bit-identical (not a test).

Real (phase-corrected) and magnitude phantoms (MNI 3x96x96 SNR 50; ellipsoid 2x64x64 oblique;
MNI 2x80x80 SNR 30 with other WM/GM T1), each fitted one-pass, with the B1-smoothing pass, and
with a Gaussian slice profile. Prints one line per case; diff the output of two checkouts.

    python benchmarks/fit_map_hashes.py [--no-noise-floor]

--no-noise-floor fits magnitude data with |S| (fit_mdme(noise_floor=False)), the model of the
fit before issue 13, so magnitude hashes can be compared with a checkout from before it
(except the B1-smoothing cases: magnitude data now get a robust B1 smoothing on purpose).
Measured at issue 13 against 08ca190: the 9 real cases and 6 of 9 magnitude cases identical.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from processing.fit import fit_mdme
from processing.phantom import make_phantom
from processing.signal import gaussian_slice_profile

CASES = [
    (1, (3, 96, 96), {}),
    (2, (2, 64, 64), {"oblique": True, "anatomy": "ellipsoid"}),
    (3, (2, 80, 80), {"snr": 30.0, "tissues": {"WM": {"t1_ms": 700}, "GM": {"t1_ms": 1500}}}),
]


def digest(q) -> str:
    h = hashlib.sha256()
    for a in (q.t1_ms, q.t2_ms, q.m0, q.b1, q.residual, q.failed, q.mask):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(repr(q.noise_sd).encode())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-noise-floor", action="store_true")
    args = ap.parse_args()
    for mag in (False, True):
        for seed, shape, kw in CASES:
            ph = make_phantom(shape, seed=seed, magnitude=mag, **kw)
            for fkw in ({}, {"b1_smoothing": True}, {"profile": gaussian_slice_profile(3)}):
                extra = {"noise_floor": False} if (mag and args.no_noise_floor) else {}
                q = fit_mdme(ph.acq, **fkw, **extra)
                print("mag" if mag else "real", seed, list(fkw), digest(q))


if __name__ == "__main__":
    main()
