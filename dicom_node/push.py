"""C-STORE SCU and the outbox.

:func:`send_files` sends files over ONE association with every presentation context the
files need (SOP class x their own transfer syntax), without decoding them. Every network
step has a timeout, so a dead PACS costs at most ``timeout_s`` and never hangs the node.

:class:`Outbox` sends due outbox rows grouped by (destination, series); a failure
reschedules with exponential backoff and jitter; after ``max_attempts`` the item is a dead
letter (counted, kept on disk, re-queued by an operator retry).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config as _pynetdicom_config
from pynetdicom.presentation import build_context

from dicom_node.config import Destination, RetrySettings
from dicom_node.logging import log_event
from dicom_node.metrics import NodeMetrics
from dicom_node.registry import Registry, Retirement
from dicom_node.requestor import (
    Part10Error,
    PushAE,
    part10_meta,
    read_part10_meta,
    send_c_store_bytes,
)
from dicom_node.transport import make_client_ssl_context, set_tcp_nodelay

__all__ = ["Link", "Outbox", "backoff_delay", "send_files", "send_parallel"]

log = logging.getLogger("synthmr.push")

_MAX_CONTEXTS = 128  # DICOM limit of presentation contexts per association
# Send each file's bytes as they are, in chunks, instead of decoding and re-encoding every
# dataset (pynetdicom's default): ~2x the C-STORE rate. It needs a presentation context in
# the file's own transfer syntax; send_files proposes one, and falls back to decoding.
_pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True


def backoff_delay(attempts: int, retry: RetrySettings, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt after ``attempts`` failures (>= 1):
    ``min(max_delay, base * 2**(attempts-1))`` spread by +-``jitter``."""
    rng = rng or random
    d = min(retry.max_delay_s, retry.base_delay_s * 2.0 ** max(0, attempts - 1))
    return max(0.0, d * (1.0 + rng.uniform(-retry.jitter, retry.jitter)))


class Link:
    """One association to a destination, opened on demand and kept open between sends
    (across a series' batches and across series while work is queued; the owner closes
    it when idle). It proposes, per SOP class, a context in each transfer syntax its
    files use (they go out as they are) plus one uncompressed context with both little
    endian syntaxes for the decode-and-convert fallback; a file that needs a context the
    open association lacks reopens it with the union."""

    def __init__(self, dest: Destination, calling_aet: str = "SYNTHMR") -> None:
        self.dest, self.calling_aet = dest, calling_aet
        self.assoc: Any = None
        self._ae: PushAE | None = None
        #: (SOP class, transfer syntax) proposed on this link, kept across reopenings
        self.wanted: set[tuple[str, str]] = set()
        self._proposed: set[tuple[str, str]] = set()
        self._as_is: dict[tuple[str, str], int] = {}  # accepted as proposed: context ID
        self._message_id = 0

    @property
    def is_open(self) -> bool:
        return self.assoc is not None and self.assoc.is_established

    def open(self, needs: set[tuple[str, str]]) -> str:
        """Make sure an association carrying ``needs`` is up; "" or why it is not."""
        self.wanted |= needs
        if self.is_open and needs <= self._proposed:
            return ""
        self.close()
        wanted = self.wanted
        cxs = self._contexts(wanted)
        if len(cxs) > _MAX_CONTEXTS:  # too varied a history: what this batch needs only
            wanted = set(needs)
            cxs = self._contexts(wanted)
            if len(cxs) > _MAX_CONTEXTS:
                raise ValueError(
                    f"send_files: {len(cxs)} presentation contexts exceed {_MAX_CONTEXTS}"
                )
        dest = self.dest
        # PushAE: no 1 ms polls, and the association's reactor cannot take a C-STORE
        # response from a sender (pynetdicom's pause race: see dicom_node.requestor)
        ae = PushAE(ae_title=self.calling_aet)
        for t in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, t, dest.timeout_s)
        ae.requested_contexts = cxs
        tls_args = None
        if dest.tls:
            ctx = make_client_ssl_context(dest.ca_file, dest.cert_file, dest.key_file)
            tls_args = (ctx, dest.host)
        self._ae = ae
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
        except Exception as exc:  # e.g. TLS handshake errors
            self.close()
            return f"association failed: {exc}"
        if not assoc.is_established:
            self.close()
            return "association rejected or PACS unreachable"
        set_tcp_nodelay(assoc)
        # pynetdicom leaves a requestor's socket blocking once connected: a PACS that stops
        # reading would hold a send forever; now it fails after timeout_s (and is aborted)
        with contextlib.suppress(OSError, AttributeError):
            assoc.dul.socket.socket.settimeout(dest.timeout_s)
        self.assoc, self._proposed, self._message_id = assoc, set(wanted), 0
        self._as_is = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id)
            for cx in assoc.accepted_contexts
        }
        return ""

    @staticmethod
    def _contexts(wanted: set[tuple[str, str]]) -> list[Any]:
        by_class: dict[str, set[str]] = defaultdict(set)
        for cls, ts in wanted:
            by_class[cls].add(ts)
        cxs = []
        for cls in sorted(by_class):
            cxs.extend(build_context(cls, ts) for ts in sorted(by_class[cls]))
            cxs.append(build_context(cls, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        return cxs

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            try:
                self.assoc.release()
            except Exception:  # a peer gone: nothing to release
                pass
        if self._ae is not None:
            self._ae.shutdown()
        self.assoc, self._ae, self._proposed, self._as_is = None, None, set(), {}

    def send(self, path: str | Path) -> dict[str, Any]:
        """C-STORE one file over the open association: ``{"path", "status", "error"}``."""
        p = str(path)
        if not self.is_open:
            return {"path": p, "status": None, "error": "association lost"}
        self._message_id = self._message_id % 0xFFFF + 1
        try:
            data = Path(path).read_bytes()
            try:
                meta = part10_meta(data)
            except Part10Error:
                meta = None
            ctx = self._as_is.get((meta.sop_class_uid, meta.transfer_syntax_uid)) if meta else None
            if meta is not None and ctx is not None:
                # the file's bytes as they are, command set encoded directly
                rsp = send_c_store_bytes(
                    self.assoc, ctx, meta, memoryview(data)[meta.offset :], self._message_id
                )
                if rsp is not None and rsp.MessageIDBeingRespondedTo != self._message_id:
                    rsp = None  # not the answer to this request
            elif meta is None:  # a file this reader cannot walk: pynetdicom reads it
                rsp = self.assoc.send_c_store(path, msg_id=self._message_id)
            else:
                # the PACS refused the file's syntax: decode (and decompress), and let
                # pynetdicom encode it in an accepted uncompressed syntax
                ds = dcmread(BytesIO(data))
                if ds.file_meta.TransferSyntaxUID.is_compressed:
                    # keep the SOP Instance UID: pydicom 3 makes a new one by default,
                    # which would break the SEG/SR references and duplicate on retry
                    ds.decompress(generate_instance_uid=False)
                rsp = self.assoc.send_c_store(ds, msg_id=self._message_id)
        except Exception as exc:
            return {"path": p, "status": None, "error": f"{type(exc).__name__}: {exc}"}
        status = _status(rsp)
        ok = status is not None and (status == 0 or status in (0xB000, 0xB007, 0xB006))
        return {"path": p, "status": status, "error": "" if ok else "no or failed response"}


def _status(rsp: Any) -> int | None:
    """The Status of a C-STORE response (a pynetdicom primitive or status Dataset)."""
    if rsp is None:
        return None
    status = getattr(rsp, "Status", None)
    if status is None and hasattr(rsp, "get"):
        status = rsp.get("Status")
    return int(status) if status is not None else None


def file_contexts(
    paths: Sequence[str | Path],
) -> tuple[dict[str, tuple[str, str]], list[dict[str, Any]]]:
    """(SOP class, transfer syntax) of each Part-10 file by path, and the failures of
    the files that have no readable file meta."""
    found: dict[str, tuple[str, str]] = {}
    bad: list[dict[str, Any]] = []
    for p in paths:
        try:
            m = read_part10_meta(p)
            found[str(p)] = (m.sop_class_uid, m.transfer_syntax_uid)
        except Exception:
            try:  # a file without preamble or group length: pydicom's reader
                fm = read_file_meta_info(p)
                found[str(p)] = (str(fm.MediaStorageSOPClassUID), str(fm.TransferSyntaxUID))
            except Exception as exc:  # not a Part-10 file
                bad.append(
                    {"path": str(p), "status": None, "error": f"unreadable file meta: {exc}"}
                )
    return found, bad


def send_files(
    paths: Sequence[str | Path],
    dest: Destination | None = None,
    *,
    ae_title: str | None = None,
    host: str | None = None,
    port: int | None = None,
    calling_aet: str = "SYNTHMR",
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Send DICOM files over one association to ``dest`` (or ``ae_title@host:port``).

    Returns ``{"sent": n, "failed": n, "results": [{"path", "status", "error"}]}``;
    ``status`` is the C-STORE status (int) or None when the file was not sent.
    Never raises for network trouble: every file then carries the error.
    """
    if dest is None:
        if not (ae_title and host and port):
            raise ValueError("send_files: give a Destination or ae_title, host and port")
        dest = Destination(
            name=f"{ae_title}@{host}:{port}",
            ae_title=ae_title,
            host=host,
            port=int(port),
            timeout_s=timeout_s,
        )
    return send_parallel(paths, replace(dest, associations=1), calling_aet=calling_aet)


def send_parallel(
    paths: Sequence[str | Path],
    dest: Destination,
    *,
    calling_aet: str = "SYNTHMR",
) -> dict[str, Any]:
    """Send files over ``dest.associations`` concurrent associations, each taking the next
    file from one shared queue (no share waits for a slower one); the shape of
    :func:`send_files`. The threads wait on sockets, the GIL is mostly free: a PACS that
    stores concurrently (Orthanc does) takes the outputs faster."""
    contexts, results = file_contexts(paths)
    todo = deque(str(p) for p in paths if str(p) in contexts)
    if not todo:
        return _summary(results)
    needs = set(contexts.values())
    lock = threading.Lock()
    links_up = [0]  # associations established so far

    def run() -> None:
        link = Link(dest, calling_aet)
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    p = todo.popleft()
                was_open = link.is_open
                err = link.open(needs)
                with lock:
                    if not err and not was_open:
                        links_up[0] += 1
                    if err and links_up[0]:  # another association takes the rest
                        todo.appendleft(p)
                        return
                if err:  # nobody will do better: every file left fails with it
                    with lock:
                        rest = [p, *todo]
                        todo.clear()
                        results.extend({"path": q, "status": None, "error": err} for q in rest)
                    return
                r = link.send(p)
                with lock:
                    results.append(r)
        finally:
            link.close()

    k = max(1, min(int(dest.associations), len(todo)))
    threads = [
        threading.Thread(target=run, name=f"push-{dest.name}-{i}", daemon=True) for i in range(1, k)
    ]
    for t in threads:
        t.start()
    run()
    for t in threads:
        t.join()
    # left by threads whose association went down while another was still up
    results.extend({"path": q, "status": None, "error": "association lost"} for q in todo)
    return _summary(results)


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    sent = sum(1 for r in results if not r["error"])
    return {"sent": sent, "failed": len(results) - sent, "results": results}


#: seconds a destination's associations stay open with nothing to send (a PACS closes
#: idle ones itself after a while: Orthanc after 30 s, DicomScpTimeout)
LINK_IDLE_S = 5.0
#: delivered items are marked SENT in one registry transaction per this many seconds
#: (or when the queue runs dry): a crash in between re-sends them, never loses them
_MARK_EVERY_S = 0.25


class _Pusher:
    """One destination's sender: ``dest.associations`` threads, each with its own
    :class:`Link`, take the next queued item as soon as it is offered (an output is sent
    once it is released, whatever batch it came in), keep their association open while
    work is queued and close it after :data:`LINK_IDLE_S` without any. Results are
    recorded in batches (:meth:`_record`)."""

    def __init__(self, outbox: Outbox, dest: Destination) -> None:
        self.outbox, self.dest = outbox, dest
        self._cv = threading.Condition()
        self._queue: deque[Any] = deque()
        self._contexts: dict[int, tuple[str, str]] = {}  # item id -> (class, syntax)
        self.in_flight: set[int] = set()  # queued, being sent, or sent and not yet recorded
        self._done: list[tuple[Any, dict[str, Any]]] = []
        self._marked_at = time.monotonic()
        self._drain_started: float | None = None
        self._threads: list[threading.Thread] = []
        self._senders = 0  # sender threads taking items (a leaving one no longer counts)
        self._sending = 0  # items being sent right now
        self._links: set[Link] = set()
        self._retired = False
        self._record_lock = threading.Lock()
        self.delivered = 0

    def offer(self, items: list[Any]) -> None:
        """Queue the items not already on their way; start senders as needed."""
        fresh = [i for i in items if i.id not in self.in_flight]
        if not fresh:
            return
        found, bad = file_contexts([i.path for i in fresh])
        with self._cv:
            if self._retired:
                return
            for item in fresh:
                self.in_flight.add(item.id)
                if str(item.path) in found:
                    self._contexts[item.id] = found[str(item.path)]
                    self._queue.append(item)
            if self._drain_started is None:
                self._drain_started = time.perf_counter()
            self._threads = [t for t in self._threads if t.is_alive()]
            want = min(max(1, int(self.dest.associations)), len(self._queue))
            for _ in range(want - self._senders):
                link = Link(self.dest, self.outbox.calling_aet)
                self._links.add(link)
                self._senders += 1
                t = threading.Thread(
                    target=self._run, args=(link,), name=f"push-{self.dest.name}", daemon=True
                )
                self._threads.append(t)
                t.start()
            self._cv.notify_all()
        if bad:
            by_path = {r["path"]: r for r in bad}
            self._finish([(i, by_path[str(i.path)]) for i in fresh if str(i.path) in by_path])

    def retire(self, wait: bool = True) -> None:
        """Stop (settings reloaded, node stopping): senders finish their current item and
        close (``wait``: until they did); queued items are dropped (still PENDING: offered
        again to a successor)."""
        with self._cv:
            self._retired = True
            for item in self._queue:
                self.in_flight.discard(item.id)
            self._queue.clear()
            self._cv.notify_all()
            threads = list(self._threads) if wait else []
        for t in threads:
            t.join(timeout=self.dest.timeout_s + 5)

    def wait_recorded(self, stop: threading.Event, poll_s: float = 0.5) -> None:
        """Return once every item offered so far is recorded (none in flight), or once
        ``stop`` is set (looked at every ``poll_s``: nothing notifies a stop here)."""
        with self._cv:
            while self.in_flight and not stop.is_set():
                self._cv.wait(poll_s)

    def _next(self) -> Any:
        """The next item, or None (the sender leaves): retired, or idle for LINK_IDLE_S."""
        with self._cv:
            while not self._queue:
                if self._retired or (not self._cv.wait(LINK_IDLE_S) and not self._queue):
                    return None
            self._sending += 1
            return self._queue.popleft()

    def _run(self, link: Link) -> None:
        leaving = False  # this sender no longer counts (decided under the lock)
        try:
            while True:
                with self._cv:
                    item = self._next()
                    if item is None:
                        self._senders -= 1  # at once, so an offer never counts on it
                        leaving = True
                        return
                    needs = {self._contexts[i.id] for i in (item, *self._queue)}
                try:
                    err = link.open(needs)
                    result = link.send(item.path) if not err else None
                except Exception as exc:  # e.g. too many contexts: this item fails alone
                    err, result = "", {"status": None, "error": f"{type(exc).__name__}: {exc}"}
                with self._cv:
                    self._sending -= 1
                    failed: list[Any] = []
                    if err and any(x.is_open for x in self._links if x is not link):
                        self._queue.appendleft(item)  # another association takes the rest
                    elif err:  # nobody gets through: every queued item fails with this now
                        failed = [item, *self._queue]
                        self._queue.clear()
                    if err:
                        self._senders -= 1
                        leaving = True
                if result is not None:
                    self._finish([(item, result)])
                    continue
                if failed:
                    self._finish([(i, {"status": None, "error": err}) for i in failed])
                return
        finally:
            with self._cv:
                if not leaving:  # an unexpected error: the item is offered again later
                    self._senders -= 1
                self._links.discard(link)
            link.close()
            self._record(force=True)

    def _finish(self, results: list[tuple[Any, dict[str, Any]]]) -> None:
        with self._cv:
            self._done.extend(results)
            drained = not self._queue and not self._sending
        self._record(force=drained)

    def _record(self, force: bool = False) -> None:
        """Mark what was sent (one transaction) and reschedule what failed, when the queue
        ran dry or every :data:`_MARK_EVERY_S`."""
        if not force and time.monotonic() - self._marked_at < _MARK_EVERY_S:
            return
        with self._record_lock:
            with self._cv:
                done, self._done = self._done, []
                self._marked_at = time.monotonic()
                drain_started = self._drain_started
            if not done:
                return
            try:
                self.delivered += self.outbox._record(self.dest.name, done)
            finally:
                with self._cv:
                    for item, _ in done:
                        self.in_flight.discard(item.id)
                        self._contexts.pop(item.id, None)
                    if not self.in_flight and drain_started is not None:
                        self._drain_started = None
                        self.outbox.metrics.stage.labels("push").observe(
                            time.perf_counter() - drain_started
                        )
                    self._cv.notify_all()


class Outbox:
    """Background sender of the registry's outbox rows."""

    def __init__(
        self,
        registry: Registry,
        destinations: Sequence[Destination],
        retry: RetrySettings,
        metrics: NodeMetrics,
        calling_aet: str = "SYNTHMR",
        rejection_note: Callable[[Retirement], tuple[str, str, str]] | None = None,
    ) -> None:
        self.registry = registry
        self.destinations = {d.name: d for d in destinations}
        self.retry = retry
        self.metrics = metrics
        self.calling_aet = calling_aet
        #: builds and stores the IOCM note of a retirement: (sop_uid, sop_class_uid, path)
        self.rejection_note = rejection_note
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pushers: dict[str, _Pusher] = {}
        self._pushers_lock = threading.Lock()

    def reload(self, destinations: Sequence[Destination], retry: RetrySettings) -> None:
        self.destinations = {d.name: d for d in destinations}
        self.retry = retry
        with self._pushers_lock:
            old, self._pushers = list(self._pushers.values()), {}
        for p in old:  # their queued items are offered to the new settings' pushers
            p.retire(wait=False)  # (SIGHUP: the handler does not wait for a send)
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._pushers_lock:
            old, self._pushers = list(self._pushers.values()), {}
        for p in old:
            p.retire()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._feed()
            except Exception:
                log.exception("outbox_error")
            self._wake.wait(self.retry.poll_interval_s)
            self._wake.clear()

    def _feed(self) -> list[_Pusher]:
        """Queue rejection notes of superseded outputs, then offer every due item to its
        destination's pusher (items already on their way are skipped); return the
        pushers offered something."""
        self._retire()
        groups: dict[str, list[Any]] = defaultdict(list)
        for item in self.registry.due_outbox():
            groups[item.destination].append(item)
        offered = []
        for dest_name, items in groups.items():
            if self._stop.is_set():
                break
            dest = self.destinations.get(dest_name)
            if dest is None:
                for series_uid in sorted({i.series_uid for i in items}):
                    mine = [i for i in items if i.series_uid == series_uid]
                    self._failed(
                        [i.id for i in mine],
                        dest_name,
                        f"destination {dest_name!r} is no longer configured",
                        max(i.attempts for i in mine),
                        series_uid,
                    )
                continue
            with self._pushers_lock:
                pusher = self._pushers.get(dest_name)
                if pusher is None:
                    pusher = self._pushers[dest_name] = _Pusher(self, dest)
            pusher.offer(items)
            offered.append(pusher)
        return offered

    def run_once(self) -> int:
        """Queue rejection notes, send every due item once and wait until each is
        recorded; return how many were delivered."""
        offered = self._feed()
        before = {id(p): p.delivered for p in offered}
        for p in offered:
            p.wait_recorded(self._stop)
        return sum(p.delivered - before[id(p)] for p in offered)

    def _retire(self) -> None:
        """Superseded outputs a destination holds: a rejection note joins its outbox (sent
        like any output; the series is DELIVERED only once it is), or none where the
        destination says ``reject_superseded = false``."""
        for ret in self.registry.due_retirements():
            dest = self.destinations.get(ret.destination)
            note = None
            try:
                if dest is not None and dest.reject_superseded and self.rejection_note:
                    note = self.rejection_note(ret)
            except Exception as exc:  # retried at the next pass
                log_event(
                    log,
                    "rejection_note_failed",
                    level=logging.ERROR,
                    series_uid=ret.series_uid,
                    destination=ret.destination,
                    error=f"{type(exc).__name__}: {exc}",
                )
                continue
            self.registry.retired(ret, note)
            log_event(
                log,
                "outputs_retired",
                series_uid=ret.series_uid,
                destination=ret.destination,
                n=len(ret.instances),
                rejection_note=note[0] if note else None,
            )

    def _record(self, dest_name: str, done: list[tuple[Any, dict[str, Any]]]) -> int:
        """Mark the delivered items SENT in one transaction, reschedule the failed ones;
        return how many were delivered."""
        ok = [i for i, r in done if not r["error"]]
        bad = [(i, r) for i, r in done if r["error"]]
        if ok:
            self.registry.outbox_sent([i.id for i in ok])
            self.metrics.push.labels(dest_name, "success").inc(len(ok))
            by_series: dict[str, int] = defaultdict(int)
            for i in ok:
                by_series[i.series_uid] += 1
            for series_uid, n in by_series.items():
                log_event(log, "pushed", series_uid=series_uid, destination=dest_name, n=n)
        if bad:
            self.metrics.push.labels(dest_name, "failure").inc(len(bad))
            groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
            for i, r in bad:
                groups[(i.series_uid, r["error"])].append(i)
            for (series_uid, err), items in groups.items():
                self._failed(
                    [i.id for i in items],
                    dest_name,
                    err,
                    max(i.attempts for i in items),
                    series_uid,
                )
        return len(ok)

    def _failed(
        self, ids: list[int], dest: str, err: str, attempts: int, series_uid: str = ""
    ) -> None:
        delay = backoff_delay(attempts + 1, self.retry)
        dead = self.registry.outbox_failed(ids, err, time.time() + delay, self.retry.max_attempts)
        if dead:
            self.metrics.dead_letters.inc(len(dead))
        log_event(
            log,
            "push_failed",
            level=logging.WARNING,
            series_uid=series_uid,
            destination=dest,
            n=len(ids),
            error=err,
            retry_in_s=round(delay, 2),
            dead_letters=len(dead),
        )
