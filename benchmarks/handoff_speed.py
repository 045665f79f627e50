"""Node -> embedded worker -> node transfer: the pool's pipe (pickle) vs dicom_node.handoff.

A 30x256x256 MDME acquisition's samples (30 x 4 delays x 2 echoes x 256 x 256 complex64,
126 MB) go to a spawned worker, which answers with 25 float32 volumes of 30x256x256
(197 MB, about what a SeriesResult carries back). Printed: the median round trip of each
way (nothing else runs in the worker but allocating the answer), and the load average.

    python benchmarks/handoff_speed.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.handoff import submit_via_tmpfs


def answer(acq: dict[str, np.ndarray]) -> dict[str, object]:
    """The worker's side: a SeriesResult-sized answer."""
    return {
        "shape": acq["signal"].shape,
        "volumes": [np.full((30, 256, 256), i, np.float32) for i in range(25)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    acq = {"signal": rng.standard_normal((30, 4, 2, 256, 256)).astype(np.complex64)}
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        pool.submit(int).result()  # the worker is up
        times: dict[str, list[float]] = {"pool pipe (pickle)": [], "tmpfs hand-off": []}
        for _ in range(args.repeat):
            for way, dts in times.items():
                t = time.perf_counter()
                if way.startswith("pool"):
                    got = pool.submit(answer, acq).result()
                else:
                    got = submit_via_tmpfs(pool.submit, answer, acq).result()
                dts.append(time.perf_counter() - t)
                assert got["volumes"][24][0, 0, 0] == 24  # type: ignore[index]
    finally:
        pool.shutdown()
    for way, dts in times.items():
        runs = ", ".join(f"{d:.2f}" for d in dts)
        print(f"{way:20s} median {statistics.median(dts):5.2f} s  (runs {runs})")
    print(f"load average (1 min): {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
