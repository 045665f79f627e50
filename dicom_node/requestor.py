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

import threading
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE, DIMSEServiceProvider
from pynetdicom.pdu import P_DATA_TF

from dicom_node.reactor import IDLE_WAIT_S, _EventDUL, _make_event_driven, end_of_turn

__all__ = ["PushAE"]


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
    """The event-driven DUL whose own sends take the lock :class:`_DirectDIMSE` holds."""

    _send_lock: threading.Lock

    def _send(self, pdu: Any) -> None:
        with self._send_lock:
            super()._send(pdu)


def make_requestor(assoc: Association) -> None:
    """Give a new (not yet started) requestor association the race-free reactor, the
    event-driven DUL and the direct P-DATA sends."""
    _make_event_driven(assoc, acceptor_reactor=False)
    assoc.__class__ = _RequestorAssociation
    assoc._floor = threading.Lock()  # type: ignore[attr-defined]
    assoc._reactor_busy = False  # type: ignore[attr-defined]
    assoc.dul.__class__ = _RequestorDUL
    assoc.dul._send_lock = threading.Lock()  # type: ignore[attr-defined]
    assoc.dimse.__class__ = _DirectDIMSE


class PushAE(AE):
    """An AE whose requested associations (``associate``) are :func:`make_requestor`'s."""

    def _create_socket(self, assoc: Association, *args: Any, **kwargs: Any) -> Any:
        # AE.associate calls this on the new association before its threads start
        make_requestor(assoc)
        return super()._create_socket(assoc, *args, **kwargs)
