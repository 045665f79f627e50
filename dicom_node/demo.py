"""``synthmr demo``: phantom -> vendor DICOM -> normalize -> process -> DICOM outputs.

Prints a summary a physicist can check at a glance: stage timings, median T1/T2/PD per
tissue against the phantom's truth, volumes against the truth, QC, and where the files went.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def _median_on(mask: np.ndarray, arr: np.ndarray) -> float:
    vals = arr[mask]
    return float(np.median(vals)) if vals.size else float("nan")


def run_demo(args: argparse.Namespace) -> int:
    from dicom_node import cli, emulator, ingest
    from processing import fit
    from processing.phantom import make_phantom
    from processing.run import ProcessingSettings, run

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    fit.warmup()
    timings["numba warm-up"] = time.perf_counter() - t

    t = time.perf_counter()
    ph = make_phantom(args.shape, seed=args.seed, snr=args.snr)
    timings["phantom"] = time.perf_counter() - t

    t = time.perf_counter()
    src_dir = out / "scanner"
    emulator.write_series(
        ph.acq, args.vendor, src_dir, with_phase=not args.magnitude_only, seed=args.seed
    )
    timings["emulate scanner DICOM"] = time.perf_counter() - t

    t = time.perf_counter()
    groups = ingest.read_paths([src_dir], progress=False)
    outcome = ingest.classify_and_normalize(groups[0], None)
    if outcome.acquisition is None:
        print(f"demo: normalization failed: {outcome.reason}")
        return 1
    acq = outcome.acquisition
    timings["read + normalize"] = time.perf_counter() - t

    t = time.perf_counter()
    result = run(acq, ProcessingSettings())
    timings["process (total)"] = time.perf_counter() - t
    for k, v in result.timings_s.items():
        timings[f"  {k}"] = v

    t = time.perf_counter()
    try:
        written = cli._export_series(result, outcome.datasets, out / "outputs", None)
        exported = f"{len(written)} DICOM files in {out / 'outputs'}"
    except ImportError as exc:
        written = cli._write_fallback(result, out / "outputs")
        exported = f"maps.npz + montage.png in {out / 'outputs'} (DICOM export unavailable: {exc})"
    timings["export"] = time.perf_counter() - t
    (out / "montage.png").write_bytes(cli.montage_png(result))

    z, d, e, y, x = acq.signal.shape
    print(f"synthmr demo: phantom {z}x{y}x{x}, {d} delays x {e} echoes, SNR {args.snr:g},")
    print(
        f"  vendor layout {args.vendor!r} ({'magnitude' if acq.is_magnitude else 'mag+phase -> real'}),"
        f" delays from {acq.delay_source}"
    )
    print()
    print(f"{'stage':<28}{'seconds':>10}")
    for k, v in timings.items():
        print(f"{k:<28}{v:>10.2f}")
    print()

    truth = ph.truth
    maps = result.maps
    print(
        f"{'tissue':<8}{'T1 fit':>9}{'T1 true':>9}{'T2 fit':>9}{'T2 true':>9}"
        f"{'PD fit':>9}{'PD true':>9}{'voxels':>9}"
    )
    for tissue in ("WM", "GM", "CSF"):
        pure = (truth.fractions[tissue] >= 0.95) & maps.mask
        p = truth.tissues[tissue]
        print(
            f"{tissue:<8}{_median_on(pure, maps.t1_ms):>9.0f}{p.t1_ms:>9.0f}"
            f"{_median_on(pure, maps.t2_ms):>9.1f}{p.t2_ms:>9.1f}"
            f"{_median_on(pure, maps.pd_pu):>9.1f}{p.pd_pu:>9.1f}{int(pure.sum()):>9d}"
        )
    print()
    if result.volumes_ml:
        vox_ml = acq.voxel_volume_ml
        true_vol = {t: float(truth.fractions[t].sum() * vox_ml) for t in truth.fractions}
        true_vol.setdefault("LESION", 0.0)
        tv = {
            "WM": true_vol.get("WM", 0.0),
            "GM": true_vol.get("GM", 0.0),
            "CSF": true_vol.get("CSF", 0.0),
        }
        tv["NON"] = true_vol.get("LESION", 0.0)
        tv["BPV"] = tv["WM"] + tv["GM"] + tv["NON"]
        tv["ICV"] = tv["BPV"] + tv["CSF"]
        print(f"{'volume':<8}{'measured':>10}{'truth':>10}")
        for k in ("WM", "GM", "CSF", "NON", "BPV", "ICV", "MYELIN"):
            if k in result.volumes_ml:
                true_s = f"{tv[k]:>10.1f}" if k in tv else f"{'-':>10}"
                print(f"{k + ' mL':<8}{result.volumes_ml[k]:>10.1f}{true_s}")
        if "BPF" in result.volumes_ml:
            print(f"{'BPF':<8}{result.volumes_ml['BPF']:>10.3f}{tv['BPV'] / tv['ICV']:>10.3f}")
        print()
    if result.dir_parameters:
        print("per-patient DIR:", ", ".join(f"{k}={v}" for k, v in result.dir_parameters.items()))
    if result.qc:
        print("QC:", ", ".join(f"{k}={v}" for k, v in result.qc.items() if not isinstance(v, dict)))
    for w in result.warnings:
        print("warning:", w)
    print(f"outputs: {exported}; montage: {out / 'montage.png'}")
    return 0
