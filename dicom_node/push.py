"""C-STORE SCU and the outbox.

:func:`send_files` sends files over ONE association with every presentation context the
files need (SOP class x their own transfer syntax), without decoding them. Every network
step has a timeout, so a dead PACS costs at most ``timeout_s`` and never hangs the node.

:class:`Outbox` sends due outbox rows grouped by (destination, series); a failure
reschedules with exponential backoff and jitter; after ``max_attempts`` the item is a dead
letter (counted, kept on disk, re-queued by an operator retry).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config as _pynetdicom_config
from pynetdicom.presentation import build_context

from dicom_node.config import Destination, RetrySettings
from dicom_node.logging import log_context, log_event
from dicom_node.metrics import NodeMetrics
from dicom_node.registry import Registry, Retirement
from dicom_node.requestor import PushAE
from dicom_node.transport import make_client_ssl_context, set_tcp_nodelay

__all__ = ["Outbox", "backoff_delay", "send_files", "send_parallel"]

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
    files = [Path(p) for p in paths]
    results: list[dict[str, Any]] = []
    contexts: dict[str, set[str]] = defaultdict(set)
    sendable: list[Path] = []
    syntax: dict[Path, tuple[str, str]] = {}
    for p in files:
        try:
            meta = read_file_meta_info(p)
            cls, ts = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        except Exception as exc:  # not a Part-10 file
            results.append(
                {"path": str(p), "status": None, "error": f"unreadable file meta: {exc}"}
            )
            continue
        contexts[cls].add(ts)
        sendable.append(p)
        syntax[p] = (cls, ts)
    if not sendable:
        return _summary(results)

    # PushAE: no 1 ms polls, and the association's reactor cannot take a C-STORE response
    # from send_c_store (pynetdicom's pause race: see dicom_node.requestor)
    ae = PushAE(ae_title=calling_aet)
    for t in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, t, dest.timeout_s)
    # Per SOP class: one context per transfer syntax the files use (an acceptor picks a
    # single syntax per context, and files go out as they are), plus one uncompressed
    # context with both syntaxes for the decode-and-convert fallback.
    cxs = []
    for cls, tss in contexts.items():
        cxs.extend(build_context(cls, ts) for ts in sorted(tss))
        cxs.append(build_context(cls, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    if len(cxs) > _MAX_CONTEXTS:
        raise ValueError(f"send_files: {len(cxs)} presentation contexts exceed {_MAX_CONTEXTS}")
    ae.requested_contexts = cxs
    tls_args = None
    if dest.tls:
        tls_args = (make_client_ssl_context(dest.ca_file, dest.cert_file, dest.key_file), dest.host)
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except Exception as exc:  # e.g. TLS handshake errors
        assoc = None
        err = f"association failed: {exc}"
    else:
        err = "association rejected or PACS unreachable" if not assoc.is_established else ""
    if assoc is None or not assoc.is_established:
        results.extend({"path": str(p), "status": None, "error": err} for p in sendable)
        ae.shutdown()
        return _summary(results)
    set_tcp_nodelay(assoc)
    as_is = {
        (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
    }
    try:
        for p in sendable:
            if not assoc.is_established:
                results.append({"path": str(p), "status": None, "error": "association lost"})
                continue
            try:
                if syntax[p] in as_is:
                    rsp = assoc.send_c_store(p)  # the file's bytes as they are
                else:
                    # the PACS refused the file's syntax: decode (and decompress), and let
                    # pynetdicom encode it in an accepted uncompressed syntax
                    ds = dcmread(p)
                    if ds.file_meta.TransferSyntaxUID.is_compressed:
                        # keep the SOP Instance UID: pydicom 3 makes a new one by default,
                        # which would break the SEG/SR references and duplicate on retry
                        ds.decompress(generate_instance_uid=False)
                    rsp = assoc.send_c_store(ds)
                status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
                ok = status is not None and (status == 0 or status in (0xB000, 0xB007, 0xB006))
                results.append(
                    {
                        "path": str(p),
                        "status": status,
                        "error": "" if ok else "no or failed response",
                    }
                )
            except Exception as exc:
                results.append(
                    {"path": str(p), "status": None, "error": f"{type(exc).__name__}: {exc}"}
                )
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    return _summary(results)


def send_parallel(
    paths: Sequence[str | Path],
    dest: Destination,
    *,
    sender: Callable[..., dict[str, Any]] = send_files,
    calling_aet: str = "SYNTHMR",
) -> dict[str, Any]:
    """:func:`send_files` over ``dest.associations`` concurrent associations (round-robin
    shares of ``paths``); same result shape. The threads wait on sockets, the GIL is free:
    a PACS that stores concurrently (Orthanc does) takes the outputs ~k times as fast."""
    paths = list(paths)
    k = max(1, min(int(dest.associations), len(paths)))
    if k == 1:
        return sender(paths, dest, calling_aet=calling_aet)
    shares = [paths[i::k] for i in range(k)]
    out: list[dict[str, Any] | None] = [None] * k

    def send(i: int) -> None:
        try:
            out[i] = sender(shares[i], dest, calling_aet=calling_aet)
        except Exception as exc:  # one share's failure must not lose the others' results
            err = f"{type(exc).__name__}: {exc}"
            out[i] = _summary([{"path": str(p), "status": None, "error": err} for p in shares[i]])

    threads = [
        threading.Thread(target=send, args=(i,), name=f"push-{dest.name}-{i}", daemon=True)
        for i in range(1, k)
    ]
    for t in threads:
        t.start()
    send(0)
    for t in threads:
        t.join()
    return _summary([r for res in out if res is not None for r in res["results"]])


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    sent = sum(1 for r in results if not r["error"])
    return {"sent": sent, "failed": len(results) - sent, "results": results}


class Outbox:
    """Background sender of the registry's outbox rows."""

    def __init__(
        self,
        registry: Registry,
        destinations: Sequence[Destination],
        retry: RetrySettings,
        metrics: NodeMetrics,
        calling_aet: str = "SYNTHMR",
        sender: Callable[..., dict[str, Any]] = send_files,
        rejection_note: Callable[[Retirement], tuple[str, str, str]] | None = None,
    ) -> None:
        self.registry = registry
        self.destinations = {d.name: d for d in destinations}
        self.retry = retry
        self.metrics = metrics
        self.calling_aet = calling_aet
        self.sender = sender
        #: builds and stores the IOCM note of a retirement: (sop_uid, sop_class_uid, path)
        self.rejection_note = rejection_note
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def reload(self, destinations: Sequence[Destination], retry: RetrySettings) -> None:
        self.destinations = {d.name: d for d in destinations}
        self.retry = retry
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

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("outbox_error")
            self._wake.wait(self.retry.poll_interval_s)
            self._wake.clear()

    def run_once(self) -> int:
        """Queue rejection notes of superseded outputs, then send every due item once;
        return how many were delivered."""
        self._retire()
        groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for item in self.registry.due_outbox():
            groups[(item.destination, item.series_uid)].append(item)
        delivered = 0
        for (dest_name, series_uid), items in groups.items():
            if self._stop.is_set():
                break
            with log_context(series_uid=series_uid, destination=dest_name):
                delivered += self._send_group(dest_name, series_uid, items)
        return delivered

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

    def _send_group(self, dest_name: str, series_uid: str, items: list[Any]) -> int:
        """One association for one (destination, series); return how many were delivered."""
        delivered = 0
        dest = self.destinations.get(dest_name)
        ids = [i.id for i in items]
        if dest is None:
            self._failed(
                ids,
                dest_name,
                f"destination {dest_name!r} is no longer configured",
                max(i.attempts for i in items),
                series_uid,
            )
            return 0
        t0 = time.perf_counter()
        res = send_parallel(
            [i.path for i in items], dest, sender=self.sender, calling_aet=self.calling_aet
        )
        self.metrics.stage.labels("push").observe(time.perf_counter() - t0)
        by_path = {r["path"]: r for r in res["results"]}
        ok = [i.id for i in items if not by_path.get(str(i.path), {"error": "missing"})["error"]]
        bad = [i for i in items if i.id not in set(ok)]
        if ok:
            self.registry.outbox_sent(ok)
            delivered += len(ok)
            self.metrics.push.labels(dest_name, "success").inc(len(ok))
            log_event(log, "pushed", series_uid=series_uid, destination=dest_name, n=len(ok))
        if bad:
            err = by_path.get(str(bad[0].path), {}).get("error", "unknown error")
            self.metrics.push.labels(dest_name, "failure").inc(len(bad))
            self._failed(
                [i.id for i in bad], dest_name, err, max(i.attempts for i in bad), series_uid
            )
        return delivered

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
