"""metrics: the exact names deploy/ alerts on, valid exposition (promtool), endpoints."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request

import pytest

from dicom_node.metrics import MetricsServer, NodeMetrics
from tests.conftest import require_tool

CONTRACT = [
    "synthmr_build_info",
    "synthmr_associations_total",
    "synthmr_instances_received_total",
    "synthmr_series_transitions_total",
    "synthmr_series_in_state",
    "synthmr_series_oldest_age_seconds",
    "synthmr_stage_duration_seconds_bucket",
    "synthmr_jobs_total",
    "synthmr_processing_errors_total",
    "synthmr_outbox_pending",
    "synthmr_outbox_dead_letter_total",
    "synthmr_push_total",
    "synthmr_spool_free_bytes",
    "synthmr_spool_watermark_bytes",
    "synthmr_fit_failed_fraction",
    "synthmr_qc_status_total",
]


def _metrics() -> NodeMetrics:
    m = NodeMetrics()
    now = time.time()
    m.attach_state(
        lambda: {
            "series": {"RECEIVING": 1, "DELIVERED": 3},
            "oldest_since": {"RECEIVING": now - 42.0},
            "outbox": {"PENDING": 5},
            "free": 10_000,
            "watermark": 1_000,
        }
    )
    m.transitions.labels("COMPLETE").inc()
    m.processing_errors.labels("normalize").inc()
    m.push.labels("pacs", "success").inc(3)
    m.fit_failed_fraction.set(0.01)
    m.stage.labels("process").observe(1.5)
    return m


def test_contract_names_present_and_promtool_clean() -> None:
    text = _metrics().text().decode()
    names = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    missing = [n for n in CONTRACT if n not in names]
    assert not missing, missing
    assert 'synthmr_build_info{version="' in text
    assert "synthmr_outbox_pending 5.0" in text
    assert 'synthmr_series_in_state{state="DELIVERED"} 3.0' in text
    age = next(
        line
        for line in text.splitlines()
        if line.startswith('synthmr_series_oldest_age_seconds{state="RECEIVING"}')
    )
    assert 41.0 <= float(age.split()[-1]) < 60.0
    assert not any("_created" in n for n in names)
    chk = subprocess.run(
        [require_tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert chk.returncode == 0, chk.stdout + chk.stderr


def test_http_endpoints() -> None:
    state = {"ok": True}
    srv = MetricsServer(
        _metrics(),
        "127.0.0.1",
        0,
        lambda: (state["ok"], {"scp_listening": state["ok"], "registry": True}),
    )
    srv.start()
    base = f"http://127.0.0.1:{srv.port}"
    try:
        assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
        assert b"synthmr_jobs_total" in urllib.request.urlopen(base + "/metrics", timeout=5).read()
        assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200
        state["ok"] = False
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/readyz", timeout=5)
        assert e.value.code == 503 and b"scp_listening FAIL" in e.value.read()
    finally:
        srv.stop()
