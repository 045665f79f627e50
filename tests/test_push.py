"""push: C-STORE SCU against Orthanc, no hang when the PACS is down or silent, backoff,
dead letters."""

from __future__ import annotations

import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicom_node.config import Destination, RetrySettings
from dicom_node.metrics import NodeMetrics
from dicom_node.push import Outbox, backoff_delay, send_files
from dicom_node.registry import Registry, State
from tests.conftest import (
    OrthancServer,
    free_port,
    make_mr_file,
    require_tool,
    stop_pid,
    wait_port,
)
from tests.test_scp_security import pki  # noqa: F401  (module fixture: throw-away CA)


@contextmanager
def dcmtk_storescp(out: Path, aet: str, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """dcmtk storescp as ``aet`` on a free loopback port, writing into ``out``; yields the
    process (its port as ``.port``), stopped by PID on exit."""
    port = free_port()
    proc = subprocess.Popen(
        [require_tool("storescp"), *options, "-aet", aet, "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    proc.port = port  # type: ignore[attr-defined]
    try:
        wait_port(port, 10)
        yield proc
    finally:
        stop_pid(proc)


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    r = RetrySettings(base_delay_s=2.0, max_delay_s=60.0, jitter=0.0)
    assert [backoff_delay(a, r) for a in (1, 2, 3, 4, 10)] == [2.0, 4.0, 8.0, 16.0, 60.0]
    rj = RetrySettings(base_delay_s=2.0, max_delay_s=60.0, jitter=0.25)
    rng = random.Random(1)
    ds = [backoff_delay(3, rj, rng) for _ in range(500)]
    assert min(ds) >= 6.0 and max(ds) <= 10.0 and max(ds) - min(ds) > 2.0  # spread, in bounds


def _series_with_rle(tmp_path: Path, n: int) -> tuple[list[Path], Path, pydicom.Dataset]:
    """``n`` explicit-VR MR files and one RLE-compressed one (path and dataset), one series."""
    series = pydicom.uid.generate_uid()
    files = [
        make_mr_file(tmp_path / f"{i}.dcm", series_uid=series, instance_number=i) for i in range(n)
    ]
    rle = make_mr_file(tmp_path / "rle.dcm", series_uid=series, instance_number=9, shape=(16, 16))
    ds = pydicom.dcmread(rle)
    ds.compress(RLELossless)
    ds.save_as(rle, enforce_file_format=True)
    return files, rle, ds


@pytest.mark.integration
def test_send_files_to_orthanc_one_association(orthanc: OrthancServer, tmp_path: Path) -> None:
    files, rle, ds = _series_with_rle(tmp_path, 3)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    dest = Destination("pacs", "ORTHANC", "127.0.0.1", orthanc.dicom_port, timeout_s=10)
    res = send_files([*files, rle, junk], dest)
    assert res["sent"] == 4 and res["failed"] == 1
    assert (
        "unreadable file meta" in next(r for r in res["results"] if r["path"] == str(junk))["error"]
    )
    sops = {
        orthanc.rest(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
        for i in orthanc.instances()
    }
    assert sops == {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in [*files, rle]
    }
    # sent as it was: Orthanc stored the RLE transfer syntax
    (rle_id,) = [
        i
        for i in orthanc.instances()
        if orthanc.rest(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] == ds.SOPInstanceUID
    ]
    assert orthanc.rest(f"/instances/{rle_id}/metadata?expand").get("TransferSyntax") == RLELossless


@pytest.mark.integration
def test_a_peer_that_refuses_the_files_syntax_still_gets_them(tmp_path: Path) -> None:
    """Files go out as they are (no decode); dcmtk storescp accepting implicit VR only
    (+xi) refuses their explicit-VR and RLE contexts, so they are decoded and converted."""
    files, rle, _ = _series_with_rle(tmp_path, 2)
    assert all(
        pydicom.dcmread(f).file_meta.TransferSyntaxUID != pydicom.uid.ImplicitVRLittleEndian
        for f in [*files, rle]
    )
    out = tmp_path / "received"
    out.mkdir()
    with dcmtk_storescp(out, "IMPLICIT", "+xi") as scp:
        res = send_files([*files, rle], Destination("p", "IMPLICIT", "127.0.0.1", scp.port, 10))
    assert res["sent"] == 3 and res["failed"] == 0, res
    got = [pydicom.dcmread(p) for p in out.iterdir()]
    assert {str(d.SOPInstanceUID) for d in got} == {
        str(pydicom.dcmread(f).SOPInstanceUID) for f in [*files, rle]
    }
    assert {str(d.file_meta.TransferSyntaxUID) for d in got} == {pydicom.uid.ImplicitVRLittleEndian}


@pytest.mark.integration
def test_pacs_down_or_silent_never_hangs(tmp_path: Path) -> None:
    f = make_mr_file(tmp_path / "a.dcm")
    # nobody listening
    t0 = time.monotonic()
    res = send_files([f], Destination("down", "PACS", "127.0.0.1", free_port(), timeout_s=2))
    assert res["failed"] == 1 and res["results"][0]["status"] is None
    assert time.monotonic() - t0 < 5
    # a black hole: accepts TCP, never answers the association request
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    conns: list[socket.socket] = []
    th = threading.Thread(target=lambda: conns.append(srv.accept()[0]), daemon=True)
    th.start()
    t0 = time.monotonic()
    res = send_files(
        [f], Destination("hole", "PACS", "127.0.0.1", srv.getsockname()[1], timeout_s=1.5)
    )
    elapsed = time.monotonic() - t0
    for c in conns:
        c.close()
    srv.close()
    assert res["failed"] == 1
    assert elapsed < 8, f"send_files took {elapsed:.1f} s against a silent peer"


@pytest.mark.integration
def test_a_pacs_that_stops_reading_mid_send_costs_the_timeout(tmp_path: Path) -> None:
    """dcmtk storescp frozen (SIGSTOP) after the association is up: a 16 MB file fills the
    socket buffers and the send stalls; it fails after about timeout_s instead of hanging."""
    import os
    import signal

    from dicom_node.push import Link

    small = make_mr_file(tmp_path / "small.dcm", instance_number=1)
    big = make_mr_file(tmp_path / "big.dcm", instance_number=2, shape=(2048, 4096))
    with dcmtk_storescp(tmp_path, "PEER") as scp:
        link = Link(Destination("p", "PEER", "127.0.0.1", scp.port, timeout_s=2))
        meta = pydicom.dcmread(small, stop_before_pixels=True).file_meta
        assert link.open({(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)}) == ""
        assert link.send(small)["error"] == ""
        os.kill(scp.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            res = link.send(big)
            elapsed = time.monotonic() - t0
            link.close()
        finally:
            os.kill(scp.pid, signal.SIGCONT)
    assert res["error"] and res["status"] is None
    assert elapsed < 10, f"a stalled send took {elapsed:.1f} s"


class _PreemptedCheckpoint(threading.Event):
    """The association reactor's pause checkpoint, with the reactor thread losing the CPU
    for ``delay_s`` right after every wait: pynetdicom's check-then-act window, held open."""

    def __init__(self, reactor: threading.Thread, delay_s: float) -> None:
        super().__init__()
        self.reactor, self.delay_s = reactor, delay_s
        self.set()

    def wait(self, timeout: float | None = None) -> bool:
        ok = super().wait(timeout)
        if threading.current_thread() is self.reactor:
            time.sleep(self.delay_s)
        return ok


@pytest.mark.integration
@pytest.mark.parametrize("requestor", ["pynetdicom", "PushAE"])
def test_the_reactor_never_takes_a_c_store_response(requestor: str, tmp_path: Path) -> None:
    """A requestor's reactor thread preempted just after its pause checkpoint, and the
    sender just after sending (as under load): pynetdicom's own association then takes the
    C-STORE response off the queue and the sender waits out the DIMSE timeout;
    dicom_node.requestor's never does."""
    from pynetdicom import AE, build_context

    from dicom_node.requestor import PushAE

    files = [make_mr_file(tmp_path / f"{i}.dcm", instance_number=i) for i in range(4)]
    out = tmp_path / "received"
    out.mkdir()
    with dcmtk_storescp(out, "PEER") as scp:
        ae = (AE if requestor == "pynetdicom" else PushAE)(ae_title="SYNTHMR")
        ae.dimse_timeout = 1.5
        ts = str(pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID)
        ae.requested_contexts = [build_context(pydicom.dcmread(files[0]).SOPClassUID, ts)]
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="PEER")
        assert assoc.is_established
        assoc._reactor_checkpoint = _PreemptedCheckpoint(assoc, delay_s=0.3)
        send_msg = assoc.dimse.send_msg

        def preempted_send(*args: object) -> None:  # the sender loses the CPU after sending
            send_msg(*args)
            time.sleep(0.5)

        assoc.dimse.send_msg = preempted_send
        time.sleep(0.1)  # the reactor is in its (preempted) turn
        statuses = []
        for f in files:
            rsp = assoc.send_c_store(f) if assoc.is_established else None
            statuses.append(int(rsp.Status) if rsp is not None and "Status" in rsp else None)
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    if requestor == "pynetdicom":  # the race this test holds open is real
        assert None in statuses, statuses
    else:
        assert statuses == [0, 0, 0, 0]
        assert len(list(out.iterdir())) == 4


def _exported_series(db: Path, outbox: list[tuple[str, str, str, str]]) -> Registry:
    """A registry whose series 1.1 (one instance) went through a job to EXPORTED with these
    outbox rows ``(destination, SOP Instance UID, SOP Class UID, file)``."""
    reg = Registry(db)
    reg.add_instance(
        sop_uid="1.1.1", series_uid="1.1", study_uid="", sop_class_uid="1", path="/p", size=1
    )
    reg.transition("1.1", State.COMPLETE)
    job = reg.enqueue("1.1")
    reg.claim_job()
    reg.finish_job(job, "1.1", State.EXPORTED, outbox=outbox)
    return reg


def test_outbox_dead_letter_after_max_attempts(tmp_path: Path) -> None:
    f = make_mr_file(tmp_path / "out.dcm")
    reg = _exported_series(tmp_path / "r.db", [("down", "9.1", "1.2", str(f))])
    metrics = NodeMetrics()
    retry = RetrySettings(max_attempts=2, base_delay_s=0.0, max_delay_s=0.0, jitter=0.0)
    ob = Outbox(
        reg, [Destination("down", "PACS", "127.0.0.1", free_port(), timeout_s=1)], retry, metrics
    )
    assert ob.run_once() == 0
    assert reg.outbox_counts() == {"PENDING": 1, "SENT": 0, "DEAD": 0, "HELD": 0}
    assert ob.run_once() == 0
    assert reg.outbox_counts() == {"PENDING": 0, "SENT": 0, "DEAD": 1, "HELD": 0}
    assert metrics.registry.get_sample_value("synthmr_outbox_dead_letter_total") == 1
    assert (
        metrics.registry.get_sample_value(
            "synthmr_push_total", {"destination": "down", "result": "failure"}
        )
        == 2
    )
    assert reg.series("1.1").state == State.EXPORTED  # not delivered


@pytest.mark.integration
def test_outbox_pushes_a_series_over_parallel_associations(tmp_path: Path) -> None:
    """Destination.associations = 3: the 9 outputs of one series reach a real pynetdicom
    storage SCP over 3 associations, every one once, and the series becomes DELIVERED."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import MRImageStorage

    seen: list[tuple[int, str]] = []
    connections: list[int] = []

    def on_store(event: evt.Event) -> int:
        seen.append((id(event.assoc), str(event.dataset.SOPInstanceUID)))
        return 0x0000

    ae = AE("PACS")
    ae.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
    handlers = [
        (evt.EVT_C_STORE, on_store),
        (evt.EVT_CONN_OPEN, lambda event: connections.append(id(event.assoc))),
    ]
    srv = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    try:
        outs = [make_mr_file(tmp_path / f"out{i}.dcm", instance_number=i) for i in range(12)]
        sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in outs]
        rows = [("pacs", s, str(MRImageStorage), str(f)) for s, f in zip(sops, outs, strict=True)]
        reg = _exported_series(tmp_path / "r.db", rows[:9])
        dest = Destination("pacs", "PACS", "127.0.0.1", srv.server_address[1], 10, associations=3)
        ob = Outbox(reg, [dest], RetrySettings(), NodeMetrics())
        assert ob.run_once() == 9
        assert sorted(s for _, s in seen) == sorted(sops[:9])
        assert len({a for a, _ in seen}) == 3
        assert reg.series("1.1").state == State.DELIVERED
        # a later batch (the next output series released) rides the open associations
        reg.add_outbox("1.1", rows[9:])
        assert ob.run_once() == 3
        assert sorted(s for _, s in seen) == sorted(sops)
        assert len(connections) == 3
        ob.stop()  # closes them
        reg.close()
    finally:
        srv.shutdown()


def test_c_store_command_set_is_pynetdicoms(tmp_path: Path) -> None:
    """The directly encoded C-STORE-RQ command set is byte for byte the one pynetdicom
    encodes, and the Part-10 reader finds what pydicom finds (and where the data set
    starts: the bytes after it are what pydicom would encode)."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    from dicom_node.requestor import c_store_rq_command, read_part10_meta

    f = make_mr_file(tmp_path / "a.dcm")  # odd-length UIDs are padded
    ds = pydicom.dcmread(f)
    meta = read_part10_meta(f)
    assert (meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax_uid) == (
        ds.file_meta.MediaStorageSOPClassUID,
        ds.file_meta.MediaStorageSOPInstanceUID,
        ds.file_meta.TransferSyntaxUID,
    )
    assert f.read_bytes()[meta.offset :] == encode(ds, False, True)
    for msg_id in (1, 7, 65535):
        req = C_STORE()
        req.MessageID, req.Priority = msg_id, 2
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        req.DataSet = BytesIO(b"\x00")
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        assert c_store_rq_command(ds.SOPClassUID, ds.SOPInstanceUID, msg_id) == encode(
            msg.command_set, True, True
        )


@pytest.mark.integration
def test_push_over_tls_to_dcmtk(tmp_path: Path, pki: Path) -> None:  # noqa: F811
    """Destination tls = true: files of many PDUs (and TLS records) each go out, and their
    responses come back, over dcmtk storescp +tls verifying our client certificate."""
    from dicom_node.push import send_parallel

    files = [
        make_mr_file(tmp_path / f"{i}.dcm", instance_number=i, shape=(256, 256)) for i in range(3)
    ]
    out = tmp_path / "received"
    out.mkdir()
    tls = ["+tls", f"{pki}/server.key", f"{pki}/server.crt", "-pw", "+cf", f"{pki}/ca.crt"]
    with dcmtk_storescp(out, "PEER", *tls) as scp:
        dest = Destination(
            "tls",
            "PEER",
            "127.0.0.1",
            scp.port,
            10,
            tls=True,
            ca_file=f"{pki}/ca.crt",
            cert_file=f"{pki}/client.crt",
            key_file=f"{pki}/client.key",
            associations=2,
        )
        res = send_parallel(files, dest)
    assert res["sent"] == 3 and res["failed"] == 0, res
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in out.iterdir()} == {
        str(pydicom.dcmread(f).SOPInstanceUID) for f in files
    }
