"""metrics: the exact names deploy/ alerts on, valid exposition (promtool), endpoints."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request

import pytest

from dicom_node.metrics import (
    MAX_CALLING_AE_LABELS,
    OTHER_AE,
    PROCESSING_STAGES,
    MetricsServer,
    NodeMetrics,
)
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
    "synthmr_associations_active",
    "synthmr_fit_qc",
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
    m.associations_active.set(2)
    m.instance_received("MR_SCANNER", "stored")
    m.observe_processing(
        {"fit": 0.7, "synthesis": 0.2, "enhance": 0.1},
        {"residual_to_noise": 1.1, "b1_p1": 0.8, "b1_p99": 1.2, "status": "PASS"},
    )
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


def test_readiness_verdict_names_warming() -> None:
    """Only the workers' warm-up missing -> "warming"; anything else -> "not ready: <checks>"."""
    from dicom_node.metrics import readiness_text

    assert readiness_text(True, {"scp_listening": True, "workers_warm": True}).startswith("ready\n")
    body = readiness_text(False, {"scp_listening": True, "workers_warm": False})
    assert body.splitlines() == ["warming", "scp_listening ok", "workers_warm FAIL"]
    body = readiness_text(False, {"registry": False, "workers_warm": False})
    assert body.splitlines()[0] == "not ready: registry, workers_warm"


def _sample(m: NodeMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_calling_ae_label_is_bounded_without_allow_list() -> None:
    """No allow-list: the first MAX_CALLING_AE_LABELS titles are labels, later ones 'other'."""
    m = NodeMetrics()
    n_extra = 5
    titles = [f"AE{i:03d}" for i in range(MAX_CALLING_AE_LABELS + n_extra)]
    for t in titles:
        m.instance_received(t, "stored")
    m.instance_received(titles[0], "failed")  # a known title stays itself
    values = {
        s.labels["calling_ae"]
        for fam in m.registry.collect()
        for s in fam.samples
        if s.name == "synthmr_instances_received_total"
    }
    assert values == set(titles[:MAX_CALLING_AE_LABELS]) | {OTHER_AE}
    assert _sample(m, "synthmr_instances_received_total", calling_ae=OTHER_AE, result="stored") == (
        n_extra
    )
    assert _sample(m, "synthmr_instances_received_total", calling_ae="AE000", result="failed") == 1


def test_calling_ae_label_with_allow_list_and_hostile_titles() -> None:
    m = NodeMetrics()
    m.set_allowed_callers(["MR_SCANNER", "CT1 "])
    m.instance_received("MR_SCANNER", "stored")
    m.instance_received("CT1", "stored")
    m.instance_received("INTRUDER", "failed")
    m.instance_received('x"}\n{evil', "failed")
    assert _sample(m, "synthmr_instances_received_total", calling_ae="MR_SCANNER", result="stored")
    assert _sample(m, "synthmr_instances_received_total", calling_ae="CT1", result="stored") == 1
    assert _sample(m, "synthmr_instances_received_total", calling_ae=OTHER_AE, result="failed") == 2
    # no allow-list: a title with quotes/newlines is still valid exposition (escaped by the client)
    m.set_allowed_callers(None)
    m.instance_received('A"B\nC', "stored")
    chk = subprocess.run(
        [require_tool("promtool"), "check", "metrics"],
        input=m.text().decode(),
        capture_output=True,
        text=True,
    )
    assert chk.returncode == 0, chk.stdout + chk.stderr


def test_processing_stages_and_fit_qc() -> None:
    m = _metrics()
    for st in PROCESSING_STAGES:  # pre-created: dashboards see zeros, not gaps
        assert _sample(m, "synthmr_stage_duration_seconds_count", stage=st) is not None
    assert _sample(m, "synthmr_stage_duration_seconds_count", stage="fit") == 1
    assert _sample(m, "synthmr_stage_duration_seconds_sum", stage="fit") == pytest.approx(0.7)
    assert _sample(m, "synthmr_stage_duration_seconds_count", stage="myelin") == 0
    assert _sample(m, "synthmr_fit_qc", figure="residual_to_noise") == pytest.approx(1.1)
    assert _sample(m, "synthmr_fit_qc", figure="b1_p99") == pytest.approx(1.2)
    assert _sample(m, "synthmr_fit_qc", figure="status") is None  # strings are not figures
    # NaN figures (e.g. no B1 voxels) keep the previous value instead of exporting NaN
    m.observe_processing({}, {"b1_p1": float("nan")})
    assert _sample(m, "synthmr_fit_qc", figure="b1_p1") == pytest.approx(0.8)
    assert _sample(m, "synthmr_associations_active") == 2
