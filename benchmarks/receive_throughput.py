"""Receive throughput: instances/s stored by the synthmr SCP vs dcmtk's storescp.

Both receive the same files from dcmtk ``storescu`` over one association on 127.0.0.1.
Ours writes each instance durably (temp file, fsync, rename, directory fsync) and records
it in SQLite (synchronous=FULL) before answering; storescp just writes the file.

    python benchmarks/receive_throughput.py [--n 200] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.config import load_settings  # noqa: E402
from dicom_node.metrics import NodeMetrics  # noqa: E402
from dicom_node.registry import Registry  # noqa: E402
from dicom_node.scp import StoreSCP  # noqa: E402
from dicom_node.spool import Spool  # noqa: E402
from tests.conftest import free_port, make_mr_file, wait_port, write_config  # noqa: E402


def _tool(name: str) -> str:
    path = shutil.which(name, path="/usr/bin:/usr/local/bin") or shutil.which(name)
    if path is None:
        sys.exit(f"{name} (dcmtk) is not installed")
    return path


def _send(files: list[Path], port: int) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            _tool("storescu"),
            "-aet",
            "BENCH",
            "-aec",
            "SYNTHMR",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        # Nagle off on the sender too (dcmtk leaves it on unless TCP_NODELAY=1): otherwise
        # each instance's last PDU waits for a delayed ACK and both receivers look slow.
        env=dict(os.environ, TCP_NODELAY="1"),
    )
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"storescu failed: {r.stderr[-2000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="instances to send")
    ap.add_argument("--size", type=int, default=256, help="image rows = columns")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        series = "1.2.826.0.1.3680043.8.498.777"
        files = [
            make_mr_file(
                tmp / "src" / f"{i:05d}.dcm",
                series_uid=series,
                instance_number=i,
                shape=(args.size, args.size),
            )
            for i in range(args.n)
        ]
        mb = sum(f.stat().st_size for f in files) / 1e6

        settings = load_settings(write_config(tmp, "", spool=tmp / "spool"), env={})
        reg = Registry(tmp / "spool" / "registry.sqlite3")
        scp = StoreSCP(settings, Spool(settings.spool.path), reg, NodeMetrics())
        scp.start()
        try:
            ours = _send(files, scp.port)
        finally:
            scp.stop()
            reg.close()
        stored = len(list((tmp / "spool" / "incoming").rglob("*.dcm")))
        assert stored == args.n, f"only {stored} of {args.n} stored"

        port = free_port()
        out = tmp / "storescp"
        out.mkdir()
        # TCP_NODELAY=1: dcmtk then disables Nagle like pynetdicom does (fair comparison)
        env = dict(os.environ, TCP_NODELAY="1")
        proc = subprocess.Popen([_tool("storescp"), "-od", str(out), str(port)], env=env)
        try:
            wait_port(port, 10)
            ref = _send(files, port)
        finally:
            proc.terminate()
            proc.wait(10)

    print(
        f"instances: {args.n} x {args.size}x{args.size} uint16 ({mb:.1f} MB), one association, 127.0.0.1"
    )
    print(
        f"synthmr SCP (fsync + SQLite FULL): {args.n / ours:8.1f} instances/s  {mb / ours:7.1f} MB/s  ({ours:.2f} s)"
    )
    print(
        f"dcmtk storescp (no fsync)        : {args.n / ref:8.1f} instances/s  {mb / ref:7.1f} MB/s  ({ref:.2f} s)"
    )


if __name__ == "__main__":
    main()
