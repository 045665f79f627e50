"""Receive throughput, side by side in one run: instances/s stored by

- dcmtk ``storescp`` (writes each file, no fsync; one association at a time, as started
  here without ``--fork``: parallel senders wait in turn),
- a do-nothing pynetdicom SCP (stock reactors: 1 ms polling sleeps; answers success),
- the same do-nothing SCP with the node's event-driven reactors (dicom_node.reactor),
- the synthmr SCP (validates, writes the file, appends it to the ingest journal and answers
  once a group-committed fdatasync of the journal covers it: a success status means the
  instance is on disk; registers in SQLite), as configured by default (``[node]
  acceptor_processes``, dicom_node.acceptors: 1) and with the other choice (2 processes
  accepting; or 1 if the default is more).

Each receiver's CPU time per instance is printed too (all its processes, from the first
connection to the last answer; the senders' CPU apart): less sensitive than instances/s to
what else runs on the machine.

For synthmr, the journal's fdatasyncs per instance are printed (group commit: below 1 when
parallel senders share a flush) and its own CPU: synthmr's CPU per instance less the bare
SCP's with the same (event) reactors.

Also printed: the disk's flush time (append + fdatasync, median of 20) on the spool's file
system, which bounds a durable receiver with one synchronous sender (storescu waits for
each answer) at 1/flush instances/s whatever the CPU does, and synthmr's rate including
the journal checkpoint that follows a burst (files synced, journal dropped).

Senders: dcmtk ``storescu`` on 127.0.0.1 (TCP_NODELAY=1 on both dcmtk ends, as pynetdicom),
1 association, or ``--senders K`` parallel associations each sending its own series of
n/K instances. Rounds alternate the receivers (``--rounds``, default 3) so machine noise
hits all alike; printed: the median instances/s per receiver and the ratios the issue asks for.

    python benchmarks/receive_throughput.py [--n 300] [--size 256] [--senders 1 4] [--rounds 3]
        [--associations 60]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.config import load_settings  # noqa: E402
from dicom_node.metrics import NodeMetrics  # noqa: E402
from dicom_node.registry import Registry  # noqa: E402
from dicom_node.scp import StoreSCP  # noqa: E402
from dicom_node.service import open_spool  # noqa: E402
from dicom_node.warm_cache import freeze_start_up_objects  # noqa: E402
from tests.conftest import free_port, make_mr_file, wait_port, write_config  # noqa: E402

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


def _tool(name: str) -> str:
    path = shutil.which(name, path="/usr/bin:/usr/local/bin") or shutil.which(name)
    if path is None:
        sys.exit(f"{name} (dcmtk) is not installed")
    return path


def _send(batches: list[list[Path]], port: int) -> float:
    """Send each batch over its own storescu association, all at once; wall seconds."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [_tool("storescu"), "-aet", "BENCH", "-aec", "SYNTHMR", "127.0.0.1", str(port)]
            + [str(f) for f in batch],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=DCMTK_ENV,
        )
        for batch in batches
    ]
    errors = [p.communicate()[1] for p in procs]
    dt = time.perf_counter() - t0
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            sys.exit(f"storescu failed: {err.decode()[-2000:]}")
    return dt


@contextmanager
def _storescp(out: Path) -> Iterator[int]:
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([_tool("storescp"), "-od", str(out), str(port)], env=DCMTK_ENV)
    try:
        wait_port(port, 10)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def _bare_pynetdicom(event_driven: bool) -> Iterator[int]:
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.presentation import AllStoragePresentationContexts

    from dicom_node import reactor

    ae = AE("SYNTHMR")
    ae.maximum_associations = 16
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    handlers = [(evt.EVT_C_STORE, lambda event: 0x0000)]
    if event_driven:
        server = reactor.make_server(ae, ("127.0.0.1", 0), handlers)
    else:
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


#: CPU seconds of the helper processes (acceptors) of the synthmr receiver that ran last,
#: from accepting to stopping (RUSAGE_CHILDREN would add their start-up and interpreter exit,
#: ~0.2 ms per instance of a 200-instance run)
_helper_cpu = [0.0]
#: fdatasyncs of the ingest journals (all processes) of the synthmr receiver that ran last
_journal_syncs = [0]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@contextmanager
def _synthmr(tmp: Path, processes: int | None = None) -> Iterator[int]:
    tmp.mkdir(parents=True, exist_ok=True)
    extra = "" if processes is None else f"acceptor_processes = {processes}\n"
    config = write_config(tmp, "", spool=tmp / "spool").read_text()
    config = config.replace("[node]\n", "[node]\n" + extra, 1)
    (tmp / "node.toml").write_text(config)
    settings = load_settings(tmp / "node.toml", env={})
    reg = Registry(tmp / "spool" / "registry.sqlite3")
    scp = StoreSCP(settings, open_spool(settings), reg, NodeMetrics())  # as the node has it
    freeze_start_up_objects()  # as Node.start does
    scp.start()
    deadline = time.monotonic() + 60
    while scp._pool is not None and not scp._pool.ready() and time.monotonic() < deadline:
        time.sleep(0.05)  # the helpers import pynetdicom
    try:
        yield scp.port
    finally:
        scp.stop()
        _helper_cpu[0] = scp.helper_cpu_s
        _journal_syncs[0] = scp.spool.journal.syncs + scp.helper_journal_syncs  # before close
        scp.spool.close()  # the journal checkpoint (timed by the caller)
        reg.close()


def _flush_ms(folder: Path, n: int = 20) -> float:
    """Median milliseconds of a 4 KiB append + fdatasync in ``folder``."""
    path = folder / "flush-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, b"x" * 4096)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="instances per run (all senders)")
    ap.add_argument("--size", type=int, default=256, help="image rows = columns")
    ap.add_argument("--senders", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--associations",
        type=int,
        default=0,
        help="also: synthmr's CPU per association, N storescu runs of one instance each, one"
        " after the other (a sender that opens an association per instance or per series)",
    )
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as td:
        tmp = Path(td)
        max_k = max(args.senders)
        per = args.n // max_k
        files = [
            [
                make_mr_file(
                    tmp / "src" / f"s{k}" / f"{i:05d}.dcm",
                    series_uid=f"1.2.826.0.1.3680043.8.498.777.{k}",
                    instance_number=i,
                    shape=(args.size, args.size),
                )
                for i in range(per)
            ]
            for k in range(max_k)
        ]
        mb = os.path.getsize(files[0][0]) / 1e6
        default_processes = load_settings(write_config(tmp, ""), env={}).node.acceptor_processes
        receivers: dict[str, Callable[[Path], object]] = {
            "dcmtk storescp (no fsync)": lambda d: _storescp(d),
            "bare pynetdicom, stock reactors": lambda d: _bare_pynetdicom(False),
            "bare pynetdicom, event reactors": lambda d: _bare_pynetdicom(True),
            "synthmr SCP (durable)": lambda d: _synthmr(d),
        }
        other = 2 if default_processes == 1 else 1
        receivers[f"synthmr SCP, {other} acceptor process{'es' if other > 1 else ''}"] = lambda d: (
            _synthmr(d, other)
        )
        rates: dict[tuple[int, str], list[float]] = {}
        cpu: dict[tuple[int, str], list[float]] = {}
        syncs: dict[tuple[int, str], list[float]] = {}
        flushes: list[float] = []
        run = 0
        for _ in range(args.rounds):
            for k in args.senders:
                all_files = [f for batch in files for f in batch][: per * max_k]
                batches = [all_files[i::k] for i in range(k)]
                n = sum(len(b) for b in batches)
                for name, make in receivers.items():
                    run += 1
                    _helper_cpu[0] = 0.0
                    with make(tmp / f"run{run}") as port:  # type: ignore[attr-defined]
                        children0, self0 = _children_cpu(), time.process_time()
                        t0 = time.perf_counter()
                        dt = _send(batches, port)
                        self1, senders = time.process_time(), _children_cpu() - children0
                    # storescp's CPU arrives when it is reaped (end of the with); the
                    # helpers' is their own count (their start-up and exit left out)
                    if name.startswith("synthmr"):
                        others = _helper_cpu[0]
                    else:
                        others = _children_cpu() - children0 - senders
                    cpu.setdefault((k, name), []).append((self1 - self0 + others) / n * 1e3)
                    rates.setdefault((k, name), []).append(n / dt)
                    if name.startswith("synthmr"):
                        syncs.setdefault((k, name), []).append(_journal_syncs[0] / n)
                        _journal_syncs[0] = 0
                    if name == "synthmr SCP (durable)":
                        with_ckpt = "synthmr incl. journal checkpoint"
                        rates.setdefault((k, with_ckpt), []).append(n / (time.perf_counter() - t0))
                        flushes.append(_flush_ms(tmp))
                        stored = len(
                            list((tmp / f"run{run}" / "spool" / "incoming").rglob("*.dcm"))
                        )
                        assert stored == n, f"synthmr stored {stored} of {n}"
                    shutil.rmtree(tmp / f"run{run}", ignore_errors=True)

    print(
        f"{per * max_k} instances of {args.size}x{args.size} uint16 ({mb:.2f} MB each) per run,"
        f" 127.0.0.1, {args.rounds} rounds, median (min-max) instances/s"
    )
    flush = statistics.median(flushes)
    load_after = os.getloadavg()
    print(
        f"load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load_before)},"
        f" after {'/'.join(f'{x:.2f}' for x in load_after)} (2 cores: above ~1 the timings"
        " are inflated)"
    )
    print(
        f"disk flush (4 KiB append + fdatasync): {flush:.2f} ms median ->"
        f" at most {1e3 / flush:.0f} durable answers/s to one synchronous sender"
    )
    for k in args.senders:
        print(f"\n{k} parallel sender(s):")
        names = [*receivers, "synthmr incl. journal checkpoint"]
        med = {name: statistics.median(rates[(k, name)]) for name in names}
        for name in names:
            r = rates[(k, name)]
            c = cpu.get((k, name))
            ms = f"   CPU {statistics.median(c):.2f} ms/instance" if c else ""
            if (k, name) in syncs:
                ms += f", journal syncs/instance {statistics.median(syncs[(k, name)]):.2f}"
            print(f"  {name:<34}{med[name]:8.0f}  ({min(r):.0f}-{max(r):.0f}){ms}")
        own = statistics.median(cpu[(k, "synthmr SCP (durable)")]) - statistics.median(
            cpu[(k, "bare pynetdicom, event reactors")]
        )
        print(
            f"  synthmr's own CPU (beyond the bare SCP with event reactors): {own:.2f} ms/instance"
        )
        ref = med["dcmtk storescp (no fsync)"]
        bare = med["bare pynetdicom, stock reactors"]
        ours = med["synthmr SCP (durable)"]
        print(
            f"  ratios: synthmr/storescp {ours / ref:.2f}, synthmr/bare pynetdicom {ours / bare:.2f},"
            f" bare/storescp {bare / ref:.2f},"
            f" event-reactor bare/storescp {med['bare pynetdicom, event reactors'] / ref:.2f}"
        )
    if args.associations:
        _per_association(args.associations)


def _per_association(n: int) -> None:
    """CPU ms per association (in this process: the receiver's own threads) of ``n``
    sequential storescu runs, one 64x64 instance each: association set-up (storescu
    proposes 128 presentation contexts), one C-STORE, release."""
    print(f"\nper association ({n} storescu runs of one instance, one after the other):")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as td:
        tmp = Path(td)
        f = make_mr_file(
            tmp / "one.dcm", series_uid="1.2.826.0.1.3680043.8.498.778", shape=(64, 64)
        )
        # synthmr only: the node's remembered UID checks and negotiation are process-wide
        # (installed by the first server above), so a bare pynetdicom SCP here would not be
        # pynetdicom's stock cost
        with _synthmr(tmp / "assoc") as port:
            _send([[f]], port)  # the first: what is remembered is learnt
            t0 = time.process_time()
            for _ in range(n):
                _send([[f]], port)
            ms = (time.process_time() - t0) / n * 1e3
        print(f"  {'synthmr SCP (durable)':<34} CPU {ms:6.2f} ms/association")


if __name__ == "__main__":
    main()
