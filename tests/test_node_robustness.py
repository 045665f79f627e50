"""Robustness of the node against real peers.

- kill -9 while receiving (mid-``storescu``) and while pushing (to a PACS that stalls:
  Orthanc frozen with SIGSTOP), restart: every acknowledged instance is present, every
  output reaches Orthanc exactly once per SOP Instance UID;
- PACS outage with a node restart in between: nothing lost;
- access: dcmtk ``storescu +tls`` with mutual TLS, plaintext refused, unknown AE rejected;
- 300 malformed / fuzzed instances: failure statuses, counted, nothing outside the spool,
  the node keeps serving.

Series: the 2 x 32 x 32 GE phantom series of conftest (32 files); processing with
segmentation, myelin and enhancement off (they do not change the node's behaviour).
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom.sop_class import Verification

from dicom_node.config import load_settings
from dicom_node.metrics import NodeMetrics
from dicom_node.registry import Registry
from dicom_node.requestor import PushAE
from dicom_node.scp import StoreSCP
from dicom_node.spool import Spool
from tests.conftest import (
    FAST_PROCESSING,
    OrthancServer,
    durably_received,
    echoscu,
    free_port,
    make_mr_file,
    registry_rows,
    require_tool,
    storescu,
    wait_for,
    write_config,
)
from tests.test_node_e2e import NodeProcess, _db_state, _orthanc_sops
from tests.test_scp_security import pki  # noqa: F401  (module fixture: throw-away CA)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _series_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _sop_uid(f: Path) -> str:
    return str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)


_rows = registry_rows


def _dest(orth: OrthancServer, timeout_s: float = 5.0) -> str:
    return (
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
        f"port = {orth.dicom_port}\ntimeout_s = {timeout_s}\n"
    )


RETRY_FAST = (
    "[retry]\nbase_delay_s = 0.3\nmax_delay_s = 1.0\nmax_attempts = 100\npoll_interval_s = 0.1\n"
)


def _acked(stdout: str) -> list[str]:
    """Files dcmtk ``storescu -v`` got a success C-STORE response for."""
    out, cur = [], None
    for line in stdout.splitlines():
        if "Sending file:" in line:
            cur = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response" in line and "(Success)" in line and cur:
            out.append(cur)
            cur = None
    return out


def _assert_delivered_once(spool: Path, orth: OrthancServer, uid: str) -> set[str]:
    """Orthanc holds exactly the outbox's outputs of ``uid`` (one per SOP UID), all SENT."""
    outbox = _rows(spool, "SELECT sop_uid, state FROM outbox WHERE series_uid=?", (uid,))
    expected = {r[0] for r in outbox}
    assert len(expected) >= 3 and all(r[1] == "SENT" for r in outbox), outbox
    in_pacs = _orthanc_sops(orth)
    assert sorted(in_pacs) == sorted(expected)
    # no output written twice under different UIDs: one outbox file per output
    files = list((spool / "outbox").rglob("*.dcm"))
    assert len(files) == len(expected)
    return expected


# --------------------------------------------------------------------------- crashes
def test_kill9_while_receiving_keeps_every_acknowledged_instance(
    tmp_path: Path, pacs: OrthancServer, mdme_series: list[Path]
) -> None:
    """storescu sends half the MDME series, 200 other images, then the other half; the node
    is killed -9 while that association is running. Every acknowledged instance is in the
    spool and registry after restart; the scanner re-sends the series and its outputs reach
    Orthanc exactly once."""
    pacs.start()
    port = free_port()
    spool = tmp_path / "spool"
    cfg = write_config(
        tmp_path,
        _dest(pacs) + FAST_PROCESSING + RETRY_FAST + "[completion]\nquiet_period_s = 1\n",
        port=port,
        spool=spool,
    )
    filler_series = generate_uid()
    filler = [
        make_mr_file(
            tmp_path / "filler" / f"{i:04d}.dcm",
            series_uid=filler_series,
            instance_number=i,
            shape=(64, 64),
        )
        for i in range(200)
    ]
    files = mdme_series[:16] + filler + mdme_series[16:]
    node = NodeProcess(cfg, tmp_path / "node.log")
    uid = _series_uid(mdme_series)
    try:
        node.start(port)
        cmd = [require_tool("storescu"), "-v", "-aet", "SCANNER", "-aec", "SYNTHMR"]
        send = subprocess.Popen(
            [*cmd, "127.0.0.1", str(port), *map(str, files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for(lambda: len(durably_received(spool)) >= 40, 60, 0.005, "40 instances")
        node.kill9()
        out, _ = send.communicate(timeout=60)
        acked = _acked(out)
        assert send.returncode != 0  # the association died under the sender
        assert 16 <= len(acked) < len(files), len(acked)  # killed mid-association
        node.start(port)  # recovery: temp files removed, registry consistent
        assert list((spool / "tmp").iterdir()) == []
        in_registry = {r[0]: r[1] for r in _rows(spool, "SELECT sop_uid, path FROM instances")}
        for f in acked:
            sop = _sop_uid(Path(f))
            assert sop in in_registry, f"acknowledged {f} lost"
            stored = pydicom.dcmread(in_registry[sop])
            assert stored.PixelData == pydicom.dcmread(f).PixelData
        # the scanner re-sends the whole series: completes by grid, delivered once
        r = storescu(mdme_series, port)
        assert r.returncode == 0, r.stdout[-2000:]
        wait_for(lambda: _db_state(spool, uid) == "DELIVERED", 240, 0.2, "DELIVERED")
        _assert_delivered_once(spool, pacs, uid)
        assert _rows(spool, "SELECT COUNT(*) FROM instances WHERE series_uid=?", (uid,))[0][
            0
        ] == len(mdme_series)
    finally:
        node.stop()


def test_kill9_while_pushing_to_a_stalled_pacs(
    tmp_path: Path, pacs: OrthancServer, mdme_series: list[Path]
) -> None:
    """Orthanc is frozen (SIGSTOP) while the series is processed, so the push hangs in the
    association; the node is killed -9 mid-push, Orthanc resumes, the node restarts: the
    outbox (not a re-run) delivers every output exactly once."""
    pacs.start()
    port = free_port()
    spool = tmp_path / "spool"
    cfg = write_config(
        tmp_path,
        _dest(pacs, timeout_s=30) + FAST_PROCESSING + RETRY_FAST,
        port=port,
        spool=spool,
    )
    node = NodeProcess(cfg, tmp_path / "node.log")
    uid = _series_uid(mdme_series)
    assert pacs.proc is not None
    try:
        node.start(port)
        os.kill(pacs.proc.pid, signal.SIGSTOP)  # accepts TCP (kernel backlog), never answers
        assert storescu(mdme_series, port).returncode == 0
        wait_for(lambda: _db_state(spool, uid) == "EXPORTED", 240, 0.1, "EXPORTED")
        time.sleep(1.0)  # the outbox is now waiting inside an association to Orthanc
        outbox_before = _rows(spool, "SELECT id, sop_uid, state FROM outbox ORDER BY id")
        assert outbox_before and all(r[2] == "PENDING" for r in outbox_before)
        node.kill9()
        os.kill(pacs.proc.pid, signal.SIGCONT)
        node.start(port)
        wait_for(lambda: _db_state(spool, uid) == "DELIVERED", 60, 0.2, "DELIVERED")
        _assert_delivered_once(spool, pacs, uid)
        # delivered from the outbox as it was: same rows, the job did not run again
        assert [r[:2] for r in _rows(spool, "SELECT id, sop_uid FROM outbox ORDER BY id")] == [
            r[:2] for r in outbox_before
        ]
        assert _rows(spool, "SELECT COUNT(*) FROM jobs WHERE series_uid=?", (uid,))[0][0] == 1
    finally:
        node.stop()


def test_pacs_outage_with_node_restart_loses_nothing(
    tmp_path: Path, pacs: OrthancServer, mdme_series: list[Path]
) -> None:
    """Orthanc down: the outbox retries (attempts recorded); the node is killed -9 and
    restarted while Orthanc is still down; Orthanc comes back: everything is delivered."""
    port = free_port()
    spool = tmp_path / "spool"
    cfg = write_config(tmp_path, _dest(pacs) + FAST_PROCESSING + RETRY_FAST, port=port, spool=spool)
    node = NodeProcess(cfg, tmp_path / "node.log")
    uid = _series_uid(mdme_series)
    try:
        node.start(port)
        assert storescu(mdme_series, port).returncode == 0
        wait_for(lambda: _db_state(spool, uid) == "EXPORTED", 240, 0.1, "EXPORTED")

        def min_attempts() -> int:
            return int(_rows(spool, "SELECT MIN(attempts) FROM outbox")[0][0] or 0)

        wait_for(lambda: min_attempts() >= 2, 30, 0.1, "two failed attempts per item")
        n_outbox = _rows(spool, "SELECT COUNT(*) FROM outbox")[0][0]
        node.kill9()
        node.start(port)
        wait_for(lambda: min_attempts() >= 3, 30, 0.1, "retries after the restart")
        assert _db_state(spool, uid) == "EXPORTED"
        pacs.start()
        wait_for(lambda: _db_state(spool, uid) == "DELIVERED", 60, 0.2, "DELIVERED")
        assert len(_assert_delivered_once(spool, pacs, uid)) == n_outbox
    finally:
        node.stop()


# --------------------------------------------------------------------------- access
def _storescu_tls(
    files: list[Path], port: int, certs: Path, calling: str = "SCANNER"
) -> subprocess.CompletedProcess[str]:
    cmd = [require_tool("storescu"), "-v", "-aet", calling, "-aec", "SYNTHMR"]
    cmd += [
        "+tls",
        str(certs / "client.key"),
        str(certs / "client.crt"),
        "+cf",
        str(certs / "ca.crt"),
    ]
    cmd += ["127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_mutual_tls_storescu_plaintext_refused_unknown_ae_rejected(
    tmp_path: Path,
    pki: Path,  # noqa: F811
) -> None:
    cfg = write_config(
        tmp_path,
        '[security]\nrequire_known_callers = true\n[[security.allowed_callers]]\nae_title = "SCANNER"\n'
        f'[security.tls]\nenabled = true\ncert_file = "{pki}/server.crt"\n'
        f'key_file = "{pki}/server.key"\nca_file = "{pki}/ca.crt"\nrequire_client_cert = true\n',
    )
    s = load_settings(cfg, env={})
    spool = Spool(s.spool.path)
    reg = Registry(tmp_path / "r.db")
    metrics = NodeMetrics()
    scp = StoreSCP(s, spool, reg, metrics)
    scp.start()
    try:
        files = [make_mr_file(tmp_path / "in" / f"{i}.dcm", instance_number=i) for i in range(3)]
        ok = _storescu_tls(files, scp.port, pki)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert (ok.stdout + ok.stderr).count("Received Store Response (Success)") == 3
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            assert spool.instance_path(
                "incoming", ds.SeriesInstanceUID, ds.SOPInstanceUID
            ).is_file()
        plain = storescu(files, scp.port)  # no TLS at all
        assert plain.returncode != 0
        intruder = _storescu_tls(files, scp.port, pki, calling="INTRUDER")  # valid cert, bad AE
        assert intruder.returncode != 0
        assert "Association Rejected" in intruder.stdout + intruder.stderr
        assert len(list(spool.incoming.rglob("*.dcm"))) == 3
        assert (
            metrics.registry.get_sample_value("synthmr_associations_total", {"result": "rejected"})
            == 1.0
        )
    finally:
        scp.stop()
        reg.close()


# --------------------------------------------------------------------------- bad input
def _samples(metrics: NodeMetrics, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels`` (other labels ignored)."""
    total = 0.0
    for fam in metrics.registry.collect():
        for smp in fam.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                total += smp.value
    return total


TRAVERSAL = ["../../etc/passwd", "1.2/../../x", "/tmp/abs", "..", "1.2.3\x00/../../y"]


def _element_ends(raw: bytes, body: int) -> set[int]:
    """Byte offsets where a top-level element of ``raw`` (explicit VR LE from ``body``) ends."""
    from pydicom.filereader import data_element_generator

    fp = io.BytesIO(raw)
    fp.seek(body)
    return {e.value_tell + e.length for e in data_element_generator(fp, False, True)}


def _fuzz_files(tmp: Path, n: int, seed: int) -> tuple[list[tuple[str, Path]], list[Path]]:
    """``n`` broken instances (kind, path), and the crafted-UID ones (readable, hostile
    names). Every broken file keeps a valid preamble and file meta, so that it is sent."""
    rng = random.Random(seed)
    out: list[tuple[str, Path]] = []
    kinds = ["truncated", "random", "bad_vr", "huge_length", "missing_uid"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        good = make_mr_file(tmp / "src" / f"{i}.dcm", shape=(16, 16), instance_number=i)
        raw = good.read_bytes()
        body = raw.index(b"\x08\x00", 132 + 12)  # first element after the file meta
        if kind == "truncated":
            # cut inside an element's value: a cut exactly between two elements would
            # leave a well-formed (shorter) dataset, which no parser can call truncated
            ends = _element_ends(raw, body)
            cut = rng.randrange(body + 1, len(raw) - 1)
            while cut in ends:
                cut += 1
            data = raw[:cut]
        elif kind == "random":
            data = raw[:body] + rng.randbytes(rng.randrange(16, 4000))
        elif kind == "bad_vr":
            # the SOP Instance UID element's VR replaced by two random non-letter bytes
            at = raw.index(b"\x08\x00\x18\x00UI")
            vr = bytes([rng.randrange(0, 0x40), rng.randrange(0, 0x40)])
            data = raw[: at + 4] + vr + raw[at + 6 :]
        elif kind == "huge_length":
            at = raw.index(b"\x08\x00\x18\x00UI")  # SOP Instance UID: length 0xFFF0 (short VR)
            data = raw[: at + 6] + b"\xf0\xff" + raw[at + 8 :]
        else:
            ds = pydicom.dcmread(good)
            del ds[rng.choice(["SOPInstanceUID", "SeriesInstanceUID", "SOPClassUID"])]
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=False)
            data = buf.getvalue()
        p = tmp / "fuzz" / f"{i:04d}_{kind}.dcm"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out.append((kind, p))
    crafted = []
    for j, evil in enumerate(TRAVERSAL):
        p = make_mr_file(tmp / "crafted" / f"{j}.dcm", shape=(8, 8))
        ds = pydicom.dcmread(p)
        ds.SOPInstanceUID = evil  # the file meta keeps a valid UID: the DIMSE request is valid
        if j % 2:
            ds.SeriesInstanceUID = evil
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        p.write_bytes(buf.getvalue())
        crafted.append(p)
    return out, crafted


def _listing(root: Path, skip: Path) -> set[Path]:
    return {p for p in root.rglob("*") if skip not in p.parents and p != skip}


def test_fuzzed_instances_get_failures_node_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import _config

    # pynetdicom's raw mode: the file's bytes go on the wire as they are, garbage included
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    broken, crafted = _fuzz_files(tmp_path / "data", 300, seed=20)
    s = load_settings(write_config(tmp_path), env={})
    spool = Spool(s.spool.path)
    reg = Registry(Path(s.spool.path) / "registry.sqlite3")
    metrics = NodeMetrics()
    scp = StoreSCP(s, spool, reg, metrics)
    scp.start()
    before = _listing(tmp_path, spool.root)
    statuses: dict[str, list[int]] = {}
    try:
        # PushAE: stock pynetdicom's requestor can lose a C-STORE response under load (a
        # DIMSE timeout, no status: see dicom_node.requestor); the SCP is what is tested here
        ae = PushAE(ae_title="FUZZER")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(Verification)
        assoc = None
        t0 = time.perf_counter()
        for kind, p in [*broken, *(("crafted", c) for c in crafted)]:
            if assoc is None or not assoc.is_established:
                assoc = ae.associate("127.0.0.1", scp.port, ae_title="SYNTHMR")
                assert assoc.is_established
            rsp = assoc.send_c_store(p)
            statuses.setdefault(kind, []).append(int(rsp.Status) if "Status" in rsp else -1)
        dt = time.perf_counter() - t0
        assert assoc is not None and int(assoc.send_c_echo().Status) == 0
        assoc.release()
        print(f"fuzz: {len(broken) + len(crafted)} instances in {dt:.1f} s")
        for kind in ("truncated", "random", "bad_vr", "huge_length", "missing_uid"):
            st = statuses[kind]
            assert len(st) == 60
            bad = [(n, hex(x)) for n, x in enumerate(st) if not 0xC000 <= x <= 0xCFFF]
            assert not bad, (kind, bad)
        n_failed = sum(len(statuses[k]) for k in statuses if k != "crafted")
        assert _samples(metrics, "synthmr_instances_received_total", result="failed") == n_failed
        # crafted UIDs: readable datasets, stored under sanitized names inside the spool
        assert statuses["crafted"] == [0] * len(TRAVERSAL)
        stored = list(spool.incoming.rglob("*"))
        assert all(spool.incoming in p.resolve().parents for p in stored)
        assert all(
            ".." not in p.name and "/" not in p.relative_to(spool.incoming).parts[-1]
            for p in stored
        )
        assert len([p for p in stored if p.is_file()]) == len(TRAVERSAL)
        assert _listing(tmp_path, spool.root) == before  # nothing written outside the spool
        assert list(spool.tmp.iterdir()) == []
        # still serving: a dcmtk echo and a valid store over a new association
        assert echoscu(scp.port).returncode == 0
        good = make_mr_file(tmp_path / "good.dcm")
        assert storescu([good], scp.port).returncode == 0
        assert _samples(metrics, "synthmr_instances_received_total", result="stored") == (
            len(TRAVERSAL) + 1
        )
    finally:
        scp.stop()
        reg.close()
