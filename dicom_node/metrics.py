"""Prometheus metrics and the node's HTTP endpoint (/metrics, /healthz, /readyz).

The metric names below are a contract with deploy/ (alerts, dashboard): do not rename.
Each :class:`NodeMetrics` owns its own :class:`CollectorRegistry` so several nodes (tests)
can live in one process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
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

__all__ = ["STAGES", "MetricsServer", "NodeMetrics"]

# *_created series double the exposition for no operational value.
disable_created_metrics()

STAGES = ("receive", "completion", "queue", "normalize", "process", "export", "push", "end_to_end")
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
        self.instances = Counter(
            "synthmr_instances_received", "C-STORE requests by outcome", ["result"], registry=r
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
        # Pre-create label sets so dashboards see zeros instead of gaps.
        for v in ("accepted", "rejected"):
            self.associations.labels(v)
        for v in ("stored", "rejected", "failed"):
            self.instances.labels(v)
        for v in ("success", "failed", "ignored", "quarantined"):
            self.jobs.labels(v)
        for v in ("pass", "warn", "fail"):
            self.qc_status.labels(v)
        for st in STAGES:
            self.stage.labels(st)

    def attach_state(self, source: Callable[[], dict[str, Any]]) -> None:
        """Register the scrape-time collector (``source`` returns registry/spool figures)."""
        self.registry.register(_StateCollector(source))

    def text(self) -> bytes:
        return generate_latest(self.registry)


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
                    body = "".join(f"{k} {'ok' if v else 'FAIL'}\n" for k, v in checks.items())
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
