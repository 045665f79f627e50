"""End-to-end latency of the node: last instance sent -> last output stored in Orthanc.

A phantom MDME series (default 30 x 256 x 256, GE layout, magnitude + phase = 480 files)
is sent by dcmtk ``storescu`` to ``synthmr serve`` (``python -m dicom_node.cli serve``,
a subprocess); the outputs go to a real Orthanc. Everything binds 127.0.0.1 on free ports
and is stopped by PID. Printed: the end-to-end figure, the grid-completion latency, and
where the time goes (normalize, fit, pd, segmentation, myelin, synthesis, enhance, qc,
export, push), from the registry's timestamps and the node's ``job_finished`` log line.

    python benchmarks/e2e_latency.py [--shape 30 256 256] [--layout ge] [--fast] [--repeat 3]
    python benchmarks/e2e_latency.py --sequence qalas --shape 176 256 256 --layout siemens

``--repeat N``: N series (phantom seeds 5, 6, ...) one after the other into the same node
and Orthanc; the figure is the median, every run's stage profile is printed. Outputs are
pushed while the job still encodes (streamed), so "push after export" is only the tail.
The job's critical path is normalize + process + export + bookkeeping (+ the push tail);
the parametric maps, the SEG and the synthetic series but FLAIR_AI are built by the node
while the worker still runs (the "early part", overlapped: inside "process"; the web
store's maps and the report's ratio meanwhile on a thread), and delivered once the
worker's QC is in.

``E2E_RSS_TRACE=file``: every RSS sample (time, node MiB, workers MiB, then ``pid:MiB`` of
each child process) appended there.

``--fast``: segmentation, myelin and enhancement off (three contrasts), for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import (  # noqa: E402
    free_port,
    make_orthanc,
    require_tool,
    sqlite_rows,
    stop_pid,
    wait_for,
    wait_port,
    write_config,
)

FAST = (
    '[processing]\ncontrasts = ["T1W", "T2W", "FLAIR"]\nsegmentation = false\n'
    "myelin = false\nenhance = false\n"
)


_q = sqlite_rows


def _state(db: Path, series_uid: str) -> str | None:
    try:
        rows = _q(db, "SELECT state FROM series WHERE series_uid=?", (series_uid,))
    except sqlite3.OperationalError:
        return None
    return rows[0][0] if rows else None


def _tree_rss_by_pid(pid: int) -> dict[int, int]:
    """Resident bytes of ``pid`` and of each of its children (the node and its spawned
    workers), by process id."""
    pids = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            pids.append(int(stat.parent.name))
    out: dict[int, int] = {}
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[p] = int(line.split()[1]) * 1024
        except OSError:
            pass
    return out


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its children (the node and its spawned workers)."""
    return sum(_tree_rss_by_pid(pid).values())


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by ``pid`` and by its children (the
    workers): what the job costs, whatever else the machine runs."""
    tick = os.sysconf("SC_CLK_TCK")

    def used(fields: list[str]) -> float:
        return (int(fields[11]) + int(fields[12])) / tick

    own, children = 0.0, 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid:
            own = used(fields)
        elif int(fields[1]) == pid:
            children += used(fields)
    return own, children


class _PeakRss:
    """Samples the node's process tree every 0.1 s; ``peak`` is the largest *sum* seen
    (the peak of node + workers together, not the sum of each one's peak), ``node_peak``
    and ``worker_peak`` each process's own largest (workers: the largest of any one).
    With ``trace`` (a file), every sample is appended: time, node RSS, worker RSS."""

    def __init__(self, pid: int, trace: Path | None = None) -> None:
        self.pid, self._stop, self.trace = pid, threading.Event(), trace
        self.reset()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            by_pid = _tree_rss_by_pid(self.pid)
            node = by_pid.pop(self.pid, 0)
            workers = sum(by_pid.values())
            self.peak = max(self.peak, node + workers)
            self.node_peak = max(self.node_peak, node)
            self.worker_peak = max([self.worker_peak, *by_pid.values()])
            if self.trace is not None:
                with open(self.trace, "a") as f:
                    each = " ".join(f"{p}:{v / 2**20:.0f}" for p, v in by_pid.items())
                    f.write(f"{time.time():.2f} {node / 2**20:.0f} {workers / 2**20:.0f} {each}\n")

    def reset(self) -> None:
        self.peak = self.node_peak = self.worker_peak = 0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class _Kept:
    """A folder that outlives the run (E2E_KEEP): the node log and registry to inspect."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> str:
        Path(self.path).mkdir(parents=True, exist_ok=True)
        return self.path

    def __exit__(self, *exc: object) -> None:
        return None


def _send(files: list[Path], port: int, env: dict[str, str]) -> None:
    r = subprocess.run(
        [require_tool("storescu"), "-aet", "SCANNER", "-aec", "SYNTHMR", "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        env=env,
    )
    if r.returncode != 0:
        sys.exit(f"storescu failed: {r.stderr[-2000:]}")


def _profile(db: Path, log: Path, uid: str, t_last_sent: float) -> dict[str, float]:
    """Seconds of each stage of one delivered series, from the registry and the log."""
    w = (uid,)
    # Orthanc answered success to the last C-STORE at sent_at (same host clock)
    t_last_stored = _q(db, "SELECT MAX(sent_at) FROM outbox WHERE series_uid=?", w)[0][0]
    first_sent = _q(db, "SELECT MIN(sent_at) FROM outbox WHERE series_uid=?", w)[0][0]
    last_rx = _q(db, "SELECT MAX(received_at) FROM instances WHERE series_uid=?", w)[0][0]
    at = dict(
        _q(db, "SELECT to_state, MAX(at) FROM transitions WHERE series_uid=? GROUP BY to_state", w)
    )
    finished = [
        json.loads(x)
        for x in log.read_text().splitlines()
        if x.startswith("{") and '"job_finished"' in x and uid in x
    ]
    timings = finished[-1].get("timings_s", {}) if finished else {}
    out = {
        "END TO END (last sent -> last stored in Orthanc)": t_last_stored - t_last_sent,
        "last sent -> last received (SCP)": last_rx - t_last_sent,
        "completion by grid (-> COMPLETE)": at["COMPLETE"] - last_rx,
        "queue (COMPLETE -> PROCESSING)": at["PROCESSING"] - at["COMPLETE"],
        "job (PROCESSING -> EXPORTED)": at["EXPORTED"] - at["PROCESSING"],
    }
    for k in ("normalize", "fit", "pd", "segmentation", "myelin", "synthesis", "enhance", "qc"):
        if k in timings:
            out[f"  {k}"] = timings[k]
    # myelin + qc run on a thread beside synthesis + enhance (processing.run): the longer
    # side counts
    t = {k: timings.get(k, 0.0) for k in ("myelin", "qc", "synthesis", "enhance")}
    worker = sum(timings.get(k, 0.0) for k in ("fit", "pd", "segmentation")) + max(
        t["myelin"] + t["qc"], t["synthesis"] + t["enhance"]
    )
    if "process" in timings:
        out["  node <-> worker transfer (process - worker stages)"] = timings["process"] - worker
    if "export_early" in timings:  # node, overlapped with the worker (inside "process")
        out["  (export, early part: maps, SEG, synthetic, while the worker runs)"] = timings[
            "export_early"
        ]
    if "export" in timings:
        out["  export (build + encode + store, streamed)"] = timings["export"]
    job_rest = (at["EXPORTED"] - at["PROCESSING"]) - sum(
        timings.get(k, 0.0) for k in ("normalize", "process", "export")
    )
    out["  job bookkeeping (rest)"] = job_rest
    out["push: first output stored, after PROCESSING"] = first_sent - at["PROCESSING"]
    out["push after export (EXPORTED -> last stored)"] = t_last_stored - at["EXPORTED"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(30, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--layout", default="ge")
    ap.add_argument(
        "--sequence",
        default="mdme",
        choices=["mdme", "qalas"],
        help="qalas: a 3D-QALAS series (1 mm isotropic; layouts of dicom_node.qalas_emulator)",
    )
    ap.add_argument("--fast", action="store_true", help="segmentation/myelin/enhance off")
    ap.add_argument("--repeat", type=int, default=3, help="series sent one after the other")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument(
        "--stock-orthanc",
        action="store_true",
        help="Orthanc without TCP_NODELAY=1 (DCMTK's Nagle on: ~20 instances/s)",
    )
    args = ap.parse_args()
    nodelay = not args.stock_orthanc
    # The scanner (storescu) sends with Nagle off, as a tuned modality would.
    send_env = dict(os.environ, TCP_NODELAY="1")

    from dicom_node import emulator
    from dicom_node.config import Destination
    from dicom_node.push import send_parallel
    from processing.phantom import make_phantom

    profiles: list[dict[str, float]] = []
    keep = os.environ.get("E2E_KEEP")  # a folder: keep spool, node log, Orthanc there
    with tempfile.TemporaryDirectory() if not keep else _Kept(keep) as td:
        tmp = Path(td)
        series: list[tuple[list[Path], str]] = []
        t = time.perf_counter()
        if args.sequence == "qalas":
            from dicom_node.qalas_emulator import write_qalas_series
            from processing.qalas_phantom import make_qalas_phantom
        for rep in range(args.repeat):
            if args.sequence == "qalas":
                ph = make_qalas_phantom(
                    tuple(args.shape),
                    voxel_size_mm=(1.0, 1.0, 1.0),
                    seed=5 + rep,
                    snr=50.0,
                    magnitude=True,
                )
                files = write_qalas_series(ph.acq, args.layout, tmp / f"series{rep}", seed=5 + rep)
            else:
                ph = make_phantom(tuple(args.shape), seed=5 + rep, snr=50.0)
                files = emulator.write_series(
                    ph.acq, args.layout, tmp / f"series{rep}", seed=5 + rep
                )
            uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            series.append((files, uid))
        print(
            f"series: {args.repeat} x {args.sequence} {args.layout} {tuple(args.shape)},"
            f" {len(series[0][0])} files each (made in {time.perf_counter() - t:.1f} s)"
        )
        orth = make_orthanc(tmp / "orthanc", tcp_nodelay=nodelay)
        print(f"PACS: Orthanc, TCP_NODELAY={'1' if nodelay else 'unset (stock)'}")
        port = free_port()
        spool = tmp / "spool"
        cfg = write_config(
            tmp,
            f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
            f"port = {orth.dicom_port}\ntimeout_s = 60\n"
            "[retry]\nbase_delay_s = 0.5\nmax_delay_s = 2.0\npoll_interval_s = 0.1\n"
            "[completion]\npoll_interval_s = 0.1\n" + (FAST if args.fast else ""),
            port=port,
            spool=spool,
        )
        log = tmp / "node.log"
        node = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg)],
            cwd=ROOT,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
        )
        db = spool / "registry.sqlite3"
        try:
            wait_port(port, 120)
            # steady state: a tiny series first, so start-up warming is not in the figure
            if args.sequence == "qalas":
                warm = write_qalas_series(
                    make_qalas_phantom((8, 32, 32), seed=6, anatomy="ellipsoid").acq,
                    args.layout,
                    tmp / "warm",
                    seed=99,
                )
            else:
                warm = emulator.write_series(
                    make_phantom((2, 32, 32), seed=6, anatomy="ellipsoid").acq,
                    args.layout,
                    tmp / "warm",
                    seed=99,
                )
            _send(warm, port, send_env)
            warm_uid = str(pydicom.dcmread(warm[0], stop_before_pixels=True).SeriesInstanceUID)
            wait_for(lambda: _state(db, warm_uid) == "DELIVERED", 600, 0.2, "warm-up series")
            trace = os.environ.get("E2E_RSS_TRACE")  # a file: RSS samples over time
            rss = _PeakRss(node.pid, Path(trace) if trace else None)
            for files, uid in series:
                rss.reset()
                cpu0 = _cpu_seconds(node.pid)
                t_send = time.time()
                _send(files, port, send_env)
                t_last_sent = time.time()
                wait_for(
                    lambda uid=uid: _state(db, uid) in ("DELIVERED", "FAILED", "QUARANTINED"),
                    args.timeout,
                    0.1,
                    "series delivered",
                )
                if _state(db, uid) != "DELIVERED":
                    reason = _q(db, "SELECT reason FROM series WHERE series_uid=?", (uid,))
                    sys.exit(f"series ended {_state(db, uid)}: {reason}")
                prof = _profile(db, log, uid, t_last_sent)
                cpu1 = _cpu_seconds(node.pid)
                prof["CPU seconds, node (receive + job + push)"] = cpu1[0] - cpu0[0]
                prof["CPU seconds, workers"] = cpu1[1] - cpu0[1]
                prof["send (storescu -> node)"] = t_last_sent - t_send
                prof["peak RSS node + workers (GiB)"] = rss.peak / 2**30
                prof["  peak RSS node alone (GiB)"] = rss.node_peak / 2**30
                prof["  peak RSS one worker alone (GiB)"] = rss.worker_peak / 2**30
                profiles.append(prof)
            n_out = _q(db, "SELECT COUNT(*) FROM outbox WHERE series_uid=?", (series[-1][1],))[0][0]
        finally:
            if "rss" in locals():
                rss.stop()
            stop_pid(node, 60)
            orth.stop()
        print(f"outputs per series: {n_out}")
        keys = list(profiles[0])
        print(
            f"\n{'stage (seconds)':56s}"
            + "".join(f"{'run ' + str(i + 1):>9s}" for i in range(len(profiles)))
            + f"{'median':>9s}"
        )
        for k in keys:
            vals = [p.get(k, float("nan")) for p in profiles]
            print(
                f"{k:56s}" + "".join(f"{v:9.2f}" for v in vals) + f"{statistics.median(vals):9.2f}"
            )
        e2e = statistics.median(p[keys[0]] for p in profiles)
        goal = "goal <= 60 s, peak RSS <= 6 GiB" if args.sequence == "qalas" else "goal <= 7 s"
        peak = max(p["peak RSS node + workers (GiB)"] for p in profiles)
        print(
            f"\nEND TO END median of {len(profiles)}: {e2e:.2f} s, peak RSS {peak:.2f} GiB ({goal})"
        )
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        print(
            f"load average (1, 5, 15 min) at the end of the runs: {load} on {os.cpu_count()} CPUs"
        )
        # push comparison on the same output files, each into a fresh Orthanc, alternating:
        # send_parallel over 1..4 associations (Destination.associations, default 2),
        # dcmtk storescu; CPU per instance of the sender and of Orthanc (same 2 cores)
        outputs = [r[0] for r in _q(db, "SELECT path FROM outbox WHERE series_uid=?", (uid,))]
        push_cmp: dict[str, list[tuple[float, float, float]]] = {}
        whos = [f"synthmr push ({k} association{'s' * (k > 1)})" for k in (2, 1, 3, 4)]
        for rnd in range(args.repeat):
            for who in (*whos, "dcmtk storescu"):
                o2 = make_orthanc(tmp / f"orthanc_{rnd}_{len(push_cmp.get(who, []))}_{who[:16]}")
                try:
                    orthanc_cpu0, own0 = _pid_cpu(o2.proc.pid), _own_cpu()
                    t = time.perf_counter()
                    if who.startswith("dcmtk"):
                        cmd = [require_tool("storescu"), "-R", "-aec", "ORTHANC", "127.0.0.1"]
                        subprocess.run(
                            [*cmd, str(o2.dicom_port), *outputs],
                            capture_output=True,
                            check=True,
                            env=send_env,
                        )
                    else:
                        k = int(who.split("(")[1].split()[0])
                        dest = Destination(
                            "o", "ORTHANC", "127.0.0.1", o2.dicom_port, 60.0, associations=k
                        )
                        assert send_parallel(outputs, dest)["failed"] == 0
                    dt = time.perf_counter() - t
                    sender_cpu = _own_cpu() - own0
                    assert len(o2.instances()) == len(outputs)
                    orthanc_cpu = _pid_cpu(o2.proc.pid) - orthanc_cpu0
                    push_cmp.setdefault(who, []).append((dt, sender_cpu, orthanc_cpu))
                finally:
                    o2.stop()

    n = len(outputs)
    print(f"\npush of the same {n} outputs into a fresh Orthanc ({args.repeat} rounds):")
    ref = statistics.median(r[0] for r in push_cmp["dcmtk storescu"])
    for who, runs in push_cmp.items():
        med = statistics.median(r[0] for r in runs)
        cpu_s = statistics.median(r[1] for r in runs) * 1000 / n
        cpu_o = statistics.median(r[2] for r in runs) * 1000 / n
        print(
            f"  {who:30s} median {med:6.2f} s ({n / med:4.0f}/s), {med / ref:4.2f}x storescu's"
            f" time; CPU ms/instance sender {cpu_s:4.2f}, Orthanc {cpu_o:4.2f};"
            f" runs {', '.join(f'{r[0]:.2f}' for r in runs)}"
        )
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average (1, 5, 15 min) after the push comparison: {load}")


def _own_cpu() -> float:
    """CPU seconds of this process (every thread) and its finished children (storescu)."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _pid_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by one process (Orthanc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
