"""Durable instance store.

Layout under the spool root::

    tmp/                      half-written files (removed at start-up)
    incoming/<series>/<sop>.dcm   received instances
    outbox/<series>/<sop>.dcm     exported instances waiting to be pushed
    journal/ingest-<n>.log    received instances not yet checkpointed (dicom_node.journal)

Every write goes to ``tmp/`` and is renamed into place with :func:`os.replace`. A received
instance is on disk when its C-STORE is answered because it is in the ingest journal
(group-committed ``fdatasync``; the spool file follows at the next checkpoint, or the
journal's replay rewrites it after a crash); other writes fsync the file and its directory.
File names come from sanitized UIDs: a name can never escape the spool.

Write-behind (``write_behind_bytes`` > 0, the node's default): a received instance's spool
file is not created on the answer path at all. Its bytes stay in memory, already durable
in the journal, and are written out once receiving pauses (:attr:`Spool.write_behind_idle_s`),
when a reader asks for the series (:meth:`Spool.write_pending`, called by
``Registry.instance_paths``), before a journal checkpoint drops their records, or at
close. Creating a file was the largest part of the answer path's kernel time with parallel
senders (ext4 inode allocation, a second copy of the data); behind the burst the same files
cost the senders nothing. Beyond ``write_behind_bytes`` of held data an instance is written
at once, as without write-behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import os
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_node.header_scan import scan_header
from dicom_node.journal import IngestJournal, fsync_dir, sync_file_system
from dicom_node.validate import (
    InstanceTooLargeError,
    InvalidInstanceError,
    check_inflated_size,
    check_instance,
    meta_end,
)

__all__ = [
    "InstanceHeader",
    "Spool",
    "SpoolFullError",
    "UnreadableDatasetError",
    "content_digest",
    "read_header",
    "safe_name",
]

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SpoolFullError(OSError):
    """Free space on the spool file system is below the configured watermark."""


class UnreadableDatasetError(InvalidInstanceError):
    """The received bytes are not a readable DICOM dataset (message says why)."""


@dataclass(frozen=True)
class InstanceHeader:
    """The identifying attributes of one received instance."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    transfer_syntax_uid: str
    #: sha256 of the dataset's encoded bytes after the file meta (what the sender sent);
    #: empty from :meth:`Spool.receive` unless the instance replaced one in the spool
    content_sha256: str = ""
    #: :meth:`Spool.receive`: the content digest of the file this instance replaced (a
    #: re-send), or None when there was none
    replaced_sha256: str | None = None
    #: the parsed dataset, or None until :attr:`dataset` parses ``encoded``
    parsed: Any = field(default=None, compare=False, repr=False)
    #: the Part-10 bytes, when they were checked without pydicom (parsed on demand)
    encoded: bytes = field(default=b"", compare=False, repr=False)

    @property
    def dataset(self) -> Any:
        """The pydicom dataset, for vendor rules such as expected_count (parsed on first
        use when the fast path checked the instance)."""
        if self.parsed is None and self.encoded:
            object.__setattr__(self, "parsed", pydicom.dcmread(io.BytesIO(self.encoded)))
        return self.parsed


def fsync_path(path: Path) -> None:
    """fsync one written file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_name(uid: str) -> str:
    """A file-name-safe token for a UID.

    Valid UIDs (digits and dots, <= 64 chars) are used as they are; anything else becomes
    ``x`` + a SHA-256 prefix so that ``..``, ``/`` or NUL can never reach the file system.
    """
    uid = uid.strip().rstrip("\x00")
    if _UID_RE.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _truncated_element(ds: pydicom.Dataset, size: int) -> str:
    """Why the encoded dataset of ``size`` bytes is truncated, or ''. pydicom reads both a
    short last value and a partial element header at the end without complaint."""
    end = 0
    for tag in ds.keys():
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        tell = getattr(raw, "value_tell", None)
        if isinstance(value, bytes) and length not in (None, 0xFFFFFFFF) and len(value) < length:
            return (
                f"cannot parse dataset: truncated: element {tag} has {len(value)} of {length} bytes"
            )
        end = tell + length if tell is not None and length not in (None, 0xFFFFFFFF) else 0
    if 0 < end < size:
        return f"cannot parse dataset: truncated: {size - end} stray bytes after the last element"
    return ""


def content_digest(data: bytes) -> str:
    """sha256 of an encoded instance's dataset bytes (the file meta, which names the
    receiving application, left out): an identical re-send has the same digest."""
    return hashlib.sha256(memoryview(data)[meta_end(data) :]).hexdigest()


def read_header(
    data: bytes,
    *,
    max_instance_bytes: int | None = None,
    max_inflated_bytes: int | None = None,
    digest: bool = True,
    meta: tuple[str, str] | None = None,
) -> InstanceHeader:
    """Parse and validate encoded DICOM bytes (Part 10, with file meta). ``digest``:
    fill in ``content_sha256`` (the receive path asks for it only when it needs it).
    ``meta``: (SOP class, transfer syntax) of a file meta group the caller wrote itself.

    Raises :class:`~dicom_node.validate.InvalidInstanceError` (its ``status`` is the C-STORE
    answer): :class:`UnreadableDatasetError` when the bytes do not parse,
    :class:`~dicom_node.validate.InstanceTooLargeError` beyond a size limit, others when the
    object is inconsistent (see :func:`dicom_node.validate.check_instance`).
    """
    if max_instance_bytes is not None and len(data) > max_instance_bytes:
        raise InstanceTooLargeError(
            f"instance of {len(data)} bytes exceeds node.max_instance_bytes {max_instance_bytes}"
        )
    start = meta_end(data)
    if start and max_inflated_bytes is not None and _is_deflated(data, start):
        check_inflated_size(data, start, max_inflated_bytes)
    scanned = scan_header(data, start, meta) if start else None
    if scanned is not None:  # a valid native little endian instance, checked without pydicom
        sha = content_digest(data) if digest else ""
        return InstanceHeader(**scanned, content_sha256=sha, encoded=data)
    try:
        # Read everything (pixel data included) so that a truncated instance is caught
        # here, before the success answer, rather than at normalization.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data))
        eof = [str(w.message) for w in caught if "End of file" in str(w.message)]
        if eof:
            raise UnreadableDatasetError(f"cannot parse dataset: truncated: {eof[0]}")
        short = _truncated_element(ds, len(data))
        if short:
            raise UnreadableDatasetError(short)
        # Force parsing of the elements we need: broken encodings fail here.
        values = {
            kw: str(ds.get(kw, "") or "")
            for kw in (
                "SOPInstanceUID",
                "SOPClassUID",
                "SeriesInstanceUID",
                "StudyInstanceUID",
                "Modality",
            )
        }
        tsyntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if ds.file_meta else ""
    except UnreadableDatasetError:
        raise
    except (
        InvalidDicomError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        OverflowError,
    ) as exc:
        raise UnreadableDatasetError(f"cannot parse dataset: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # pydicom raises a variety of errors on garbage
        raise UnreadableDatasetError(f"cannot parse dataset: {type(exc).__name__}: {exc}") from exc
    for kw in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID"):
        if not values[kw]:
            raise UnreadableDatasetError(f"dataset has no {kw}")
    # A file cut at an element boundary parses cleanly: an image without its pixels is
    # the tell-tale (every image IOD with Rows requires one of the pixel data elements).
    try:
        check_instance(ds, tsyntax)
    except InvalidInstanceError:
        raise
    except Exception as exc:  # an attribute pydicom cannot convert (bad VR, bad number)
        raise InvalidInstanceError(f"image attributes: {type(exc).__name__}: {exc}") from exc
    return InstanceHeader(
        sop_instance_uid=values["SOPInstanceUID"],
        sop_class_uid=values["SOPClassUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        study_instance_uid=values["StudyInstanceUID"],
        modality=values["Modality"],
        transfer_syntax_uid=tsyntax,
        content_sha256=content_digest(data) if digest else "",
        parsed=ds,
    )


def _is_deflated(data: bytes, start: int) -> bool:
    """Whether the file meta names the deflated transfer syntax (read without pydicom)."""
    return str(DeflatedExplicitVRLittleEndian).encode() in data[:start]


class _Held:
    """A received file held back (write-behind): its bytes until the journal append says
    where they are, then the log's path and the data's offset in it."""

    __slots__ = ("data", "log", "log_fd", "offset", "size")

    def __init__(self, data: bytes | None, size: int, log: str = "", offset: int = 0) -> None:
        self.data, self.size, self.log, self.offset = data, size, log, offset
        self.log_fd = -1

    def snapshot(self) -> tuple[_Held, _Held]:
        """(this entry, a copy of its fields now): the copy is written out while the
        receive path may still fill in the log's place in this one."""
        return self, _Held(self.data, self.size, self.log, self.offset)

    def read(self) -> bytes:
        """The bytes: held, or read back from the journal log."""
        if self.data is not None:
            return self.data
        fd = os.open(self.log, os.O_RDONLY)
        try:
            return os.pread(fd, self.size, self.offset)
        finally:
            os.close(fd)

    def copy_to(self, fd: int) -> None:
        """Copy the bytes from the journal log (open as ``log_fd``) into ``fd``, in the
        kernel (no copy through Python)."""
        offset, left = self.offset, self.size
        while left:
            n = os.copy_file_range(self.log_fd, fd, left, offset)
            if n <= 0:
                raise OSError(f"journal log {self.log} ends before its record's data")
            offset += n
            left -= n


class Spool:
    """The on-disk store. ``min_free_bytes`` is the free-disk watermark."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        min_free_bytes: int = 0,
        journal_owner: str = "",
        replay: bool = True,
        write_behind_bytes: int = 0,
    ) -> None:
        self.root = Path(root).resolve()
        self.min_free_bytes = int(min_free_bytes)
        #: received bytes held in memory at most, not yet in their spool files (0: none)
        self.write_behind_bytes = int(write_behind_bytes)
        #: spool file path -> its bytes, durable in the journal, not yet written (in order)
        self._behind: dict[str, bytes] = {}
        self._behind_size = 0
        self._behind_cond = threading.Condition()
        #: held while files are written out of ``_behind`` or a series directory is removed
        self._writing_out = threading.Lock()
        self._last_received = 0.0
        self._writer: threading.Thread | None = None
        self._closed = False
        self.tmp = self.root / "tmp"
        self.incoming = self.root / "incoming"
        self.outbox = self.root / "outbox"
        for d in (self.root, self.tmp, self.incoming, self.outbox):
            d.mkdir(parents=True, exist_ok=True)
        self._root_str, self._tmp_str = str(self.root), str(self.tmp)
        #: names of the received files' temp files: unique per process (O_EXCL checks it)
        self._tmp_seq = itertools.count()
        self._pid = os.getpid()
        self.journal = IngestJournal(self.root, journal_owner)
        self.journal.before_sync = self.write_pending  # a checkpoint drops their records
        #: received files a crash had left missing or partial, rewritten from the journal
        #: (every process's logs: only the node process replays, before acceptors start)
        self.replayed = self.journal.replay(self.write_atomic) if replay else 0
        self.journal.prepare_log()  # the first instance received does not create it
        #: checkpoints of the other processes' journals (dicom_node.acceptors), run with
        #: this one's wherever no journal record may outlive a removal
        self.peer_checkpoints: list[Callable[[], None]] = []

    # -- capacity
    #: bytes kept allocated in ``<spool>/reserve`` while the disk has room: released when
    #: a job meets a full disk, so the registry can still record the deferral (SQLite's
    #: WAL must grow to commit) and the node keeps working instead of losing its job thread
    RESERVE_BYTES = 8 * 1024 * 1024

    @property
    def reserve(self) -> Path:
        return self.root / "reserve"

    def ensure_reserve(self) -> bool:
        """Allocate the reserve file if it is missing and the disk has room for it twice
        over; return whether it is in place."""
        if self.reserve.exists():
            return True
        if self.free_bytes() < 2 * self.RESERVE_BYTES:
            return False
        fd = os.open(self.reserve, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.RESERVE_BYTES)
        except OSError:
            os.close(fd)
            self.reserve.unlink(missing_ok=True)
            return False
        os.close(fd)
        return True

    def release_reserve(self) -> int:
        """Free the reserve (the disk is full); return the bytes freed."""
        try:
            n = self.reserve.stat().st_size
            self.reserve.unlink()
        except FileNotFoundError:
            return 0
        return n

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def above_watermark(self) -> bool:
        return self.free_bytes() >= self.min_free_bytes

    def has_room(self, n_bytes: int) -> bool:
        """Whether ``n_bytes`` more still leave the watermark free (readiness counts one
        instance of the largest size accepted; jobs wait for it before they start)."""
        return self.free_bytes() - n_bytes >= self.min_free_bytes

    # -- paths
    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if self.root not in resolved.parents:
            raise ValueError(f"path escapes the spool: {path}")
        return resolved

    def instance_path(self, area: str, series_uid: str, sop_uid: str) -> Path:
        base = {"incoming": self.incoming, "outbox": self.outbox}[area]
        # no resolve() (a realpath walk, ~0.1 ms per received instance): a safe name is
        # digits and dots starting with a digit, or "x" + hex, so it cannot leave ``base``
        return base / safe_name(series_uid) / f"{safe_name(sop_uid)}.dcm"

    # -- writing
    def write_atomic(self, target: Path, data: bytes) -> Path:
        """Write ``data`` to ``target`` durably (temp file, fsync, replace, fsync dir)."""
        target = self._inside(target)
        self._check_space(len(data))
        new_dir = not target.parent.is_dir()
        target.parent.mkdir(parents=True, exist_ok=True)
        self._write_file(target, data, fsync=True)
        fsync_dir(target.parent)
        if new_dir:  # the new series directory's own entry must be durable too
            fsync_dir(target.parent.parent)
        return target

    def _check_space(self, n_bytes: int) -> None:
        """Refuse ``n_bytes`` more unless the watermark stays free, counting the received
        files not yet written (write-behind: they will take their room too)."""
        free = self.free_bytes()
        if free - self._behind_size - n_bytes < self.min_free_bytes:
            held = f" ({self._behind_size} B of it promised to held files)" * bool(
                self._behind_size
            )
            raise SpoolFullError(
                f"spool free space {free} B{held} is below the watermark {self.min_free_bytes} B"
            )

    def store_received(
        self,
        data: bytes,
        max_instance_bytes: int | None = None,
        max_inflated_bytes: int | None = None,
    ) -> tuple[InstanceHeader, Path]:
        """:meth:`receive`, with the path as a :class:`~pathlib.Path`."""
        header, target = self.receive(data, max_instance_bytes, max_inflated_bytes)
        return header, Path(target)

    def receive(
        self,
        data: bytes,
        max_instance_bytes: int | None = None,
        max_inflated_bytes: int | None = None,
        meta: tuple[str, str] | None = None,
    ) -> tuple[InstanceHeader, str]:
        """Validate and durably store a received instance; return its header and path (a
        string: the C-STORE handler's path, where a pathlib object per instance cost more
        of the GIL than the rest of this method's own Python). ``meta``: see
        :func:`read_header`.

        The header's content digest is worked out only for a re-sent instance (a file is
        there already), with the replaced file's (:attr:`InstanceHeader.replaced_sha256`):
        a new instance, nearly every one, is answered without hashing its bytes.

        Durable through the ingest journal: its bytes are appended to the journal, whose
        group-committed ``fdatasync`` has completed when this returns (one flush shared by
        concurrent associations instead of a file and a directory fsync each). The file
        itself is written behind (module docstring), or renamed into place unsynced when
        write-behind is off or full. The path returned is where it is or will be; readers
        get it through ``Registry.instance_paths``, which writes it first.

        Raises :class:`~dicom_node.validate.InvalidInstanceError` (nothing kept) or
        :class:`SpoolFullError`.
        """
        header = read_header(
            data,
            max_instance_bytes=max_instance_bytes,
            max_inflated_bytes=max_inflated_bytes,
            digest=False,
            meta=meta,
        )
        self._check_space(len(data))  # one statvfs: the watermark with this instance
        # paths as strings (no pathlib per instance); a safe name cannot leave incoming/
        series_dir = safe_name(header.series_instance_uid)
        relative = f"incoming/{series_dir}/{safe_name(header.sop_instance_uid)}.dcm"
        target = f"{self._root_str}/{relative}"
        replaced = self._stored_digest(target)
        if replaced is not None:  # a re-send: the registry compares the two
            header = dataclasses.replace(
                header, content_sha256=content_digest(data), replaced_sha256=replaced
            )
        entry = self._hold_back(target, data)
        if entry is not None:
            try:
                where = self.journal.log_write_relative(relative, data, time.monotonic_ns())
            except BaseException:
                self._forget(target, entry)  # not answered: nothing of it is kept
                raise
            with self._behind_cond:  # from now on it is copied from the log
                entry.data, entry.log, entry.offset = None, where[0], where[1]
            return header, target
        at = self._write_file(target, data)
        self.journal.log_write_relative(relative, data, at)
        return header, target

    def _write_file(self, target: str | Path, data: bytes | _Held, fsync: bool = False) -> int:
        """Write ``data`` to a temp file in ``tmp/``, fsync it if ``fsync`` (otherwise the
        journal or the caller's ``syncfs`` makes it durable) and rename it to ``target``,
        creating ``target``'s directory if it is missing; the caller fsyncs the directory.
        ``data``: bytes, or a held received file whose bytes are copied from the journal
        log. Returns the monotonic ns of the rename (the journal orders versions by it)."""
        tmp = f"{self._tmp_str}/{self._pid}-{next(self._tmp_seq)}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                if isinstance(data, _Held):
                    data.copy_to(fd)
                else:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            at = time.monotonic_ns()  # orders it among other processes' writes (journal)
            try:
                os.replace(tmp, target)
            except FileNotFoundError:  # e.g. the series' first instance: a new directory
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return at

    # -- write-behind
    #: held files are written out once no instance was received for this long
    write_behind_idle_s = 0.05

    def _hold_back(self, target: str, data: bytes) -> _Held | None:
        """Hold ``target``'s file back (write-behind) if there is room, or if an older held
        version of it would otherwise be written after this one; None: write it now.

        Registered *before* the journal append, with its bytes: a checkpoint that drops the
        log holding the record writes out everything held by then (:meth:`write_pending`,
        from these bytes if the append has not said where they are in the log yet). After
        the append the entry keeps only the log's path and offset, and the received bytes
        are freed: memory that stayed held would cost a page fault per 4 KiB of every
        instance (fresh memory each time) instead of being reused."""
        size = len(data)
        with self._behind_cond:
            if self._closed:
                return None
            old = self._behind.get(target)
            if old is None and self._behind_size + size > self.write_behind_bytes:
                return None
            entry = _Held(data, size)
            was_empty = not self._behind
            self._behind[target] = entry
            self._behind_size += size - (0 if old is None else old.size)
            self._last_received = time.monotonic()
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_behind_loop, name="spool-write-behind", daemon=True
                )
                self._writer.start()
            if was_empty:  # the writer sleeps until then; later ones it sees when it wakes
                self._behind_cond.notify()
            return entry

    def _forget(self, target: str, entry: _Held) -> None:
        with self._behind_cond:
            if self._behind.get(target) is entry:
                del self._behind[target]
                self._behind_size -= entry.size

    def write_pending(self, series_uid: str | None = None) -> int:
        """Write the held-back received files (of ``series_uid``, or all) to their spool
        paths now; return how many. Readers of received files call it first
        (``Registry.instance_paths``)."""
        prefix = None
        if series_uid is not None:
            prefix = f"{self._root_str}/incoming/{safe_name(series_uid)}/"
        n = 0
        with self._writing_out:
            with self._behind_cond:
                items = [
                    (t, e.snapshot())
                    for t, e in self._behind.items()
                    if prefix is None or t.startswith(prefix)
                ]
            logs: dict[str, int] = {}
            try:
                for target, (entry, copy) in items:
                    if copy.log and copy.log not in logs:
                        logs[copy.log] = os.open(copy.log, os.O_RDONLY)
                    copy.log_fd = logs.get(copy.log, -1)
                    self._write_file(target, copy.data if copy.data is not None else copy)
                    self._forget(target, entry)  # a newer version held meanwhile stays held
                    n += 1
            finally:
                for fd in logs.values():
                    os.close(fd)
        return n

    def _write_behind_loop(self) -> None:
        while True:
            with self._behind_cond:
                while not self._behind and not self._closed:
                    self._behind_cond.wait()
                if self._closed:
                    return
                wait = self._last_received + self.write_behind_idle_s - time.monotonic()
                if wait > 0:  # still receiving: the files cost the senders nothing later
                    self._behind_cond.wait(wait)
                    continue
            try:
                self.write_pending()
            except OSError as exc:  # the checkpoint or a reader tries again; data is durable
                warnings.warn(f"write-behind of received files failed: {exc}", stacklevel=1)
                time.sleep(self.write_behind_idle_s)

    def _stored_digest(self, target: str) -> str | None:
        """Content digest of what the spool holds at ``target`` (held back or in its
        file), or None when it holds nothing there: only a re-sent instance is hashed."""
        with self._behind_cond:
            entry = self._behind.get(target)
            held = None if entry is None else entry.snapshot()[1]
        if held is not None:
            return content_digest(held.read())
        try:
            with open(target, "rb") as f:
                return content_digest(f.read())
        except FileNotFoundError:
            return None

    @property
    def held_bytes(self) -> int:
        """Bytes of received instances not yet in their spool files (write-behind)."""
        return self._behind_size

    def discard_received(self, path: Path | str) -> None:
        """Remove a stored received file the node does not keep after all (a replay of the
        journal does not bring it back)."""
        path = Path(path)
        with self._behind_cond:
            entry = self._behind.get(str(path))
            if entry is not None:
                self._forget(str(path), entry)
        with self._writing_out:  # not written out by the write-behind after this
            path.unlink(missing_ok=True)
        self.journal.log_delete(self._inside(path))

    def close(self) -> None:
        """Write out held files and checkpoint the ingest journal (a clean stop leaves
        nothing to replay)."""
        self.write_pending()
        with self._behind_cond:
            self._closed = True
            self._behind_cond.notify_all()
        if self._writer is not None:
            self._writer.join(timeout=10)
        self.journal.close()

    def store_outputs(self, series_uid: str, items: Iterable[tuple[str, bytes]]) -> list[Path]:
        """Durably store a series' exported instances ``(sop_uid, data)`` in the outbox.

        The files are written to ``tmp/`` and renamed into place unsynced, then made
        durable together before this returns (the caller records the outputs only then):
        one ``syncfs`` of the spool's file system (the files' data, their renames and the
        series directory in one journal commit; ~0.03 ms of CPU per file where an fsync
        each cost ~0.3 ms and ~6 ms of waiting) and an fsync of the directory; an fsync
        per file where ``syncfs`` does not exist.
        """
        paths: list[Path] = []
        fresh: list[Path] = []  # files this call creates: removed again if it fails
        out_dir: Path | None = None
        new_dir = False
        try:
            for sop_uid, data in items:
                # a safe name cannot leave the outbox (instance_path): the directory is
                # checked once
                target = self.instance_path("outbox", series_uid, sop_uid)
                if out_dir is None:
                    out_dir = self._inside(target.parent)
                    new_dir = not out_dir.is_dir()
                    out_dir.mkdir(parents=True, exist_ok=True)
                self._check_space(len(data))
                if not target.exists():
                    fresh.append(target)
                self._write_file(target, data)
                paths.append(target)
            if out_dir is not None and not sync_file_system(out_dir):
                for p in paths:
                    fsync_path(p)
        except BaseException:
            # a disk that filled up mid-series leaves no untracked partial outputs: the
            # job is re-run when space returns and writes them again
            for p in fresh:
                p.unlink(missing_ok=True)
            raise
        if out_dir is not None:
            fsync_dir(out_dir)
            if new_dir:
                fsync_dir(out_dir.parent)
        return paths

    # -- housekeeping
    def clean_tmp(self) -> int:
        """Remove half-written temp files (after a crash); return how many."""
        n = 0
        for p in self.tmp.iterdir():
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
        return n

    def remove_series(self, series_uid: str, area: str = "incoming") -> None:
        base = {"incoming": self.incoming, "outbox": self.outbox}[area]
        d = self._inside(base / safe_name(series_uid))
        if area == "incoming":
            self.journal.checkpoint()  # no journal record left that would bring them back
            for checkpoint in self.peer_checkpoints:
                checkpoint()
            with self._writing_out:  # held files of it, if any came since, are dropped
                prefix = f"{d}/"
                with self._behind_cond:
                    for t in [t for t in self._behind if t.startswith(prefix)]:
                        self._behind_size -= self._behind.pop(t).size
                shutil.rmtree(d, ignore_errors=True)
            return
        shutil.rmtree(d, ignore_errors=True)
