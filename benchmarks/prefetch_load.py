"""CPU of a node job's load step (dicom_node.pipeline.load_datasets) without and with the
read-ahead of dicom_node.prefetch, on a GE magnitude + phase series from the emulator
(30x256x256: 480 files), side by side in one run, with the load average.

"without": the job parses every spool file (as before). "with": the files were parsed in
the background while the series arrived (instance_stored notes, one per file); the job
takes the cache and only checks each file's (inode, size, mtime). The background CPU is
printed too: it is spent while the series is received, off the critical path. At
40x512x512 the default budget (256 MiB) leaves the series to its job (printed).

    PYTHONPATH=$PWD python benchmarks/prefetch_load.py [--shape 30 256 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node import emulator
from dicom_node.config import NodeSettings
from dicom_node.pipeline import load_datasets
from dicom_node.prefetch import SeriesPrefetch
from processing.phantom import make_phantom


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", type=int, nargs=3, default=(30, 256, 256))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    ph = make_phantom(tuple(args.shape), seed=5, snr=50.0)
    budget = NodeSettings().prefetch_max_bytes
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(p) for p in emulator.write_series(ph.acq, "ge", Path(tmp), with_phase=True)]
        size = sum(os.path.getsize(p) for p in paths)
        print(
            f"shape {tuple(args.shape)}: {len(paths)} files, {size / 2**20:.0f} MiB; "
            f"budget {budget / 2**20:.0f} MiB"
        )
        for i in range(args.repeat):
            c, t = time.process_time(), time.perf_counter()
            plain = load_datasets(paths)
            cpu_plain, wall_plain = time.process_time() - c, time.perf_counter() - t

            arrived: list[str] = []  # the registry's paths of the series so far
            prefetch = SeriesPrefetch(lambda _series, got=arrived: list(got), budget)
            prefetch.start()
            c = time.process_time()
            for n, p in enumerate(paths, 1):  # the series arrives (~200 instances/s)
                arrived.append(p)
                prefetch.instance_stored("s", n, len(paths))
                time.sleep(0.005)
            deadline = time.monotonic() + 60
            while prefetch.read_files < len(paths) and time.monotonic() < deadline:
                if prefetch.cached_bytes() == 0 and prefetch.read_files:
                    break
                time.sleep(0.01)
            time.sleep(2 * SeriesPrefetch.BATCH_S)
            cpu_background = time.process_time() - c
            cached = prefetch.take("s")
            prefetch.stop()
            c, t = time.process_time(), time.perf_counter()
            warm = load_datasets(paths, cached)
            cpu_warm, wall_warm = time.process_time() - c, time.perf_counter() - t
            same = warm == plain
            print(
                f"[{i + 1}] job load step: without prefetch cpu {cpu_plain:.3f} s (wall "
                f"{wall_plain:.3f}); with prefetch cpu {cpu_warm:.3f} s (wall {wall_warm:.3f}), "
                f"{len(cached)}/{len(paths)} files from the cache, same datasets: {same}; "
                f"background cpu while receiving {cpu_background:.3f} s; "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            del plain, warm, cached


if __name__ == "__main__":
    main()
