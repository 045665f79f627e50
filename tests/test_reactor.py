"""The SCP's shortcuts around pynetdicom (dicom_node.reactor) give pynetdicom's results."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from pynetdicom import AE, evt
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
    assert ours.DataSet.getvalue() == theirs.DataSet.getvalue()
    assert ours._context_id == theirs._context_id == 5
    assert ours.is_valid_request


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
