"""The SCP's shortcuts around pynetdicom (dicom_node.reactor) give pynetdicom's results."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts

from dicom_node import reactor
from dicom_node.reactor import (
    _c_store_primitive,
    _SupportedContexts,
    c_store_rsp_command,
    parse_c_store_rq_command,
)
from dicom_node.scp import TRANSFER_SYNTAXES
from tests.conftest import make_mr_file, storescu


def _rsp(**kw: object) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = kw.get("mid", 7)
    rsp.Status = kw.get("status", 0x0000)
    for name, key in (
        ("AffectedSOPClassUID", "cls"),
        ("AffectedSOPInstanceUID", "inst"),
        ("ErrorComment", "comment"),
    ):
        if kw.get(key) is not None:
            setattr(rsp, name, kw[key])
    return rsp


@pytest.mark.parametrize(
    "kw",
    [
        {"cls": "1.2.840.10008.5.1.4.1.1.4", "inst": "1.2.826.0.1.3680043.8.498.1234567"},
        {"cls": "1.2.840.10008.5.1.4.1.1.4", "inst": "1.2.3"},  # odd length: NUL pad
        {
            "cls": "1.2.840.10008.5.1.4.1.1.4",
            "inst": "1.2.34",
            "status": 0xC000,
            "comment": "cannot parse dataset: truncated",
        },
        {
            "cls": "1.2.840.10008.5.1.4.1.1.4",
            "inst": "1.2.34",
            "status": 0xA700,
            "comment": "odd",
            "mid": 65535,
        },
        {},  # neither UID
    ],
)
def test_c_store_rsp_command_is_pynetdicoms_encoding(kw: dict[str, object]) -> None:
    msg = C_STORE_RSP()
    msg.primitive_to_message(_rsp(**kw))
    (pdata,) = list(msg.encode_msg(1, 16382))
    (context_id, pdv) = pdata.presentation_data_value_list[0]
    assert context_id == 1
    assert pdv[:1] == b"\x03"  # command, last fragment
    assert c_store_rsp_command(_rsp(**kw)) == pdv[1:]


def test_c_store_rsp_command_leaves_unusual_answers_to_pynetdicom() -> None:
    rsp = _rsp(cls="1.2.3", inst="1.2.4", status=0xC000, comment="é")
    assert c_store_rsp_command(rsp) is None
    rsp = _rsp(cls="1.2.3", inst="1.2.4", status=0xC000)
    rsp.OffendingElement = [0x00100010]
    assert c_store_rsp_command(rsp) is None


def test_supported_contexts_copy_equals_deepcopy_and_is_independent() -> None:
    ae = AE()
    for cx in AllStoragePresentationContexts[:20]:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    contexts = _SupportedContexts(ae.supported_contexts)
    fast, slow = copy.deepcopy(contexts), copy.deepcopy(list(contexts))
    assert [vars(c) for c in fast] == [vars(c) for c in slow]
    fast[0]._transfer_syntax.append("1.2.3.4")
    fast[0].context_id = 99
    assert "1.2.3.4" not in contexts[0].transfer_syntax
    assert contexts[0].context_id != 99


def _encoded_rq(inst: str, priority: int = 2, **extra: object) -> list[tuple[int, bytes]]:
    """(context ID, PDV) of a C-STORE-RQ as pynetdicom's requestor sends it (64 KiB PDUs)."""
    from io import BytesIO

    rq = C_STORE()
    rq.MessageID = 7
    rq.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    rq.AffectedSOPInstanceUID = inst
    rq.Priority = priority
    for name, value in extra.items():
        setattr(rq, name, value)
    rq.DataSet = BytesIO(bytes(range(256)) * 700)  # 3 data fragments
    msg = C_STORE_RQ()
    msg.primitive_to_message(rq)
    return [pdv for p in msg.encode_msg(5, 65536) for pdv in p.presentation_data_value_list]


@pytest.mark.parametrize("inst", ["1.2.826.0.1.3680043.8.498.1234567", "1.2.3"])
def test_fast_c_store_request_equals_pynetdicoms_primitive(inst: str) -> None:
    pdvs = _encoded_rq(inst, priority=1)
    msg = DIMSEMessage()
    theirs = None
    for cx, data in pdvs:
        from pynetdicom.pdu_primitives import P_DATA

        p = P_DATA()
        p.presentation_data_value_list = [[cx, data]]
        if msg.decode_msg(p):
            theirs = msg.message_to_primitive()
    assert theirs is not None and len(pdvs) == 4
    command = parse_c_store_rq_command(pdvs[0][1][1:])
    assert command is not None
    ours = _c_store_primitive(5, command, [data[1:] for _, data in pdvs[1:]])
    for name in (
        "MessageID",
        "Priority",
        "AffectedSOPClassUID",
        "AffectedSOPInstanceUID",
        "MoveOriginatorApplicationEntityTitle",
        "MoveOriginatorMessageID",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    body = theirs.DataSet.getvalue()
    # the file meta and the data set in one copy, before or after DataSet is asked for
    again = _c_store_primitive(5, command, [data[1:] for _, data in pdvs[1:]])
    assert again.part10(b"META") == b"META" + body
    assert ours.DataSet.getvalue() == body
    assert ours.part10(b"META") == b"META" + body
    assert ours._context_id == theirs._context_id == 5
    assert ours.is_valid_request
    from io import BytesIO

    ours.DataSet = BytesIO(b"other")  # a handler's own data set replaces the fragments
    assert ours.part10(b"M") == b"Mother" and ours.DataSet.getvalue() == b"other"


@pytest.mark.parametrize(
    "inst, extra",
    [
        ("1.2.03", {}),  # non-conformant UID (leading zero): pynetdicom warns, its path
        ("1.2.3", {"MoveOriginatorApplicationEntityTitle": "MOVER", "MoveOriginatorMessageID": 3}),
    ],
)
def test_unusual_c_store_requests_take_pynetdicoms_path(inst: str, extra: dict) -> None:
    assert parse_c_store_rq_command(_encoded_rq(inst, **extra)[0][1][1:]) is None


def test_dcmtk_storescu_gets_the_directly_encoded_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over a real association: every C-STORE answer goes out on the fast path, and dcmtk
    reads each (success for the stored ones, the failure status for the refused one)."""
    encoded: list[int] = []

    def counting(rsp: C_STORE) -> bytes | None:
        out = c_store_rsp_command(rsp)
        encoded.append(int(rsp.Status))
        return out

    monkeypatch.setattr(reactor, "c_store_rsp_command", counting)
    files = [
        make_mr_file(
            tmp_path / f"{i}.dcm", series_uid="1.2.826.0.1.3680043.8.498.5", instance_number=i
        )
        for i in range(3)
    ]
    refused = str(_uid_of(files[2]))  # dcmtk stops after a refusal

    def on_store(event: evt.Event) -> int:
        return 0xA700 if str(event.request.AffectedSOPInstanceUID) == refused else 0x0000

    ae = AE("SYNTHMR")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    server = reactor.make_server(ae, ("127.0.0.1", 0), [(evt.EVT_C_STORE, on_store)])
    try:
        done = storescu(files, int(server.server_address[1]))
    finally:
        server.shutdown()
    log = done.stdout + done.stderr
    assert sorted(encoded) == [0x0000, 0x0000, 0xA700]
    assert log.count("Received Store Response (Success)") == 2, log
    assert "Received Store Response (Refused: OutOfResources)" in log, log


def _uid_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_memoized_uid_checks_answer_as_before() -> None:
    """The remembered UID checks (negotiation speed) give pydicom's and pynetdicom's
    verdicts, asked twice (the second answer comes from the cache)."""
    from pydicom import valuerep
    from pydicom.uid import UID
    from pynetdicom import _config
    from pynetdicom.utils import set_uid

    cases = {"1.2.840.10008.1.2.1": True, "1.2.03": False, "1.2.a": False, "1." + "1" * 70: False}
    reactor._memoize_uid_checks()
    reactor._memoize_uid_checks()  # idempotent: no wrapper around the wrapper
    for _ in range(2):
        for value, valid in cases.items():
            assert UID(value, 0).is_valid is valid
            assert valuerep.VALIDATORS["UI"]("UI", value)[0] is valid
            assert _config.VALIDATORS["UI"](UID(value, 0))[0] is (len(value) <= 64)
    with pytest.raises(ValueError, match="must not exceed 64"):
        set_uid("1." + "1" * 70, "Abstract Syntax Name")


def _negotiated(result: tuple[list, list]) -> tuple[list, list]:
    contexts, roles = result
    return (
        [
            (c.context_id, c.abstract_syntax, list(c.transfer_syntax), c.result, c.as_scu, c.as_scp)
            for c in contexts
        ],
        [(r.sop_class_uid, r.scu_role, r.scp_role) for r in roles],
    )


def test_memoized_negotiation_answers_as_pynetdicom() -> None:
    """The remembered presentation context negotiation gives pynetdicom's result for each
    proposal (accepted, no common transfer syntax, abstract syntax not supported, roles,
    the same abstract syntax twice), asked twice; each answer is a new set of contexts."""
    from pynetdicom import acse
    from pynetdicom.presentation import build_context, negotiate_as_acceptor

    reactor._memoize_negotiation()
    reactor._memoize_negotiation()  # idempotent: no wrapper around the wrapper
    memo = acse.negotiate_as_acceptor
    assert memo is not negotiate_as_acceptor
    ct, us = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.6.1"
    supported = [build_context(MR, TRANSFER_SYNTAXES), build_context(ct, ["1.2.840.10008.1.2"])]
    supported.append(build_context(us, ["1.2.840.10008.1.2"]))
    supported[2].scu_role, supported[2].scp_role = True, True
    proposals = [
        [build_context(MR, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])],
        [
            build_context(MR, ["1.2.840.10008.1.2.4.50"]),  # JPEG baseline: not supported
            build_context(ct, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]),
            build_context("1.2.840.10008.5.1.4.1.1.7", ["1.2.840.10008.1.2"]),  # not supported
            build_context(MR, ["1.2.840.10008.1.2"]),  # MR again, another context
            build_context(us, ["1.2.840.10008.1.2"]),
        ],
    ]
    for proposal in proposals:
        for i, cx in enumerate(proposal):
            cx.context_id = 2 * i + 1
    for proposal, roles in [
        (proposals[0], None),
        (proposals[1], None),
        (proposals[1], {us: (True, False)}),
    ]:
        expected = _negotiated(negotiate_as_acceptor(proposal, supported, roles))
        before = len(reactor._negotiations)
        first = memo(proposal, supported, roles)
        assert len(reactor._negotiations) == before + 1  # remembered
        assert _negotiated(first) == expected
        first[0][0].transfer_syntax.append("1.2.840.10008.1.2.2")  # an association's own
        first[0][0].result = 0x01
        again = memo(proposal, copy.deepcopy(supported), roles)
        assert len(reactor._negotiations) == before + 1  # the same key, from the cache
        assert _negotiated(again) == expected
        assert all(a is not b for a, b in zip(first[0], again[0], strict=True))
    assert _negotiated(memo(proposals[1], supported, {us: (True, False)}))[1] == [(us, True, False)]


def test_a_repeated_associate_request_is_decoded_once_with_its_own_values() -> None:
    """Two associations with the same A-ASSOCIATE-RQ bytes: the second reuses the first's
    decoding (remembered by the bytes), and each gets its own primitive and contexts; a
    request from another calling AE title is decoded anew and keeps its title."""
    seen: list[tuple[str, object, object]] = []

    def on_requested(event: evt.Event) -> None:
        primitive = event.assoc.requestor.primitive
        title = str(primitive.calling_ae_title).strip()
        seen.append((title, primitive, primitive.presentation_context_definition_list))

    ae = AE("SYNTHMR")
    ae.add_supported_context(MR, TRANSFER_SYNTAXES)
    ae.add_supported_context("1.2.840.10008.1.1")
    server = reactor.make_server(
        ae, ("127.0.0.1", 0), [(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_ECHO, lambda e: 0)]
    )
    before = len(reactor._associate_rqs)
    try:
        for title in ("ONE", "ONE", "TWO"):
            scu = AE(title)
            scu.add_requested_context(MR, "1.2.840.10008.1.2.1")
            scu.add_requested_context("1.2.840.10008.1.1")
            assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="SYNTHMR")
            assert assoc.is_established
            assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [
                MR,
                "1.2.840.10008.1.1",
            ]
            assert assoc.send_c_echo().Status == 0
            assoc.release()
    finally:
        server.shutdown()
    assert [title for title, _, _ in seen] == ["ONE", "ONE", "TWO"]
    assert len(reactor._associate_rqs) == before + 2  # ONE once, TWO once
    (_, p1, cx1), (_, p2, cx2) = seen[:2]
    assert p1 is not p2 and cx1 is not cx2
    assert all(a is not b for a, b in zip(cx1, cx2, strict=True))
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntax) for c in cx1] == [
        (c.context_id, c.abstract_syntax, c.transfer_syntax) for c in cx2
    ]


def test_bulk_recv_reads_whole_pdu_and_stops_at_close() -> None:
    """The acceptor's socket reads a PDU longer than one ``recv`` chunk whole, and returns
    what came before the peer closed (pynetdicom's contract: Evt17 follows)."""
    import socket
    import threading

    from dicom_node.reactor import RECV_CHUNK, _BulkRecvSocket

    ours, peer = socket.socketpair()
    wrapped = object.__new__(_BulkRecvSocket)
    wrapped.socket = ours
    payload = bytes(range(256)) * (RECV_CHUNK // 128 + 3)  # > 2 chunks
    sender = threading.Thread(target=lambda: (peer.sendall(payload + b"tail"), peer.close()))
    sender.start()
    try:
        assert wrapped.recv(len(payload)) == payload
        assert wrapped.recv(100) == b"tail"  # closed after 4 of 100 bytes
        assert wrapped.recv(6) == b""
    finally:
        sender.join()
        ours.close()


# --------------------------------------------------------------------------- the lean path
MR = "1.2.840.10008.5.1.4.1.1.4"


class _Recorder:
    """An SCP with the event reactors recording each C-STORE: (SOP instance UID, data set
    bytes, served in a DUL thread: the lean path)."""

    def __init__(self, max_pdu: int = 16384) -> None:
        self.stored: list[tuple[str, bytes, bool]] = []
        self.gate: dict[str, object] = {}  # SOP instance UID -> threading.Event to wait on
        ae = AE("SYNTHMR")
        ae.maximum_pdu_size = max_pdu
        ae.add_supported_context(MR, TRANSFER_SYNTAXES)
        ae.add_supported_context("1.2.840.10008.1.1")
        self.server = reactor.make_server(
            ae, ("127.0.0.1", 0), [(evt.EVT_C_STORE, self.on_store), (evt.EVT_C_ECHO, self.on_echo)]
        )
        self.echo_threads: list[bool] = []

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def on_store(self, event: evt.Event) -> int:
        import threading

        uid = str(event.request.AffectedSOPInstanceUID)
        gate = self.gate.get(uid)
        if gate is not None:
            assert gate.wait(10)  # type: ignore[attr-defined]
        in_dul = isinstance(threading.current_thread(), reactor._EventDUL)
        self.stored.append((uid, event.request.DataSet.getvalue(), in_dul))
        return 0x0000

    def on_echo(self, event: evt.Event) -> int:
        import threading

        self.echo_threads.append(isinstance(threading.current_thread(), reactor._EventDUL))
        return 0x0000


@pytest.fixture(scope="module")
def _recording_server() -> Iterator[_Recorder]:
    rec = _Recorder()
    try:
        yield rec
    finally:
        rec.server.shutdown()


@pytest.fixture
def recorder(_recording_server: _Recorder) -> _Recorder:
    """The module's recording SCP, its records emptied."""
    _recording_server.stored.clear()
    _recording_server.echo_threads.clear()
    _recording_server.gate.clear()
    return _recording_server


def _requestor(rec: _Recorder, max_pdu: int = 16384) -> Association:
    """An association with ``rec``'s SCP, returned once the SCP's end is established too.

    pynetdicom's acceptor sends its A-ASSOCIATE-AC before it marks the association
    established; a request arriving in between is served by the association thread (the
    correct, slower way) instead of the lean path these tests look at."""
    import time

    ae = AE("SCANNER")
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 20
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(MR, "1.2.840.10008.1.2.1")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", rec.port, ae_title="SYNTHMR")
    assert assoc.is_established
    deadline = time.monotonic() + 20
    while not all(a.is_established for a in rec.server.active_associations):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the SCP's end of the association never established"
        time.sleep(0.001)
    return assoc


def _command(uid: str, msg_id: int) -> bytes:
    """The encoded command set of a C-STORE-RQ for ``uid`` (pynetdicom's encoding)."""
    from io import BytesIO

    rq = C_STORE()
    rq.MessageID = msg_id
    rq.AffectedSOPClassUID = MR
    rq.AffectedSOPInstanceUID = uid
    rq.Priority = 2
    rq.DataSet = BytesIO(b"\x00" * 4)
    msg = C_STORE_RQ()
    msg.primitive_to_message(rq)
    return b"".join(
        data[1:]
        for p in msg.encode_msg(1, 0)
        for _, data in p.presentation_data_value_list
        if data[0] & 1
    )


def _pdu(context_id: int, *pdvs: tuple[int, bytes]) -> bytes:
    """A P-DATA-TF with the PDVs (message control header, fragment) given."""
    import struct

    items = b"".join(
        struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
        for control, fragment in pdvs
    )
    return struct.pack(">BBL", 4, 0, len(items)) + items


def _send_raw(assoc: Association, pdus: list[bytes]) -> C_STORE:
    """Write ``pdus`` on the association's socket as they are and wait for the answer
    (the requestor's reactor paused, as pynetdicom's own send_c_store does)."""
    import time

    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        for pdu in pdus:
            assoc.dul.socket.socket.sendall(pdu)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert isinstance(rsp, C_STORE), rsp
    return rsp


def _mr_context(assoc: Association) -> int:
    return next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == MR)


#: how each C-STORE's command set (c) and data set (d) are cut into PDVs and PDUs:
#: (name, [[(control, (part, start, end)), ...PDVs of a PDU], ...PDUs], lean path expected)
_LAYOUTS = [
    ("command and data PDVs in one PDU", [[(3, "c", 0, None), (0, "d", 0, 1000), (2, "d", 1000, None)]], True),
    ("data fragmented across PDUs", [[(3, "c", 0, None)], [(0, "d", 0, 7000)], [(0, "d", 7000, 7001)], [(2, "d", 7001, None)]], True),
    ("first data fragment beside the command", [[(3, "c", 0, None), (0, "d", 0, 5000)], [(2, "d", 5000, None)]], True),
    ("empty last data fragment", [[(3, "c", 0, None)], [(0, "d", 0, None)], [(2, "d", 0, 0)]], True),
    ("command in two PDUs", [[(1, "c", 0, 20)], [(3, "c", 20, None), (2, "d", 0, None)]], False),
    ("command in two PDVs of one PDU", [[(1, "c", 0, 20), (3, "c", 20, None)], [(2, "d", 0, None)]], False),
]  # fmt: skip


def test_lean_path_stores_every_pdv_layout_as_sent(recorder: _Recorder) -> None:
    """C-STORE requests cut into PDVs and PDUs in every way PS3.8 allows reach the handler
    whole, one after the other on one association; the plain ones on the lean path (DUL
    thread), a command set in several fragments on pynetdicom's path."""
    assoc = _requestor(recorder)
    cx = _mr_context(assoc)
    data = bytes(range(256)) * 60  # 15 KiB
    try:
        for i, (name, layout, _) in enumerate(_LAYOUTS):
            uid = f"1.2.826.0.1.3680043.8.498.{i + 1}"
            parts = {"c": _command(uid, i + 1), "d": data[i:]}
            pdus = [_pdu(cx, *[(ctl, parts[p][a:b]) for ctl, p, a, b in pdvs]) for pdvs in layout]
            rsp = _send_raw(assoc, pdus)
            assert rsp.Status == 0 and rsp.MessageIDBeingRespondedTo == i + 1, name
            assert str(rsp.AffectedSOPInstanceUID) == uid, name
    finally:
        assoc.release()
    assert [(u, d) for u, d, _ in recorder.stored] == [
        (f"1.2.826.0.1.3680043.8.498.{i + 1}", data[i:]) for i in range(len(_LAYOUTS))
    ]
    assert [lean for *_, lean in recorder.stored] == [lean for *_, lean in _LAYOUTS]


@pytest.mark.parametrize("over", [0, 1000])
def test_lean_path_reads_pdus_at_and_over_the_negotiated_maximum(
    recorder: _Recorder, over: int
) -> None:
    """A PDU exactly as long as our maximum PDU length is read into one buffer; a longer one
    (a peer must not send it; pynetdicom accepts it) is read as it arrives, just as well."""
    assoc = _requestor(recorder)
    cx = _mr_context(assoc)
    limit = assoc.acceptor.maximum_length
    assert limit == 16384
    data = bytes(range(251)) * 200
    first = limit - 6 + over  # fragment filling the PDU to the byte (+ over)
    uid = "1.2.826.0.1.3680043.8.498.77"
    pdus = [
        _pdu(cx, (3, _command(uid, 5))),
        _pdu(cx, (0, data[:first])),
        _pdu(cx, (2, data[first:])),
    ]
    assert len(pdus[1]) == limit + 6 + over
    try:
        assert _send_raw(assoc, pdus).Status == 0
    finally:
        assoc.release()
    assert recorder.stored == [(uid, data, True)]


def test_lean_path_answers_only_after_the_handler_returns(recorder: _Recorder) -> None:
    """Served in the DUL thread, a C-STORE's success still leaves only once the handler
    returned (DESIGN promise 1: the success means the instance is stored)."""
    import threading

    from pydicom.dataset import Dataset

    uid = "1.2.826.0.1.3680043.8.498.88"
    gate = recorder.gate[uid] = threading.Event()
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientName = MR, uid, "LEAN^GATE"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    assoc = _requestor(recorder)
    answers: list[Dataset] = []
    sender = threading.Thread(target=lambda: answers.append(assoc.send_c_store(ds)))
    sender.start()
    try:
        sender.join(0.5)
        assert sender.is_alive() and not answers and not recorder.stored  # handler waits
        gate.set()
        sender.join(20)
        assert answers and answers[0].Status == 0
        assert [(u, lean) for u, _, lean in recorder.stored] == [(uid, True)]
    finally:
        gate.set()
        sender.join(20)
        assoc.release()


def test_c_echo_among_c_stores_on_one_association(recorder: _Recorder) -> None:
    """A C-ECHO between C-STOREs goes pynetdicom's way (association thread); the C-STOREs
    before and after it the lean way, answered in order."""
    from pydicom.dataset import Dataset

    assoc = _requestor(recorder)
    uids = [f"1.2.826.0.1.3680043.8.498.9{i}" for i in range(4)]
    try:
        for i, uid in enumerate(uids):
            ds = Dataset()
            ds.SOPClassUID, ds.SOPInstanceUID = MR, uid
            ds.file_meta = Dataset()
            ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
            assert assoc.send_c_store(ds).Status == 0
            if i % 2 == 0:
                assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    assert [(u, lean) for u, _, lean in recorder.stored] == [(u, True) for u in uids]
    assert recorder.echo_threads == [False, False]


def _wait_ended(server: object, assoc: Association) -> None:
    """Both ends of ``assoc`` (written to raw, its reactor paused) end, the acceptor's DUL
    thread too."""
    import threading
    import time

    assoc._reactor_checkpoint.set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        duls = [t for t in threading.enumerate() if isinstance(t, reactor._EventDUL)]
        if not assoc.is_alive() and not server.active_associations and not duls:  # type: ignore[attr-defined]
            return
        time.sleep(0.05)
    raise AssertionError("the association did not end")


def test_abort_in_the_middle_of_a_data_set(recorder: _Recorder) -> None:
    """A peer's A-ABORT after part of a data set: nothing reaches the handler, the
    association's threads end, and the next association stores as usual."""
    import struct

    assoc = _requestor(recorder)
    cx = _mr_context(assoc)
    uid = "1.2.826.0.1.3680043.8.498.66"
    assoc._reactor_checkpoint.clear()
    sock = assoc.dul.socket.socket
    sock.sendall(_pdu(cx, (3, _command(uid, 1)), (0, b"\x01" * 3000)))
    sock.sendall(struct.pack(">BBLBBBB", 7, 0, 4, 0, 0, 0, 0))  # A-ABORT, service user
    _wait_ended(recorder.server, assoc)
    assert recorder.stored == []
    again = _requestor(recorder)
    try:
        assert (
            _send_raw(again, [_pdu(_mr_context(again), (3, _command(uid, 2)), (2, b"ok"))]).Status
            == 0
        )
    finally:
        again.release()
    assert recorder.stored == [(uid, b"ok", True)]


def test_pdv_of_another_context_mid_data_set_aborts(recorder: _Recorder) -> None:
    """A data fragment under another presentation context in the middle of a data set is
    an invalid message: the SCP aborts the association (as pynetdicom does)."""
    assoc = _requestor(recorder)
    cx = _mr_context(assoc)
    other = next(c.context_id for c in assoc.accepted_contexts if c.context_id != cx)
    assoc._reactor_checkpoint.clear()
    sock = assoc.dul.socket.socket
    sock.sendall(_pdu(cx, (3, _command("1.2.826.0.1.3680043.8.498.55", 1)), (0, b"\x01" * 100)))
    sock.sendall(_pdu(other, (2, b"\x02" * 100)))
    _wait_ended(recorder.server, assoc)
    assert assoc.is_aborted
    assert recorder.stored == []


def test_failure_outside_the_handler_on_the_lean_path_aborts_without_deadlock(
    recorder: _Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom aborts (blocking: it waits for the DUL to stop) when serving a request
    fails outside the handler; on the lean path that wait is the association thread's,
    not the DUL thread's own: the association ends instead of hanging."""

    def broken(self: object, status: object, rsp: C_STORE) -> C_STORE:
        raise RuntimeError("status check failed")

    monkeypatch.setattr(reactor._LeanStorageSCP, "validate_status", broken)
    assoc = _requestor(recorder)
    cx = _mr_context(assoc)
    assoc._reactor_checkpoint.clear()
    uid = "1.2.826.0.1.3680043.8.498.44"
    assoc.dul.socket.socket.sendall(_pdu(cx, (3, _command(uid, 1)), (2, b"\x01\x02")))
    _wait_ended(recorder.server, assoc)
    assert assoc.is_aborted
    assert [(u, lean) for u, _, lean in recorder.stored] == [(uid, True)]


def test_dcmtk_storescu_over_small_pdus(tmp_path: Path) -> None:
    """dcmtk's storescu against a 4 KiB maximum PDU (each instance in 5 PDUs or more):
    every instance arrives whole, each after the first on the lean path (the first may
    come before pynetdicom marks the association established: see :func:`_requestor`)."""
    rec = _Recorder(max_pdu=4096)
    files = [
        make_mr_file(
            tmp_path / f"{i}.dcm",
            series_uid="1.2.826.0.1.3680043.8.498.6",
            instance_number=i,
            shape=(96, 96),
        )
        for i in range(4)
    ]
    try:
        done = storescu(files, rec.port)
    finally:
        rec.server.shutdown()
    assert done.returncode == 0, done.stdout + done.stderr
    import pydicom

    for i, (path, (uid, data, lean)) in enumerate(zip(files, rec.stored, strict=True)):
        ds = pydicom.dcmread(path)
        assert uid == str(ds.SOPInstanceUID) and (lean or i == 0)
        assert len(data) > 4 * 4096 and data.endswith(ds.PixelData), uid
