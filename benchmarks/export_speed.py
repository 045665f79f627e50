"""Time every export kind on a clinical-size grid (not a test; prints measured numbers).

    python benchmarks/export_speed.py [--nz 30] [--ny 256] [--nx 256] [--repeat 1]

Prints one total line (``export_all`` with every output: 8 Parametric Maps, the 8 maps
as MR images, the synthetic contrasts, SEG FRACTIONAL and the SR), then seconds per
output kind (plus SEG BINARY) and the encoded size, for the stated grid.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from io import BytesIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_export_support import make_result, make_sources

from dicom_node.export import (
    ExportSettings,
    export_all,
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
    # the default pipeline makes 9 contrasts: add the 6 the stated model lacks (same cost)
    flair = result.synthetic["FLAIR"]
    for name in ("T1W", "T2W", "PDW", "T1FLAIR", "STIR", "DIR"):
        result.synthetic[name] = replace(
            flair, name=name, description=f"SYNTHETIC {name} TR{flair.tr_ms:.0f}"
        )
    sources = make_sources(a.nz, a.ny, a.nx, n_delay=1, n_echo=1)
    s = ExportSettings()
    per_kind = {
        "parametric maps (8)": lambda: parametric_maps(result, sources, s),
        "maps as MR (8 series)": lambda: map_mr_images(result, sources, s),
        f"synthetic MR ({len(result.synthetic)} contrasts)": lambda: synthetic_images(
            result, sources, s
        ),
        "SEG FRACTIONAL": lambda: [segmentation(result, sources, s)],
        "SEG BINARY": lambda: [segmentation(result, sources, ExportSettings(seg_type="BINARY"))],
        "SR": lambda: [report(result, sources, s)],
    }
    print(f"grid z,y,x = {a.nz},{a.ny},{a.nx}; repeat {a.repeat}")
    everything = ExportSettings(maps_as_mr_images=True)
    cases = {"TOTAL export_all (all outputs)": lambda: export_all(result, sources, everything)}
    cases.update(per_kind)
    for name, fn in cases.items():
        best = float("inf")
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        print(f"{name:32s} {best:7.2f} s  {len(out):4d} instances  {size_mb(out):8.1f} MB")


if __name__ == "__main__":
    main()
