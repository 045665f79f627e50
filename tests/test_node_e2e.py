"""The whole node against real peers: dcmtk storescu as the scanner, Orthanc as the PACS.

Tiny phantom series (2 x 32 x 32, 32 instances) keep each test to a few seconds.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import load_settings
from dicom_node.registry import State
from dicom_node.service import Node
from tests.conftest import (
    OrthancServer,
    durably_received,
    free_port,
    http_get,
    make_mr_file,
    registry_rows,
    require_tool,
    stop_pid,
    storescu,
    wait_for,
    wait_port,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def _series_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _dest(orth: OrthancServer) -> str:
    return (
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
        f"port = {orth.dicom_port}\ntimeout_s = 5\n"
    )


def _db_state(spool: Path, series_uid: str) -> str | None:
    db = sqlite3.connect(f"file:{spool / 'registry.sqlite3'}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT state FROM series WHERE series_uid=?", (series_uid,)).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        db.close()
    return None if row is None else str(row[0])


def _outbox_sops(spool: Path) -> set[str]:
    return {r[0] for r in registry_rows(spool, "SELECT sop_uid FROM outbox")}


def _orthanc_sops(orth: OrthancServer) -> list[str]:
    return [
        orth.rest(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in orth.instances()
    ]


class NodeProcess:
    """The node in a subprocess, stopped (or killed) by PID: ``python -m dicom_node.service``,
    or with ``cli=True`` the ``synthmr serve`` entry point (``python -m dicom_node.cli``)."""

    def __init__(self, cfg: Path, log: Path, cli: bool = False) -> None:
        self.cfg, self.log, self.cli = cfg, log, cli
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        entry = ["dicom_node.cli", "serve"] if self.cli else ["dicom_node.service"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *entry, "--config", str(self.cfg)],
            cwd=ROOT,
            env=env,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
        )
        wait_port(port, 60)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc, 30)


def test_delivered_to_orthanc_then_kill9_restart_no_loss_no_duplicates(
    tmp_path: Path, pacs: OrthancServer, mdme_series: list[Path]
) -> None:
    """Processing is interrupted by kill -9; after restart the job re-runs and Orthanc
    holds exactly one copy of each output (same UIDs). /metrics passes promtool."""
    pacs.start()
    port, mport = free_port(), free_port()
    spool = tmp_path / "spool"
    cfg = write_config(
        tmp_path,
        _dest(pacs) + "[workers]\ndebug_job_delay_s = 3.0\n",
        port=port,
        spool=spool,
        metrics_port=mport,
    )
    node = NodeProcess(cfg, tmp_path / "node.log")
    uid = _series_uid(mdme_series)
    try:
        node.start(port)
        r = storescu(mdme_series, port)
        assert r.returncode == 0, r.stdout + r.stderr
        # acknowledged => on disk (its spool file, or the journal until it is written)
        assert len(durably_received(spool)) == len(mdme_series)
        wait_for(lambda: _db_state(spool, uid) == "PROCESSING", 30, 0.05, "PROCESSING")
        node.kill9()
        assert _db_state(spool, uid) == "PROCESSING"
        (spool / "tmp" / "half-written.part").write_bytes(b"junk")  # as a crash would leave
        node.start(port)
        wait_for(
            lambda: _db_state(spool, uid) == "DELIVERED", 240, 0.2, "DELIVERED after restart"
        )  # cold numba cache: compile
        assert list((spool / "tmp").iterdir()) == []
        expected = _outbox_sops(spool)
        assert len(expected) >= 3
        sops = _orthanc_sops(pacs)
        assert sorted(sops) == sorted(expected)  # every output once, no duplicates
        # operations endpoints
        assert http_get(mport, "/healthz")[0] == 200
        code, body = http_get(mport, "/readyz")
        assert code == 200 and "scp_listening ok" in body
        code, metrics = http_get(mport, "/metrics")
        assert code == 200
        assert 'synthmr_series_transitions_total{state="DELIVERED"} 1.0' in metrics
        assert 'synthmr_jobs_total{result="success"} 1.0' in metrics
        assert (
            f'synthmr_push_total{{destination="pacs",result="success"}} {float(len(expected))}'
            in metrics
        )
        promtool = require_tool("promtool")
        chk = subprocess.run(
            [promtool, "check", "metrics"], input=metrics, capture_output=True, text=True
        )
        assert chk.returncode == 0, chk.stdout + chk.stderr
    finally:
        node.stop()
    log_lines = [
        json.loads(x) for x in (tmp_path / "node.log").read_text().splitlines() if x.startswith("{")
    ]
    assert any(x["event"] == "node_recovered" and x.get("jobs_requeued") == 1 for x in log_lines)


def test_pacs_down_retries_then_delivers_and_rerun_replaces(
    tmp_path: Path, pacs: OrthancServer, mdme_series: list[Path]
) -> None:
    cfg = write_config(
        tmp_path,
        _dest(pacs)
        + "[retry]\nbase_delay_s = 0.3\nmax_delay_s = 1.0\nmax_attempts = 50\npoll_interval_s = 0.1\n",
    )
    node = Node(load_settings(cfg, env={})).start()
    uid = _series_uid(mdme_series)
    try:
        assert storescu(mdme_series, node.port).returncode == 0
        wait_for(lambda: node.registry.series(uid).state == State.EXPORTED, 240, 0.1, "EXPORTED")

        def failures() -> float:
            v = node.metrics.registry.get_sample_value(
                "synthmr_push_total", {"destination": "pacs", "result": "failure"}
            )
            return v or 0.0

        wait_for(lambda: failures() >= 2, 20, 0.1, "two failed push attempts")  # retried, no hang
        assert node.registry.series(uid).state == State.EXPORTED
        assert node.registry.outbox_counts()["PENDING"] > 0
        pacs.start()
        wait_for(lambda: node.registry.series(uid).state == State.DELIVERED, 30, 0.1, "DELIVERED")
        n = len(pacs.instances())
        assert n == node.registry.outbox_counts()["SENT"] > 0
        # operator retry: the re-run exports the same UIDs, so PACS gets no duplicates
        node.registry.retry(uid)
        node._jobs_wake.set()
        wait_for(
            lambda: (
                node.registry.transitions_of(uid)[-1] == ("EXPORTED", "DELIVERED")
                and len(node.registry.transitions_of(uid)) > 8
            ),
            60,
            0.1,
            "second delivery",
        )
        assert len(pacs.instances()) == n
    finally:
        node.stop()


def test_non_mdme_ignored_and_partial_grid_quarantined(
    tmp_path: Path, mdme_series: list[Path]
) -> None:
    cfg = write_config(
        tmp_path, "[completion]\nquiet_period_s = 0.5\nceiling_s = 4\npoll_interval_s = 0.1\n"
    )
    node = Node(load_settings(cfg, env={})).start()
    try:
        series = "1.2.826.0.1.3680043.8.498.1"
        plain = [
            make_mr_file(tmp_path / f"t2_{i}.dcm", series_uid=series, instance_number=i)
            for i in (1, 2)
        ]
        assert storescu(plain, node.port).returncode == 0
        partial = mdme_series[:20]  # 20 of 32 images
        assert storescu(partial, node.port).returncode == 0
        wait_for(lambda: node.registry.series(series).state == State.IGNORED, 60, 0.1, "IGNORED")
        assert "not an MDME series" in node.registry.series(series).reason
        uid = _series_uid(mdme_series)
        row = node.registry.series(uid)
        assert row.state == State.RECEIVING  # known grid, partial: the quiet period does not end it
        wait_for(
            lambda: node.registry.series(uid).state == State.QUARANTINED, 20, 0.1, "QUARANTINED"
        )
        row = node.registry.series(uid)
        assert "20 of 32 instances" in row.reason
        # 12 cells missing: slice 2 (index 1), delays 2-4, both echoes, magnitude and phase
        assert len(row.missing) == 12
        assert "slice=1 delay=1 echo=0 part=M" in row.missing
        # ready once the worker is warm too (it may still be loading its kernels: no MDME
        # series was processed here)
        wait_for(lambda: node.ready()[0], 240, 0.2, f"ready: {node.ready()[1]}")
    finally:
        node.stop()
