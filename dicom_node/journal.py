"""Ingest journal: the durable record of a received instance between its C-STORE answer
and the spool checkpoint (DESIGN promise 1 with one disk flush per answer, shared).

Storing a received file durably by itself costs two journal commits of the file system
(fsync of the file, then of its directory after the rename): ~11 ms on the 2-core machine
whose disk flush takes ~5 ms, so one sender could not pass ~90 instances/s. Here each
instance is appended to a log file and the log is ``fdatasync``'d once for every append
that came before the sync started (group commit: concurrent associations share a flush);
the spool file itself is written and renamed into place without a sync of its own.

Every so often (the log passed :attr:`IngestJournal.checkpoint_bytes`, or nothing was
appended for :attr:`IngestJournal.idle_checkpoint_s`) a *checkpoint* switches to a new log,
makes everything written so far durable with one ``syncfs`` of the spool's file system,
and deletes the old log. After a crash, :meth:`IngestJournal.replay` (run when the spool
opens) rewrites every logged file that is missing or differs, in log order, durably.

Record layout (little endian): magic ``SMR2``, kind (``W`` write, ``D`` delete), name
length (u16), data length (u64), CRC-32 of time + name + data (u32), time (u64: the
system's monotonic clock in ns when the file was renamed into place or removed), name
(UTF-8 path relative to the spool root), data. A torn last record (a crash mid-append:
never answered) fails its length or CRC check and ends the replay of that log. Logs of
the first layout (magic ``SMRJ``, no time) are still replayed, in log order.

Every process that stores into the spool (:mod:`dicom_node.acceptors`) has logs of its
own; the time orders their records: of two versions of one file in two processes' logs
(a corrected re-send received by the other process) the replay keeps the one renamed
last, as the disk had it. The monotonic clock is shared by the machine's processes and
restarts with the machine, and every replay runs (and empties the logs) before anything
new is logged, so the records compared always come from one boot.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["IngestJournal", "sync_file_system", "syncfs"]

log = logging.getLogger("synthmr.journal")

_HEAD = struct.Struct("<4scHQIQ")
_MAGIC = b"SMR2"
#: the first layout (no time): still read
_HEAD_V1 = struct.Struct("<4scHQI")
_MAGIC_V1 = b"SMRJ"
_TIME = struct.Struct("<Q")


def _libc_syncfs() -> Any:
    """libc's ``syncfs`` (Linux), or None; looked up once."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    except OSError:
        return None


_SYNCFS = _libc_syncfs()


def sync_file_system(path: Path) -> bool:
    """Flush every written file of the file system holding ``path`` and wait for it
    (``syncfs(2)``: data, metadata and a journal commit; write errors are reported since
    Linux 5.8). False where the call does not exist (the caller falls back)."""
    if _SYNCFS is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs({path}): {os.strerror(err)}")
    finally:
        os.close(fd)
    return True


def syncfs(path: Path) -> None:
    """Flush every dirty page and the metadata of the file system holding ``path``
    (Linux ``syncfs``; ``sync`` where it is missing)."""
    if not sync_file_system(path):
        os.sync()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed, removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IngestJournal:
    """Append-only, group-committed log of spool writes under ``root / "journal"``.

    ``write_file(path, data)`` is called by :meth:`replay` for each record to restore
    (durably); paths in the log are relative to ``root``.
    """

    #: switch logs (and checkpoint) once the current one holds this many bytes
    checkpoint_bytes = 256 << 20
    #: checkpoint when nothing was appended for this long (a burst is over)
    idle_checkpoint_s = 1.0
    #: fdatasyncs of the log that may run at once. A record appended while a sync runs
    #: needs a sync that starts after it: with one sync at a time it waited for the
    #: running one to end first (~1.5 flushes per answer, and two alternating senders
    #: never shared one). Overlapping syncs complete together in the kernel (one journal
    #: commit and cache flush): 4 threads each appending and syncing reached several times
    #: the syncs/s of one on the 2-core machine's disk
    max_concurrent_syncs = 4

    def __init__(self, root: Path, owner: str = "") -> None:
        self.root = root
        #: the logs of this journal are ``ingest-<owner><seq>.log``: every process that
        #: stores into the spool (dicom_node.acceptors) appends to and checkpoints its own
        self.owner = owner
        self.dir = root / "journal"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._cond = threading.Condition()
        self._fd: int | None = None
        self._fd_path = ""  # the current log's path
        #: (number, fd) of an empty log created ahead of need (:meth:`prepare_log`)
        self._spare: tuple[int, int] | None = None
        self._seq = 0  # highest log number handed out
        self._size = 0  # bytes in the current log
        self._written = 0  # bytes appended, all logs (monotonic)
        self._synced = 0  # bytes covered by a completed fdatasync
        self._sync_started = 0  # bytes covered by the latest fdatasync started
        self._syncs_running = 0
        self._checkpoint_waiting = False  # appenders wait: the checkpoint's sync covers them
        self._last_append = 0.0
        self._checkpointing = threading.Lock()
        self._timer: threading.Thread | None = None
        #: called by a checkpoint after it switched logs and before its ``syncfs``: writes
        #: out whatever the owner holds back that the logs being dropped cover (the spool's
        #: write-behind files)
        self.before_sync: Callable[[], None] | None = None
        #: fdatasyncs done (fewer than appends when writers overlap; for tests/benchmarks)
        self.syncs = 0
        self.checkpoints = 0

    # ------------------------------------------------------------------ logs on disk
    def _logs(self, every_owner: bool = False) -> list[tuple[int, Path]]:
        """This journal's logs in order (``every_owner``: all processes' logs, each
        owner's in order, for the replay)."""
        out = []
        prefix = f"ingest-{self.owner}"
        for p in self.dir.glob("ingest-*.log"):
            if every_owner:
                owner, _, seq = p.stem[len("ingest-") :].rpartition(".")
            elif p.stem.startswith(prefix):
                owner, seq = "", p.stem[len(prefix) :]
            else:
                continue
            try:
                out.append((owner, int(seq), p))
            except ValueError:
                continue
        return [(seq, p) for _, seq, p in sorted(out)]

    def _path(self, seq: int) -> Path:
        return self.dir / f"ingest-{self.owner}{seq:08d}.log"

    def _next_seq(self) -> int:
        """Reserve the number of the next log (under ``_cond``): above every log on disk and
        every number handed out, so the replay's order is the order of appending."""
        self._seq = max([self._seq, *(n for n, _ in self._logs())]) + 1
        return self._seq

    def _create(self, seq: int) -> int:
        """Create log ``seq`` (empty) and make its directory entry durable; its fd."""
        fd = os.open(self._path(seq), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        try:
            fsync_dir(self.dir)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_next(self) -> None:
        """A new, empty current log whose directory entry is durable: the spare one
        :meth:`prepare_log` made, when no later number was handed out since."""
        spare, self._spare = self._spare, None
        if spare is not None and spare[0] == self._seq:
            self._fd = spare[1]
            self._fd_path = str(self._path(spare[0]))
        else:
            if spare is not None:  # a later log exists: this one would replay out of order
                os.close(spare[1])
                self._path(spare[0]).unlink(missing_ok=True)
            self._fd = self._create(self._next_seq())
            self._fd_path = str(self._path(self._seq))
        self._size = 0

    def prepare_log(self) -> None:
        """Create the next log ahead of need, off the answer path (at start-up and after
        each checkpoint): the first instance of a burst then does not wait for a file
        creation and a directory sync (~1-6 ms, and every concurrent answer behind it).

        Under the checkpoint lock: a checkpoint deletes the logs it finds that are not the
        spare, and a spare on disk but not yet recorded as such would be one of them."""
        with self._checkpointing:
            with self._cond:
                if self._spare is not None:
                    return
                seq = self._next_seq()
            fd = self._create(seq)
            with self._cond:
                if self._spare is None:
                    self._spare = (seq, fd)
                    return
            os.close(fd)  # the answer path made its own log meanwhile and took the number
            self._path(seq).unlink(missing_ok=True)

    def _drop_spare(self) -> None:
        with self._cond:
            spare, self._spare = self._spare, None
        if spare is not None:
            os.close(spare[1])
            self._path(spare[0]).unlink(missing_ok=True)

    @staticmethod
    def records(path: Path) -> Iterator[tuple[str, str, bytes]]:
        """(kind, relative name, data) of each intact record of one log, in order."""
        for _, kind, name, data in IngestJournal.timed_records(path):
            yield kind, name, data

    @staticmethod
    def timed_records(path: Path) -> Iterator[tuple[int, str, str, bytes]]:
        """(time ns, kind, relative name, data) of each intact record of one log, in order;
        the time is 0 in a log of the first layout."""
        with open(path, "rb") as f:
            while True:
                head = f.read(_HEAD_V1.size)
                if len(head) < _HEAD_V1.size:
                    return
                magic, kind, n_name, n_data, crc = _HEAD_V1.unpack(head)
                at, at_bytes = 0, b""
                if magic == _MAGIC:
                    at_bytes = f.read(_TIME.size)
                    if len(at_bytes) < _TIME.size:
                        return
                    (at,) = _TIME.unpack(at_bytes)
                elif magic != _MAGIC_V1:
                    return
                name = f.read(n_name)
                data = f.read(n_data)
                if len(name) < n_name or len(data) < n_data:
                    return
                if zlib.crc32(data, zlib.crc32(name, zlib.crc32(at_bytes))) != crc:
                    return
                yield at, kind.decode("ascii", "replace"), name.decode("utf-8"), data

    # ------------------------------------------------------------------ appending
    def _relative(self, path: Path) -> bytes:
        return str(path.relative_to(self.root)).encode("utf-8")

    def _append(
        self, kind: bytes, name: bytes, data: bytes, durable: bool, at: int | None = None
    ) -> tuple[str, int]:
        if at is None:
            at = time.monotonic_ns()
        crc = zlib.crc32(data, zlib.crc32(name, zlib.crc32(_TIME.pack(at))))
        head = _HEAD.pack(_MAGIC, kind, len(name), len(data), crc, at)
        with self._cond:
            if self._fd is None:
                self._open_next()
            assert self._fd is not None
            n = _HEAD.size + len(name) + len(data)
            where = (self._fd_path, self._size + _HEAD.size + len(name))
            done = os.writev(self._fd, (head + name, data))  # one system call
            if done < n:  # a short write (rare): the rest
                view = memoryview(b"".join((head, name, data)))[done:]
                while view:
                    view = view[os.write(self._fd, view) :]
            self._size += n
            self._written += n
            mine = self._written
            self._last_append = time.monotonic()
            while durable and self._synced < mine:
                if (
                    self._sync_started >= mine
                    or self._checkpoint_waiting
                    or self._syncs_running >= self.max_concurrent_syncs
                ):
                    self._cond.wait()  # a running sync covers this record, or will
                    continue
                covered, fd = self._written, self._fd
                self._sync_started = covered
                self._syncs_running += 1
                self._cond.release()
                ok = False
                try:
                    os.fdatasync(fd)
                    ok = True
                finally:
                    self._cond.acquire()
                    self._syncs_running -= 1
                    if ok:
                        self._synced = max(self._synced, covered)
                        self.syncs += 1
                    else:  # whoever waited for this sync starts its own
                        self._sync_started = self._synced
                    self._cond.notify_all()
            full = self._size >= self.checkpoint_bytes
        if full:
            self.checkpoint()
        else:
            self._arm_timer()
        return where

    def log_write(self, path: Path, data: bytes) -> None:
        """Durably log that ``path`` (inside the root) holds ``data``; returns once an
        ``fdatasync`` of the log that started after this append has completed."""
        self._append(b"W", self._relative(path), data, durable=True)

    def log_write_relative(self, name: str, data: bytes, at: int | None = None) -> tuple[str, int]:
        """:meth:`log_write` of the file ``name`` (relative to the root, ``/``-separated:
        the receive path builds it without pathlib); ``at``: ``time.monotonic_ns()`` taken
        before the file was renamed into place (default: now). Returns the log's path and
        the offset of ``data`` in it: the bytes can be copied from there until the next
        checkpoint (:attr:`before_sync` runs before the log is dropped)."""
        return self._append(b"W", name.encode("utf-8"), data, durable=True, at=at)

    def log_delete(self, path: Path) -> None:
        """Log that ``path`` was removed (so a replay does not bring it back); durable with
        the next group commit or checkpoint."""
        self._append(b"D", self._relative(path), b"", durable=False)

    # ------------------------------------------------------------------ checkpoints
    def _arm_timer(self) -> None:
        with self._cond:
            if self._timer is not None and self._timer.is_alive():
                return
            self._timer = threading.Thread(
                target=self._idle_loop, name="journal-checkpoint", daemon=True
            )
            self._timer.start()

    def _idle_loop(self) -> None:
        while True:
            time.sleep(self.idle_checkpoint_s / 4)
            with self._cond:
                idle = time.monotonic() - self._last_append
                if self._fd is None:
                    self._timer = None
                    return
            if idle >= self.idle_checkpoint_s:
                try:
                    self.checkpoint()
                except OSError as exc:  # retried on the next turn; the log stays
                    log.error("journal checkpoint failed: %s", exc)

    def checkpoint(self, prepare: bool = True) -> None:
        """Make every spool write logged so far durable by itself, then drop those logs;
        then (``prepare``) create the next log ahead of the next burst."""
        self._checkpoint()
        if prepare:
            self.prepare_log()

    def _checkpoint(self) -> None:
        with self._checkpointing:
            with self._cond:
                self._checkpoint_waiting = True
                try:
                    while self._syncs_running:
                        self._cond.wait()
                finally:
                    self._checkpoint_waiting = False
                spare = None if self._spare is None else self._path(self._spare[0])
                if self._fd is None and not [p for _, p in self._logs() if p != spare]:
                    return
                if self._fd is not None:
                    if self._synced < self._written:
                        # an appender may be waiting for this: it answers once synced
                        os.fdatasync(self._fd)
                        self._synced = self._sync_started = self._written
                        self.syncs += 1
                    self._cond.notify_all()
                    os.close(self._fd)
                    self._fd = None
                old = [(n, p) for n, p in self._logs() if p != spare]  # the spare is empty
            # Appends go on in a new log meanwhile: their files are not covered, they stay.
            if self.before_sync is not None:
                self.before_sync()
            syncfs(self.root)
            self.checkpoints += 1  # counted before the logs go (a watcher sees both)
            for _, path in old:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Checkpoint (a clean stop leaves no log to replay, not even an empty one)."""
        self.checkpoint(prepare=False)
        self._drop_spare()

    # ------------------------------------------------------------------ recovery
    def replay(self, write_file: Callable[[Path, bytes], None]) -> int:
        """After a crash: restore every logged file that is missing or differs, in log
        order (deletions too); checkpoint; return how many files were rewritten."""
        # the newest record of each name wins: the latest time, and of equal times (the
        # first layout's 0) the later in the logs (one process's logs are in order)
        final: dict[str, tuple[int, bytes | None]] = {}
        # first layout (no time): each process's last write of a name; a file that holds
        # one of them was renamed into place by that process and is left as it is (below)
        written: dict[str, dict[str, bytes]] = {}
        replayed = self._logs(every_owner=True)
        for _, log_path in replayed:
            owner = log_path.stem[len("ingest-") :].rpartition(".")[0]
            for at, kind, name, data in self.timed_records(log_path):
                if name in final and final[name][0] > at:
                    continue  # another process's newer record of it came first
                final.pop(name, None)  # keep log order for the writes below
                final[name] = (at, None if kind == "D" else data)
                if kind == "D":
                    written.get(name, {}).pop(owner, None)
                else:
                    written.setdefault(name, {})[owner] = data
        n = 0
        for name, (at, data) in final.items():
            target = (self.root / name).resolve()
            if self.root not in target.parents:
                continue  # never written by us: a log names paths inside the root
            if at:  # the newest version is known: a file that holds it is left as it is
                versions = [] if data is None else [data]
            else:
                versions = list(written.get(name, {}).values())
            try:
                size = target.stat().st_size
                same = any(len(v) == size for v in versions) and target.read_bytes() in versions
            except OSError:
                same = False
            if same:
                continue
            if data is None:
                target.unlink(missing_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file(target, data)
            n += 1
        self.checkpoint(prepare=False)
        for _, log_path in replayed:  # other processes' logs (each file rewritten durably)
            log_path.unlink(missing_ok=True)
        self.prepare_log()  # after the unlinks: it may take a replayed log's number
        return n
