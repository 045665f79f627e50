"""Time every export kind on a clinical-size grid (not a test; prints measured numbers).

    python benchmarks/export_speed.py [--nz 30] [--ny 256] [--nx 256] [--repeat 1]

Prints seconds per output kind (Parametric Maps, synthetic MR, maps as MR, SEG
FRACTIONAL/BINARY, SR) and the encoded size, for the stated grid.
"""

from __future__ import annotations

import argparse
import sys
import time
from io import BytesIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_export_support import make_result, make_sources

from dicom_node.export import (
    ExportSettings,
    map_mr_images,
    parametric_maps,
    report,
    segmentation,
    synthetic_images,
)


def size_mb(datasets) -> float:
    total = 0
    for ds in datasets:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        total += buf.tell()
    return total / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nz", type=int, default=30)
    ap.add_argument("--ny", type=int, default=256)
    ap.add_argument("--nx", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    result = make_result(a.nz, a.ny, a.nx)
    sources = make_sources(a.nz, a.ny, a.nx, n_delay=1, n_echo=1)
    s = ExportSettings()
    cases = {
        "parametric maps (8)": lambda: parametric_maps(result, sources, s),
        "maps as MR (8 series)": lambda: map_mr_images(result, sources, s),
        "synthetic MR (3 contrasts)": lambda: synthetic_images(result, sources, s),
        "SEG FRACTIONAL": lambda: [segmentation(result, sources, s)],
        "SEG BINARY": lambda: [segmentation(result, sources, ExportSettings(seg_type="BINARY"))],
        "SR": lambda: [report(result, sources, s)],
    }
    print(f"grid z,y,x = {a.nz},{a.ny},{a.nx}; repeat {a.repeat}")
    for name, fn in cases.items():
        best = float("inf")
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        print(f"{name:28s} {best:7.2f} s  {len(out):4d} instances  {size_mb(out):8.1f} MB")


if __name__ == "__main__":
    main()
