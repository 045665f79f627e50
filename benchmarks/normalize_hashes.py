"""SHA-256 of vendors.normalize's Acquisition per emulator layout, to prove a refactor of the
adapter bit-identical (not a test). Diff the output of two checkouts.

    PYTHONPATH=$PWD python benchmarks/normalize_hashes.py

Cases: every layout of dicom_node.emulator x {magnitude + phase, magnitude only} x two
acquisitions (tests/test_vendors.acquisition(): 3 x 16 x 16 noiseless random tissue; an
ellipsoid phantom 3 x 32 x 32 seed 11 SNR 60), emulator seed 5. Hashed: signal, delays, echo
times, affine, voxel size, TR / flip angles / is_magnitude / delay source and the metadata
(without ``phase_unit``, added by issue 13). Measured at issue 13 (normalize split into
phases, phase unit from the data) against 08ca190: all 20 identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dicom_node import emulator
from dicom_node.vendors import normalize
from processing.phantom import make_phantom
from tests.test_vendors import acquisition


def digest(acq) -> str:
    h = hashlib.sha256()
    for a in (acq.signal, acq.delays_ms, acq.echo_times_ms, acq.affine):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(np.asarray(acq.voxel_size_mm, dtype=np.float64).tobytes())
    h.update(
        repr(
            (acq.tr_ms, acq.saturation_deg, acq.excitation_deg, acq.is_magnitude, acq.delay_source)
        ).encode()
    )
    meta = {k: v for k, v in acq.metadata.items() if k != "phase_unit"}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def main() -> None:
    acqs = {
        "test_vendors": acquisition(),
        "phantom": make_phantom((3, 32, 32), seed=11, snr=60.0, anatomy="ellipsoid").acq,
    }
    for name, acq in acqs.items():
        for layout in emulator.VENDOR_LAYOUTS:
            for with_phase in (True, False):
                dss = emulator.make_datasets(acq, layout, with_phase=with_phase, seed=5)
                parts = "MP" if with_phase else "M"
                print(f"{name:<13} {layout:<20} {parts:<3} {digest(normalize(dss))}")


if __name__ == "__main__":
    main()
