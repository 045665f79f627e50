"""CPU of the one-page report (PDF + PNG) on a realistic page (not a test; prints numbers).

    python benchmarks/report_speed.py [--repeat 5] [--profile]

The page: every bundled normative figure with its references (age 56, F), one earlier
visit, four 256 x 256 key images. Prints the CPU seconds of each render (process time,
the worker's cost), their median, the PDF/PNG sizes and the load average (the machine may
be shared: compare ratios measured in one run).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
from test_report import _data

from processing.report import render_report


def page_data() -> dict:
    prior = {"WM": 455.0, "GM": 610.0, "CSF": 190.0, "MYELIN": 92.0, "BPV": 1065.0}
    data = _data(priors=[{"age_years": 54.0, "figures": {**prior, "ICV": 1250.0, "BPF": 0.85}}])
    yy, xx = np.mgrid[:256, :256]
    image = ((np.sin(xx / 9.0) * np.cos(yy / 7.0) + 1) * 127).astype(np.uint8)
    data["images"] = [(name, image) for name in ("T1W", "T2W", "FLAIR", "PDW")]
    return data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="cProfile one render (top 30)")
    args = ap.parse_args()
    data = page_data()
    render_report(data)  # imports, font cache
    cpu = []
    for _ in range(args.repeat):
        t0 = time.process_time()
        pdf, png = render_report(data)
        cpu.append(time.process_time() - t0)
    print(f"report page CPU s: {' '.join(f'{t:.3f}' for t in cpu)}  "
          f"median {statistics.median(cpu):.3f}  (PDF {len(pdf)} B, PNG {len(png)} B)  "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(render_report, data)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
