"""Registrar: the registry rows of received instances, written behind the C-STORE answer.

A C-STORE success status means the instance is on disk: its spool file is in place and the
ingest journal's group-committed ``fdatasync`` covers its bytes (DESIGN promise 1,
:mod:`dicom_node.journal`). Its registry row is not part of that promise (rows are
committed without a sync; :func:`dicom_node.scp.register_spooled` re-creates lost ones
from the files at start-up), so the C-STORE handler hands the row to this thread and
answers. The thread records what has queued up in one transaction
(:meth:`~dicom_node.registry.Registry.add_instances`: parallel associations share a
commit) and then runs the completion hook of each instance.

With 4 parallel senders the row cost the answer ~0.9 ms of waiting for the registry's lock
and the GIL (0.15 ms of CPU); behind the answer the receive rate rose by about a quarter.

What still holds at the answer:

* a SOP Instance UID already registered in another series (or queued here for one) is
  refused, as before: the handler asks :meth:`Registrar.pending_series` and the registry's
  reader (:class:`~dicom_node.registry.InstanceLookup`) before it answers;
* an association's rows are recorded before it is released: :meth:`Registrar.flush` runs
  before the A-RELEASE-RP is sent (dicom_node.reactor) and before the series are marked
  released, so completion and a peer that queries after its release see every row.

A row that fails to record (the database is locked, full or broken) is retried, with the
error logged, and never dropped: its file is on disk and in the journal either way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from dicom_node.logging import log_event
from dicom_node.registry import InstanceMovedError

__all__ = ["Registrar", "RowResult"]

log = logging.getLogger("synthmr.registrar")

#: (distinct instances of the series, expected count for an immediate completion), or the
#: reason the row was not recorded (its SOP Instance UID is in another series)
RowResult = tuple[int, "int | None"] | InstanceMovedError
#: records rows (keyword arguments of Registry.add_instance) in one transaction
RecordRows = Callable[[list[dict[str, Any]]], list[RowResult]]
#: called after a row is recorded: (its fields, its result)
OnRecorded = Callable[[dict[str, Any], RowResult], None]


class Registrar:
    """One thread that records queued instance rows in batches; thread-safe.

    ``record`` writes a batch (``Registry.add_instances``, or in an acceptor process the
    node process's); ``on_recorded`` runs per row after its batch committed.
    """

    #: rows per transaction at most (a transaction holds the registry's write lock)
    max_batch = 64
    #: first wait before retrying a batch that failed; doubles up to ``max_retry_s``
    retry_s = 0.05
    max_retry_s = 5.0

    def __init__(self, record: RecordRows, on_recorded: OnRecorded | None = None) -> None:
        self._record = record
        self._on_recorded = on_recorded
        self._cond = threading.Condition()
        self._queue: list[dict[str, Any]] = []
        #: SOP Instance UID -> (series, rows of it queued or being recorded)
        self._pending: dict[str, tuple[str, int]] = {}
        self._submitted = 0
        self._done = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ handler side
    def submit(self, row: dict[str, Any]) -> None:
        """Queue a stored instance's row (the keyword arguments of
        ``Registry.add_instance``)."""
        with self._cond:
            sop = row["sop_uid"]
            self._pending[sop] = (row["series_uid"], self._pending.get(sop, ("", 0))[1] + 1)
            self._queue.append(row)
            self._submitted += 1
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="registrar", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending_series(self, sop_uid: str) -> str | None:
        """The series of a queued, not yet recorded row of ``sop_uid``, if any."""
        with self._cond:
            pending = self._pending.get(sop_uid)
        return None if pending is None else pending[0]

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every row submitted before this call is recorded; False on timeout
        (the rows stay queued and are recorded later)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            while self._done < target:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Record what is queued, then end the thread (a new :meth:`submit` starts it
        again); False if rows were still queued at the timeout."""
        done = self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and done:
            thread.join(timeout)
        return done

    @property
    def queued(self) -> int:
        """Rows submitted and not yet recorded."""
        with self._cond:
            return self._submitted - self._done

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        delay = self.retry_s
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    self._thread = None
                    return
                batch = self._queue[: self.max_batch]
            try:
                results = self._record(batch)
            except Exception as exc:  # the rows stay queued: their files are on disk
                log_event(
                    log,
                    "registry_rows_failed",
                    level=logging.ERROR,
                    rows=len(batch),
                    retry_s=delay,
                    reason=repr(exc),
                )
                time.sleep(delay)
                delay = min(2 * delay, self.max_retry_s)
                continue
            delay = self.retry_s
            for row, result in zip(batch, results, strict=True):
                if isinstance(result, InstanceMovedError):
                    # another process took the UID for another series between this one's
                    # check and its row: the file stays (its content is not lost), unlisted
                    log_event(
                        log,
                        "instance_moved_after_answer",
                        level=logging.ERROR,
                        sop_uid=row["sop_uid"],
                        series_uid=row["series_uid"],
                        path=row["path"],
                        reason=str(result),
                    )
                if self._on_recorded is not None:
                    try:
                        self._on_recorded(row, result)
                    except Exception:  # a hook must not stop the recording of others
                        log.exception("after recording %s", row["sop_uid"])
            with self._cond:
                del self._queue[: len(batch)]
                for row in batch:
                    series, n = self._pending[row["sop_uid"]]
                    if n > 1:
                        self._pending[row["sop_uid"]] = (series, n - 1)
                    else:
                        del self._pending[row["sop_uid"]]
                self._done += len(batch)
                self._cond.notify_all()
