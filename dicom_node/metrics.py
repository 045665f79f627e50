"""Prometheus metrics and the node's HTTP endpoint (/metrics, /healthz, /readyz).

The metric names below are a contract with deploy/ (alerts, dashboard): do not rename.
Each :class:`NodeMetrics` owns its own :class:`CollectorRegistry` so several nodes (tests)
can live in one process.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from processing._version import __version__

__all__ = ["FIT_QC_FIGURES", "PROCESSING_STAGES", "STAGES", "MetricsServer", "NodeMetrics"]

# *_created series double the exposition for no operational value.
disable_created_metrics()

#: Stages the node times itself (``process`` is the whole of processing.run).
NODE_STAGES = (
    "receive",
    "completion",
    "queue",
    "normalize",
    "process",
    "export",
    "push",
    "end_to_end",
)
#: Sub-stages of processing.run, from SeriesResult.timings_s.
PROCESSING_STAGES = ("fit", "pd", "synthesis", "segmentation", "myelin", "enhance", "qc")
STAGES = NODE_STAGES + PROCESSING_STAGES
#: Fit QC figures of the last processed series (processing.qc keys), on synthmr_fit_qc.
FIT_QC_FIGURES = ("residual_to_noise", "noise_sd", "b1_p1", "b1_p99", "failed_fraction")
#: Label used for calling AEs beyond the label budget (bounded cardinality).
OTHER_AE = "other"
MAX_CALLING_AE_LABELS = 32
_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _StateCollector(Collector):
    """Series counts, oldest age per state and spool/outbox gauges, read at scrape time."""

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            s = self._source()
        except Exception:  # a scrape must never fail because the DB is busy or closed
            return
        g = GaugeMetricFamily(
            "synthmr_series_in_state", "Series currently in each state", labels=["state"]
        )
        for state, n in sorted(s.get("series", {}).items()):
            g.add_metric([state], n)
        yield g
        a = GaugeMetricFamily(
            "synthmr_series_oldest_age_seconds",
            "Age of the oldest series in each non-final state (seconds in that state)",
            labels=["state"],
        )
        now = time.time()
        for state, since in sorted(s.get("oldest_since", {}).items()):
            a.add_metric([state], max(0.0, now - since))
        yield a
        yield GaugeMetricFamily(
            "synthmr_outbox_pending",
            "Exported instances waiting to be pushed",
            value=s.get("outbox", {}).get("PENDING", 0),
        )
        yield GaugeMetricFamily(
            "synthmr_spool_free_bytes",
            "Free bytes on the spool file system",
            value=s.get("free", 0),
        )
        yield GaugeMetricFamily(
            "synthmr_spool_watermark_bytes",
            "Free-space watermark below which C-STORE answers 0xA700",
            value=s.get("watermark", 0),
        )


class NodeMetrics:
    """All metrics of one node."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.build_info = Info("synthmr_build", "synthmr build", registry=r)
        self.build_info.info({"version": __version__})
        self.associations = Counter(
            "synthmr_associations", "Associations requested", ["result"], registry=r
        )
        self.connections_refused = Counter(
            "synthmr_connections_refused",
            "Connections and associations refused, by reason (tls, pending_limit, host_limit,"
            " setup_timeout, association_limit, called_ae, calling_ae, error)",
            ["reason"],
            registry=r,
        )
        self.associations_active = Gauge(
            "synthmr_associations_active", "Associations currently open on the SCP", registry=r
        )
        self.instances = Counter(
            "synthmr_instances_received",
            "C-STORE requests by calling AE (bounded, see calling_ae_label) and outcome",
            ["calling_ae", "result"],
            registry=r,
        )
        self.transitions = Counter(
            "synthmr_series_transitions", "Series state changes", ["state"], registry=r
        )
        self.stage = Histogram(
            "synthmr_stage_duration_seconds",
            "Duration of each stage of a series' life",
            ["stage"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.jobs = Counter("synthmr_jobs", "Finished jobs by result", ["result"], registry=r)
        self.processing_errors = Counter(
            "synthmr_processing_errors", "Errors by pipeline stage", ["stage"], registry=r
        )
        self.dead_letters = Counter(
            "synthmr_outbox_dead_letter", "Outbox items that exhausted their retries", registry=r
        )
        self.results_removed = Counter(
            "synthmr_results_removed",
            "Stored results (<spool>/results/<series>) removed by retention, by reason (age, size)",
            ["reason"],
            registry=r,
        )
        self.push = Counter(
            "synthmr_push", "Push attempts by destination", ["destination", "result"], registry=r
        )
        self.fit_failed_fraction = Gauge(
            "synthmr_fit_failed_fraction",
            "Fraction of fitted voxels that failed (last series)",
            registry=r,
        )
        self.qc_status = Counter(
            "synthmr_qc_status", "QC status of processed series", ["status"], registry=r
        )
        self.fit_qc = Gauge(
            "synthmr_fit_qc",
            "Fit QC figures of the last processed series (processing.qc)",
            ["figure"],
            registry=r,
        )
        self._ae_lock = threading.Lock()
        self._ae_labels: set[str] = set()
        self._ae_allowed: frozenset[str] | None = None
        #: (calling AE as sent, result) -> its instances counter: the label is worked out
        #: once per sender, not per instance (C-STORE path); emptied when the allow-list
        #: changes, bounded against senders that vary their title
        self._instance_counters: dict[tuple[str, str], Any] = {}
        # Pre-create label sets so dashboards see zeros instead of gaps.
        for v in ("accepted", "rejected"):
            self.associations.labels(v)
        for v in ("stored", "rejected", "failed"):
            self.instances.labels(OTHER_AE, v)
        for v in ("success", "failed", "ignored", "quarantined", "held"):
            self.jobs.labels(v)
        for v in ("pass", "warn", "fail"):
            self.qc_status.labels(v)
        for v in ("age", "size"):
            self.results_removed.labels(v)
        for st in STAGES:
            self.stage.labels(st)

    # ------------------------------------------------------------------ calling AEs
    def set_allowed_callers(self, ae_titles: Iterable[str] | None) -> None:
        """Enforced allow-list (or None when any caller may associate): its titles are
        the only calling_ae label values besides ``other``."""
        with self._ae_lock:
            self._ae_allowed = (
                None if ae_titles is None else frozenset(a.strip() for a in ae_titles)
            )
            self._instance_counters = {}

    def calling_ae_label(self, calling_ae: str) -> str:
        """A bounded label for ``calling_ae``: an allow-listed title as is; with no
        allow-list, the first ``MAX_CALLING_AE_LABELS`` distinct titles seen, then ``other``.
        A sender can therefore never grow the exposition without bound."""
        ae = "".join(c for c in calling_ae.strip() if c.isprintable())[:16] or OTHER_AE
        with self._ae_lock:
            if self._ae_allowed is not None:
                return ae if ae in self._ae_allowed else OTHER_AE
            if ae in self._ae_labels:
                return ae
            if len(self._ae_labels) < MAX_CALLING_AE_LABELS:
                self._ae_labels.add(ae)
                return ae
        return OTHER_AE

    #: distinct (calling AE, result) pairs whose counter is remembered
    INSTANCE_COUNTERS_KEPT = 1024

    def instance_received(self, calling_ae: str, result: str) -> None:
        """Count one C-STORE request (``result``: stored, rejected, failed)."""
        counter = self._instance_counters.get((calling_ae, result))
        if counter is None:
            counter = self.instances.labels(self.calling_ae_label(calling_ae), result)
            with self._ae_lock:
                if len(self._instance_counters) >= self.INSTANCE_COUNTERS_KEPT:
                    self._instance_counters = {}
                self._instance_counters[(calling_ae, result)] = counter
        counter.inc()

    def observe_processing(self, timings_s: dict[str, float], qc: dict[str, Any]) -> None:
        """Sub-stage durations of processing.run and the fit QC figures of one series."""
        for stage, seconds in timings_s.items():
            if stage in PROCESSING_STAGES:
                self.stage.labels(stage).observe(float(seconds))
        for figure in FIT_QC_FIGURES:
            v = qc.get(figure)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.fit_qc.labels(figure).set(float(v))

    def attach_state(self, source: Callable[[], dict[str, Any]]) -> None:
        """Register the scrape-time collector (``source`` returns registry/spool figures)."""
        self.registry.register(_StateCollector(source))

    def text(self) -> bytes:
        return generate_latest(self.registry)


def readiness_text(ok: bool, checks: dict[str, bool]) -> str:
    """The /readyz body: a verdict line, then one line per check. The verdict is "warming"
    when only the workers' warm-up is missing (the SCP already spools instances then)."""
    failed = [k for k, v in checks.items() if not v]
    if ok:
        verdict = "ready"
    elif failed == ["workers_warm"]:
        verdict = "warming"
    else:
        verdict = "not ready: " + ", ".join(failed)
    return verdict + "\n" + "".join(f"{k} {'ok' if v else 'FAIL'}\n" for k, v in checks.items())


class MetricsServer:
    """Threaded HTTP server: /metrics, /healthz (process alive), /readyz (``ready()``)."""

    def __init__(
        self,
        metrics: NodeMetrics,
        address: str,
        port: int,
        ready: Callable[[], tuple[bool, dict[str, bool]]],
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, outer.metrics.text(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif path == "/readyz":
                    ok, checks = outer.ready()
                    body = readiness_text(ok, checks)
                    self._send(200 if ok else 503, body.encode(), "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
                return

        self.metrics = metrics
        self.ready = ready
        self.httpd = ThreadingHTTPServer((address, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
