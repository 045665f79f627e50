"""Retention of <spool>/results/: by age and by size, never a series whose work is not done
(real sqlite registry driven through its own transitions; the node's housekeeping counts
and logs each removal)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from dicom_node.registry import Registry, State
from dicom_node.results_retention import prune_results, results_entries

DAY = 86400.0
NOW = 2_000_000_000.0


def _results(spool: Path, uid: str, age_days: float, n_bytes: int = 1000) -> Path:
    d = spool / "results" / uid
    d.mkdir(parents=True)
    (d / "maps.npz").write_bytes(b"\0" * n_bytes)
    meta = d / "meta.json"
    meta.write_text(json.dumps({"series_uid": uid}))
    t = NOW - age_days * DAY
    os.utime(meta, (t, t))
    return d


def _exported(reg: Registry, uid: str, outbox_rows: int = 1) -> list[int]:
    """A series received, processed and queued to the outbox (EXPORTED); its item ids."""
    reg.add_instance(
        sop_uid=f"{uid}.1", series_uid=uid, study_uid="9", sop_class_uid="1.2", path="p", size=1
    )
    for st in (State.COMPLETE, State.QUEUED, State.PROCESSING):
        reg.transition(uid, st)
    reg.add_outbox(uid, [("pacs", f"{uid}.o{i}", "1.2", "o") for i in range(outbox_rows)])
    reg.transition(uid, State.EXPORTED)
    return [i.id for i in reg.due_outbox(now=time.time() + 1) if i.series_uid == uid]


@pytest.fixture
def spool_and_registry(tmp_path: Path):
    spool = tmp_path / "spool"
    reg = Registry(tmp_path / "registry.sqlite3")
    delivered = _exported(reg, "1.1")
    reg.outbox_sent(delivered)  # -> DELIVERED
    _exported(reg, "1.2")  # outbox PENDING
    dead = _exported(reg, "1.3")
    reg.outbox_failed(dead, "refused", time.time(), max_attempts=1)  # DEAD letter
    reg.add_instance(
        sop_uid="1.4.1", series_uid="1.4", study_uid="9", sop_class_uid="1.2", path="q", size=1
    )  # still RECEIVING (re-opened by a late instance, say)
    assert reg.series("1.1").state == State.DELIVERED
    assert reg.outbox_of("1.3")["pacs"]["DEAD"] == 1
    for uid in ("1.1", "1.2", "1.3", "1.4"):
        _results(spool, uid, age_days=100)
    _results(spool, "1.5", age_days=100)  # unknown to this registry (restored backup)
    _results(spool, "1.6", age_days=5)
    _results(spool, "1.7", age_days=1)
    yield spool, reg
    reg.close()


def test_age_limit_spares_unfinished_series_and_undone_outboxes(spool_and_registry) -> None:
    spool, reg = spool_and_registry
    removed = prune_results(spool, reg, max_age_days=90, max_gb=0, now=NOW)
    assert sorted((e.series_uid, why) for e, why in removed) == [("1.1", "age"), ("1.5", "age")]
    left = {e.series_uid for e in results_entries(spool)}
    assert left == {"1.2", "1.3", "1.4", "1.6", "1.7"}  # PENDING, DEAD, RECEIVING, young
    assert prune_results(spool, reg, max_age_days=0, max_gb=0, now=NOW) == []  # 0 = no limit


def test_size_limit_removes_oldest_first_until_it_fits(spool_and_registry) -> None:
    spool, reg = spool_and_registry
    per_series = results_entries(spool)[0].n_bytes
    # room for four series: 1.1 and 1.5 (100 days) go, then 1.6 (5 days); 1.7 stays, and
    # 1.2-1.4 stay although old, as their work is not done
    limit_gb = 4.5 * per_series / 1024**3
    removed = prune_results(spool, reg, max_age_days=0, max_gb=limit_gb, now=NOW)
    assert [e.series_uid for e, _ in removed][-1] == "1.6"
    assert {e.series_uid for e, _ in removed} == {"1.1", "1.5", "1.6"}
    assert {why for _, why in removed} == {"size"}
    assert {e.series_uid for e in results_entries(spool)} == {"1.2", "1.3", "1.4", "1.7"}


def test_node_housekeeping_counts_and_logs_removals(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dicom_node.config import load_settings
    from dicom_node.service import Node

    spool = tmp_path / "spool"
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[spool]\npath = "{spool}"\n[metrics]\nenabled = false\n[retention]\nresults_days = 30.0\n'
    )
    node = Node(load_settings(cfg, env={}))
    try:
        _results(spool, "2.1", age_days=(NOW - time.time()) / DAY + 31)  # 31 days old today
        _results(spool, "2.2", age_days=(NOW - time.time()) / DAY + 2)
        with caplog.at_level(logging.INFO, logger="synthmr.retention"):
            node._housekeeping()
        assert {e.series_uid for e in results_entries(spool)} == {"2.2"}
        value = node.metrics.registry.get_sample_value(
            "synthmr_results_removed_total", {"reason": "age"}
        )
        assert value == 1.0
        lines = [r for r in caplog.records if r.getMessage() == "results_removed"]
        assert len(lines) == 1 and lines[0].series_uid == "2.1" and lines[0].reason == "age"
    finally:
        node.registry.close()
