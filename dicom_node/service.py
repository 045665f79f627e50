"""The running node: wires spool, registry, SCP, completion, workers, outbox and metrics.

``Node(settings).start()`` / ``.stop()``; :func:`serve` runs until SIGTERM/SIGINT and
reloads the allow-list and destinations on SIGHUP (associations in flight continue).
``python -m dicom_node.service --config node.toml`` runs it without the CLI.

Start-up order: temp files removed -> registry recovery (PROCESSING jobs re-queued,
pending outbox kept) -> phase kernels and workers warmed -> SCP listening -> completion, jobs, outbox.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dicom_node.b1match import B1Match, match_b1_map, qalas_series_processed_before
from dicom_node.completion import Completion
from dicom_node.config import Settings, load_settings
from dicom_node.logging import configure_logging, log_context, log_event
from dicom_node.metrics import MetricsServer, NodeMetrics
from dicom_node.pipeline import (
    load_datasets,
    output_records,
    run_series_job,
    write_rejection_note,
)
from dicom_node.prefetch import SeriesPrefetch
from dicom_node.push import Outbox
from dicom_node.registry import FINAL_STATES, Registry, State
from dicom_node.results_retention import prune_results
from dicom_node.scp import StoreSCP, register_spooled
from dicom_node.series import B1_MAP_REASON, missing_cells
from dicom_node.spool import Spool, content_digest
from dicom_node.vendors import expected_count
from dicom_node.workers import Workers

__all__ = ["Node", "main", "retry_series", "serve"]

log = logging.getLogger("synthmr.node")

_JOB_RESULT = {
    State.EXPORTED: "success",
    State.FAILED: "failed",
    State.IGNORED: "ignored",
    State.QUARANTINED: "quarantined",
    State.HELD: "held",
}


#: a series in these states keeps its read-ahead datasets (dicom_node.prefetch) for its job
_PREFETCH_KEPT = frozenset({State.RECEIVING, State.COMPLETE, State.QUEUED, State.PROCESSING})


def _disk_full(reason: str) -> bool:
    """A job that failed because the spool's file system is full (it is re-run later)."""
    return "SpoolFullError" in reason or "[Errno 28]" in reason or "disk is full" in reason


def open_spool(settings: Settings) -> Spool:
    """The node's spool as configured. Write-behind only with one process storing into
    it: another process's acceptor could replace a file that this one writes out later."""
    behind = settings.spool.write_behind_bytes if settings.node.acceptor_processes <= 1 else 0
    return Spool(settings.spool.path, settings.spool.min_free_bytes, write_behind_bytes=behind)


class Node:
    """One synthmr node. Not reusable after :meth:`stop`."""

    def __init__(self, settings: Settings, config_path: str | None = None) -> None:
        self.settings = settings
        self.config_path = config_path or settings.source
        self.metrics = NodeMetrics()
        self.spool = open_spool(settings)
        self.registry = Registry(
            Path(settings.spool.path) / "registry.sqlite3", self._on_transition
        )
        self.registry.files_of = self.spool.write_pending  # write-behind: files before paths
        self.workers = Workers(settings.workers, settings.processing)
        self.completion = Completion(
            settings.completion,
            self.registry,
            self.metrics,
            on_complete=self._on_complete,
            missing_cells=lambda s: missing_cells(
                self.registry.instance_paths(s), self.settings.vendors
            ),
        )
        # the series' files are parsed while it arrives; its job takes them (_run_job_logged)
        self.prefetch = SeriesPrefetch(
            self.registry.instance_paths, settings.node.prefetch_max_bytes
        )

        def on_instance(series_uid: str, n: int, expected: int | None) -> None:
            self.prefetch.instance_stored(series_uid, n, expected)
            self.completion.instance_stored(series_uid, n, expected)

        self.scp = StoreSCP(
            settings,
            self.spool,
            self.registry,
            self.metrics,
            on_instance=on_instance,
            expected_count=lambda ds: expected_count(ds, self.settings.vendors),
        )
        self.outbox = Outbox(
            self.registry,
            settings.destinations,
            settings.retry,
            self.metrics,
            settings.node.ae_title,
            rejection_note=lambda ret: write_rejection_note(
                self.spool, self.registry.instance_paths(ret.series_uid), ret, self.settings
            ),
        )
        self.metrics.attach_state(self._state_figures)
        from dicom_node.qc_history import PhantomQCCollector

        self.metrics.registry.register(PhantomQCCollector(self.registry.path))
        self.metrics_server: MetricsServer | None = None
        self.web: Any = None  # dicom_node.web.server.WebServer when [web] enabled
        self._stop = threading.Event()
        self._jobs_wake = threading.Event()
        self._job_threads: list[threading.Thread] = []
        self._housekeeping_at = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Node:
        removed = self.spool.clean_tmp()
        recovered = self.registry.recover()
        # files acknowledged before a power loss took their (unsynced) registry rows
        reregistered = register_spooled(
            self.spool, self.registry, lambda ds: expected_count(ds, self.settings.vendors)
        )
        log_event(
            log,
            "node_recovered",
            temp_files_removed=removed,
            journal_files_restored=self.spool.replayed,
            instances_reregistered=reregistered,
            **recovered,
        )
        from dicom_node.warm_cache import freeze_start_up_objects, warm_without_compiling

        # normalization runs here, in the node process, not in the workers; a kernel the
        # numba cache lacks is compiled by a throwaway process (no compiler memory kept here)
        warm = warm_without_compiling("processing.phase:warmup")
        if warm["cache_missed"]:
            log_event(log, "node_kernels_compiled", **warm)
        # export runs here too: highdicom's import loads its standard tables (~1 s), not
        # while the first series waits
        import dicom_node.export  # noqa: F401

        freeze_start_up_objects()
        self.workers.start()
        self.prefetch.start()
        self.scp.start()
        self.completion.start()
        for i in range(self.settings.workers.processes):
            t = threading.Thread(target=self._job_loop, name=f"jobs-{i}", daemon=True)
            t.start()
            self._job_threads.append(t)
        self.outbox.start()
        m = self.settings.metrics
        if m.enabled:
            self.metrics_server = MetricsServer(self.metrics, m.address, m.port, self.ready)
            self.metrics_server.start()
        if self.settings.web.enabled:
            from dicom_node.web.glue import start_web

            self.web = start_web(self)
        log_event(
            log,
            "node_started",
            ae_title=self.settings.node.ae_title,
            port=self.scp.port,
            metrics_port=self.metrics_port,
            web_port=self.web.port if self.web else None,
        )
        return self

    def stop(self) -> None:
        self._stop.set()
        self._jobs_wake.set()
        if self.web is not None:
            self.web.stop()
        self.scp.stop()
        self.completion.stop()
        self.prefetch.stop()
        self.outbox.stop()
        for t in self._job_threads:
            # A job still running stays PROCESSING and is re-queued at the next start.
            t.join(timeout=10.0)
        self.workers.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.spool.close()
        self.registry.close()
        log_event(log, "node_stopped")

    @property
    def port(self) -> int:
        return self.scp.port

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server else None

    def reload(self, settings: Settings | None = None) -> None:
        """Apply a new allow-list and destinations (others need a restart)."""
        if settings is None:
            settings = load_settings(self.config_path)
        self.scp.reload(settings)
        self.outbox.reload(settings.destinations, settings.retry)
        log_event(
            log,
            "config_reloaded",
            allowed_callers=[c.ae_title for c in settings.security.allowed_callers],
            destinations=[d.name for d in settings.destinations],
        )

    def ready(self) -> tuple[bool, dict[str, bool]]:
        checks = {
            "scp_listening": self.scp.listening,
            "registry": self.registry.ok(),
            # room for one more instance of the largest size accepted above the watermark:
            # "ready" means the next C-STORE is not answered 0xA700
            "spool_above_watermark": self.spool.has_room(self.settings.node.max_instance_bytes),
            # numba kernels compiled / loaded in every worker: a series taken before that
            # would wait for the compile (~45 s on an empty cache; `synthmr warmup` fills it)
            "workers_warm": self.workers.warm,
        }
        return all(checks.values()), checks

    # ------------------------------------------------------------------ hooks
    def _state_figures(self) -> dict[str, Any]:
        return {
            "series": self.registry.state_counts(),
            "oldest_since": self.registry.oldest_since(),
            "outbox": self.registry.outbox_counts(),
            "free": self.spool.free_bytes(),
            "watermark": self.spool.min_free_bytes,
        }

    def _on_transition(self, series_uid: str, old: State | None, new: State, dt: float) -> None:
        self.metrics.transitions.labels(new.value).inc()
        if new == State.RECEIVING:
            self.prefetch.reopen(series_uid)
        elif new not in _PREFETCH_KEPT:  # quarantined, failed, ...: no job takes it
            self.prefetch.drop(series_uid)
        if new == State.DELIVERED:
            row = self.registry.series(series_uid)
            if row is not None:
                self.metrics.stage.labels("end_to_end").observe(time.time() - row.first_received)
        log_event(
            log,
            "series_state",
            series_uid=series_uid,
            from_state=old.value if old else None,
            to_state=new.value,
        )

    def _on_complete(self, series_uid: str) -> None:
        self.registry.enqueue(series_uid)
        self._jobs_wake.set()

    # ------------------------------------------------------------------ jobs
    def _job_loop(self) -> None:
        while not self._stop.is_set():
            claimed = None
            try:
                # a job needs room for its outputs: with the spool full it waits (a job that
                # hit a full disk was deferred, and runs again once space returns)
                if self.spool.has_room(self.settings.node.max_instance_bytes):
                    self.spool.ensure_reserve()
                    claimed = self.registry.claim_job()
            except Exception:
                log.exception("claim_failed")
            if claimed is None:
                self._housekeeping()
                self._jobs_wake.wait(0.5)
                self._jobs_wake.clear()
                continue
            job_id, series_uid, waited = claimed
            self.metrics.stage.labels("queue").observe(waited)
            try:
                self._run_job(job_id, series_uid)
            except Exception:  # the job thread outlives any one job (it stays PROCESSING
                # and is re-queued at the next start); log it and go on with the queue
                log.exception("job_thread_error")
                self._stop.wait(1.0)

    def _run_job(self, job_id: int, series_uid: str) -> None:
        with log_context(series_uid=series_uid, job_id=job_id):
            self._run_job_logged(job_id, series_uid)

    def _run_job_logged(self, job_id: int, series_uid: str) -> None:
        delay = self.settings.workers.debug_job_delay_s
        if delay > 0 and self._stop.wait(delay):
            return  # stopping: the job stays PROCESSING and is re-queued at next start
        b1 = self._b1_match(job_id, series_uid)
        if b1 is not None and b1.wait_until is not None:
            return  # deferred: a B1-map series of the study may still come
        log_event(log, "job_started", series_uid=series_uid, job_id=job_id)
        streamed: list[tuple[str, str, str, str]] = []
        written: list[tuple[str, str, str]] = []  # streamed outputs, with or without rows

        def on_outputs(outputs: list[tuple[str, str, str]]) -> None:
            written.extend(outputs)
            streamed.extend(self._stream_outputs(series_uid, outputs))

        outcome = run_series_job(
            series_uid,
            self.registry.instance_paths(series_uid),
            self.settings,
            self.spool,
            self.workers.submit,
            self.metrics,
            timeout_s=self.settings.workers.job_timeout_s,
            on_outputs=on_outputs,
            b1_map=b1.b1_map if b1 is not None else None,
            b1_notes=b1.notes if b1 is not None else (),
            cached=self.prefetch.take(series_uid),
        )
        if self._stop.is_set():
            return  # shutting down: left PROCESSING, re-run (same output UIDs) at next start
        if outcome.state == State.FAILED and _disk_full(outcome.reason):
            self._defer_on_full_disk(job_id, series_uid, outcome.reason, written)
            return
        if outcome.state == State.FAILED and "BrokenProcessPool" in outcome.reason:
            self.workers.restart()
        if outcome.stage and outcome.state in (State.FAILED, State.QUARANTINED):
            self.metrics.processing_errors.labels(outcome.stage).inc()
        # streamed outputs are in the outbox already (_stream_outputs); held ones (QC gate)
        # were not streamed and go in now, as HELD rows
        rows = (
            []
            if streamed
            else [
                (d.name, sop, cls, path)
                for sop, cls, path in outcome.outputs
                for d in self.outbox.destinations.values()
            ]
        )
        self.registry.finish_job(
            job_id,
            series_uid,
            outcome.state,
            outcome.reason,
            outcome.missing,
            rows,
            outputs=self._records(outcome.outputs, outcome.output_uids),
        )
        self.metrics.jobs.labels(_JOB_RESULT[outcome.state]).inc()
        # the inputs' content digests, which the answers did not compute: a re-send of the
        # series is compared with them even after retention removed its files
        self.registry.fill_digests(series_uid, lambda p: content_digest(Path(p).read_bytes()))
        if outcome.state == State.IGNORED and outcome.reason.startswith(B1_MAP_REASON):
            self._late_b1_map(series_uid)
        if outcome.fit_failed_fraction is not None:
            self.metrics.fit_failed_fraction.set(outcome.fit_failed_fraction)
        if outcome.qc_status in ("pass", "warn", "fail"):
            self.metrics.qc_status.labels(outcome.qc_status).inc()
        self.metrics.observe_processing(outcome.processing_timings_s, outcome.qc_figures)
        log_event(
            log,
            "job_finished",
            series_uid=series_uid,
            job_id=job_id,
            state=outcome.state.value,
            reason=outcome.reason,
            missing=outcome.missing,
            timings_s=outcome.timings_s,
            processing_timings_s=outcome.processing_timings_s,
        )

    def _b1_match(self, job_id: int, series_uid: str) -> B1Match | None:
        """The B1 map for a 3D-QALAS series (None: not QALAS). While one may still come
        the job is deferred in the registry (returned with ``wait_until``)."""
        c = self.settings.completion
        try:
            found = match_b1_map(
                self.registry, series_uid, c.b1_map_wait_s, c.quiet_period_s, time.time(),
                load_datasets,
            )  # fmt: skip
        except Exception as exc:  # matching must not cost the series: fit without
            log_event(log, "b1_match_failed", level=logging.WARNING, error=str(exc))
            return B1Match(notes=[f"QALAS: B1-map matching failed ({exc}); nominal B1"])
        if found is None or found.wait_until is None:
            if found is not None:
                uid = found.b1_map.source.get("series_uid") if found.b1_map else None
                log_event(log, "b1_map_matched", b1_series_uid=uid, notes=found.notes)
            return found
        self.registry.defer_job(
            job_id,
            series_uid,
            "3D-QALAS: waiting for a B1-map series of the same study"
            + (f" ({found.waiting_for} still being received)" if found.waiting_for else ""),
            found.wait_until,
        )
        log_event(
            log, "b1_map_wait", until=found.wait_until, b1_series_uid=found.waiting_for or None
        )
        self._jobs_wake.set()
        return found

    def _late_b1_map(self, b1_series_uid: str) -> None:
        """A B1-map series whose study's QALAS series was processed already: say so."""
        try:
            late = qalas_series_processed_before(self.registry, b1_series_uid)
        except Exception:
            return
        for uid in late:
            log_event(
                log,
                "b1_map_after_qalas",
                level=logging.WARNING,
                b1_series_uid=b1_series_uid,
                qalas_series_uid=uid,
                hint=f"not applied automatically; `synthmr retry {uid}` re-processes with it",
            )

    def _records(
        self, outputs: list[tuple[str, str, str]], known: dict[str, tuple[str, str]]
    ) -> list[Any] | None:
        """This version's outputs for the registry (None: unreadable, no versioning)."""
        try:
            return output_records(outputs, known)
        except Exception as exc:
            log_event(log, "output_records_failed", level=logging.ERROR, error=str(exc))
            return None

    def _defer_on_full_disk(
        self,
        job_id: int,
        series_uid: str,
        reason: str,
        written: list[tuple[str, str, str]],
    ) -> None:
        """Put a job that met a full disk back in the queue, and remove the outputs it had
        written so far and their unsent outbox rows (the re-run writes them again, same UIDs). The spool's reserve
        is released first so the registry can commit; until it can, retry (the job thread
        must survive whatever the disk does)."""
        freed = self.spool.release_reserve()
        while True:
            try:
                dropped = self.registry.defer_job(
                    job_id,
                    series_uid,
                    f"waiting for spool space: {reason}",
                    time.time() + 5,
                    drop_unsent=[sop for sop, _, _ in written],
                )
                break
            except sqlite3.OperationalError as exc:
                log_event(log, "job_defer_failed", level=logging.ERROR, reason=str(exc))
                if self._stop.wait(1.0):
                    return  # left PROCESSING: re-queued at the next start
        removed = {path for _, _, path in written} | set(dropped)
        for path in removed:
            Path(path).unlink(missing_ok=True)
        log_event(
            log,
            "job_deferred",
            level=logging.WARNING,
            reason=reason,
            reserve_released_bytes=freed,
            outputs_removed=len(removed),
        )

    def _stream_outputs(
        self, series_uid: str, outputs: list[tuple[str, str, str]]
    ) -> list[tuple[str, str, str, str]]:
        """An output series is durable: queue it for every destination and wake the push,
        which sends it while the job encodes the next one. Returns the rows queued."""
        rows = [
            (d.name, sop, cls, path)
            for sop, cls, path in outputs
            for d in self.outbox.destinations.values()
        ]
        if rows:
            self.registry.add_outbox(series_uid, rows)
            self.outbox.wake()
        return rows

    def _housekeeping(self) -> None:
        """Remove spool files of finished series older than the retention period, and
        stored results by ``[retention] results_days`` / ``results_max_gb``."""
        now = time.time()
        if now < self._housekeeping_at:
            return
        self._housekeeping_at = now + 60.0
        horizon = now - self.settings.retention.days * 86400.0
        for row in self.registry.series_in(*FINAL_STATES):
            if row.state_since < horizon and row.state in (State.DELIVERED, State.IGNORED):
                self.spool.remove_series(row.series_uid, "incoming")
                self.spool.remove_series(row.series_uid, "outbox")
        ret = self.settings.retention
        try:
            removed = prune_results(
                self.spool.root, self.registry, ret.results_days, ret.results_max_gb, now
            )
        except OSError as exc:  # a full or read-only disk must not stop the job loop
            log_event(log, "results_retention_failed", level=logging.ERROR, error=str(exc))
            removed = []
        for _, reason in removed:
            self.metrics.results_removed.labels(reason).inc()


def retry_series(settings: Settings, series_uid: str) -> int:
    """Operator retry (``synthmr retry``): re-queue a FAILED / QUARANTINED / IGNORED /
    DELIVERED series and its dead-letter outbox items. Works while the node runs: its job
    threads pick up QUEUED jobs from the registry. Returns the new job id."""
    reg = Registry(Path(settings.spool.path) / "registry.sqlite3")
    try:
        reg.requeue_dead_outbox(series_uid)
        return reg.retry(series_uid)
    finally:
        reg.close()


def serve(settings: Settings, config_path: str | None = None) -> int:
    """Run a node until SIGTERM/SIGINT; SIGHUP reloads allow-list and destinations."""
    configure_logging(settings.logging.level, settings.logging.json)
    node = Node(settings, config_path).start()
    done = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        log_event(log, "signal", signal=signal.Signals(signum).name)
        done.set()

    def _hup(signum: int, frame: Any) -> None:
        try:
            node.reload()
        except Exception as exc:  # a bad file keeps the old settings
            log_event(log, "config_reload_failed", level=logging.ERROR, error=str(exc))

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _hup)
    while not done.wait(1.0):
        pass
    node.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dicom_node.service")
    p.add_argument("--config", "-c", default=None)
    args = p.parse_args(argv)
    return serve(load_settings(args.config), args.config)


if __name__ == "__main__":
    sys.exit(main())
