"""SQLite (WAL, synchronous=FULL) state of the node: instances, series, jobs, outbox.

Series life::

    RECEIVING -> COMPLETE -> QUEUED -> PROCESSING -> EXPORTED -> DELIVERED
    or IGNORED (not MDME), QUARANTINED (grid incomplete; missing cells recorded),
    FAILED (reason recorded; :meth:`Registry.retry` re-queues),
    HELD (QC failed: outputs written, their outbox rows HELD; :meth:`Registry.release_held`
    sends them: HELD -> EXPORTED -> DELIVERED).

Every state change is one transaction. One connection shared by the node's threads under
a lock (SQLite serializes writers anyway); all writes happen in the node process.

The receive path's rows are the exception: an instance of a series this registry knows to
be RECEIVING (learnt by a full transaction less than ``FAST_SERIES_TTL_S`` ago, nobody
else having taken the lock since) is answered from memory, its row written with the
others 50 ms later, at 256 rows, or before anyone else takes the lock (so every reader in
the node sees every answered instance). A row that a crash takes with it is re-created
from its spooled file at the next start, as after a power loss (DESIGN promise 1 rests on
the file and the ingest journal, never on this row).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = [
    "IllegalTransition",
    "InstanceMovedError",
    "OutboxItem",
    "Registry",
    "Retirement",
    "SeriesRow",
    "State",
    "series_timings",
]


class State(StrEnum):
    RECEIVING = "RECEIVING"
    COMPLETE = "COMPLETE"
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    EXPORTED = "EXPORTED"
    DELIVERED = "DELIVERED"
    IGNORED = "IGNORED"
    QUARANTINED = "QUARANTINED"
    FAILED = "FAILED"
    HELD = "HELD"


FINAL_STATES = frozenset(
    {State.DELIVERED, State.IGNORED, State.QUARANTINED, State.FAILED, State.HELD}
)

# Allowed transitions; FAILED/QUARANTINED may be retried (-> QUEUED), a late instance
# re-opens a COMPLETE/QUARANTINED/IGNORED series (-> RECEIVING).
_ALLOWED: dict[State, set[State]] = {
    State.RECEIVING: {State.COMPLETE, State.QUARANTINED},
    State.COMPLETE: {State.QUEUED, State.RECEIVING},
    State.QUEUED: {State.PROCESSING},
    State.PROCESSING: {
        State.EXPORTED,
        State.IGNORED,
        State.QUARANTINED,
        State.FAILED,
        State.HELD,
        State.QUEUED,
    },
    State.EXPORTED: {State.DELIVERED, State.FAILED, State.QUEUED, State.RECEIVING},
    State.HELD: {State.EXPORTED, State.QUEUED, State.RECEIVING},
    State.DELIVERED: {State.QUEUED, State.RECEIVING},
    State.IGNORED: {State.QUEUED, State.RECEIVING},
    State.QUARANTINED: {State.QUEUED, State.RECEIVING},
    State.FAILED: {State.QUEUED, State.RECEIVING},
}


class IllegalTransition(RuntimeError):
    """A state change that the series life does not allow."""


class InstanceMovedError(ValueError):
    """A known SOP Instance UID arrived in another series (a UID names one object)."""


@dataclass(frozen=True)
class Retirement:
    """Outputs a destination holds that a newer version of their source series superseded:
    ``instances`` are ``(sop_uid, sop_class_uid, study_uid, series_uid)``."""

    destination: str
    series_uid: str
    outbox_ids: tuple[int, ...]
    instances: tuple[tuple[str, str, str, str], ...]


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    state: State
    reason: str
    missing: list[str]
    expected_count: int | None
    n_instances: int
    first_received: float
    last_received: float
    last_released: float | None
    state_since: float
    calling_ae: str
    #: 0 for the first instance set; +1 each time changed instances re-open the series
    revision: int = 0


@dataclass(frozen=True)
class OutboxItem:
    id: int
    series_uid: str
    destination: str
    sop_uid: str
    sop_class_uid: str
    path: str
    attempts: int


_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    missing TEXT NOT NULL DEFAULT '[]',
    expected_count INTEGER,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    last_released REAL,
    state_since REAL NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL REFERENCES series(series_uid),
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL REFERENCES series(series_uid),
    state TEXT NOT NULL,          -- QUEUED, PROCESSING, DONE, FAILED
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,          -- PENDING, SENT, DEAD
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    sent_at REAL,
    UNIQUE(destination, sop_uid)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS outputs (
    sop_uid TEXT PRIMARY KEY,
    source_series_uid TEXT NOT NULL,
    inputs_sha256 TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    created_at REAL NOT NULL,
    superseded_at REAL
);
CREATE INDEX IF NOT EXISTS outputs_source ON outputs(source_series_uid);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    user TEXT NOT NULL,
    role TEXT NOT NULL DEFAULT '',
    action TEXT NOT NULL,
    series_uid TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    remote TEXT NOT NULL DEFAULT ''
);
"""

TransitionHook = Callable[[str, "State | None", State, float], None]

_INSERT_INSTANCE = (
    "INSERT INTO instances(sop_uid, series_uid, sop_class_uid, path, size,"
    " received_at, sha256) VALUES (?,?,?,?,?,?,?) ON CONFLICT(sop_uid) DO UPDATE"
    " SET sop_class_uid=excluded.sop_class_uid, path=excluded.path,"
    " size=excluded.size, received_at=excluded.received_at,"
    " sha256=excluded.sha256"
)


@dataclass(slots=True)
class _KnownSeries:
    """What the fast path of :meth:`Registry.add_instance` knows of a RECEIVING series."""

    count: int  # instances, pending rows included
    revision: int
    expected: int | None  # expected instance count
    learnt: float  # monotonic seconds, when a full transaction read it


class _RegistryLock:
    """The registry's lock (re-entrant). Taking it at the first level writes the instance
    rows that :meth:`Registry.add_instance` answered without a transaction of their own,
    and forgets what it knew of the series they went to: whoever holds the lock sees the
    database complete and may change any series. :meth:`fast` takes it without either
    (the receive path's own entry)."""

    def __init__(self, write_pending: Callable[[], None]) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._write_pending = write_pending
        self._fast_entry = _FastEntry(self)

    def __enter__(self) -> _RegistryLock:
        self._lock.acquire()
        self._depth += 1
        if self._depth == 1:
            try:
                self._write_pending()
            except BaseException:
                self._depth -= 1
                self._lock.release()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        self._lock.release()

    def fast(self) -> _FastEntry:
        return self._fast_entry


class _FastEntry:
    __slots__ = ("_owner",)

    def __init__(self, owner: _RegistryLock) -> None:
        self._owner = owner

    def __enter__(self) -> None:
        owner = self._owner
        owner._lock.acquire()
        owner._depth += 1

    def __exit__(self, *exc: object) -> None:
        owner = self._owner
        owner._depth -= 1
        owner._lock.release()


class Registry:
    """Durable node state. ``on_transition(series_uid, old, new, seconds_in_old)``
    is called after each committed state change (metrics)."""

    def __init__(self, path: str | Path, on_transition: TransitionHook | None = None) -> None:
        self.path = str(path)
        # Instances answered on the fast path of add_instance, not yet in SQLite: their
        # rows, SOP Instance UID -> series, and per series (last received, expected count).
        # Written in one transaction FAST_ROWS_DELAY_S after the first, at FAST_ROWS_MAX,
        # or before anyone else takes the lock.
        self._pending_rows: list[tuple[Any, ...]] = []
        self._pending_sops: dict[str, str] = {}
        self._pending_series: dict[str, tuple[float, int | None]] = {}
        #: RECEIVING series add_instance may answer without a transaction; forgotten whenever
        #: anyone else takes the lock, and after FAST_SERIES_TTL_S (another process, such as
        #: the command line, may change a series: what this one knows of it is that recent)
        self._hot: dict[str, _KnownSeries] = {}
        self._flusher: threading.Thread | None = None
        self._flush_due = threading.Event()
        self._closed = False
        self._lock = _RegistryLock(self._write_pending)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._synchronous_full = True  # the connection's mode now (_tx switches it)
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._migrate()
        self.on_transition = on_transition
        #: called with a series UID before its paths are handed out: writes the series'
        #: files the spool still holds in memory (``Spool.write_pending``; write-behind)
        self.files_of: Callable[[str], object] | None = None

    def _migrate(self) -> None:
        """Columns added after the first release (an older registry gains them)."""
        added = {
            "instances": [("sha256", "TEXT NOT NULL DEFAULT ''")],
            "series": [
                ("revision", "INTEGER NOT NULL DEFAULT 0"),
                ("changed_while_processing", "INTEGER NOT NULL DEFAULT 0"),
            ],
            "jobs": [("not_before", "REAL NOT NULL DEFAULT 0")],
        }
        with self._lock:
            for table, columns in added.items():
                have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns:
                    if name not in have:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")

    def close(self) -> None:
        with self._lock:  # writes the pending rows
            self._closed = True
            self._db.close()
        self._flush_due.set()

    #: seconds an instance row answered on the fast path waits for its transaction, and
    #: the most rows that wait
    FAST_ROWS_DELAY_S = 0.05
    FAST_ROWS_MAX = 256
    FAST_SERIES_TTL_S = 0.5

    def flush(self) -> None:
        """Write the instance rows answered without a transaction of their own now (the
        start-up's re-registration does, so that they are on disk before it reports)."""
        with self._lock.fast():
            self._write_rows()

    def _write_pending(self) -> None:
        """Write the rows add_instance answered on its fast path (one transaction) and
        forget the series it could answer so (the lock's holder may change them). Called
        with the lock held."""
        self._hot.clear()
        self._write_rows()

    def _write_rows(self) -> None:
        """Write the fast path's pending rows (with the lock held)."""
        if not self._pending_rows:
            return
        rows, series = self._pending_rows, self._pending_series
        with self._tx(fsync=False) as db:
            db.executemany(_INSERT_INSTANCE, rows)
            db.executemany(
                "UPDATE series SET last_received=MAX(COALESCE(last_received, 0), ?),"
                " expected_count=COALESCE(expected_count, ?) WHERE series_uid=?",
                [(last, expected, uid) for uid, (last, expected) in series.items()],
            )
        self._pending_rows, self._pending_series = [], {}
        self._pending_sops.clear()

    def _flush_loop(self) -> None:
        while True:
            self._flush_due.wait()
            if self._closed:
                return
            time.sleep(self.FAST_ROWS_DELAY_S)
            self._flush_due.clear()
            try:
                self.flush()  # nothing is pending once closed
            except sqlite3.Error:
                time.sleep(1.0)  # the next holder of the lock tries again
                self._flush_due.set()

    def _answer_fast(
        self,
        sop_uid: str,
        series_uid: str,
        row: tuple[Any, ...],
        now: float,
        expected_count: int | None,
    ) -> tuple[int, int | None] | None:
        """add_instance without a transaction, when nothing but a count changes: a new
        SOP Instance UID of a series known RECEIVING since the lock was last taken by
        anyone else. None: the full path decides."""
        with self._lock.fast():
            hot = self._hot.get(series_uid)
            if hot is None or sop_uid in self._pending_sops or self._closed:
                return None
            if time.monotonic() - hot.learnt > self.FAST_SERIES_TTL_S:
                return None  # learnt again by the full path
            if self._db.execute("SELECT 1 FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone():
                return None  # a re-send, or an instance of another series
            if hot.expected is None:
                hot.expected = expected_count
            self._pending_rows.append(row)
            self._pending_sops[sop_uid] = series_uid
            self._pending_series[series_uid] = (now, hot.expected)
            hot.count += 1
            answer = hot.count, (hot.expected if hot.revision == 0 else None)
            if len(self._pending_rows) >= self.FAST_ROWS_MAX:
                self._write_rows()
            elif len(self._pending_rows) == 1:
                if self._flusher is None:
                    self._flusher = threading.Thread(
                        target=self._flush_loop, name="registry-rows", daemon=True
                    )
                    self._flusher.start()
                self._flush_due.set()
            return answer

    @contextmanager
    def _tx(self, fsync: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction. ``fsync=False`` commits without syncing the WAL (synchronous=
        NORMAL): safe against a killed process (the commit is in the OS's cache), lost only
        with the machine (power loss), and then the next FULL commit or checkpoint syncs it."""
        with self._lock:
            # the mode is switched only when it changes: consecutive receive-path
            # transactions (one per instance) run without two PRAGMAs each
            if fsync != self._synchronous_full:
                self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
                self._synchronous_full = fsync
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def ok(self) -> bool:
        """True when the database answers (readiness)."""
        try:
            with self._lock:
                self._db.execute("SELECT 1").fetchone()
            return True
        except sqlite3.Error:
            return False

    # ------------------------------------------------------------------ transitions
    def _set_state(
        self,
        db: sqlite3.Connection,
        series_uid: str,
        new: State,
        reason: str = "",
        missing: list[str] | None = None,
        expect: set[State] | None = None,
    ) -> tuple[State, float]:
        row = db.execute(
            "SELECT state, state_since FROM series WHERE series_uid=?", (series_uid,)
        ).fetchone()
        if row is None:
            raise KeyError(f"unknown series {series_uid}")
        old = State(row["state"])
        if expect is not None and old not in expect:
            raise IllegalTransition(
                f"series {series_uid}: in {old}, expected one of {sorted(expect)}"
            )
        if new not in _ALLOWED[old]:
            raise IllegalTransition(f"series {series_uid}: {old} -> {new} is not allowed")
        now = time.time()
        db.execute(
            "UPDATE series SET state=?, reason=?, missing=?, state_since=? WHERE series_uid=?",
            (new.value, reason, json.dumps(missing or []), now, series_uid),
        )
        db.execute(
            "INSERT INTO transitions(series_uid, from_state, to_state, at, reason) VALUES (?,?,?,?,?)",
            (series_uid, old.value, new.value, now, reason),
        )
        return old, now - float(row["state_since"])

    def _notify(self, series_uid: str, old: State | None, new: State, dt: float) -> None:
        if self.on_transition is not None:
            self.on_transition(series_uid, old, new, dt)

    def transition(
        self,
        series_uid: str,
        new: State,
        reason: str = "",
        missing: list[str] | None = None,
        expect: set[State] | None = None,
    ) -> State:
        """Change a series' state in one transaction; return the previous state."""
        with self._tx() as db:
            old, dt = self._set_state(db, series_uid, new, reason, missing, expect)
        self._notify(series_uid, old, new, dt)
        return old

    # ------------------------------------------------------------------ instances
    def add_instance(
        self,
        *,
        sop_uid: str,
        series_uid: str,
        study_uid: str,
        sop_class_uid: str,
        path: str,
        size: int,
        calling_ae: str = "",
        expected_count: int | None = None,
        sha256: str = "",
        replaced_sha256: str | None = None,
    ) -> tuple[int, int | None]:
        """Record a stored instance; return (distinct instances, expected count for an
        immediate completion).

        Creates the series in RECEIVING. A re-sent instance with the same content
        (``sha256``) changes nothing: no re-open, no job. The receive path hashes only a
        re-sent instance (``Spool.receive``): a new one's row keeps an empty digest until
        :meth:`fill_digests`, and a re-send brings the digest of the file it replaced
        (``replaced_sha256``). A new or changed instance re-opens a series that was
        COMPLETE, EXPORTED or final (-> RECEIVING, ``revision`` + 1) or marks a PROCESSING
        one to re-open when its job ends; a revised series completes
        after the quiet period only (the expected count returned is then None), so a
        changed set makes one new version, not one per instance. A SOP Instance UID known
        in another series raises :class:`InstanceMovedError` (nothing recorded).

        Committed without an fsync of its own (the C-STORE answer waits for it): the durable
        record of a received instance is its spooled file, made durable by the ingest
        journal (DESIGN promise 1, :mod:`dicom_node.journal`), and a row that a power loss
        takes with it is re-created from that file at the next start (:meth:`known_paths`,
        :func:`dicom_node.scp.register_spooled`, after the journal's replay).
        """
        now = time.time()
        row_values = (sop_uid, series_uid, sop_class_uid, path, size, now, sha256)
        fast = self._answer_fast(sop_uid, series_uid, row_values, now, expected_count)
        if fast is not None:
            return fast
        created = reopened = None
        with self._lock.fast():
            # this series' rows and every other's pending ones first; what is known of
            # the other series stays (nothing here changes them)
            self._hot.pop(series_uid, None)
            self._write_rows()
            with self._tx(fsync=False) as db:
                known = db.execute(
                    "SELECT series_uid, sha256 FROM instances WHERE sop_uid=?", (sop_uid,)
                ).fetchone()
                if known is not None and known["series_uid"] != series_uid:
                    raise InstanceMovedError(
                        f"SOP Instance UID {sop_uid} is already part of series {known['series_uid']}"
                    )
                old = "" if known is None else (known["sha256"] or replaced_sha256 or "")
                same = known is not None and bool(sha256) and old == sha256
                # the series' count comes with it: what the answer needs is known without a
                # query after the writes unless the series re-opens (rare)
                row = db.execute(
                    "SELECT state, expected_count, revision,"
                    " (SELECT COUNT(*) FROM instances WHERE series_uid=?) FROM series"
                    " WHERE series_uid=?",
                    (series_uid, series_uid),
                ).fetchone()
                after: tuple[Any, ...] | None = None  # (expected, revision, state, count)
                if row is None:
                    db.execute(
                        "INSERT INTO series(series_uid, study_uid, state, expected_count,"
                        " first_received, last_received, state_since, calling_ae)"
                        " VALUES (?,?,?,?,?,?,?,?)",
                        (
                            series_uid,
                            study_uid,
                            State.RECEIVING.value,
                            expected_count,
                            now,
                            now,
                            now,
                            calling_ae,
                        ),
                    )
                    db.execute(
                        "INSERT INTO transitions(series_uid, from_state, to_state, at) VALUES (?,?,?,?)",
                        (series_uid, None, State.RECEIVING.value, now),
                    )
                    created = True
                    after = (expected_count, 0, State.RECEIVING.value, 1)
                elif not same:
                    state = State(row["state"])
                    if state in (State.COMPLETE, State.EXPORTED, *FINAL_STATES):
                        reopened = self._reopen(db, series_uid, "new or changed instance", now)
                    elif state == State.PROCESSING:
                        db.execute(
                            "UPDATE series SET changed_while_processing=1 WHERE series_uid=?",
                            (series_uid,),
                        )
                    db.execute(
                        "UPDATE series SET last_received=?,"
                        " expected_count=COALESCE(expected_count, ?) WHERE series_uid=?",
                        (now, expected_count, series_uid),
                    )
                    if reopened is None:
                        expected = row[1] if row[1] is not None else expected_count
                        after = (expected, row[2], row[0], row[3] + int(known is None))
                else:
                    after = (row[1], row[2], row[0], row[3])
                if not same:
                    db.execute(_INSERT_INSTANCE, row_values)
                r = (
                    after
                    or db.execute(
                        "SELECT expected_count, revision, state, (SELECT COUNT(*) FROM instances"
                        " WHERE series_uid=?) FROM series WHERE series_uid=?",
                        (series_uid, series_uid),
                    ).fetchone()
                )
            if r[2] == State.RECEIVING.value:  # the next instances may take the fast path
                self._hot[series_uid] = _KnownSeries(int(r[3]), r[1], r[0], time.monotonic())
        if created:
            self._notify(series_uid, None, State.RECEIVING, 0.0)
        if reopened:
            self._notify(series_uid, reopened[0], State.RECEIVING, reopened[1])
        immediate = r[0] if r[1] == 0 and r[2] == State.RECEIVING.value else None
        return int(r[3]), immediate

    def _reopen(
        self, db: sqlite3.Connection, series_uid: str, why: str, now: float
    ) -> tuple[State, float]:
        """-> RECEIVING as a new revision; its ceiling counts from now."""
        old = self._set_state(db, series_uid, State.RECEIVING, why)
        db.execute(
            "UPDATE series SET revision=revision+1, first_received=?, last_released=NULL,"
            " changed_while_processing=0 WHERE series_uid=?",
            (now, series_uid),
        )
        return old

    def fill_digests(self, series_uid: str, digest_of: Callable[[str], str]) -> int:
        """Store the content digest, ``digest_of(path)``, of the series' instances that
        have none (received new: not hashed on the answer path); return how many. Run
        after the series' job: a re-send after retention removed the files is still
        compared. A file that is gone is skipped."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_uid, path FROM instances WHERE series_uid=? AND sha256=''",
                (series_uid,),
            ).fetchall()
        digests = []
        for sop, path in rows:
            try:
                digests.append((digest_of(path), sop))
            except OSError:
                continue
        if digests:
            with self._tx() as db:  # a re-send meanwhile stored its own: kept
                db.executemany(
                    "UPDATE instances SET sha256=? WHERE sop_uid=? AND sha256=''", digests
                )
        return len(digests)

    def inputs_sha256(self, series_uid: str) -> str:
        """sha256 over the series' instances (SOP UID and content digest, sorted): what a
        job of this series processes. Same instance set, same digest."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_uid, sha256 FROM instances WHERE series_uid=? ORDER BY sop_uid",
                (series_uid,),
            ).fetchall()
        h = hashlib.sha256()
        for sop, sha in rows:
            h.update(f"{sop}:{sha}\n".encode())
        return h.hexdigest()

    def known_paths(self) -> set[str]:
        """Every registered instance's spool path."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT path FROM instances").fetchall()}

    def instance_paths(self, series_uid: str) -> list[str]:
        """The series' received files, each on disk when this returns: the spool's
        held-back files of the series are written out first (:attr:`files_of`)."""
        if self.files_of is not None:
            self.files_of(series_uid)
        with self._lock:
            rows = self._db.execute(
                "SELECT path FROM instances WHERE series_uid=? ORDER BY sop_uid", (series_uid,)
            ).fetchall()
        return [r[0] for r in rows]

    def mark_released(self, series_uids: list[str]) -> None:
        """An association that carried these series was released or aborted."""
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "UPDATE series SET last_released=? WHERE series_uid=?",
                [(now, s) for s in series_uids],
            )

    # ------------------------------------------------------------------ series queries
    def series(self, series_uid: str) -> SeriesRow | None:
        with self._lock:
            r = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_uid=s.series_uid)"
                " AS n FROM series s WHERE series_uid=?",
                (series_uid,),
            ).fetchone()
        return None if r is None else self._row(r)

    def series_in(self, *states: State) -> list[SeriesRow]:
        q = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_uid=s.series_uid)"
                f" AS n FROM series s WHERE state IN ({q}) ORDER BY first_received",
                [s.value for s in states],
            ).fetchall()
        return [self._row(r) for r in rows]

    def series_of_study(self, study_uid: str) -> list[SeriesRow]:
        """Every series of one study, oldest first (B1-map matching)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_uid=s.series_uid)"
                " AS n FROM series s WHERE study_uid=? ORDER BY first_received",
                (study_uid,),
            ).fetchall()
        return [self._row(r) for r in rows]

    @staticmethod
    def _row(r: sqlite3.Row) -> SeriesRow:
        return SeriesRow(
            series_uid=r["series_uid"],
            study_uid=r["study_uid"],
            state=State(r["state"]),
            reason=r["reason"],
            missing=json.loads(r["missing"]),
            expected_count=r["expected_count"],
            n_instances=int(r["n"]),
            first_received=r["first_received"],
            last_received=r["last_received"],
            last_released=r["last_released"],
            state_since=r["state_since"],
            calling_ae=r["calling_ae"],
            revision=int(r["revision"]),
        )

    def state_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM series GROUP BY state").fetchall()
        out = {s.value: 0 for s in State}
        out.update({r[0]: int(r[1]) for r in rows})
        return out

    def oldest_since(self) -> dict[str, float]:
        """Per non-final state: ``state_since`` of the oldest series in it."""
        with self._lock:
            rows = self._db.execute(
                "SELECT state, MIN(state_since) FROM series GROUP BY state"
            ).fetchall()
        return {r[0]: float(r[1]) for r in rows if State(r[0]) not in FINAL_STATES}

    def recent_series(self, limit: int = 20) -> list[SeriesRow]:
        """The ``limit`` most recently received series, newest first (``synthmr status``)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_uid=s.series_uid)"
                " AS n FROM series s ORDER BY last_received DESC LIMIT ?",
                (int(limit),),
            ).fetchall()
        return [self._row(r) for r in rows]

    def timeline(self, series_uid: str) -> list[tuple[str | None, str, float, str]]:
        """Every state change of a series: ``(from, to, unix time, reason)``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT from_state, to_state, at, reason FROM transitions WHERE series_uid=?"
                " ORDER BY id",
                (series_uid,),
            ).fetchall()
        return [(r[0], r[1], float(r[2]), r[3]) for r in rows]

    def dead_outbox_count(self, series_uid: str | None = None) -> int:
        """Dead-letter outbox items (of one series, or all)."""
        with self._lock:
            r = self._db.execute(
                "SELECT COUNT(*) FROM outbox WHERE state='DEAD' AND (? IS NULL OR series_uid=?)",
                (series_uid, series_uid),
            ).fetchone()
        return int(r[0])

    def transitions_of(self, series_uid: str) -> list[tuple[str | None, str]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT from_state, to_state FROM transitions WHERE series_uid=? ORDER BY id",
                (series_uid,),
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    # ------------------------------------------------------------------ jobs
    def enqueue(self, series_uid: str) -> int:
        """COMPLETE (or a retried final state) -> QUEUED plus a job row, one transaction."""
        with self._tx() as db:
            old, dt = self._set_state(db, series_uid, State.QUEUED)
            cur = db.execute(
                "INSERT INTO jobs(series_uid, state, created_at) VALUES (?, 'QUEUED', ?)",
                (series_uid, time.time()),
            )
            job_id = int(cur.lastrowid or 0)
        self._notify(series_uid, old, State.QUEUED, dt)
        return job_id

    def claim_job(self) -> tuple[int, str, float] | None:
        """Take the oldest QUEUED job: job and series -> PROCESSING in one transaction.

        Returns (job id, series uid, seconds it waited in the queue) or None.
        """
        with self._tx() as db:
            r = db.execute(
                "SELECT id, series_uid, created_at FROM jobs WHERE state='QUEUED'"
                " AND not_before<=? ORDER BY id LIMIT 1",
                (time.time(),),
            ).fetchone()
            if r is None:
                return None
            old, dt = self._set_state(db, r["series_uid"], State.PROCESSING, expect={State.QUEUED})
            db.execute(
                "UPDATE jobs SET state='PROCESSING', attempts=attempts+1, started_at=? WHERE id=?",
                (time.time(), r["id"]),
            )
        self._notify(r["series_uid"], old, State.PROCESSING, dt)
        return int(r["id"]), str(r["series_uid"]), dt

    def finish_job(
        self,
        job_id: int,
        series_uid: str,
        new: State,
        reason: str = "",
        missing: list[str] | None = None,
        outbox: list[tuple[str, str, str, str]] | None = None,
        outputs: list[tuple[str, str, str, str, str]] | None = None,
        inputs_sha256: str = "",
    ) -> None:
        """End a job: series -> ``new`` (EXPORTED, HELD, IGNORED, QUARANTINED, FAILED) and,
        for EXPORTED / HELD, outbox rows ``(destination, sop_uid, sop_class_uid, path)``,
        PENDING / HELD (re-runs replace rows of the same SOP UID), in one transaction.

        ``outputs`` ``(sop_uid, sop_class_uid, study_uid, series_uid, path)`` record this
        version: earlier outputs of the series that it does not repeat are superseded, their
        unsent outbox rows cancelled and their sent ones marked for retirement (a rejection
        note, see :meth:`due_retirements`). A series that received changed instances while
        it was processed re-opens (RECEIVING) right after.
        """
        row_state = "HELD" if new == State.HELD else "PENDING"
        now = time.time()
        reopened = None
        with self._tx() as db:
            old, dt = self._set_state(
                db, series_uid, new, reason, missing, expect={State.PROCESSING}
            )
            db.execute(
                "UPDATE jobs SET state=?, finished_at=?, error=? WHERE id=?",
                ("FAILED" if new == State.FAILED else "DONE", now, reason, job_id),
            )
            self._upsert_outbox(db, series_uid, outbox or [], now, row_state)
            if outputs is not None and new in (State.EXPORTED, State.HELD):
                self._record_version(db, series_uid, outputs, inputs_sha256, now)
            # outputs streamed to the outbox during the job (add_outbox) may all be sent
            # already: outbox_sent saw the series PROCESSING then, so it is delivered now
            delivered = self._deliver_if_done(db, [series_uid]) if new == State.EXPORTED else []
            changed = db.execute(
                "SELECT changed_while_processing FROM series WHERE series_uid=?", (series_uid,)
            ).fetchone()[0]
            if changed and new in (State.EXPORTED, *FINAL_STATES):
                reopened = self._reopen(db, series_uid, "instances changed during processing", now)
        self._notify(series_uid, old, new, dt)
        for s, old_state, seconds in delivered:
            self._notify(s, old_state, State.DELIVERED, seconds)
        if reopened:
            self._notify(series_uid, reopened[0], State.RECEIVING, reopened[1])

    @staticmethod
    def _upsert_outbox(
        db: sqlite3.Connection,
        series_uid: str,
        rows: list[tuple[str, str, str, str]],
        now: float,
        row_state: str = "PENDING",
    ) -> None:
        for dest, sop, cls, path in rows:
            db.execute(
                "INSERT INTO outbox(series_uid, destination, sop_uid, sop_class_uid, path,"
                " state, attempts, next_attempt_at, created_at) VALUES (?,?,?,?,?,?,0,?,?)"
                " ON CONFLICT(destination, sop_uid) DO UPDATE SET series_uid=excluded.series_uid,"
                " sop_class_uid=excluded.sop_class_uid, path=excluded.path,"
                " state=excluded.state, attempts=0, next_attempt_at=excluded.next_attempt_at,"
                " last_error=''",
                (series_uid, dest, sop, cls, path, row_state, now, now),
            )

    def add_outbox(self, series_uid: str, rows: list[tuple[str, str, str, str]]) -> None:
        """Queue PENDING ``(destination, sop_uid, sop_class_uid, path)`` rows of a series
        whose job still runs (streamed outputs: pushed while the next group is encoded).
        The series stays PROCESSING; :meth:`finish_job` then makes it EXPORTED, or
        DELIVERED if every row was sent by then."""
        with self._tx() as db:
            self._upsert_outbox(db, series_uid, rows, time.time())

    @staticmethod
    def _record_version(
        db: sqlite3.Connection,
        series_uid: str,
        outputs: list[tuple[str, str, str, str, str]],
        inputs_sha256: str,
        now: float,
    ) -> None:
        for sop, cls, study, out_series, path in outputs:
            db.execute(
                "INSERT INTO outputs(sop_uid, source_series_uid, inputs_sha256, sop_class_uid,"
                " study_uid, series_uid, path, created_at) VALUES (?,?,?,?,?,?,?,?)"
                " ON CONFLICT(sop_uid) DO UPDATE SET path=excluded.path, superseded_at=NULL",
                (sop, series_uid, inputs_sha256, cls, study, out_series, path, now),
            )
        db.execute("CREATE TEMP TABLE IF NOT EXISTS live_version(sop_uid TEXT PRIMARY KEY)")
        db.execute("DELETE FROM live_version")
        db.executemany("INSERT OR IGNORE INTO live_version VALUES (?)", [(o[0],) for o in outputs])
        stale = "SELECT sop_uid FROM outputs WHERE source_series_uid=? AND superseded_at IS NULL"
        stale += " AND sop_uid NOT IN (SELECT sop_uid FROM live_version)"
        gone = [r[0] for r in db.execute(stale, (series_uid,)).fetchall()]
        for sop in gone:
            db.execute("UPDATE outputs SET superseded_at=? WHERE sop_uid=?", (now, sop))
            db.execute(
                "UPDATE outbox SET state=CASE state WHEN 'SENT' THEN 'RETIRE' ELSE 'CANCELLED'"
                " END WHERE sop_uid=? AND state IN ('PENDING', 'DEAD', 'SENT')",
                (sop,),
            )

    def due_retirements(self) -> list[Retirement]:
        """Superseded outputs that destinations hold, grouped by (destination, series)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT o.id, o.destination, o.series_uid, o.sop_uid, o.sop_class_uid,"
                " p.study_uid, p.series_uid FROM outbox o JOIN outputs p ON p.sop_uid=o.sop_uid"
                " WHERE o.state='RETIRE' ORDER BY o.id"
            ).fetchall()
        groups: dict[tuple[str, str], list[Any]] = {}
        for r in rows:
            groups.setdefault((r[1], r[2]), []).append(r)
        return [
            Retirement(dest, series, tuple(r[0] for r in rs), tuple(tuple(r[3:7]) for r in rs))
            for (dest, series), rs in groups.items()
        ]

    def retired(self, retirement: Retirement, note: tuple[str, str, str] | None = None) -> None:
        """The retirement's rows -> RETIRED; ``note`` ``(sop_uid, sop_class_uid, path)`` (the
        rejection note) joins the outbox for that destination, in one transaction."""
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "UPDATE outbox SET state='RETIRED' WHERE id=? AND state='RETIRE'",
                [(i,) for i in retirement.outbox_ids],
            )
            if note is not None:
                db.execute(
                    "INSERT INTO outbox(series_uid, destination, sop_uid, sop_class_uid, path,"
                    " state, attempts, next_attempt_at, created_at)"
                    " VALUES (?,?,?,?,?,'PENDING',0,?,?) ON CONFLICT(destination, sop_uid)"
                    " DO UPDATE SET state='PENDING', attempts=0, path=excluded.path",
                    (retirement.series_uid, retirement.destination, *note, now, now),
                )
            delivered = self._deliver_if_done(db, [retirement.series_uid])
        for s, old, dt in delivered:
            self._notify(s, old, State.DELIVERED, dt)

    def live_outputs(self, series_uid: str) -> list[str]:
        """SOP UIDs of the series' current (not superseded) outputs."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_uid FROM outputs WHERE source_series_uid=? AND superseded_at IS NULL"
                " ORDER BY sop_uid",
                (series_uid,),
            ).fetchall()
        return [r[0] for r in rows]

    def defer_job(
        self,
        job_id: int,
        series_uid: str,
        reason: str,
        not_before: float,
        drop_unsent: Iterable[str] = (),
    ) -> list[str]:
        """A job that hit a transient condition (spool full): job and series back to
        QUEUED, not claimed before ``not_before``, in one transaction. Outbox rows of
        ``drop_unsent`` (SOP UIDs streamed by this job) that were not sent yet are deleted:
        the re-run writes them again with the same UIDs. Returns the deleted rows' paths
        (the caller removes those files)."""
        dropped: list[str] = []
        with self._tx() as db:
            for sop in drop_unsent:
                rows = db.execute(
                    "SELECT id, path FROM outbox WHERE series_uid=? AND sop_uid=?"
                    " AND state='PENDING'",
                    (series_uid, sop),
                ).fetchall()
                for row_id, path in rows:
                    db.execute("DELETE FROM outbox WHERE id=?", (row_id,))
                    dropped.append(str(path))
            old, dt = self._set_state(
                db, series_uid, State.QUEUED, reason, expect={State.PROCESSING}
            )
            db.execute(
                "UPDATE jobs SET state='QUEUED', not_before=?, error=? WHERE id=?",
                (not_before, reason, job_id),
            )
        self._notify(series_uid, old, State.QUEUED, dt)
        return dropped

    def retry(self, series_uid: str) -> int:
        """Re-queue a FAILED / QUARANTINED / IGNORED / DELIVERED series; return the job id."""
        row = self.series(series_uid)
        if row is None:
            raise KeyError(f"unknown series {series_uid}")
        if row.state not in FINAL_STATES and row.state != State.EXPORTED:
            raise IllegalTransition(f"series {series_uid} is {row.state}: nothing to retry")
        return self.enqueue(series_uid)

    def release_held(self, series_uid: str, reason: str = "released by the operator") -> int:
        """A HELD series -> EXPORTED with its HELD outbox rows PENDING (the outbox sends
        them); return how many rows were released."""
        with self._tx() as db:
            old, dt = self._set_state(db, series_uid, State.EXPORTED, reason, expect={State.HELD})
            cur = db.execute(
                "UPDATE outbox SET state='PENDING', attempts=0, next_attempt_at=?"
                " WHERE series_uid=? AND state='HELD'",
                (time.time(), series_uid),
            )
            n = int(cur.rowcount)
        self._notify(series_uid, old, State.EXPORTED, dt)
        return n

    # ------------------------------------------------------------------ outbox
    def due_outbox(self, now: float | None = None, limit: int = 1000) -> list[OutboxItem]:
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT id, series_uid, destination, sop_uid, sop_class_uid, path, attempts"
                " FROM outbox WHERE state='PENDING' AND next_attempt_at<=? ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()
        return [OutboxItem(*r) for r in rows]

    def outbox_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall()
        out = {"PENDING": 0, "SENT": 0, "DEAD": 0, "HELD": 0}
        out.update({r[0]: int(r[1]) for r in rows})
        return out

    def outbox_sent(self, ids: list[int]) -> list[str]:
        """Mark items sent; return series that became DELIVERED (nothing left to send or
        retire). An item cancelled (superseded) while it was on its way must be retired."""
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "UPDATE outbox SET state=CASE state WHEN 'CANCELLED' THEN 'RETIRE' ELSE 'SENT'"
                " END, sent_at=?, last_error='' WHERE id=?",
                [(now, i) for i in ids],
            )
            q = ",".join("?" * len(ids))
            series = [
                r[0]
                for r in db.execute(
                    f"SELECT DISTINCT series_uid FROM outbox WHERE id IN ({q})", ids
                ).fetchall()
            ]
            delivered = self._deliver_if_done(db, series)
        for s, old, dt in delivered:
            self._notify(s, old, State.DELIVERED, dt)
        return [d[0] for d in delivered]

    def _deliver_if_done(
        self, db: sqlite3.Connection, series: list[str]
    ) -> list[tuple[str, State, float]]:
        """EXPORTED series with outbox rows, none left to send or retire -> DELIVERED
        (superseded rows, cancelled or retired, do not count)."""
        delivered: list[tuple[str, State, float]] = []
        for s in series:
            n_rows, left = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(state IN ('PENDING', 'DEAD', 'RETIRE', 'HELD')),"
                " 0) FROM outbox WHERE series_uid=?",
                (s,),
            ).fetchone()
            st = db.execute("SELECT state FROM series WHERE series_uid=?", (s,)).fetchone()
            if n_rows and not left and st is not None and st[0] == State.EXPORTED.value:
                old, dt = self._set_state(db, s, State.DELIVERED)
                delivered.append((s, old, dt))
        return delivered

    def outbox_failed(
        self, ids: list[int], error: str, next_attempt_at: float, max_attempts: int
    ) -> list[int]:
        """Record a failed attempt; items reaching ``max_attempts`` become DEAD (returned)."""
        dead: list[int] = []
        with self._tx() as db:
            for i in ids:
                r = db.execute("SELECT attempts FROM outbox WHERE id=?", (i,)).fetchone()
                if r is None:
                    continue
                attempts = int(r[0]) + 1
                state = "DEAD" if attempts >= max_attempts else "PENDING"
                if state == "DEAD":
                    dead.append(i)
                db.execute(
                    "UPDATE outbox SET attempts=?, state=?, last_error=?, next_attempt_at=? WHERE id=?",
                    (attempts, state, error[:2000], next_attempt_at, i),
                )
        return dead

    def requeue_dead_outbox(self, series_uid: str | None = None) -> int:
        """Dead letters -> PENDING again (operator retry); return how many."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE outbox SET state='PENDING', attempts=0, next_attempt_at=?"
                " WHERE state='DEAD' AND (? IS NULL OR series_uid=?)",
                (time.time(), series_uid, series_uid),
            )
            return int(cur.rowcount)

    def queue_outputs(self, series_uid: str, rows: list[tuple[str, str, str, str]]) -> int:
        """Extra outbox rows ``(destination, sop_uid, sop_class_uid, path)`` for a series
        that keeps its state (a contrast sent from the tuner); a SOP UID already there is
        replaced (PENDING again), never duplicated. Returns how many rows."""
        now = time.time()
        with self._tx() as db:
            for dest, sop, cls, path in rows:
                db.execute(
                    "INSERT INTO outbox(series_uid, destination, sop_uid, sop_class_uid, path,"
                    " state, attempts, next_attempt_at, created_at) VALUES (?,?,?,?,?,'PENDING',0,?,?)"
                    " ON CONFLICT(destination, sop_uid) DO UPDATE SET series_uid=excluded.series_uid,"
                    " sop_class_uid=excluded.sop_class_uid, path=excluded.path, state='PENDING',"
                    " attempts=0, next_attempt_at=excluded.next_attempt_at, last_error=''",
                    (series_uid, dest, sop, cls, path, now, now),
                )
        return len(rows)

    def outbox_of(self, series_uid: str) -> dict[str, dict[str, Any]]:
        """Per destination: item counts by state and the last error (series detail page)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT destination, state, COUNT(*), MAX(last_error), MAX(sent_at)"
                " FROM outbox WHERE series_uid=? GROUP BY destination, state",
                (series_uid,),
            ).fetchall()
        out: dict[str, dict[str, Any]] = {}
        for dest, state, n, err, sent in rows:
            d = out.setdefault(
                dest, {"PENDING": 0, "SENT": 0, "DEAD": 0, "last_error": "", "sent_at": None}
            )
            d[state] = int(n)
            if err:
                d["last_error"] = err
            if sent:
                d["sent_at"] = max(float(sent), d["sent_at"] or 0.0)
        return out

    def list_series(
        self,
        *,
        states: list[str] | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 200,
    ) -> list[SeriesRow]:
        """Series newest first, filtered by state and by first-received time (web list)."""
        where, args = ["1=1"], []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += list(states)
        if since is not None:
            where.append("first_received >= ?")
            args.append(since)
        if until is not None:
            where.append("first_received < ?")
            args.append(until)
        with self._lock:
            rows = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_uid=s.series_uid)"
                f" AS n FROM series s WHERE {' AND '.join(where)}"
                " ORDER BY first_received DESC LIMIT ?",
                (*args, int(limit)),
            ).fetchall()
        return [self._row(r) for r in rows]

    # ------------------------------------------------------------------ audit
    def audit(
        self,
        user: str,
        action: str,
        *,
        role: str = "",
        series_uid: str = "",
        detail: str = "",
        remote: str = "",
    ) -> None:
        """One line of the audit log: who did what, on which series, when."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO audit(at, user, role, action, series_uid, detail, remote)"
                " VALUES (?,?,?,?,?,?,?)",
                (time.time(), user, role, action, series_uid, detail[:2000], remote),
            )

    def audit_log(self, series_uid: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Audit lines, newest first (of one series, or all)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT at, user, role, action, series_uid, detail, remote FROM audit"
                " WHERE (? IS NULL OR series_uid=?) ORDER BY id DESC LIMIT ?",
                (series_uid, series_uid, int(limit)),
            ).fetchall()
        return [dict(r) for r in rows]

    # ------------------------------------------------------------------ recovery
    def recover(self) -> dict[str, int]:
        """After a crash: PROCESSING jobs -> QUEUED, COMPLETE series without a job queued.

        Pending outbox rows need nothing: the pusher sends every due PENDING row.
        """
        requeued = 0
        with self._tx() as db:
            rows = db.execute("SELECT id, series_uid FROM jobs WHERE state='PROCESSING'").fetchall()
            for r in rows:
                db.execute("UPDATE jobs SET state='QUEUED' WHERE id=?", (r["id"],))
                st = db.execute(
                    "SELECT state FROM series WHERE series_uid=?", (r["series_uid"],)
                ).fetchone()
                if st is not None and st[0] == State.PROCESSING.value:
                    self._set_state(db, r["series_uid"], State.QUEUED, "recovered after restart")
                requeued += 1
        completes = [s.series_uid for s in self.series_in(State.COMPLETE)]
        for s in completes:
            self.enqueue(s)
        return {
            "jobs_requeued": requeued,
            "complete_enqueued": len(completes),
            "outbox_pending": self.outbox_counts()["PENDING"],
        }

    def stats(self) -> dict[str, Any]:
        return {"series": self.state_counts(), "outbox": self.outbox_counts()}


def series_timings(timeline: list[tuple[str | None, str, float, str]]) -> dict[str, float]:
    """Seconds from the first instance to the last COMPLETE, processed (job ended) and
    DELIVERED transitions of a series' :meth:`Registry.timeline`."""
    if not timeline:
        return {}
    t0 = timeline[0][2]
    ends = {"EXPORTED", "FAILED", "IGNORED", "QUARANTINED", "HELD"}
    out: dict[str, float] = {}
    for old, new, at, _ in timeline:
        if new in ("COMPLETE", "QUARANTINED") and old == "RECEIVING":
            out["complete"] = at - t0
        if old == "PROCESSING" and new in ends:
            out["processed"] = at - t0
        if new == "DELIVERED":
            out["delivered"] = at - t0
    return out
