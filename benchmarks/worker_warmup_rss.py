"""Resident memory of an embedded worker once warm, on an empty and then on a filled numba cache.

Starts :class:`dicom_node.workers.Workers` (1 process, default processing settings) with
``NUMBA_CACHE_DIR`` a new empty folder and waits until the worker is warm; then stops it
and starts a second pool on the now filled cache. For each: the seconds until warm, the
worker's RSS once warm, and how many numba specializations that worker compiled itself vs
loaded from the cache (a worker that compiled keeps ~0.5 GiB of compiler memory; issue 14:
the compile belongs in a throwaway process, :func:`dicom_node.workers.warm_worker`).

    python benchmarks/worker_warmup_rss.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="synthmr-numba-") as cache:
        os.environ["NUMBA_CACHE_DIR"] = cache  # before numba is imported, here and in workers
        from dicom_node.config import WorkerSettings
        from dicom_node.workers import Workers, worker_numba_counts

        for label in ("empty cache", "filled cache"):
            workers = Workers(WorkerSettings(backend="embedded", processes=1))
            t0 = time.perf_counter()
            workers.start(wait_warm=True)
            seconds = time.perf_counter() - t0
            try:
                (pid,) = list(workers._pool._processes)  # type: ignore[union-attr]
                counts = workers.submit(worker_numba_counts).result(timeout=600)
                rss = _rss_mib(pid)
                report = workers.warm_reports.get(pid, {})
            finally:
                workers.stop()
            child = report.get("child")
            throwaway = (
                f"{child['compiled']} numba compiles in {child['seconds']:.1f} s"
                if child
                else "none"
            )
            print(
                f"{label:<13} warm in {seconds:6.1f} s; worker RSS once warm {rss:6.0f} MiB; "
                f"numba compiles in the worker {report.get('compiled_here')}, specializations "
                f"loaded {counts['loaded_from_cache']}; throwaway process: {throwaway}"
                f" (load average {_load()})"
            )


if __name__ == "__main__":
    main()
