"""Requestor associations for the push (C-STORE SCU): event-driven and race-free.

Why not pynetdicom's own requestor (3.0.4) as it is:

- **a lost response.** While ``send_c_store`` waits for its response, the association's
  own reactor thread must not read the DIMSE queue (it would take the response and drop
  it as an "unexpected C-STORE service message"; the sender then waits out the DIMSE
  timeout). pynetdicom pauses the reactor with a check-then-act handshake: the sender
  clears ``_reactor_checkpoint`` and waits until ``_is_paused``; the reactor sets
  ``_is_paused = True``, waits on the checkpoint, sets ``_is_paused = False`` and reads
  the queue. A reactor that passed ``checkpoint.wait()`` just before the sender cleared
  it has ``_is_paused`` still True for a moment: the sender goes ahead, and if the
  reactor thread then loses the CPU (GIL switch, a loaded machine) until the response has
  arrived, it takes the response. The more threads compete for the GIL (two parallel
  associations: four threads), the likelier: that is the "one C-STORE response never
  came" of two associations into Orthanc under load.
- **1 ms polls.** The DUL thread sleeps 1 ms whenever it finds nothing to do, so each
  request waits up to 1 ms to go out and its response up to 1 ms to be noticed; the
  sender also waits up to 1 ms for the reactor to reach its pause point.

Here the reactor's turn and a sender's exchange exclude each other under one lock
(:class:`_RequestorAssociation`: ``_is_paused`` is true exactly while the reactor is
outside its turn, and a turn starts only while the checkpoint is set, both decided
under the lock), and the DUL is :mod:`dicom_node.reactor`'s event-driven one (a queued
request wakes it at once; so does the peer's data). pynetdicom is not modified: the
classes of a new association are swapped before its threads start.
"""

from __future__ import annotations

import select
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE, DIMSEServiceProvider
from pynetdicom.pdu import P_DATA_TF

from dicom_node.elements import command_element, even
from dicom_node.header_scan import Part10Error, read_meta_group
from dicom_node.reactor import IDLE_WAIT_S, _EventDUL, _make_event_driven, end_of_turn

__all__ = [
    "Part10Error",
    "Part10Meta",
    "PushAE",
    "part10_meta",
    "read_part10_meta",
    "send_c_store_bytes",
]


class _RequestorAssociation(Association):
    """A requestor whose reactor never takes the floor from ``send_*`` / ``release``."""

    _floor: threading.Lock
    _reactor_busy: bool
    _wake_event: threading.Event

    @property  # type: ignore[override]
    def _is_paused(self) -> bool:
        """pynetdicom's senders wait for this before they send: true while the reactor is
        not in a turn (and, once they cleared the checkpoint, none can start)."""
        floor = self.__dict__.get("_floor")
        if floor is None:
            return True
        with floor:
            return not self.__dict__.get("_reactor_busy", False)

    @_is_paused.setter
    def _is_paused(self, value: bool) -> None:
        """pynetdicom's own writes (``__init__``, ``kill``) carry nothing we need."""

    def _run_reactor(self) -> None:
        # pynetdicom 3.0.4 Association._run_reactor (MIT licence) with the pause handshake
        # under self._floor and the 1 ms sleep replaced by the DUL's wake-up event
        while not self._kill:
            self._reactor_checkpoint.wait()  # a sender holds the floor: wait (kill sets it)
            self._wake_event.wait(IDLE_WAIT_S)
            self._wake_event.clear()
            with self._floor:
                if not self._reactor_checkpoint.is_set():
                    continue  # a sender cleared it since: its exchange goes first
                self._reactor_busy = True
            try:
                after = self._turn()
            finally:
                with self._floor:
                    self._reactor_busy = False
            if after == "stop":
                return
            if after == "idle":  # network timeout: release or abort outside the turn
                if self.network_timeout_response == "A-RELEASE":
                    self.release()
                else:
                    self.abort()
                self.kill()
                return

    def _turn(self) -> str:
        """One look at what the peer sent; "stop", "idle" (network timeout) or ""."""
        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, int(context_id))  # type: ignore[arg-type]
            self._wake_event.set()  # another message may be queued: look again at once
        return end_of_turn(self)


#: bytes of P-DATA-TF PDUs written to the socket at once by :class:`_DirectDIMSE`
_BATCH_BYTES = 1 << 20


class _DirectDIMSE(DIMSEServiceProvider):
    """Sends a DIMSE message's P-DATA-TF PDUs from the sending thread, in batches.

    pynetdicom queues every PDU for the DUL thread, which takes it through its state
    machine (Sta6 + Evt9 -> DT-1: send the PDU, stay in Sta6) and one ``send`` each: for
    an 8 MB Parametric Map at a 16 kB PDU limit, 500 thread hand-offs. In Sta6 this
    does what DT-1 does (encode, send, stay in Sta6) for all of a message's PDUs here,
    ``_BATCH_BYTES`` per socket write, under the DUL's send lock (an abort or release
    the DUL sends never lands inside a message). In any other state (the association is
    going down) the message takes pynetdicom's queued path."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        dul = self.dul
        if dul.state_machine.current_state != "Sta6" or dul.to_provider_queue.queue:
            super().send_msg(primitive, context_id)
            return
        if primitive.MessageIDBeingRespondedTo is None:
            msg = _RQ_TO_MESSAGE[primitive.__class__]()
        else:
            msg = _RSP_TO_MESSAGE[primitive.__class__]()
        msg.primitive_to_message(primitive)
        msg.context_id = context_id
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": msg})
        sock = dul.socket
        batch: list[bytes] = []
        size = 0
        with dul._send_lock:  # type: ignore[attr-defined]
            for pdata in msg.encode_msg(context_id, self.maximum_pdu_size):
                pdu = P_DATA_TF(pdata)
                batch.append(pdu.encode())
                size += len(batch[-1])
                evt.trigger(self.assoc, evt.EVT_PDU_SENT, {"pdu": pdu})
                if size >= _BATCH_BYTES:
                    sock.send(b"".join(batch))  # AssociationSocket: Evt17 when it fails
                    batch, size = [], 0
            if batch:
                sock.send(b"".join(batch))


class _RequestorDUL(_EventDUL):
    """The event-driven DUL whose own sends take the lock :class:`_DirectDIMSE` holds,
    and whose socket reads take ``_read_lock``: :func:`send_c_store_bytes` holds it while
    it reads a C-STORE response itself (readiness is checked under the lock, so the DUL
    never starts a read of bytes that the sender takes)."""

    _send_lock: threading.Lock
    _read_lock: threading.Lock

    def _send(self, pdu: Any) -> None:
        with self._send_lock:
            super()._send(pdu)

    def _is_transport_event(self) -> bool:
        with self._read_lock:
            return bool(super()._is_transport_event())


def make_requestor(assoc: Association) -> None:
    """Give a new (not yet started) requestor association the race-free reactor, the
    event-driven DUL and the direct P-DATA sends."""
    _make_event_driven(assoc, acceptor_reactor=False)
    assoc.__class__ = _RequestorAssociation
    assoc._floor = threading.Lock()  # type: ignore[attr-defined]
    assoc._reactor_busy = False  # type: ignore[attr-defined]
    assoc.dul.__class__ = _RequestorDUL
    assoc.dul._send_lock = threading.Lock()  # type: ignore[attr-defined]
    assoc.dul._read_lock = threading.Lock()  # type: ignore[attr-defined]
    assoc.dimse.__class__ = _DirectDIMSE


class PushAE(AE):
    """An AE whose requested associations (``associate``) are :func:`make_requestor`'s."""

    def _create_socket(self, assoc: Association, *args: Any, **kwargs: Any) -> Any:
        # AE.associate calls this on the new association before its threads start
        make_requestor(assoc)
        return super()._create_socket(assoc, *args, **kwargs)


# ---------------------------------------------------------------- C-STORE of a file's bytes
@dataclass(frozen=True)
class Part10Meta:
    """What a C-STORE needs from a Part-10 file's meta group; ``offset``: where the data
    set starts (the bytes sent as they are)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    offset: int


_META_TAGS = {0x0002: "sop_class_uid", 0x0003: "sop_instance_uid", 0x0010: "transfer_syntax_uid"}


def _uid_text(raw: bytes) -> str:
    """A UID value without its padding (a NUL, or a space from a lenient writer)."""
    return raw.rstrip(b"\x00 ").decode("ascii")


def part10_meta(head: bytes | memoryview) -> Part10Meta:
    """The meta group of a Part-10 file (:func:`dicom_node.header_scan.read_meta_group`)
    from its first bytes: 128-byte preamble, "DICM", then group 0002 elements until the
    first element of another group. Raises :class:`Part10Error` when ``head`` is not one
    (or ends inside the meta group: read more)."""
    if len(head) < 132 or bytes(head[128:132]) != b"DICM":
        raise Part10Error("no DICM prefix")
    found, offset = read_meta_group(head, _META_TAGS, _uid_text)
    if len(found) != 3:
        missing = sorted(set(_META_TAGS.values()) - set(found))
        raise Part10Error(f"file meta lacks {', '.join(missing)}")
    return Part10Meta(offset=offset, **found)


def read_part10_meta(path: str | Path, head_bytes: int = 4096) -> Part10Meta:
    """:func:`part10_meta` of a file, reading only its head (more if the meta is longer)."""
    with open(path, "rb") as f:
        head = f.read(head_bytes)
        while True:
            try:
                return part10_meta(head)
            except Part10Error:
                more = f.read(len(head))
                if not more or len(head) > (1 << 20):
                    raise
                head += more


def c_store_rq_command(sop_class_uid: str, sop_instance_uid: str, message_id: int) -> bytes:
    """The encoded command set of a C-STORE request with a data set (PS3.7 9.3.1.1):
    what pynetdicom builds through a pydicom Dataset, in a few ``struct.pack`` calls.
    Priority LOW (2), as pynetdicom's ``send_c_store`` sends it."""
    body = b"".join(
        (
            command_element(0x0002, even(sop_class_uid, b"\x00")),
            command_element(0x0100, struct.pack("<H", 0x0001)),  # C-STORE-RQ
            command_element(0x0110, struct.pack("<H", message_id & 0xFFFF)),
            command_element(0x0700, struct.pack("<H", 0x0002)),
            command_element(0x0800, struct.pack("<H", 0x0001)),  # a data set follows
            command_element(0x1000, even(sop_instance_uid, b"\x00")),
        )
    )
    return command_element(0x0000, struct.pack("<I", len(body))) + body


def _p_data_pdus(
    context_id: int, control: int, payload: bytes | memoryview, max_pdu: int
) -> Iterator[bytes | memoryview]:
    """P-DATA-TF PDUs (PS3.8 9.3.5) carrying ``payload`` in one PDV each, the last one
    flagged (``control``: 1 command, 0 data set; 2 is added to the last fragment), as
    header and fragment pieces to be joined."""
    step = max(1, max_pdu - 6) if max_pdu else max(1, len(payload))
    n = len(payload)
    starts = range(0, n, step) if n else range(1)
    for start in starts:
        chunk = payload[start : start + step]
        last = start + step >= n
        yield struct.pack(
            ">BBIIBB", 0x04, 0x00, len(chunk) + 6, len(chunk) + 2, context_id, control | (2 * last)
        )
        yield chunk


class StoreResponse:
    """The parts of a C-STORE response the push looks at (PS3.7 9.3.1.2)."""

    __slots__ = ("MessageIDBeingRespondedTo", "Status")

    def __init__(self, message_id: int | None, status: int | None) -> None:
        self.MessageIDBeingRespondedTo = message_id
        self.Status = status


def _recv_exact(raw: Any, n: int, deadline: float) -> bytes | None:
    """``n`` bytes from the socket, or None: closed, or nothing by ``deadline``."""
    buf = bytearray()
    while len(buf) < n:
        if not (isinstance(raw, ssl.SSLSocket) and raw.pending()):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([raw], [], [], left)[0]:
                return None
        chunk = raw.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _read_store_response(raw: Any, timeout_s: float) -> StoreResponse | int | None:
    """Read one DIMSE response command set (P-DATA-TF PDUs) from the socket: the response,
    the type of another PDU that came instead (an abort, a release request), or None
    (closed, timed out, malformed)."""
    deadline = time.monotonic() + timeout_s
    command = bytearray()
    while True:
        head = _recv_exact(raw, 6, deadline)
        if head is None:
            return None
        pdu_type, _, length = struct.unpack(">BBI", head)
        body = _recv_exact(raw, length, deadline)
        if body is None:
            return None
        if pdu_type != 0x04:
            return pdu_type
        pos, last = 0, False
        while pos + 6 <= length:
            (item_length,) = struct.unpack_from(">I", body, pos)
            control = body[pos + 5]
            if not control & 0x01:  # a data set fragment: no C-STORE response has one
                return None
            command += body[pos + 6 : pos + 4 + item_length]
            last = bool(control & 0x02)
            pos += 4 + item_length
        if last:
            break
    values: dict[int, int] = {}
    pos = 0
    while pos + 8 <= len(command):
        _, elem, vl = struct.unpack_from("<HHI", command, pos)
        if elem in (0x0100, 0x0120, 0x0800, 0x0900) and vl == 2:
            values[elem] = struct.unpack_from("<H", command, pos + 8)[0]
        pos += 8 + vl
    if values.get(0x0100) != 0x8001 or values.get(0x0800, 0x0101) != 0x0101:
        return None  # not a C-STORE response, or one with a data set
    return StoreResponse(values.get(0x0120), values.get(0x0900))


def send_c_store_bytes(
    assoc: Association,
    context_id: int,
    meta: Part10Meta,
    dataset: bytes | memoryview,
    message_id: int,
) -> Any:
    """Send one C-STORE request whose data set is ``dataset`` (already encoded in the
    presentation context's transfer syntax, e.g. a Part-10 file's bytes after its meta)
    over an established :class:`PushAE` association, and wait for the response.

    The command set is encoded here and the P-DATA-TF PDUs are written from this thread
    (``_BATCH_BYTES`` per socket write, under the DUL's send lock, as DT-1 would in Sta6):
    no pydicom Dataset, no pynetdicom message or PDU objects. The response is read from
    the socket here too, under the DUL's read lock (:class:`_RequestorDUL`), with the
    reactor kept out as in :class:`_RequestorAssociation`. Returns the response, or None
    when none came in the DIMSE timeout or something else did (the association is then
    aborted)."""
    dul = assoc.dul
    command = c_store_rq_command(meta.sop_class_uid, meta.sop_instance_uid, message_id)
    max_pdu = int(assoc.acceptor.maximum_length or 0)
    timeout = assoc.dimse_timeout or 60.0
    rsp: StoreResponse | int | None = None
    assoc._reactor_checkpoint.clear()
    try:
        while not assoc._is_paused:
            time.sleep(0.0001)
        with dul._read_lock:  # type: ignore[attr-defined]
            if dul.state_machine.current_state != "Sta6" or dul.to_provider_queue.queue:
                return None  # going down: nothing may be sent
            raw = dul.socket.socket  # type: ignore[union-attr]
            pieces = [*_p_data_pdus(context_id, 0x01, command, max_pdu)]
            size = sum(len(p) for p in pieces)
            try:
                with dul._send_lock:  # type: ignore[attr-defined]
                    for piece in _p_data_pdus(context_id, 0x00, dataset, max_pdu):
                        pieces.append(piece)
                        size += len(piece)
                        if size >= _BATCH_BYTES:
                            raw.sendall(b"".join(pieces))
                            pieces, size = [], 0
                    if pieces:
                        raw.sendall(b"".join(pieces))
                # the response, read here: no DUL turn, no pynetdicom PDU, message or
                # pydicom Dataset for a few dozen bytes
                rsp = _read_store_response(raw, timeout)
            except OSError:
                rsp = None
            dul._idle_timer.restart()  # the DUL saw no traffic: this exchange was some
    finally:
        assoc._reactor_checkpoint.set()
    if isinstance(rsp, StoreResponse):
        return rsp
    # timed out, closed, malformed, or the peer aborted / asked to release mid-exchange:
    # this association is finished (the items are sent again, on a new one)
    assoc.abort()
    return None
