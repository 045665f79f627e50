"""Event-driven association threads for pynetdicom's acceptor (the node's SCP).

pynetdicom 3.0 runs two polling loops per association: the DUL reactor sleeps 1 ms whenever
it finds nothing to do, and the association's acceptor reactor sleeps 1 ms on every turn
before it looks for a decoded DIMSE message. A C-STORE request therefore waits up to ~1 ms
to be noticed and its response another ~1 ms to be sent: on loopback a do-nothing
pynetdicom SCP stores about a quarter of what dcmtk's storescp does.

Here the same loops (the code of pynetdicom 3.0.4's ``DULServiceProvider.run_reactor`` and
``Association._run_reactor``, MIT licence) block instead of sleeping:

- the DUL thread waits in ``select`` on the peer socket *and* a wake-up socket that
  ``send_pdu`` (a response queued by the association thread) and ``kill_dul`` write to;
- the association thread waits on an :class:`threading.Event` that the DUL sets after each
  state-machine action (a decoded message, a release or abort request).

Both waits have a short fallback timeout (:data:`IDLE_WAIT_S`) for what nothing signals
(the ARTIM and network-idle timers). pynetdicom is not modified: :func:`make_server` starts
a :class:`~pynetdicom.transport.ThreadedAssociationServer` whose request handler gives each
new acceptor these two classes before its threads start.

Once the association is established, the acceptor takes a lean path for what a storage SCP
mostly does: the DUL reads what has arrived in large ``recv`` calls, hands a P-DATA-TF's
PDVs to the DIMSE provider straight from the received bytes (no PDU object, state-machine
turn or queue: what Sta6 + Evt10 -> DT-2 does), a plain C-STORE request (no pydicom
dataset) is served in the DUL thread itself and its response written at once after the
handler returned (no hand-over to the association thread and back). Negotiation, release,
abort, timers and anything unusual (other messages, fragmented command sets, listeners
for the skipped steps) stay on pynetdicom's path; see :class:`_EventAssociation`.
"""

from __future__ import annotations

import copy
import functools
import logging
import queue
import re
import select
import socket
import ssl
import struct
import threading
from collections import OrderedDict
from datetime import datetime
from io import BytesIO
from typing import Any, cast

from pydicom import config as pydicom_config
from pydicom import valuerep
from pydicom.uid import UID
from pynetdicom import AE, _config, acse, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import LOGGER as _DUL_LOGGER
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass, attempt
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicom_node.elements import command_element, even

__all__ = ["IDLE_WAIT_S", "EventAE", "make_server"]

#: Longest a reactor blocks without a signal: bounds the latency of the timers (ARTIM,
#: network idle) that nothing signals. 10 wake-ups/s per idle thread instead of 1000.
IDLE_WAIT_S = 0.01


class _EventDUL(DULServiceProvider):
    """A DUL whose reactor blocks on the socket and a wake-up socket instead of sleeping.

    Only methods: existing instances become this class (``__class__``) before they start."""

    _wake_r: socket.socket
    _wake_w: socket.socket
    _wake_lock: threading.Lock

    def _init_wake(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_lock = threading.Lock()

    def run(self) -> None:
        # Thread.__init__ bound the base class's run_reactor as the target: call ours.
        make_target(self.run_reactor)()

    def _wake(self) -> None:
        with self._wake_lock:
            try:
                self._wake_w.send(b"w")
            except OSError:  # closed (reactor ended) or full (a wake-up is pending anyway)
                pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        stopping = self.state_machine.current_state == "Sta1"
        if stopping:
            self._kill_thread = True
            self._wake()
        return super().stop_dul() if stopping else False

    def _may_write_directly(self) -> bool:
        """True in this DUL's own thread (a request served on the lean path) when a PDU
        may go out now instead of through the queue: established (Sta6), nothing queued
        before it, no listener for the PDU object or the state-machine turn skipped."""
        assoc = self.assoc
        return (
            threading.current_thread() is self
            and self.socket is not None
            and self.state_machine.current_state == "Sta6"
            and not self.to_provider_queue.queue
            and not assoc.get_handlers(evt.EVT_PDU_SENT)
            and not assoc.get_handlers(evt.EVT_FSM_TRANSITION)
        )

    def _wait_for_work(self) -> None:
        """Block until the peer sent data, a primitive was queued, or IDLE_WAIT_S."""
        sock = self.socket.socket if self.socket is not None else None
        if isinstance(self.socket, _BulkRecvSocket) and self.socket.buffered():
            return  # bytes already received: select would not see them
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # TLS bytes already decrypted: select would not see them
        watch: list[Any] = [self._wake_r]
        if sock is not None and sock.fileno() >= 0:
            watch.append(sock)
        try:
            ready, _, _ = select.select(watch, [], [], IDLE_WAIT_S)
        except (OSError, ValueError):  # socket closed under us: the reactor notices
            return
        self._readable = sock is not None and sock in ready
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:
                pass

    #: the last wait saw the peer's socket readable (its next read does not block)
    _readable = False

    def _is_transport_event(self) -> bool:
        # pynetdicom asks ``socket.ready`` (a select) first: the wait just did (an
        # acceptor's connected socket; what else ``ready`` checks is pynetdicom's)
        sock = self.socket
        readable, self._readable = self._readable, False
        if (
            readable
            and isinstance(sock, _BulkRecvSocket)
            and sock._is_connected
            and self.state_machine.current_state != "Sta13"
        ):
            self._read_pdu_data()
            return True
        return super()._is_transport_event()

    def _read_pdu_data(self) -> None:
        """pynetdicom 3.0.4's ``DULServiceProvider._read_pdu_data`` (same events on the same
        errors), with the lean path: in Sta6 a P-DATA-TF goes from the received bytes to
        the DIMSE provider without a PDU object, a state-machine turn or a queue (what the
        state machine's DT-2 does with it, PS3.8 9.2), when nothing listens for those steps
        (:meth:`_lean_receive`)."""
        sock = self.socket
        if not isinstance(sock, _BulkRecvSocket):  # a requestor's: pynetdicom's own
            super()._read_pdu_data()
            return
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError) as exc:
            _DUL_LOGGER.error("Connection closed before the entire PDU was received")
            _DUL_LOGGER.exception(exc)
            self.event_queue.put("Evt17")
            return
        if len(header) != 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, pdu_length = _PDU_HEADER.unpack(header)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            _DUL_LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
            self.event_queue.put("Evt19")
            return
        try:
            body = sock.recv_exact(pdu_length, self._recv_limit())
        except (OSError, TimeoutError) as exc:
            _DUL_LOGGER.error("Connection closed before the entire PDU was received")
            _DUL_LOGGER.exception(exc)
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:
            _DUL_LOGGER.error(
                f"The received PDU is shorter than expected ({6 + len(body)} of "
                f"{6 + pdu_length} bytes received)"
            )
            self.event_queue.put("Evt17")
            return
        if pdu_type == 0x04 and self._lean_receive(body):
            return
        try:
            if pdu_type == 0x01:
                pdu, event = _decode_associate_rq(self, header + body)
            else:
                pdu, event = self._decode_pdu(header + body)
            self.event_queue.put(event)
        except Exception as exc:
            _DUL_LOGGER.error("Unable to decode the received PDU data")
            _DUL_LOGGER.exception(exc)
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    _prealloc_limit = 0

    def _recv_limit(self) -> int:
        """The longest PDU read into one preallocated buffer: the maximum we negotiated
        (a longer one, which a peer must not send, is read as it arrives)."""
        if not self._prealloc_limit:
            acceptor = getattr(self.assoc, "acceptor", None)
            limit = getattr(acceptor, "maximum_length", 0) or 0
            self._prealloc_limit = max(int(limit), 16384) + 6
        return self._prealloc_limit

    def _lean_receive(self, body: bytes | bytearray | memoryview) -> bool:
        """Hand a received P-DATA-TF's PDVs to the DIMSE provider directly, as the state
        machine would (Sta6 + Evt10 -> DT-2 -> Sta6); False (nothing done) when this is not
        that plain case: another state, events already queued, a listener for the steps
        skipped (EVT_DATA_RECV, EVT_PDU_RECV, EVT_FSM_TRANSITION), or PDV items that
        pynetdicom's decoder should judge."""
        assoc = self.assoc
        dimse = assoc.dimse
        if (
            not isinstance(dimse, _EventDIMSE)
            or self.state_machine.current_state != "Sta6"
            or self.event_queue.queue
            or assoc.get_handlers(evt.EVT_DATA_RECV)
            or assoc.get_handlers(evt.EVT_PDU_RECV)
            or assoc.get_handlers(evt.EVT_FSM_TRANSITION)
        ):
            return False
        pdvs = split_pdv_items(body)
        if pdvs is None:
            return False
        self._idle_timer.restart()  # before a handler may run in this thread
        dimse.receive_pdvs(pdvs)
        if dimse.msg_queue.queue:  # a message for the association thread (no FSM turn)
            assoc._wake_event.set()  # type: ignore[attr-defined]
        return True

    def run_reactor(self) -> None:
        # pynetdicom 3.0.4 DULServiceProvider.run_reactor, time.sleep -> _wait_for_work
        self._idle_timer.start()
        sleep = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    sleep = True
                if sleep:
                    self._wait_for_work()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    from pynetdicom.dul import LOGGER

                    LOGGER.error("Exception in DUL.run(), aborting association")
                    LOGGER.exception(exc)
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                # a look at the deque first: an empty queue's get raises and catches
                # Empty, once per PDU read on the lean path
                if not self.event_queue.queue:
                    sleep = True
                    continue
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    sleep = True
                    continue
                self.state_machine.do_action(event)
                self.assoc._wake_event.set()  # type: ignore[attr-defined]
                sleep = False
        finally:
            self.assoc._wake_event.set()  # type: ignore[attr-defined]
            with self._wake_lock:
                self._wake_r.close()
                self._wake_w.close()


class _EventAssociation(Association):
    """An acceptor whose reactor waits for the DUL's signal instead of sleeping 1 ms.

    The lean path: a plain C-STORE request (:class:`_EventDIMSE`) is served in the DUL
    thread that decoded it (:meth:`_serve_in_dul`) when this reactor has nothing queued
    or in hand: no hand-over to this thread and back for the response (two wake-ups per
    instance). The handler runs as pynetdicom runs it (``_serve_request``); its response
    still goes out only after it returns. What must not block the DUL thread is handed
    to this reactor: a blocking abort or a kill (they wait for the DUL to stop), a
    release (it waits for the peer's answer, read by the DUL)."""

    _wake_event: threading.Event
    #: this reactor has a message in hand (or is taking one off the queue)
    _taking = False
    #: a request is being served in the DUL thread
    _serving_in_dul = False
    #: what a handler in the DUL thread asked for, done by this reactor: "abort", "kill",
    #: "release" or ""
    _deferred = ""

    def _in_dul_thread(self) -> bool:
        return threading.current_thread() is self.dul

    # ``_is_paused`` tells ``release`` and the send_* methods that this reactor stands at
    # its checkpoint; ``_serve_request`` sets it around a handler, which must not change
    # it when the DUL thread serves (the reactor may be parked meanwhile).
    @property  # type: ignore[override]
    def _is_paused(self) -> bool:
        return bool(self.__dict__.get("_is_paused", False))

    @_is_paused.setter
    def _is_paused(self, value: bool) -> None:
        if not self._in_dul_thread():
            self.__dict__["_is_paused"] = value

    def _may_serve_in_dul(self, context_id: int) -> bool:
        """May the DUL thread serve a request now (same order and outcome as this reactor)?"""
        return (
            not self._taking
            and not self._deferred
            and self.is_established
            and not self._sent_release
            and self._reactor_checkpoint.is_set()
            and context_id in self._accepted_cx
            and not self.dimse.msg_queue.queue
        )

    def _serve_in_dul(self, msg: C_STORE, context_id: int) -> None:
        """Serve a plain C-STORE request (:func:`_c_store_primitive`) in the DUL thread:
        pynetdicom 3.0.4's ``_serve_request`` for a C-STORE, the storage service class's
        SCP being :class:`_LeanStorageSCP` when pynetdicom would pick StorageServiceClass."""
        self._serving_in_dul = True
        try:
            class_uid: str = msg._affected_sop_class_uid  # type: ignore[attr-defined]
            try:
                class_uid = self.acceptor.accepted_common_extended[class_uid][0]
            except KeyError:
                pass
            if _config.UNRESTRICTED_STORAGE_SERVICE:
                class_uid = "1.2.840.10008.5.1.4.1.1.1"
            service_class = uid_to_service_class(class_uid)
            if service_class is not StorageServiceClass:
                self._serve_request(msg, context_id)
                return
            context = self._accepted_cx[context_id]
            try:
                self.dimse.cancel_req = {}
                _LeanStorageSCP(self).SCP(msg, context)
                self.dimse.cancel_req = {}
            except Exception as exc:
                from pynetdicom.association import LOGGER

                LOGGER.exception(exc)
                self.abort()
        finally:
            self._serving_in_dul = False
            if self._deferred:
                self._wake_event.set()

    def _abort_blocking(self, block: bool = True) -> None:
        if block and self._in_dul_thread():
            # the A-ABORT is queued now; the waiting part (kill) is this reactor's
            super()._abort_blocking(False)
            self._deferred = self._deferred or "abort"
            return
        super()._abort_blocking(block)

    def kill(self) -> None:
        if self._in_dul_thread():
            self._deferred = self._deferred or "kill"
            self.is_established = False
            return
        super().kill()

    def release(self) -> None:
        if self._in_dul_thread():
            self._deferred = self._deferred or "release"
            return
        super().release()

    def _run_deferred(self) -> bool:
        """Do what a handler in the DUL thread asked for; True when the reactor ends."""
        action, self._deferred = self._deferred, ""
        if action == "release":
            self.release()
            return False
        self.kill()
        if action == "abort":
            try:
                cast(AssociationSocket, self.dul.socket)._shutdown_socket()
            except Exception:
                pass
        return True

    def _run_reactor(self) -> None:
        # pynetdicom 3.0.4 Association._run_reactor, time.sleep(0.001) -> _wake_event.wait
        self._is_paused = False
        served = False
        while not self._kill:
            if not served:
                self._wake_event.wait(IDLE_WAIT_S)
                self._wake_event.clear()
            served = False
            if self._deferred and not self._serving_in_dul and self._run_deferred():
                return
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            # Only the DUL thread queues and only this thread takes: an empty queue stays
            # empty until the DUL looks (and serves lean). Marking ``_taking`` on every
            # wake-up instead sent a request arriving in that instant the slow way.
            if self.dimse.msg_queue.queue:
                self._taking = True
                try:
                    context_id, msg = self.dimse.get_msg(block=False)
                    if msg:
                        self._serve_request(msg, int(context_id))  # type: ignore[arg-type]
                        served = True  # another message may be queued: look again at once
                finally:
                    self._taking = False

            if self._serving_in_dul:
                continue  # the handler in the DUL thread is this association's turn
            after = end_of_turn(self)
            if after == "stop":
                return
            if after == "idle":  # network timeout
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class _LeanStorageSCP(StorageServiceClass):
    """pynetdicom 3.0.4's ``StorageServiceClass.SCP`` for a plain C-STORE request
    (:func:`_c_store_primitive`, its values checked): the response takes the request's
    Message ID and UIDs as they are instead of checking each UID again (~0.1 ms)."""

    def SCP(self, req: C_STORE, context: PresentationContext) -> None:
        rsp = C_STORE()
        rsp._message_id = req._message_id  # type: ignore[attr-defined]
        rsp._message_id_being_responded_to = req._message_id  # type: ignore[attr-defined]
        rsp._affected_sop_instance_uid = req._affected_sop_instance_uid  # type: ignore[attr-defined]
        rsp._affected_sop_class_uid = req._affected_sop_class_uid  # type: ignore[attr-defined]
        cx_id = cast(int, context.context_id)
        with attempt(rsp, self.dimse, cx_id, self.assoc) as ctx:
            ctx.error_msg = "Exception in handler bound to 'evt.EVT_C_STORE'"
            ctx.error_status = 0xC211
            rsp_status = evt.trigger(
                ctx.assoc, evt.EVT_C_STORE, {"request": req, "context": context.as_tuple}
            )
        if not ctx.success or not self.assoc.is_established:
            return
        rsp = self.validate_status(cast(Any, rsp_status), rsp)
        self.dimse.send_msg(rsp, cx_id)


def end_of_turn(assoc: Association) -> str:
    """What pynetdicom 3.0.4's ``Association._run_reactor`` checks after each look at the
    DIMSE queue, for the acceptor and requestor reactors here: a requested release is
    answered and an abort noted (both end the association), a dead DUL ends it; returns
    "stop" (ended and killed), "idle" (network timeout: the caller releases or aborts) or
    ""."""
    from pynetdicom.association import LOGGER

    if assoc.is_established and assoc.acse.is_release_requested():
        assoc.acse.send_release(is_response=True)
        LOGGER.info("Association Released")
        assoc.is_released = True
        assoc.is_established = False
        evt.trigger(assoc, evt.EVT_RELEASED, {})
        assoc.kill()
        return "stop"
    if assoc.acse.is_aborted():
        log_msg = "Association Aborted"
        if assoc.acse.is_aborted("a-p-abort"):
            log_msg += " (A-P-ABORT)"
        LOGGER.info(log_msg)
        assoc.dul.receive_pdu(wait=False)
        assoc.is_aborted = True
        assoc.is_established = False
        evt.trigger(assoc, evt.EVT_ABORTED, {})
        assoc.kill()
        return "stop"
    if not assoc.dul.is_alive():
        assoc.kill()
        return "stop"
    if assoc.dul.idle_timer_expired():
        LOGGER.error("Network timeout reached")
        return "idle"
    return ""


def c_store_rsp_command(rsp: C_STORE) -> bytes | None:
    """The encoded command set of a C-STORE response (PS3.7 9.3.1.2), or None when it
    carries more than pynetdicom's usual answer (an offending element): the bytes
    pynetdicom 3.0.4's ``C_STORE_RSP`` encodes, built without a pydicom dataset (~10 µs
    instead of ~0.4 ms, two encodes, per C-STORE)."""
    if rsp.MessageIDBeingRespondedTo is None or rsp.Status is None:
        return None
    if rsp.OffendingElement is not None:
        return None
    parts = [_rsp_class_and_command(str(rsp.AffectedSOPClassUID or ""))]
    parts.append(command_element(0x0120, struct.pack("<H", rsp.MessageIDBeingRespondedTo)))
    parts.append(_RSP_NO_DATASET)
    parts.append(command_element(0x0900, struct.pack("<H", rsp.Status)))
    if rsp.ErrorComment is not None:
        try:
            parts.append(command_element(0x0902, even(str(rsp.ErrorComment), b" ")))
        except UnicodeEncodeError:
            return None  # pynetdicom's encoding decides
    if rsp.AffectedSOPInstanceUID:
        parts.append(command_element(0x1000, even(str(rsp.AffectedSOPInstanceUID), b"\x00")))
    body = b"".join(parts)
    return command_element(0x0000, struct.pack("<I", len(body))) + body


_RSP_NO_DATASET = command_element(0x0800, struct.pack("<H", 0x0101))


@functools.lru_cache(maxsize=256)
def _rsp_class_and_command(sop_class_uid: str) -> bytes:
    """(0000,0002) Affected SOP Class UID (when there is one) and (0000,0100) C-STORE-RSP:
    the same for every answer of a SOP class."""
    head = command_element(0x0002, even(sop_class_uid, b"\x00")) if sop_class_uid else b""
    return head + command_element(0x0100, struct.pack("<H", 0x8001))


#: a conformant UID (PS3.5 9.1): what pynetdicom's UID checks accept without a word
_CONFORMANT_UID = re.compile(rb"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_C_STORE_RQ = 0x0001
_NO_DATASET = 0x0101
#: the command elements a C-STORE-RQ may carry (PS3.7 9.3.1.1), group length included
_C_STORE_RQ_ELEMENTS = frozenset(
    (0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031)
)


def parse_c_store_rq_command(raw: bytes) -> dict[int, bytes] | None:
    """The elements (element number -> value) of an encoded C-STORE-RQ command set
    (implicit VR little endian, group 0000), or None when it is anything else or carries
    anything unusual (another command, an unknown element, a non-conformant UID, a dataset
    type of "none"): pynetdicom's own decoding then handles the message as it always does."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(raw)
    while pos < end:
        if end - pos < 8:
            return None
        group, element, length = struct.unpack_from("<HHI", raw, pos)
        pos += 8
        if group != 0 or element not in _C_STORE_RQ_ELEMENTS or end - pos < length:
            return None
        values[element] = raw[pos : pos + length]
        pos += length
    try:
        for element in (0x0100, 0x0110, 0x0700, 0x0800):
            if len(values[element]) != 2:
                return None
        if struct.unpack("<H", values[0x0100])[0] != _C_STORE_RQ:
            return None
        if struct.unpack("<H", values[0x0800])[0] == _NO_DATASET:
            return None
        if struct.unpack("<H", values[0x0700])[0] not in (0, 1, 2):
            return None
        for element in (0x0002, 0x1000):
            uid = values[element].rstrip(b"\x00 ")
            if not 0 < len(uid) <= 64 or not _CONFORMANT_UID.fullmatch(uid):
                return None
            values[element] = uid
    except KeyError:
        return None
    if 0x1030 in values or 0x1031 in values:
        return None  # a C-MOVE sub-operation: rare, pynetdicom's path
    return values


class _EventDIMSE(DIMSEServiceProvider):
    """Decodes a C-STORE request and encodes its response without pydicom datasets.

    pynetdicom decodes each request's command set into a pydicom dataset and copies it into
    the C-STORE primitive through validating setters (11 UID constructions, each a regex
    check, per C-STORE), and encodes the response through two datasets: together most of
    the CPU a C-STORE costs pynetdicom. Here a plain C-STORE-RQ (:func:`parse_c_store_rq_command`)
    becomes the same primitive directly, its dataset fragments joined once; the response's
    command set is encoded directly (:func:`c_store_rsp_command`). Both only when nothing
    listens for the decoded or encoded message (``EVT_DIMSE_RECV``/``EVT_DIMSE_SENT``);
    anything else goes pynetdicom's way."""

    _fast_request: tuple[int, dict[int, bytes], list[Any]] | None = None
    #: the peer's maximum PDU length, read at the first answer (negotiated by then)
    _peer_max_pdu: int | None = None

    def receive_primitive(self, primitive: Any) -> None:
        """A P-DATA from the state machine (DT-2): pynetdicom's path or the fast one."""
        if not isinstance(primitive, P_DATA) or not all(
            len(data) for _, data in primitive.presentation_data_value_list
        ):
            super().receive_primitive(primitive)
            return
        self._receive(
            [(cx, data[0], data[1:]) for cx, data in primitive.presentation_data_value_list],
            primitive,
        )

    def receive_pdvs(self, pdvs: list[tuple[int, int, Any]]) -> None:
        """The PDVs of a P-DATA-TF from the lean path (:func:`split_pdv_items`)."""
        self._receive(pdvs, None)

    def _receive(self, pdvs: list[tuple[int, int, Any]], primitive: P_DATA | None) -> None:
        """``pdvs``: (context ID, message control header, fragment) of one P-DATA."""
        if self._fast_request is None:
            if self.message is not None or not self._start_fast(pdvs):
                super().receive_primitive(primitive if primitive is not None else _p_data(pdvs))
                return
            pdvs = pdvs[1:]  # the command set, taken by _start_fast
        assert self._fast_request is not None
        context_id, command, fragments = self._fast_request
        for pdv_context, control, fragment in pdvs:
            if pdv_context != context_id or control & 1:  # must be the same dataset
                self._fast_request = None
                self.dul.event_queue.put("Evt19")  # invalid message: abort, as pynetdicom
                return
            fragments.append(fragment)
            if control & 2:
                self._fast_request = None
                request = _c_store_primitive(context_id, command, fragments)
                assoc = self.assoc
                if isinstance(assoc, _EventAssociation) and assoc._may_serve_in_dul(context_id):
                    assoc._serve_in_dul(request, context_id)
                else:
                    self.msg_queue.put((context_id, request))
                return

    def _start_fast(self, pdvs: list[tuple[int, int, Any]]) -> bool:
        """Take a P-DATA that opens a plain C-STORE-RQ (its whole command set in the first
        fragment) onto the fast path; False leaves it to pynetdicom."""
        if (
            not pdvs
            or pdvs[0][1] != 0x03  # command set, last fragment
            or _config.STORE_RECV_CHUNKED_DATASET
            or self.assoc.get_handlers(evt.EVT_DIMSE_RECV)
        ):
            return False
        context_id, _, fragment = pdvs[0]
        command = parse_c_store_rq_command(bytes(fragment))
        if command is None:
            return False
        self._fast_request = (context_id, command, [])
        return True

    def send_msg(self, primitive: Any, context_id: int) -> None:
        encoded = None
        if isinstance(primitive, C_STORE) and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            encoded = c_store_rsp_command(primitive)
        max_pdu = self._peer_max_pdu
        if max_pdu is None:  # the peer's, fixed once negotiated (a loop over user items)
            max_pdu = self._peer_max_pdu = self.maximum_pdu_size
        if encoded is None or (max_pdu and len(encoded) + 6 > max_pdu):
            super().send_msg(primitive, context_id)
            return
        dul = self.dul
        if isinstance(dul, _EventDUL) and dul._may_write_directly():
            # the lean path (a request served in the DUL thread): the P-DATA-TF's bytes
            # written now, as the state machine's DT-1 would write them after a queue turn
            dul.socket.send(p_data_tf(context_id, 0x03, encoded))  # type: ignore[union-attr]
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
        dul.send_pdu(pdata)


_PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LBB")


def split_pdv_items(
    body: bytes | bytearray | memoryview,
) -> list[tuple[int, int, memoryview]] | None:
    """The PDV items of a P-DATA-TF's ``body`` (after the 6-byte PDU header, PS3.8 9.3.5.1)
    as (context ID, message control header, fragment) with the fragment a view into
    ``body`` (no copy); None when an item is malformed or empty (pynetdicom's decoder then
    decides, as before)."""
    view = memoryview(body)
    items = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 6:
            return None
        item_length, context_id, control = _PDV_HEADER.unpack_from(body, pos)
        if item_length < 2 or pos + 4 + item_length > end:
            return None
        items.append((context_id, control, view[pos + 6 : pos + 4 + item_length]))
        pos += 4 + item_length
    return items


def p_data_tf(context_id: int, control: int, fragment: bytes) -> bytes:
    """A P-DATA-TF PDU carrying one PDV: what pynetdicom's ``P_DATA_TF.encode`` gives."""
    item = _PDV_HEADER.pack(len(fragment) + 2, context_id, control)
    return _PDU_HEADER.pack(0x04, 0, len(item) + len(fragment)) + item + fragment


def _p_data(pdvs: list[tuple[int, int, Any]]) -> P_DATA:
    """The P-DATA primitive of split PDVs (pynetdicom's path)."""
    primitive = P_DATA()
    primitive.presentation_data_value_list = [
        [cx, bytes((control,)) + bytes(fragment)] for cx, control, fragment in pdvs
    ]
    return primitive


@functools.lru_cache(maxsize=256)
def _class_uid(raw: bytes) -> UID:
    """The SOP Class UID object of a checked command value: a few classes, every C-STORE."""
    return UID(raw.decode("ascii"), pydicom_config.IGNORE)


def _c_store_primitive(context_id: int, command: dict[int, bytes], fragments: list[Any]) -> C_STORE:
    """The C-STORE request primitive pynetdicom's ``message_to_primitive`` makes of a plain
    C-STORE-RQ (values checked by :func:`parse_c_store_rq_command`)."""
    rq = LeanCStore()
    rq._message_id = struct.unpack("<H", command[0x0110])[0]
    rq._priority = struct.unpack("<H", command[0x0700])[0]
    ignore = pydicom_config.IGNORE  # conformant already: no second regex check
    rq._affected_sop_class_uid = _class_uid(command[0x0002])
    rq._affected_sop_instance_uid = UID(command[0x1000].decode("ascii"), ignore)
    rq._fragments = fragments  # joined when asked for (LeanCStore)
    rq._context_id = context_id
    return rq


class LeanCStore(C_STORE):
    """A plain C-STORE request of the lean path (:func:`_c_store_primitive`): its data set
    stays the received fragments until something asks for it. ``DataSet`` joins them once
    (as pynetdicom's decoding would); :meth:`part10` joins them after a file meta header
    instead, so the node's handler copies the data set once, not twice."""

    _fragments: list[Any] | None = None
    _joined: BytesIO | None = None

    @property  # type: ignore[override]
    def _dataset(self) -> BytesIO | None:
        if self._fragments is not None:
            # one copy; BytesIO shares it (getvalue() returns the same bytes)
            self._joined, self._fragments = BytesIO(b"".join(self._fragments)), None
        return self._joined

    @_dataset.setter
    def _dataset(self, value: BytesIO | None) -> None:
        self._joined, self._fragments = value, None

    def part10(self, prefix: bytes) -> bytes:
        """``prefix`` (a file's preamble and meta group) followed by the data set."""
        if self._fragments is not None:
            return b"".join([prefix, *self._fragments])
        joined = self._dataset
        return prefix + (joined.getvalue() if joined is not None else b"")


def _make_event_driven(assoc: Association, acceptor_reactor: bool = True) -> None:
    """Give a new (not yet started) association the event-driven DUL and, for an
    acceptor, the event-driven association reactor."""
    if acceptor_reactor:
        assoc.__class__ = _EventAssociation
        assoc.dimse.__class__ = _EventDIMSE
    assoc._wake_event = threading.Event()  # type: ignore[attr-defined]
    assoc.dul.__class__ = _EventDUL
    assoc.dul._init_wake()  # type: ignore[attr-defined]


class _SupportedContexts(list):  # type: ignore[type-arg]
    """The server's supported presentation contexts, copied cheaply for each association.

    pynetdicom 3.0.4 gives every new acceptor ``deepcopy(server.contexts)``: with every
    storage class x 16 transfer syntaxes that is ~30 ms of CPU under the GIL per
    association (more than 50 C-STOREs), most of a short association's cost. A context
    holds immutable UIDs and flags besides its list of transfer syntaxes, so copying each
    context's attributes and that list is the same copy at ~0.1 ms."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return [_copy_context(cx) for cx in self]


def _copy_context(cx: PresentationContext) -> PresentationContext:
    """A copy of ``cx`` as ``deepcopy`` makes it: its UIDs and flags are immutable, its
    list of transfer syntaxes is copied; no setter checks anything again."""
    new = object.__new__(type(cx))
    new.__dict__.update(cx.__dict__)
    new._transfer_syntax = list(cx._transfer_syntax)
    return new


# ------------------------------------------------------- what every association repeats
#: most distinct A-ASSOCIATE-RQ PDUs (and negotiations) remembered; a PDU longer than
#: :data:`_ASSOCIATE_RQ_CACHE_BYTES` is decoded every time (bounded memory)
_ASSOCIATION_CACHE = 32
_ASSOCIATE_RQ_CACHE_BYTES = 65536
_associate_rqs: OrderedDict[bytes, tuple[A_ASSOCIATE_RQ, str, A_ASSOCIATE]] = OrderedDict()
_negotiations: OrderedDict[tuple[Any, ...], tuple[list[Any], list[Any]]] = OrderedDict()
_association_cache_lock = threading.Lock()


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    with _association_cache_lock:
        cache[key] = value
        while len(cache) > _ASSOCIATION_CACHE:
            cache.popitem(last=False)


class _KnownAssociateRQ(A_ASSOCIATE_RQ):
    """An A-ASSOCIATE-RQ whose bytes were decoded before: its primitive is a copy of the
    one made then (the contexts and user information items copied, as new ones)."""

    _known_primitive: A_ASSOCIATE

    def to_primitive(self) -> A_ASSOCIATE:
        known = self._known_primitive
        primitive = object.__new__(type(known))
        primitive.__dict__.update(known.__dict__)
        primitive._presentation_context_definition_list = [
            _copy_context(cx) for cx in known._presentation_context_definition_list
        ]
        primitive._presentation_context_definition_results_list = []
        primitive._user_information = [copy.copy(item) for item in known._user_information]
        return primitive


def _decode_associate_rq(dul: DULServiceProvider, received: bytes | bytearray) -> tuple[Any, str]:
    """pynetdicom's ``_decode_pdu`` of an A-ASSOCIATE-RQ, remembered by its bytes.

    A sender proposes the same presentation contexts on every association: storescu's
    128 cost ~1.8 ms of CPU to decode into PDU items and primitives each time. The same
    bytes decode to the same values, so a PDU seen before is copied instead. Only when
    nothing listens for the received bytes or PDU (``EVT_DATA_RECV``, ``EVT_PDU_RECV``),
    which ``_decode_pdu`` triggers; a PDU that fails to decode is never remembered."""
    assoc, raw = dul.assoc, bytes(received)
    if (
        len(raw) > _ASSOCIATE_RQ_CACHE_BYTES
        or assoc.get_handlers(evt.EVT_DATA_RECV)
        or assoc.get_handlers(evt.EVT_PDU_RECV)
    ):
        return dul._decode_pdu(raw)  # type: ignore[arg-type]  # it takes bytes(...) itself
    with _association_cache_lock:
        known = _associate_rqs.get(raw)
    if known is None:
        pdu, event = dul._decode_pdu(raw)  # type: ignore[arg-type]
        try:
            primitive = pdu.to_primitive()
        except Exception:  # the state machine meets the error as before
            return pdu, event
        _remember(_associate_rqs, raw, (pdu, event, primitive))
        known = (pdu, event, primitive)
    pdu, event, primitive = known
    copied = object.__new__(_KnownAssociateRQ)
    copied.__dict__.update(pdu.__dict__)
    copied._known_primitive = primitive
    return copied, event


def _contexts_key(contexts: list[PresentationContext]) -> tuple[Any, ...]:
    """What ``negotiate_as_acceptor`` reads of each context, in order."""
    return tuple(
        (cx.context_id, cx.abstract_syntax, tuple(cx._transfer_syntax), cx.scu_role, cx.scp_role)
        for cx in contexts
    )


def _memoize_negotiation() -> None:
    """Remember pynetdicom's presentation context negotiation (as an acceptor) per
    proposed contexts, supported contexts and roles.

    ``negotiate_as_acceptor`` is a pure function of those three (each result a new
    context): storescu's 128 proposed against every storage class cost ~1.3 ms of CPU per
    association. A repeat returns copies of the first result, so an association may do
    with its contexts what it did before. Idempotent."""
    original = acse.negotiate_as_acceptor
    if getattr(original, "_synthmr_memo", False):
        return

    def negotiate_as_acceptor(
        rq_contexts: list[PresentationContext],
        ac_contexts: list[PresentationContext],
        roles: dict[Any, tuple[Any, Any]] | None = None,
    ) -> tuple[list[PresentationContext], list[Any]]:
        try:
            key = (
                _contexts_key(rq_contexts),
                _contexts_key(ac_contexts),
                tuple(sorted((roles or {}).items())),
            )
            hash(key)
        except TypeError:  # something unusual: pynetdicom's way, not remembered
            return original(rq_contexts, ac_contexts, roles)
        with _association_cache_lock:
            known = _negotiations.get(key)
        if known is None:
            known = original(rq_contexts, ac_contexts, roles)
            _remember(_negotiations, key, known)
        contexts, reply_roles = known
        return [_copy_context(cx) for cx in contexts], [copy.copy(r) for r in reply_roles]

    negotiate_as_acceptor._synthmr_memo = True  # type: ignore[attr-defined]
    negotiate_as_acceptor.__doc__ = original.__doc__
    acse.negotiate_as_acceptor = negotiate_as_acceptor  # type: ignore[assignment]


#: distinct UID strings whose check results are kept (a hostile peer's random UIDs only
#: evict entries: bounded memory)
_UID_CHECK_CACHE = 4096


def _memoize_uid_checks() -> None:
    """Remember the result of pydicom's and pynetdicom's UID checks per string.

    Negotiating storescu's 128 proposed presentation contexts builds ~1500 UIDs, each
    checked by regular expressions (pydicom's ``UID()`` and pynetdicom's ``set_uid``): ~4 ms
    of an association's ~8 ms of request decoding and negotiation, the same few hundred
    strings every time. Both checks are pure functions of the string (pynetdicom's also of
    ``_config.ENFORCE_UID_CONFORMANCE``, part of the key), so remembering them changes no
    result, warning or rejection: a malformed UID fails exactly as before. Idempotent."""
    pydicom_check = valuerep.VALIDATORS["UI"]
    if not getattr(pydicom_check, "_synthmr_memo", False):

        @functools.lru_cache(maxsize=_UID_CHECK_CACHE)
        def _pydicom_cached(vr: str, value: str | bytes) -> tuple[bool, str]:
            return pydicom_check(vr, value)

        def pydicom_ui(vr: str, value: Any) -> tuple[bool, str]:
            if type(value) in (str, bytes):  # exact types: a UID (str subclass) is keyed by str
                return _pydicom_cached(vr, value)
            if isinstance(value, str):
                return _pydicom_cached(vr, str(value))
            return pydicom_check(vr, value)

        pydicom_ui._synthmr_memo = True  # type: ignore[attr-defined]
        valuerep.VALIDATORS["UI"] = pydicom_ui

    pynetdicom_check = _config.VALIDATORS["UI"]
    if not getattr(pynetdicom_check, "_synthmr_memo", False):

        @functools.lru_cache(maxsize=_UID_CHECK_CACHE)
        def _pynetdicom_cached(value: str, enforce: bool) -> tuple[bool, str]:
            return pynetdicom_check(UID(value))

        def pynetdicom_ui(value: Any) -> tuple[bool, str]:
            if isinstance(value, str):
                return _pynetdicom_cached(str(value), bool(_config.ENFORCE_UID_CONFORMANCE))
            return pynetdicom_check(value)

        pynetdicom_ui._synthmr_memo = True  # type: ignore[attr-defined]
        _config.VALIDATORS["UI"] = pynetdicom_ui

    # ``UID.is_valid`` (a property: regex per call) is asked twice more per proposed transfer
    # syntax and per set_uid: ~5800 times for storescu's request
    uid_is_valid = UID.__dict__["is_valid"]
    if not getattr(uid_is_valid.fget, "_synthmr_memo", False):
        original_fget = uid_is_valid.fget

        @functools.lru_cache(maxsize=_UID_CHECK_CACHE)
        def _is_valid_cached(value: str) -> bool:
            return bool(original_fget(value))

        def is_valid(self: UID) -> bool:
            return _is_valid_cached(str(self))

        is_valid._synthmr_memo = True  # type: ignore[attr-defined]
        is_valid.__doc__ = original_fget.__doc__
        UID.is_valid = property(is_valid)  # type: ignore[method-assign,assignment]


#: most bytes one ``recv`` asks for: a peer's PDU length does not size an allocation
RECV_CHUNK = 256 * 1024


class _BulkRecvSocket(AssociationSocket):
    """pynetdicom's association socket, reading in large ``recv`` calls through a buffer.

    pynetdicom 3.0.4's ``AssociationSocket.recv`` asks for 4096 bytes at a time (a 128 KiB
    instance: ~35 ``recv`` calls and as many copies under the GIL) after a ``select`` per
    PDU. Here one ``recv`` takes whatever has arrived, up to :data:`RECV_CHUNK` bytes: the
    next PDU headers and short PDUs (a C-STORE's command) come with it, so a PDU costs
    about one system call (each one gives the GIL up and waits to get it back). Same
    contract (blocks until ``nr_bytes`` are read; returns what came before the peer
    closed; socket errors and timeouts propagate); memory grows only with the bytes that
    arrive, as before."""

    #: bytes received and not yet consumed: ``_chunk[_pos:]`` (class defaults: instances
    #: become this class after pynetdicom made them)
    _chunk: bytes = b""
    _pos = 0

    def buffered(self) -> int:
        """Received bytes not yet read (``select`` does not see them)."""
        return len(self._chunk) - self._pos

    @property
    def ready(self) -> bool:
        return self.buffered() > 0 or bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]

    def _fill(self) -> bool:
        """Receive what has arrived (blocking for at least one byte); False at the end."""
        chunk = cast(socket.socket, self.socket).recv(RECV_CHUNK)
        self._chunk, self._pos = chunk, 0
        return bool(chunk)

    def recv(self, nr_bytes: int) -> bytearray:
        bytestream = bytearray()
        while len(bytestream) < nr_bytes:
            if not self.buffered() and not self._fill():
                return bytestream  # the connection is broken: what we have so far
            take = min(nr_bytes - len(bytestream), self.buffered())
            bytestream += memoryview(self._chunk)[self._pos : self._pos + take]
            self._pos += take
        return bytestream

    def recv_exact(self, nr_bytes: int, prealloc_limit: int) -> bytes | bytearray | memoryview:
        """:meth:`recv` for a PDU's body: a view into the received bytes when they hold it
        whole (no copy), else one buffer of ``nr_bytes`` filled by ``recv_into`` when that
        is at most ``prealloc_limit`` (a length we negotiated, not any length a peer
        writes)."""
        if self.buffered() >= nr_bytes:
            view = memoryview(self._chunk)[self._pos : self._pos + nr_bytes]
            self._pos += nr_bytes
            return view
        if nr_bytes > prealloc_limit:
            return self.recv(nr_bytes)
        buffer = bytearray(nr_bytes)
        filled = self.buffered()
        buffer[:filled] = memoryview(self._chunk)[self._pos :]
        self._chunk, self._pos = b"", 0
        sock = cast(socket.socket, self.socket)
        with memoryview(buffer) as view:
            while filled < nr_bytes:
                got = sock.recv_into(view[filled:], min(nr_bytes - filled, RECV_CHUNK))
                if not got:  # the connection is broken: what we have so far
                    break
                filled += got
        if filled < nr_bytes:
            del buffer[filled:]
        return buffer


class _EventRequestHandler(RequestHandler):
    """pynetdicom's handler; the new acceptor gets the event-driven reactors."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = _BulkRecvSocket  # type: ignore[union-attr]
        _make_event_driven(assoc)
        _unbind_log_handlers(assoc)
        return assoc


#: pynetdicom's own notification handlers: they only write its INFO and DEBUG lines
_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def _unbind_log_handlers(assoc: Association) -> None:
    """Unbind pynetdicom's logging handlers while its logger drops INFO (the node logs it
    at WARNING): they build the lines of every PDU and DIMSE message all the same, and a
    bound EVT_DIMSE_SENT handler needs the response as a pydicom dataset (no
    :class:`_EventDIMSE` fast path)."""
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        return
    for event, handler in _LOG_HANDLERS:
        assoc.unbind(event, handler)


class EventAE(AE):
    """An AE whose requested associations (``associate``) use the event-driven DUL: each
    C-STORE's request goes out and its response is read without the 1 ms polls."""

    def _create_socket(self, assoc: Association, *args: Any, **kwargs: Any) -> Any:
        # called by AE.associate on the new association before its threads start.
        # Only the DUL: a requestor's own reactor must keep pynetdicom's timing. send_c_store
        # pauses it (_reactor_checkpoint) but a reactor that has just passed the checkpoint
        # can still take the C-STORE response off the queue; woken by every DUL event, ours
        # sat in that window often enough under load to lose a response (60 s DIMSE timeout).
        _make_event_driven(assoc, acceptor_reactor=False)
        return super()._create_socket(assoc, *args, **kwargs)


def make_server(
    ae: Any,
    address: tuple[str, int],
    evt_handlers: list[Any],
    ssl_context: ssl.SSLContext | None = None,
    server_class: type[ThreadedAssociationServer] = ThreadedAssociationServer,
) -> ThreadedAssociationServer:
    """``ae.start_server(address, block=False, ...)`` with the event-driven reactors.

    Registered with the AE like its own servers (``ae.shutdown()`` stops it)."""
    _memoize_uid_checks()
    _memoize_negotiation()
    server = ae.make_server(
        address,
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,
        server_class=server_class,
        request_handler=_EventRequestHandler,
    )
    server.contexts = _SupportedContexts(server.contexts)
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(
        target=make_target(server.serve_forever), name=f"AcceptorServer@{stamp}", daemon=True
    )
    thread.start()
    ae._servers.append(server)
    return server
