"""End-to-end latency of the node: last instance sent -> last output stored in Orthanc.

A phantom MDME series (default 30 x 256 x 256, GE layout, magnitude + phase = 480 files)
is sent by dcmtk ``storescu`` to ``synthmr serve`` (``python -m dicom_node.cli serve``,
a subprocess); the outputs go to a real Orthanc. Everything binds 127.0.0.1 on free ports
and is stopped by PID. Printed: the end-to-end figure, the grid-completion latency, and
where the time goes (normalize, fit, pd, segmentation, myelin, synthesis, enhance, qc,
export, push), from the registry's timestamps and the node's ``job_finished`` log line.

    python benchmarks/e2e_latency.py [--shape 30 256 256] [--layout ge] [--fast]
    python benchmarks/e2e_latency.py --sequence qalas --shape 176 256 256 --layout siemens

``--fast``: segmentation, myelin and enhancement off (three contrasts), for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import (  # noqa: E402
    free_port,
    make_orthanc,
    require_tool,
    stop_pid,
    wait_for,
    wait_port,
    write_config,
)

FAST = (
    '[processing]\ncontrasts = ["T1W", "T2W", "FLAIR"]\nsegmentation = false\n'
    "myelin = false\nenhance = false\n"
)


def _q(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return list(con.execute(sql, args).fetchall())
    finally:
        con.close()


def _state(db: Path, series_uid: str) -> str | None:
    try:
        rows = _q(db, "SELECT state FROM series WHERE series_uid=?", (series_uid,))
    except sqlite3.OperationalError:
        return None
    return rows[0][0] if rows else None


class _RssSampler:
    """Peak resident memory of the node and all its worker processes (psutil, every 0.2 s)."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid = pid
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_bytes = max(self.peak_bytes, total)
            except Exception:
                pass
            self._stop.wait(0.2)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


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
    from processing.phantom import make_phantom

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        t = time.perf_counter()
        if args.sequence == "qalas":
            from dicom_node.qalas_emulator import write_qalas_series
            from processing.qalas_phantom import make_qalas_phantom

            ph = make_qalas_phantom(
                tuple(args.shape), voxel_size_mm=(1.0, 1.0, 1.0), seed=5, snr=50.0, magnitude=True
            )
            files = write_qalas_series(ph.acq, args.layout, tmp / "series")
        else:
            ph = make_phantom(tuple(args.shape), seed=5, snr=50.0)
            files = emulator.write_series(ph.acq, args.layout, tmp / "series")
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        print(
            f"series: {args.sequence} {args.layout} {tuple(args.shape)}, {len(files)} files "
            f"(made in {time.perf_counter() - t:.1f} s)"
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
        peak = _RssSampler(node.pid)
        try:
            wait_port(port, 120)
            # steady state: a tiny series first, so start-up warming is not in the figure
            if args.sequence == "qalas":
                warm = write_qalas_series(
                    make_qalas_phantom((8, 32, 32), seed=6, anatomy="ellipsoid").acq,
                    args.layout,
                    tmp / "warm",
                    seed=6,
                )
            else:
                warm = emulator.write_series(
                    make_phantom((2, 32, 32), seed=6, anatomy="ellipsoid").acq,
                    args.layout,
                    tmp / "warm",
                )
            subprocess.run(
                [
                    require_tool("storescu"),
                    "-aet",
                    "SCANNER",
                    "-aec",
                    "SYNTHMR",
                    "127.0.0.1",
                    str(port),
                    *map(str, warm),
                ],
                capture_output=True,
                check=True,
                env=send_env,
            )
            warm_uid = str(pydicom.dcmread(warm[0], stop_before_pixels=True).SeriesInstanceUID)
            wait_for(lambda: _state(db, warm_uid) == "DELIVERED", 600, 0.2, "warm-up series")
            n_warm = len(orth.instances())
            peak.start()
            t_send = time.time()
            r = subprocess.run(
                [
                    require_tool("storescu"),
                    "-aet",
                    "SCANNER",
                    "-aec",
                    "SYNTHMR",
                    "127.0.0.1",
                    str(port),
                    *map(str, files),
                ],
                capture_output=True,
                text=True,
                env=send_env,
            )
            t_last_sent = time.time()
            if r.returncode != 0:
                sys.exit(f"storescu failed: {r.stderr[-2000:]}")

            def state() -> str | None:
                return _state(db, uid)

            wait_for(
                lambda: state() in ("DELIVERED", "FAILED", "QUARANTINED"),
                args.timeout,
                0.2,
                "series delivered",
            )
            if state() != "DELIVERED":
                sys.exit(f"series ended {state()}: {_q(db, 'SELECT reason FROM series')}")
            # Orthanc answered success to the last C-STORE at sent_at (same host clock)
            w = (uid,)
            t_last_stored = _q(db, "SELECT MAX(sent_at) FROM outbox WHERE series_uid=?", w)[0][0]
            n_out = _q(db, "SELECT COUNT(*) FROM outbox WHERE series_uid=?", w)[0][0]
            n_pacs = len(orth.instances()) - n_warm
            last_rx = _q(db, "SELECT MAX(received_at) FROM instances WHERE series_uid=?", w)[0][0]
            at = dict(
                _q(
                    db,
                    "SELECT to_state, MAX(at) FROM transitions WHERE series_uid=? GROUP BY to_state",
                    w,
                )
            )
        finally:
            peak.stop()
            stop_pid(node, 60)
            orth.stop()
        # push comparison on the same output files: our SCU (send_files, one association)
        # vs dcmtk storescu, each into a fresh Orthanc -- is the PACS or the sender the limit?
        outputs = [r[0] for r in _q(db, "SELECT path FROM outbox WHERE series_uid=?", (uid,))]
        push_cmp: dict[str, tuple[float, int]] = {}
        for who in ("synthmr send_files", "dcmtk storescu"):
            o2 = make_orthanc(tmp / f"orthanc_{who.split()[0]}", tcp_nodelay=nodelay)
            try:
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
                    from dicom_node.push import send_files

                    res = send_files(
                        outputs, ae_title="ORTHANC", host="127.0.0.1", port=o2.dicom_port
                    )
                    assert res["failed"] == 0, res
                push_cmp[who] = (time.perf_counter() - t, len(o2.instances()))
            finally:
                o2.stop()
        finished = [
            json.loads(x)
            for x in log.read_text().splitlines()
            if x.startswith("{") and '"job_finished"' in x
        ]
        timings = finished[-1].get("timings_s", {}) if finished else {}

    e2e = t_last_stored - t_last_sent
    print(f"send (storescu, {len(files)} files): {t_last_sent - t_send:6.2f} s")
    print(f"outputs: {n_out} in the outbox, {n_pacs} in Orthanc")
    print(
        f"END TO END last instance sent -> last output stored in Orthanc: {e2e:6.2f} s "
        f"(goal <= 15 s on 2 cores)"
    )
    print(f"  peak RSS of the node and its workers: {peak.peak_bytes / 2**30:.2f} GiB")
    print(f"  completion by grid (last received -> COMPLETE): {at['COMPLETE'] - last_rx:6.3f} s")
    print(
        f"  queue (COMPLETE -> PROCESSING):                 {at['PROCESSING'] - at['COMPLETE']:6.3f} s"
    )
    print(
        f"  job (PROCESSING -> EXPORTED):                   {at['EXPORTED'] - at['PROCESSING']:6.2f} s"
    )
    for k in (
        "normalize",
        "fit",
        "pd",
        "segmentation",
        "myelin",
        "synthesis",
        "enhance",
        "qc",
        "process",
        "export",
    ):
        if k in timings:
            label = "process (worker total, incl. transfer)" if k == "process" else k
            print(f"    {label:38s} {timings[k]:6.2f} s")
    print(
        f"  push (EXPORTED -> DELIVERED):                   {at['DELIVERED'] - at['EXPORTED']:6.2f} s"
    )
    for who, (dt, n) in push_cmp.items():
        print(
            f"push of the same {len(outputs)} outputs into a fresh Orthanc by {who}: "
            f"{dt:6.2f} s ({n} stored, {len(outputs) / dt:.0f} instances/s)"
        )


if __name__ == "__main__":
    main()
