"""Timeline of one node job: where the node's time goes around its worker (no push).

    PYTHONPATH=$PWD python benchmarks/job_timeline.py [Z Y X]   (default 30 256 256)

A GE phantom series (made once, cached in the temp folder) runs through
``dicom_node.pipeline.run_series_job`` in this process with the embedded worker pool (one
warm-up series first). Printed: the job's stage timings, the node's and the worker's CPU
seconds, one line per node-side step (start, end, wall and thread CPU seconds, thread:
web store parts, early build, synthetic encodes, SR, report) and when each output group
was handed over (the first one is the QC gate). SUMMARY: total, gate, tail after it.
Not a test; wall times on a shared machine say little without the load average printed.
"""

import functools
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom

T0 = [0.0]
EV = []


def mark(name, t0, t1=None, cpu=0.0):
    EV.append(
        (
            name,
            t0 - T0[0],
            (t1 or time.perf_counter()) - T0[0],
            threading.current_thread().name,
            cpu,
        )
    )


def wrap(mod, attr, name=None):
    fn = getattr(mod, attr, None)
    if fn is None:
        return

    @functools.wraps(fn)
    def w(*a, **k):
        t = time.perf_counter()
        c = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            mark(name or attr, t, cpu=time.thread_time() - c)

    setattr(mod, attr, w)


def main():
    shape = tuple(int(v) for v in (sys.argv[1:4] or (30, 256, 256)))
    cache = Path(tempfile.gettempdir()) / f"synthmr_job_timeline_{'x'.join(map(str, shape))}"
    from dicom_node import emulator
    from processing.phantom import make_phantom

    if not cache.is_dir():
        ph = make_phantom(shape, seed=5, snr=50.0)
        emulator.write_series(ph.acq, "ge", cache, seed=5)
    files = sorted(str(p) for p in cache.rglob("*.dcm"))
    import dicom_node.web.reportdata as rd
    from dicom_node import export, pipeline, series
    from dicom_node.config import load_settings
    from dicom_node.spool import Spool
    from dicom_node.workers import Workers

    settings = load_settings(None, env={})
    td = tempfile.mkdtemp(prefix="pipe2tl")
    spool = Spool(td)
    workers = Workers(settings.workers, settings.processing)
    workers.start(wait_warm=True)
    # warm: a tiny series
    wdir = Path(td) / "warm"
    wf = emulator.write_series(
        make_phantom((2, 32, 32), seed=6, anatomy="ellipsoid").acq, "ge", wdir, seed=99
    )
    uid = str(pydicom.dcmread(wf[0], stop_before_pixels=True).SeriesInstanceUID)
    pipeline.run_series_job(uid, [str(p) for p in wf], settings, spool, workers.submit)
    for mod, attr in [
        (pipeline, "save_series"),
        (getattr(pipeline, "PendingSeries", None), "add_maps"),
        (getattr(pipeline, "PendingSeries", None), "add_segmentation"),
        (getattr(pipeline, "PendingSeries", None), "finish"),
        (pipeline, "early_ratio"),
        (pipeline, "start_series_report"),
        (rd, "build_report_data"),
        (rd, "cached_render"),
        (rd, "ratio_parametric_map"),
        (rd, "ratio_volume"),
        (series, "_start_synthetic"),
        (series, "encode_synthetic_series"),
        (export, "report"),
        (export, "segmentation"),
        (export, "map_mr_images"),
        (export, "iter_parametric_maps"),
        (series, "slice_geometry"),
        (series, "classify"),
        (series, "source_digest"),
        (series._EarlyOutputs, "build"),
        (pipeline, "load_datasets"),
        (series, "_encoded"),
    ]:
        wrap(mod, attr)
    sw = pipeline.spool_writer

    def spool_writer(*a, **k):
        w = sw(*a, **k)

        def write(ds, r):
            t = time.perf_counter()
            c = time.thread_time()
            try:
                return w(ds, r)
            finally:
                mark(f"write[{len(ds)}]", t, cpu=time.thread_time() - c)

        return write

    pipeline.spool_writer = spool_writer
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    outs = []

    def on_outputs(rows):
        outs.append((time.perf_counter() - T0[0], len(rows)))

    def wcpu():
        tot = 0.0
        for p in Path("/proc").glob("[0-9]*/stat"):
            try:
                f = p.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(f[1]) == os.getpid():
                tot += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        return tot

    w0 = wcpu()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    resource.getrusage(resource.RUSAGE_CHILDREN)
    T0[0] = time.perf_counter()
    oc = pipeline.run_series_job(uid, files, settings, spool, workers.submit, on_outputs=on_outputs)
    total = time.perf_counter() - T0[0]
    ru2 = resource.getrusage(resource.RUSAGE_SELF)
    print(
        "state",
        oc.state,
        oc.reason,
        f"total {total:.2f}",
        "node cpu %.2f" % (ru2.ru_utime + ru2.ru_stime - ru.ru_utime - ru.ru_stime),
    )
    print("worker cpu %.2f" % (wcpu() - w0))
    print("timings", {k: round(v, 2) for k, v in oc.timings_s.items()})
    for name, a, b, th, cpu in sorted(EV, key=lambda e: e[1]):
        print(f"  {a:6.2f} {b:6.2f} {b - a:5.2f} cpu {cpu:5.2f} {th[:14]:14s} {name}")
    n = 0
    for _t, k in outs:
        n += k
    print(
        f"SUMMARY total {total:.2f} gate {outs[0][0]:.2f} tail {outs[-1][0] - outs[0][0]:.2f}",
        "load",
        os.getloadavg()[0],
    )
    print("outputs", n, f"first at {outs[0][0]:.2f}", f"last at {outs[-1][0]:.2f}")
    print(" ".join(f"{t:.2f}:{k}" for t, k in outs))
    workers.stop()
    shutil.rmtree(td, ignore_errors=True)
    print("load", os.getloadavg())


if __name__ == "__main__":
    main()
