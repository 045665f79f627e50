"""The node's DICOM listener: C-ECHO and C-STORE into the durable spool.

Association policy: connection admission (TLS handshake and A-ASSOCIATE-RQ within a setup
timeout, per-host limits: :mod:`dicom_node.transport`), the called AE title, the calling-AE
allow-list (optionally per host), a maximum number of associations; every refusal is logged
and counted. Handlers validate and write the raw received bytes (no decode of pixel data)
to the spool, record the instance, and return: no processing on the association's thread.
"""

from __future__ import annotations

import functools
import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from dicom_node import reactor
from dicom_node.elements import even, explicit_element
from dicom_node.logging import log_event
from dicom_node.metrics import NodeMetrics
from dicom_node.registry import InstanceMovedError, Registry
from dicom_node.spool import InstanceHeader, Spool, SpoolFullError, read_header
from dicom_node.transport import (
    AdmissionLimits,
    GuardedAssociationServer,
    make_server_ssl_context,
    set_tcp_nodelay,
)
from dicom_node.validate import InvalidInstanceError

if TYPE_CHECKING:  # settings only read here: an acceptor process does not import config
    from dicom_node.config import AllowedCaller, Settings

__all__ = ["TRANSFER_SYNTAXES", "CallerPolicy", "StoreSCP", "register_spooled"]

log = logging.getLogger("synthmr.scp")

#: Accepted for every storage SOP class: uncompressed, deflate, JPEG, JPEG-LS, JPEG 2000, RLE.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]

# C-STORE failure statuses (PS3.4 B.2.3)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class CallerPolicy:
    """Who may associate. Swapped atomically on SIGHUP (reload)."""

    require_known_callers: bool
    allowed: tuple[AllowedCaller, ...]

    def check(self, calling_ae: str, host: str) -> str | None:
        """None if allowed, else the reason for rejection."""
        if not self.require_known_callers:
            return None
        ae = calling_ae.strip()
        for c in self.allowed:
            if c.ae_title.strip() == ae:
                if c.hosts and host not in c.hosts:
                    return f"calling AE {ae!r} not allowed from host {host}"
                return None
        return f"calling AE {ae!r} is not in the allow-list"


def register_spooled(
    spool: Spool,
    registry: Registry,
    expected_count: Callable[[object], int | None] | None = None,
) -> int:
    """Register every spooled received file that has no registry row; return how many.

    The instance rows are committed without an fsync of their own (the file is the durable
    record): after a power loss the last rows may be gone while their acknowledged files
    are on disk. At start-up they are read back and registered like a C-STORE (their
    series re-opens as RECEIVING and completes again)."""
    known = registry.known_paths()
    n = 0
    for path in sorted(spool.incoming.rglob("*.dcm")):
        if str(path) in known:
            continue
        try:
            header = read_header(path.read_bytes())
        except (OSError, InvalidInstanceError) as exc:
            log_event(
                log, "spooled_unreadable", level=logging.WARNING, path=str(path), reason=str(exc)
            )
            continue
        expected = None
        if expected_count is not None:
            try:
                expected = expected_count(header.dataset)
            except Exception:  # a vendor rule must not stop the start-up
                expected = None
        try:
            registry.add_instance(
                sop_uid=header.sop_instance_uid,
                series_uid=header.series_instance_uid,
                study_uid=header.study_instance_uid,
                sop_class_uid=header.sop_class_uid,
                path=str(path),
                size=path.stat().st_size,
                expected_count=expected,
                sha256=header.content_sha256,
            )
        except InstanceMovedError as exc:
            log_event(
                log, "spooled_conflict", level=logging.WARNING, path=str(path), reason=str(exc)
            )
            continue
        n += 1
    registry.flush()
    return n


#: the file meta elements that are the same for every instance
_META_VERSION = explicit_element((2, 0x0001), b"OB", b"\x00\x01")
_META_IMPLEMENTATION = explicit_element(
    (2, 0x0012), b"UI", even(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")
) + explicit_element((2, 0x0013), b"SH", even(PYNETDICOM_IMPLEMENTATION_VERSION, b" "))


def part10_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, body: bytes
) -> bytes:
    """Preamble, ``DICM``, file meta and ``body`` (the dataset as received): the bytes
    pynetdicom's ``Event.encoded_dataset()`` returns, built without a pydicom dataset
    (~20 µs instead of ~0.5 ms per instance)."""
    return part10_prefix(sop_class_uid, sop_instance_uid, transfer_syntax) + body


def part10_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """What :func:`part10_bytes` puts before the dataset: preamble, ``DICM``, file meta."""
    head, tail = _meta_around_instance(sop_class_uid, transfer_syntax)
    instance = explicit_element((2, 0x0003), b"UI", even(sop_instance_uid, b"\x00"))
    group_length = explicit_element(
        (2, 0x0000), b"UL", struct.pack("<I", len(head) + len(instance) + len(tail))
    )
    return b"".join((_PREAMBLE, group_length, head, instance, tail))


_PREAMBLE = b"\x00" * 128 + b"DICM"


@functools.lru_cache(maxsize=256)
def _meta_around_instance(sop_class_uid: str, transfer_syntax: str) -> tuple[bytes, bytes]:
    """The file meta elements before and after (0002,0003) that depend only on the SOP
    class and transfer syntax: the same for every instance of a series."""
    head = _META_VERSION + explicit_element((2, 0x0002), b"UI", even(sop_class_uid, b"\x00"))
    tail = (
        explicit_element((2, 0x0010), b"UI", even(transfer_syntax, b"\x00")) + _META_IMPLEMENTATION
    )
    return head, tail


def _received_bytes(event: evt.Event) -> tuple[bytes, tuple[str, str]]:
    """The Part-10 bytes of a C-STORE request (see :func:`part10_bytes`; a lean-path
    request's data set copied once, straight after its file meta) and the (SOP class,
    transfer syntax) written in that meta."""
    rq = event.request
    sop_class, transfer_syntax = str(rq.AffectedSOPClassUID), str(event.context.transfer_syntax)
    prefix = part10_prefix(sop_class, str(rq.AffectedSOPInstanceUID), transfer_syntax)
    if isinstance(rq, reactor.LeanCStore):
        return rq.part10(prefix), (sop_class, transfer_syntax)
    return prefix + rq.DataSet.getvalue(), (sop_class, transfer_syntax)


InstanceHook = Callable[[str, int, "int | None"], None]
ReleaseHook = Callable[[list[str]], None]


class StoreSCP:
    """pynetdicom AE bound to the spool and the registry.

    ``on_instance(series_uid, n_instances, expected_count)`` runs after each stored
    instance; ``on_release(series_uids)`` after an association ends (released or aborted).
    """

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        registry: Registry,
        metrics: NodeMetrics,
        on_instance: InstanceHook | None = None,
        on_release: ReleaseHook | None = None,
        expected_count: Callable[[object], int | None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.registry = registry
        self.metrics = metrics
        self.on_instance = on_instance
        self.on_release = on_release
        self.expected_count = expected_count
        self.policy = CallerPolicy(
            settings.security.require_known_callers, settings.security.allowed_callers
        )
        self._label_callers()
        self._receive_stage = metrics.stage.labels("receive")  # looked up once
        self._series_by_assoc: dict[int, set[str]] = {}
        self._active: set[int] = set()  # accepted associations not yet ended
        self._expected_by_series: dict[str, int | None] = {}  # insertion order: oldest first
        self._lock = threading.Lock()
        self._server: GuardedAssociationServer | None = None
        #: the server class (an acceptor process sets its own: dicom_node.acceptors)
        self.server_class: Any = GuardedAssociationServer
        self._pool: Any = None  # dicom_node.acceptors.AcceptorPool with acceptor_processes > 1
        #: CPU seconds the acceptor processes spent accepting, known after stop (benchmarks)
        self.helper_cpu_s = 0.0
        self.helper_journal_syncs = 0
        n = settings.node
        ae = self.ae = AE(ae_title=n.ae_title)
        ae.acse_timeout = n.acse_timeout_s
        ae.dimse_timeout = n.dimse_timeout_s
        ae.network_timeout = n.network_timeout_s
        ae.maximum_pdu_size = n.max_pdu
        ae.require_called_aet = False
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        for cx in AllStoragePresentationContexts:  # every storage class, PM/SEG/SR too
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("SCP not started")
        return int(self._server.server_address[1])

    @property
    def listening(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        n = self.settings.node
        tls = self.settings.security.tls
        ssl_context = (
            make_server_ssl_context(
                tls.cert_file, tls.key_file, tls.ca_file, tls.require_client_cert
            )
            if tls.enabled
            else None
        )
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
            (evt.EVT_CONN_CLOSE, self._on_end),
        ]
        limits = AdmissionLimits(
            setup_timeout_s=n.setup_timeout_s,
            max_pending_per_host=n.max_pending_per_host,
            max_connections_per_host=n.max_connections_per_host,
            max_associations=n.max_associations,
        )
        helpers = n.acceptor_processes > 1 and not tls.enabled
        helpers = helpers and self.server_class is GuardedAssociationServer
        server_class = self.server_class
        if helpers:  # it accepts and hands connections to the acceptor processes
            from dicom_node.acceptors import AcceptorPool, DispatchingServer

            server_class = DispatchingServer
        # pynetdicom's server with admission control (dicom_node.transport), its association
        # threads blocking instead of polling in 1 ms sleeps (dicom_node.reactor): ~2 ms
        # less per C-STORE on loopback
        self._server = reactor.make_server(
            self.ae,
            (n.bind_address, n.port),
            handlers,
            ssl_context=ssl_context,
            server_class=functools.partial(
                server_class, limits=limits, on_refused=self._refused_connection
            ),
        )
        if helpers:
            self._pool = AcceptorPool(self, self._server, n.acceptor_processes)
            self._pool.start()
            self.spool.peer_checkpoints.append(self._pool.checkpoint_all)
        log_event(
            log,
            "scp_listening",
            ae_title=n.ae_title,
            address=n.bind_address,
            port=self.port,
            tls=tls.enabled,
        )

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self.helper_cpu_s = self._pool.helper_cpu_s
            self.helper_journal_syncs = self._pool.helper_journal_syncs
            self.spool.peer_checkpoints.remove(self._pool.checkpoint_all)
            self._pool = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def reload(self, settings: Settings) -> None:
        """Apply a new allow-list; associations in flight keep going."""
        self.policy = CallerPolicy(
            settings.security.require_known_callers, settings.security.allowed_callers
        )
        self._label_callers()
        self.settings = settings
        if self._pool is not None:
            self._pool.reload(settings)

    def publish_active(self) -> None:
        """The associations_active gauge: this process's and the acceptor processes'."""
        remote = self._pool.remote_active() if self._pool is not None else 0
        with self._lock:
            self.metrics.associations_active.set(len(self._active) + remote)

    def _label_callers(self) -> None:
        """An enforced allow-list bounds the calling_ae metric label to its titles."""
        p = self.policy
        self.metrics.set_allowed_callers(
            [c.ae_title for c in p.allowed] if p.require_known_callers else None
        )

    # ------------------------------------------------------------------ handlers
    def _refused_connection(self, reason: str, host: str, detail: str) -> None:
        self.metrics.connections_refused.labels(reason).inc()
        log_event(
            log, "connection_refused", level=logging.WARNING, reason=reason, host=host, why=detail
        )

    def _on_requested(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        calling = str(rq.primitive.calling_ae_title if rq.primitive else rq.ae_title).strip()
        called = str(rq.primitive.called_ae_title if rq.primitive else "").strip()
        # (result, source, reason) of A-ASSOCIATE-RJ, PS3.8 9.3.4
        if self.settings.node.require_called_ae and called != self.settings.node.ae_title.strip():
            kind, why, rj = "called_ae", f"called AE {called!r} is not this node", (1, 1, 7)
        elif (why := self.policy.check(calling, str(rq.address))) is not None:
            kind, rj = "calling_ae", (1, 1, 3)
        elif self._server is not None and (why := self._server.admit(event.assoc)) is not None:
            kind, rj = "association_limit", (2, 3, 2)  # transient, local limit exceeded
        else:
            return
        self.metrics.associations.labels("rejected").inc()
        self._refused_connection(kind, str(rq.address), f"{why} (calling AE {calling!r})")
        event.assoc.acse.send_reject(*rj)
        event.assoc.kill()  # waits until the reject PDU is out, as pynetdicom's own path

    def _on_accepted(self, event: evt.Event) -> None:
        set_tcp_nodelay(event.assoc)  # C-STORE responses go out at once (no Nagle wait)
        self.metrics.associations.labels("accepted").inc()
        with self._lock:
            self._series_by_assoc[id(event.assoc)] = set()
            self._active.add(id(event.assoc))
        self.publish_active()

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _refuse(self, calling: str, result: str, exc: Exception, status: int) -> Dataset:
        """Count, log and answer a C-STORE the node does not keep."""
        self.metrics.instance_received(calling, result)
        log_event(
            log,
            f"store_{result}",
            level=logging.ERROR if status == STATUS_OUT_OF_RESOURCES else logging.WARNING,
            status=f"0x{status:04X}",
            reason=str(exc),
            calling_ae=calling,
        )
        rsp = Dataset()
        rsp.Status = status
        rsp.ErrorComment = str(exc)[:64]  # LO
        return rsp

    def _on_store(self, event: evt.Event) -> int | Dataset:
        t0 = time.perf_counter()
        calling = str(event.assoc.requestor.ae_title).strip()
        n = self.settings.node
        path = None
        try:
            data, meta = _received_bytes(event)
            header, path = self.spool.receive(
                data, n.max_instance_bytes, n.max_inflated_bytes, meta
            )
            count, expected = self.registry.add_instance(
                sop_uid=header.sop_instance_uid,
                series_uid=header.series_instance_uid,
                study_uid=header.study_instance_uid,
                sop_class_uid=header.sop_class_uid,
                path=path,
                size=len(data),
                calling_ae=calling,
                expected_count=self._expected(header, data),
                sha256=header.content_sha256,
                replaced_sha256=header.replaced_sha256,
            )
        except (SpoolFullError, OSError) as exc:
            return self._refuse(calling, "rejected", exc, STATUS_OUT_OF_RESOURCES)
        except InvalidInstanceError as exc:
            return self._refuse(calling, "failed", exc, exc.status)
        except InstanceMovedError as exc:
            if path is not None:
                self.spool.discard_received(path)
            return self._refuse(calling, "failed", exc, STATUS_CANNOT_UNDERSTAND)
        with self._lock:
            self._series_by_assoc.setdefault(id(event.assoc), set()).add(header.series_instance_uid)
        self.metrics.instance_received(calling, "stored")
        self._receive_stage.observe(time.perf_counter() - t0)
        if self.on_instance is not None:
            self.on_instance(header.series_instance_uid, count, expected)
        return STATUS_SUCCESS

    #: series whose expected count this SCP remembers (the most recent ones)
    EXPECTED_CACHE_SERIES = 256

    def _expected(self, header: InstanceHeader, data: bytes) -> int | None:
        """The vendor rule's expected instance count of the header's series, from the
        first instance of the series this SCP stored (the rule reads a series-level count;
        the registry keeps the first it gets): the rule and the dataset it needs are not
        parsed again for every instance."""
        if self.expected_count is None:
            return None
        series = header.series_instance_uid
        with self._lock:
            if series in self._expected_by_series:
                return self._expected_by_series[series]
        try:
            expected = self._expected_uncached(header, data)
        except Exception as exc:  # a vendor rule must not fail the store
            log_event(log, "expected_count_error", level=logging.WARNING, reason=repr(exc))
            return None
        with self._lock:
            self._expected_by_series[series] = expected
            while len(self._expected_by_series) > self.EXPECTED_CACHE_SERIES:
                self._expected_by_series.pop(next(iter(self._expected_by_series)))
        return expected

    def _expected_uncached(self, header: InstanceHeader, data: bytes) -> int | None:
        """The vendor rule run on the instance (``data``: its Part-10 bytes)."""
        assert self.expected_count is not None
        return self.expected_count(header.dataset)

    def _on_end(self, event: evt.Event) -> None:
        with self._lock:
            series = self._series_by_assoc.pop(id(event.assoc), None)
            # RELEASED/ABORTED and CONN_CLOSE both fire: the set makes this idempotent.
            self._active.discard(id(event.assoc))
        self.publish_active()
        if series:
            self.registry.mark_released(sorted(series))
            if self.on_release is not None:
                self.on_release(sorted(series))
