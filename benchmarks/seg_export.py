"""CPU and peak memory of the SEG export on a large grid (not a test; prints numbers).

    python benchmarks/seg_export.py [--nz 40] [--ny 512] [--nx 512] [--repeat 2]

For SEG FRACTIONAL (the default) and BINARY, on tests/test_export_support.py's stated model:
the CPU seconds of building the dataset (process time, median of ``--repeat``), of
encoding it (``dcmwrite`` to memory), and the peak of Python/numpy allocations while
building (tracemalloc, a separate run: tracing slows the build) above what was allocated
before, next to the size of the four float32 fractions it reads. Prints the load average
(the machine may be shared: compare runs made one after the other).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import tracemalloc
from io import BytesIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_export_support import make_result, make_sources

from dicom_node.export import ExportSettings, segmentation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nz", type=int, default=40)
    ap.add_argument("--ny", type=int, default=512)
    ap.add_argument("--nx", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    result = make_result(a.nz, a.ny, a.nx)
    sources = make_sources(a.nz, a.ny, a.nx, n_delay=1, n_echo=1)
    fractions_mb = sum(f.nbytes for f in result.segmentation.fractions.values()) / 2**20
    for seg_type in ("FRACTIONAL", "BINARY"):
        settings = ExportSettings(seg_type=seg_type)
        build, encode = [], []
        for _ in range(a.repeat):
            t0 = time.process_time()
            ds = segmentation(result, sources, settings)
            t1 = time.process_time()
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            build.append(t1 - t0)
            encode.append(time.process_time() - t1)
            size_mb = buf.tell() / 2**20
            del ds, buf
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        ds = segmentation(result, sources, settings)
        peak = (tracemalloc.get_traced_memory()[1] - base) / 2**20
        tracemalloc.stop()
        print(
            f"SEG {seg_type:10s} {a.nz}x{a.ny}x{a.nx}: build CPU {statistics.median(build):.3f} s"
            f"  encode CPU {statistics.median(encode):.3f} s  peak allocated {peak:.0f} MiB"
            f" (fractions {fractions_mb:.0f} MiB, file {size_mb:.0f} MiB,"
            f" {int(ds.NumberOfFrames)} frames)  load average"
            f" {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        del ds


if __name__ == "__main__":
    main()
