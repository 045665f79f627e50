"""When is a series complete?

1. The expected grid is full (``vendors.expected_count`` of its first instance, e.g.
   slices x echoes x delays x parts): complete at once, no waiting.
2. The expected count is unknown: complete after a quiet period that starts when the
   last association carrying the series was released (or aborted).
3. Ceiling: a series still RECEIVING ``ceiling_s`` after its first instance is
   QUARANTINED when its expected count is known and not reached (the missing cells are
   recorded), else handed to processing, where normalization decides.

A series re-opened by new or changed instances after it was processed (``revision`` > 0)
completes by rule 2 only, whatever its grid: a re-sent or corrected series makes one new
version once the sender is done, not one job per instance that fills the grid again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from dicom_node.config import CompletionSettings
from dicom_node.logging import log_event
from dicom_node.metrics import NodeMetrics
from dicom_node.registry import IllegalTransition, Registry, SeriesRow, State

__all__ = ["Completion", "decide"]

log = logging.getLogger("synthmr.completion")


def decide(row: SeriesRow, now: float, cfg: CompletionSettings) -> tuple[str, str] | None:
    """Pure decision for one RECEIVING series: ``("complete"|"quarantine", why)`` or None."""
    exp = row.expected_count
    full = exp is not None and row.n_instances >= exp
    if full and row.revision == 0:
        return "complete", f"grid full ({row.n_instances}/{exp} instances)"
    if now - row.first_received >= cfg.ceiling_s:
        if exp is not None and not full:
            return "quarantine", (
                f"incomplete after the {cfg.ceiling_s:g} s ceiling: {row.n_instances} of {exp} instances"
            )
        return "complete", f"ceiling {cfg.ceiling_s:g} s reached"
    if (
        (exp is None or row.revision > 0)
        and row.last_released is not None
        and row.last_released >= row.last_received
        and now - row.last_released >= cfg.quiet_period_s
    ):
        why = f"quiet for {cfg.quiet_period_s:g} s after association release"
        return "complete", why + (f" (revision {row.revision})" if row.revision else "")
    return None


MissingFn = Callable[[str], list[str]]


class Completion:
    """Watches RECEIVING series; ``on_complete(series_uid)`` is called after COMPLETE.

    ``missing_cells(series_uid)`` lists the missing grid cells of a partial series (from
    the vendor adapter); used when the ceiling quarantines it.
    """

    def __init__(
        self,
        cfg: CompletionSettings,
        registry: Registry,
        metrics: NodeMetrics,
        on_complete: Callable[[str], None],
        missing_cells: MissingFn | None = None,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.metrics = metrics
        self.on_complete = on_complete
        self.missing_cells = missing_cells
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def instance_stored(self, series_uid: str, n: int, expected: int | None) -> None:
        """Called from the C-STORE handler: a full grid completes right away."""
        if expected is not None and n >= expected:
            self._complete(series_uid, f"grid full ({n}/{expected} instances)")

    def _complete(self, series_uid: str, why: str) -> None:
        try:
            self.registry.transition(
                series_uid, State.COMPLETE, reason=why, expect={State.RECEIVING}
            )
        except IllegalTransition:
            return  # another thread got there first
        row = self.registry.series(series_uid)
        if row is not None:
            self.metrics.stage.labels("completion").observe(
                max(0.0, time.time() - row.last_received)
            )
        log_event(log, "series_complete", series_uid=series_uid, why=why)
        self.on_complete(series_uid)

    def _quarantine(self, series_uid: str, why: str) -> None:
        missing: list[str] = []
        if self.missing_cells is not None:
            try:
                missing = self.missing_cells(series_uid)
            except Exception as exc:
                missing = [f"could not list missing cells: {exc}"]
        try:
            self.registry.transition(
                series_uid, State.QUARANTINED, reason=why, missing=missing, expect={State.RECEIVING}
            )
        except IllegalTransition:
            return
        log_event(
            log,
            "series_quarantined",
            level=logging.WARNING,
            series_uid=series_uid,
            why=why,
            missing=missing,
        )

    def check(self, now: float | None = None) -> None:
        """One pass over RECEIVING series."""
        now = time.time() if now is None else now
        for row in self.registry.series_in(State.RECEIVING):
            d = decide(row, now, self.cfg)
            if d is None:
                continue
            action, why = d
            if action == "complete":
                self._complete(row.series_uid, why)
            else:
                self._quarantine(row.series_uid, why)

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.poll_interval_s):
            try:
                self.check()
            except Exception:
                log.exception("completion_error")
