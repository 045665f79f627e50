"""Peak resident memory of one worker job, stage by stage (what the embedded worker runs).

A phantom MDME acquisition (default 40 x 512 x 512, seed 5, SNR 50: the e2e benchmark's
``--shape 40 512 512`` series) goes through the worker's own path: warm-up, then the
task handed over through tmpfs (:mod:`dicom_node.handoff`) and run by ``call_packed`` as
the node submits it (:func:`processing.run.run_taking`). The process's RSS is sampled
every 10 ms (the e2e benchmark samples every 100 ms and misses short peaks); printed: the
idle RSS after the warm-up, the job's peak, and each stage's entry and peak RSS (stages
run one after the other above processing.run.CONCURRENT_MAX_VOXELS; below it, myelin +
QC overlap the synthesis and their labels mix).

    python benchmarks/worker_memory.py [--shape 40 512 512]

Run it twice after a change to processing/: a numba kernel compiled in the warm-up (a
changed module) leaves ~100-200 MB of compiler memory in the process.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.handoff import call_packed, pack, remove, trim_heap  # noqa: E402
from processing import enhance, myelin, synthesis  # noqa: E402
from processing import qc as qc_mod  # noqa: E402
from processing import run as run_mod  # noqa: E402
from processing.phantom import make_phantom  # noqa: E402

#: (module, function name, label): the stages sampled, patched to name themselves
STAGES = (
    (run_mod, "_fit_stage", "fit + pd"),
    (run_mod, "_segmentation_stage", "segmentation"),
    (myelin, "myelin_maps", "myelin"),
    (qc_mod, "fit_qc", "qc"),
    (enhance, "enhance_inputs", "enhance inputs"),
    (synthesis, "synthesize_all", "synthesis"),
    (run_mod.mixture, "synthesize_mixture", "mixture"),
    (enhance, "enhance_flair", "enhance"),
)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class _Sampler(threading.Thread):
    """RSS every 10 ms, with the stage running then."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stage = "other"
        self.samples: list[tuple[str, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            self.samples.append((self.stage, _rss_mib()))

    def named(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def stage(*args: Any, **kwargs: Any) -> Any:
            before, self.stage = self.stage, label
            try:
                return fn(*args, **kwargs)
            finally:
                self.stage = before

        return stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[40, 512, 512])
    args = ap.parse_args()
    t = time.perf_counter()
    acq = make_phantom(tuple(args.shape), seed=5, snr=50.0).acq
    print(f"phantom {tuple(args.shape)} made in {time.perf_counter() - t:.1f} s")
    settings = run_mod.ProcessingSettings()
    run_mod.warmup(settings)
    task = pack((run_mod.run_taking, ([acq], settings)), os.getpid())
    del acq
    trim_heap()
    idle = _rss_mib()
    sampler = _Sampler()
    for module, name, label in STAGES:
        setattr(module, name, sampler.named(getattr(module, name), label))
    sampler.start()
    t = time.perf_counter()
    remove(call_packed(task, os.getpid())[1])
    seconds = time.perf_counter() - t
    sampler.done.set()
    sampler.join()
    peak = max(rss for _, rss in sampler.samples)
    print(f"worker idle after warm-up: {idle:.0f} MiB; job {seconds:.1f} s")
    print(f"PEAK RSS of the job: {peak:.0f} MiB (+{peak - idle:.0f} over idle)")
    print(f"  {'stage':<16} {'entry MiB':>10} {'peak MiB':>10}")
    seen: dict[str, list[float]] = {}
    for stage, rss in sampler.samples:
        entry_peak = seen.setdefault(stage, [rss, rss])
        entry_peak[1] = max(entry_peak[1], rss)
    for stage, (entry, top) in seen.items():
        print(f"  {stage:<16} {entry:>10.0f} {top:>10.0f}")
    print(
        f"load average: {', '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
