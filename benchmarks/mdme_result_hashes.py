"""SHA-256 of everything processing.run returns for MDME phantoms, and of the exported pixel
data, to prove a refactor of the 3D job leaves MDME bit-identical (not a test).

Cases: MNI 3x96x96 SNR 50 (real; magnitude) and ellipsoid 2x64x64 oblique SNR 50, default
settings (segmentation, myelin, synthesis incl. tissue mixture, QC; ONNX FLAIR when the
model is there). Prints one line per array; diff the output of two checkouts:

    PYTHONPATH=/work/main python benchmarks/mdme_result_hashes.py > a.txt
    PYTHONPATH=$PWD python benchmarks/mdme_result_hashes.py > b.txt && diff a.txt b.txt
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

CASES = [
    ("mni 3x96x96 real", dict(shape=(3, 96, 96), seed=3, snr=50.0)),
    ("mni 3x96x96 magnitude", dict(shape=(3, 96, 96), seed=4, snr=50.0, magnitude=True)),
    (
        "ellipsoid 2x64x64 oblique",
        dict(shape=(2, 64, 64), seed=5, snr=50.0, anatomy="ellipsoid", oblique=True),
    ),
]


def _h(a) -> str:
    a = np.ascontiguousarray(np.asarray(a))
    return f"{a.dtype}{a.shape} " + hashlib.sha256(a.tobytes()).hexdigest()[:16]


def main() -> None:
    from processing.phantom import make_phantom
    from processing.run import run

    for name, kw in CASES:
        shape = kw.pop("shape")
        ph = make_phantom(shape, **kw)
        res = run(ph.acq)
        for field in ("t1_ms", "t2_ms", "pd_pu", "m0", "b1", "mask", "failed", "residual"):
            v = getattr(res.maps, field, None)
            if v is not None:
                print(name, "maps", field, _h(v))
        if res.segmentation is not None:
            for t, f in sorted(res.segmentation.fractions.items()):
                print(name, "fraction", t, _h(f))
            print(name, "icmask", _h(res.segmentation.icmask))
        for k, img in sorted(res.synthetic.items()):
            print(name, "synthetic", k, _h(img.image), f"scale={img.scale!r}")
            print(name, "window", k, repr((img.window_center, img.window_width)))
        print(name, "volumes", json.dumps(res.volumes_ml, sort_keys=True))
        if res.myelin is not None:
            print(name, "myelin", _h(res.myelin.mypv), _h(res.myelin.epw))
        print(name, "qc", json.dumps(res.qc, sort_keys=True, default=str)[:400])


if __name__ == "__main__":
    main()
