"""Read a series' spool files while the series is still arriving, so its job starts with
the parsed datasets (``pydicom.dcmread`` of 480 GE instances is ~0.6 s of node CPU that
would otherwise sit between the last instance received and the first processing stage).

One daemon thread takes "instance stored" notes (:meth:`SeriesPrefetch.instance_stored`,
O(1) under a lock: the C-STORE handler does nothing more) and reads the series' files
that are not cached yet. The job takes the cache (:meth:`SeriesPrefetch.take`) and
:func:`dicom_node.pipeline.load_datasets` uses a cached dataset only when the file's
``(inode, size, mtime_ns)`` is the one that was read (fstat of the open file), so a
re-sent or replaced instance is read again.

Memory: at most ``budget_bytes`` of file bytes cached over all series (``[node]
prefetch_max_bytes``). A series that would not fit (expected count x first file size) or
overflows it is dropped and not read again: its job reads all files as without prefetch,
so a large series (40x512x512) costs no more memory than before. A series leaving the
receive -> job path (quarantined, failed, removed, ...) is dropped too.

The thread is not reniced: it holds the GIL while parsing, and a thread the OS starves
while holding the GIL would stall the receive threads (priority inversion). It is kept
low-priority by yielding the GIL after every file and by batching notes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

__all__ = ["CachedFile", "SeriesPrefetch", "file_key"]

log = logging.getLogger("synthmr.prefetch")

#: ``(st_ino, st_size, st_mtime_ns)`` of a spool file: a replaced or rewritten file differs
FileKey = tuple[int, int, int]
#: path -> the key of the file that was read and its dataset
CachedFile = tuple[FileKey, Dataset]


def file_key(st: os.stat_result) -> FileKey:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class _Series:
    files: dict[str, CachedFile] = field(default_factory=dict)
    nbytes: int = 0
    expected: int | None = None


class SeriesPrefetch:
    """Per-series cache of parsed spool files, filled by one background thread.

    ``paths_of(series_uid)``: the series' spool files now (the registry's list)."""

    #: notes are gathered this long before a pass (a series arrives in bursts)
    BATCH_S = 0.05
    #: refused series remembered (a note of an older one only costs a wasted read-ahead)
    REFUSED_KEPT = 4096

    def __init__(self, paths_of: Callable[[str], list[str]], budget_bytes: int) -> None:
        self.paths_of = paths_of
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending: dict[str, int | None] = {}  # series -> expected count
        self._series: dict[str, _Series] = {}
        #: series not to read (taken by their job, dropped, over budget), oldest first
        self._refused: dict[str, None] = {}
        self._total = 0
        self._thread: threading.Thread | None = None
        #: files this thread read and cached (a figure for tests and benchmarks)
        self.read_files = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.budget_bytes <= 0:
            return
        self._thread = threading.Thread(target=self._loop, name="prefetch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        with self._lock:
            self._series.clear()
            self._pending.clear()
            self._total = 0

    # ------------------------------------------------------------------ notes
    def instance_stored(self, series_uid: str, n: int, expected: int | None) -> None:
        """An instance of ``series_uid`` is in the spool (the SCP's hook: cheap)."""
        if self._thread is None:
            return
        with self._lock:
            if series_uid in self._refused:
                return
            self._pending[series_uid] = expected
        self._wake.set()

    def drop(self, series_uid: str) -> None:
        """Forget a series' cache and read none of it until it is received again
        (:meth:`reopen`): it is quarantined, failed, over budget, ..."""
        with self._lock:
            self._forget(series_uid)

    def reopen(self, series_uid: str) -> None:
        """The series is receiving (again): its instances may be read ahead."""
        with self._lock:
            self._refused.pop(series_uid, None)

    def take(self, series_uid: str) -> dict[str, CachedFile]:
        """Hand the series' cache over to its job, and read none of it from now on."""
        with self._lock:
            entry = self._forget(series_uid)
        return entry.files if entry is not None else {}

    def _forget(self, series_uid: str) -> _Series | None:
        """(under the lock)"""
        self._pending.pop(series_uid, None)
        self._refused[series_uid] = None
        while len(self._refused) > self.REFUSED_KEPT:
            del self._refused[next(iter(self._refused))]  # the oldest
        entry = self._series.pop(series_uid, None)
        if entry is not None:
            self._total -= entry.nbytes
        return entry

    def cached_bytes(self) -> int:
        with self._lock:
            return self._total

    # ------------------------------------------------------------------ thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.wait(self.BATCH_S):
                return
            self._wake.clear()
            with self._lock:
                pending, self._pending = self._pending, {}
            for series_uid, expected in pending.items():
                if self._stop.is_set():
                    return
                try:
                    self._read_series(series_uid, expected)
                except Exception:  # the job reads what is missing; never kill the thread
                    log.exception("prefetch_failed")
                    self.drop(series_uid)

    def _read_series(self, series_uid: str, expected: int | None) -> None:
        paths = self.paths_of(series_uid)  # the registry, without this class's lock held
        with self._lock:
            if series_uid in self._refused:
                return
            entry = self._series.setdefault(series_uid, _Series())
            if expected is not None:
                entry.expected = expected
            todo = [p for p in paths if p not in entry.files]
        for path in todo:
            if self._stop.is_set():
                return
            try:
                with open(path, "rb") as fp:
                    key = file_key(os.fstat(fp.fileno()))
                    ds = pydicom.dcmread(fp)
            except (OSError, InvalidDicomError):
                continue  # removed or not readable: the job reads (or reports) it
            size = key[1]
            with self._lock:
                if self._series.get(series_uid) is not entry:
                    return  # taken by its job or dropped meanwhile
                first = not entry.files
                old = entry.files.get(path)
                grow = size - (old[0][1] if old else 0)
                projected = (entry.expected or 0) * size if first else 0
                if self._total + max(grow, projected) > self.budget_bytes:
                    over = True
                else:
                    over = False
                    entry.files[path] = (key, ds)
                    entry.nbytes += grow
                    self._total += grow
            if over:
                self.drop(series_uid)
                log.info("prefetch over budget: series %s left to its job", series_uid)
                return
            self.read_files += 1
            time.sleep(0)  # give the GIL to a receive thread that waits for it
