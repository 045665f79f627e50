"""Time reading + normalizing a 256x256x30 magnitude+phase MDME series (480 files).

    python benchmarks/normalize_speed.py [--layout ge] [--shape 30,256,256] [--repeat 3]
    python benchmarks/normalize_speed.py --agreement      # cross-layout agreement numbers

Target (issue 3): <= 2 s for read + normalize on the 2-core CI machine. Prints the
best-of-N wall time per stage.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from dicom_node import emulator, ingest, series
from processing.acquisition import Acquisition
from processing.signal import mdme_signal


def synthetic_acquisition(nz: int, ny: int, nx: int, seed: int = 0) -> Acquisition:
    """Smooth random tissue maps -> MDME signal (TR 4000 ms, 4 delays x 2 echoes)."""
    rng = np.random.default_rng(seed)
    shape = (nz, ny, nx)
    t1 = rng.uniform(500, 2500, shape)
    t2 = rng.uniform(50, 200, shape)
    m0 = rng.uniform(500, 1500, shape)
    tr = 4000.0
    delays = np.array([150.0, 600.0, 1700.0, 3600.0])
    tes = np.array([20.0, 100.0])
    s = mdme_signal(m0, t1, t2, 1.0, delays, tes, tr, 120.0, 90.0)
    s = s.reshape(*shape, 4, 2).transpose(0, 3, 4, 1, 2).astype(np.float32)
    aff = np.diag([0.9, 0.9, 4.0, 1.0])
    return Acquisition(s, delays, tes, tr, 120.0, 90.0, (4.0, 0.9, 0.9), aff)


def agreement() -> None:
    """Every layout x {mag+phase, magnitude} x {axial, oblique} of one 5x32x32 acquisition
    (delays TR/5 x 1..4): max difference to the GE result in float32 ulps of the peak, error
    to the simulated truth, and (if processing.fit exists) the fitted maps' relative spread."""
    from dicom_node.vendors import normalize

    try:
        from processing.fit import fit_mdme
    except ImportError:
        fit_mdme = None
    rng = np.random.default_rng(1)
    shape = (5, 32, 32)
    t1, t2 = rng.uniform(500, 2500, shape), rng.uniform(50, 200, shape)
    m0, b1 = rng.uniform(500, 1500, shape), rng.uniform(0.9, 1.1, shape)
    td, te = np.array([800.0, 1600.0, 2400.0, 3200.0]), np.array([20.0, 100.0])
    s = mdme_signal(m0, t1, t2, b1, td, te, 4000.0, 120.0, 90.0)
    s = s.reshape(*shape, 4, 2).transpose(0, 3, 4, 1, 2).astype(np.float32)
    print(
        f"{'layout':<22}{'parts':<7}{'geometry':<9}{'vs ge [ulp]':>12}{'vs truth':>10}"
        f"{'fit rel':>10}  delay source"
    )
    for oblique in (False, True):
        aff = np.diag([0.9, 0.9, 3.0, 1.0])
        if oblique:
            a = np.deg2rad(17.0)
            rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
            aff[:3, :3] = rot @ aff[:3, :3]
        acq = Acquisition(s, td, te, 4000.0, 120.0, 90.0, (3.0, 0.9, 0.9), aff)
        ulp = float(np.spacing(np.float32(np.abs(s).max())))
        for phase in (True, False):
            truth = s if phase else np.abs(s)
            ref = normalize(emulator.make_datasets(acq, "ge", with_phase=phase))
            full = np.ones(acq.shape, dtype=bool)
            ref_fit = fit_mdme(ref, mask=full) if fit_mdme else None
            for layout in emulator.VENDOR_LAYOUTS:
                got = normalize(emulator.make_datasets(acq, layout, with_phase=phase))
                d = float(np.abs(got.signal - ref.signal).max()) / ulp
                e = float(np.abs(got.signal - truth).max())
                rel = float("nan")
                if ref_fit is not None:
                    f = fit_mdme(got, mask=full)
                    rel = max(
                        float(
                            np.max(
                                np.abs(getattr(f, k) - getattr(ref_fit, k))
                                / np.maximum(np.abs(getattr(ref_fit, k)), 1e-6)
                            )
                        )
                        for k in ("t1_ms", "t2_ms", "b1", "m0")
                    )
                print(
                    f"{layout:<22}{'M+P' if phase else 'M':<7}"
                    f"{'oblique' if oblique else 'axial':<9}{d:12.1f}{e:10.4f}{rel:10.2e}"
                    f"  {got.delay_source}"
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layout", default="ge", choices=sorted(emulator.VENDOR_LAYOUTS))
    ap.add_argument("--shape", default="30,256,256")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--magnitude-only", action="store_true")
    ap.add_argument("--agreement", action="store_true", help="cross-layout agreement table")
    args = ap.parse_args()
    if args.agreement:
        agreement()
        return
    nz, ny, nx = (int(v) for v in args.shape.split(","))
    acq = synthetic_acquisition(nz, ny, nx)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths = emulator.write_series(
            acq, args.layout, Path(tmp), with_phase=not args.magnitude_only
        )
        t_write = time.perf_counter() - t
        best_read = best_norm = cpu_read = cpu_norm = float("inf")
        for _ in range(args.repeat):
            t, c = time.perf_counter(), time.process_time()
            groups = ingest.read_paths([Path(tmp)], progress=False)
            t_read, c_read = time.perf_counter() - t, time.process_time() - c
            t, c = time.perf_counter(), time.process_time()
            outcome = series.classify(groups[0].datasets)
            t_norm, c_norm = time.perf_counter() - t, time.process_time() - c
            if outcome.acquisition is None:
                raise SystemExit(f"normalization failed: {outcome.reason}")
            best_read, best_norm = min(best_read, t_read), min(best_norm, t_norm)
            cpu_read, cpu_norm = min(cpu_read, c_read), min(cpu_norm, c_norm)
    print(
        f"layout {args.layout}: {len(paths)} files, grid {outcome.grid}, "
        f"{nz}x{ny}x{nx}, delays from {outcome.acquisition.delay_source}"
    )
    # CPU time is printed too: on a shared machine wall time includes waiting for a core
    print(f"{'stage':<26}{'wall s':>8}{'cpu s':>8}")
    print(f"{'write (emulator)':<26}{t_write:8.3f}{'':>8}")
    print(f"{'read_paths':<26}{best_read:8.3f}{cpu_read:8.3f}")
    print(f"{'series.classify':<26}{best_norm:8.3f}{cpu_norm:8.3f}")
    total, cpu = best_read + best_norm, cpu_read + cpu_norm
    verdict = "OK" if total <= 2 else "SLOW"
    print(f"{'read + normalize':<26}{total:8.3f}{cpu:8.3f}  (target <= 2 s wall): {verdict}")


if __name__ == "__main__":
    main()
