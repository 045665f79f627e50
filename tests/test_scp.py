"""SCP against real dcmtk peers: echo, association policy, durable C-STORE, bad input,
watermark, compressed transfer syntaxes, reload of the allow-list."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import RLELossless
from pynetdicom import AE

from dicom_node.config import AllowedCaller
from dicom_node.registry import State
from tests.conftest import ScpRig, echoscu, make_mr_file, store_scp, storescu

pytestmark = pytest.mark.integration


ALLOW = '[security]\nrequire_known_callers = true\n[[security.allowed_callers]]\nae_title = "SCANNER"\nhosts = ["127.0.0.1"]\n'


def test_echo(scp_rig: ScpRig) -> None:
    r = echoscu(scp_rig.port)
    assert r.returncode == 0, r.stderr
    assert "Received Echo Response (Success)" in r.stdout + r.stderr
    assert scp_rig.count("synthmr_associations_total", result="accepted") == 1


def test_unknown_ae_and_wrong_host_rejected(tmp_path: Path) -> None:
    with store_scp(tmp_path, ALLOW) as rig:
        assert echoscu(rig.port, calling="SCANNER").returncode == 0
        r = echoscu(rig.port, calling="INTRUDER")
        assert r.returncode != 0
        assert "Association Rejected" in r.stdout + r.stderr
        assert rig.count("synthmr_associations_total", result="rejected") == 1
        # the right AE from a host that is not listed: rejected too
        rig.scp.reload(
            dataclasses.replace(
                rig.scp.settings,
                security=dataclasses.replace(
                    rig.scp.settings.security,
                    allowed_callers=(AllowedCaller("SCANNER", ("10.9.9.9",)),),
                ),
            )
        )
        assert echoscu(rig.port, calling="SCANNER").returncode != 0
        # reload (SIGHUP path) admits a new AE without restarting the listener
        rig.scp.reload(
            dataclasses.replace(
                rig.scp.settings,
                security=dataclasses.replace(
                    rig.scp.settings.security, allowed_callers=(AllowedCaller("NEWMR"),)
                ),
            )
        )
        assert echoscu(rig.port, calling="NEWMR").returncode == 0
        assert rig.count("synthmr_associations_total", result="rejected") == 2


def test_series_stored_durably_and_completes_on_full_grid(
    scp_rig: ScpRig, mdme_series: list[Path]
) -> None:
    r = storescu(mdme_series, scp_rig.port)
    assert r.returncode == 0, r.stdout + r.stderr
    # every acknowledged instance is on disk, byte for byte (storescu succeeded => all acked)
    for f in mdme_series:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        p = scp_rig.spool.instance_path("incoming", ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert p.is_file()
        assert pydicom.dcmread(p).PixelData == pydicom.dcmread(f).PixelData
    series_uid = str(pydicom.dcmread(mdme_series[0], stop_before_pixels=True).SeriesInstanceUID)
    row = scp_rig.registry.series(series_uid)
    assert row.n_instances == len(mdme_series) == row.expected_count
    # complete on the full grid, from the C-STORE handler: no quiet period, no poll loop ran
    assert row.state == State.COMPLETE and scp_rig.completed == [series_uid]
    assert "grid full" in row.reason
    assert scp_rig.count("synthmr_instances_received_total", result="stored") == len(mdme_series)


def test_garbage_gets_failure_status_and_node_keeps_running(
    scp_rig: ScpRig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import _config

    # send the file's bytes as they are (pynetdicom's documented raw-send mode), garbage included
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    good = make_mr_file(tmp_path / "good.dcm")
    raw = good.read_bytes()
    meta_end = raw.index(b"\x08\x00")  # first non-meta element (group 0008)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(raw[:meta_end] + b"\x08\x00\x16\x00UI\xff\xff" + b"\xde\xad" * 50)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(pydicom.uid.MRImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp_rig.port, ae_title="SYNTHMR")
    assert assoc.is_established
    rsp = assoc.send_c_store(bad)
    assert 0xC000 <= int(rsp.Status) <= 0xCFFF
    no_series = pydicom.dcmread(good)
    del no_series.SeriesInstanceUID
    no_series.SOPInstanceUID = pydicom.uid.generate_uid()
    rsp = assoc.send_c_store(no_series)
    assert 0xC000 <= int(rsp.Status) <= 0xCFFF
    rsp2 = assoc.send_c_store(good)  # same association still works
    assert int(rsp2.Status) == 0
    assoc.release()
    assert len(list(scp_rig.spool.incoming.rglob("*.dcm"))) == 1  # the bad one was not kept
    assert list(scp_rig.spool.tmp.iterdir()) == []
    assert scp_rig.count("synthmr_instances_received_total", result="failed") == 2
    assert echoscu(scp_rig.port).returncode == 0


def test_watermark_answers_a700(tmp_path: Path) -> None:
    f = make_mr_file(tmp_path / "x.dcm")
    with store_scp(tmp_path, min_free=1 << 62) as rig:
        r = storescu([f], rig.port)
        out = (r.stdout + r.stderr).lower()
        assert "outofresources" in out or "0xa700" in out, out
        assert list(rig.spool.incoming.rglob("*.dcm")) == []
        assert rig.count("synthmr_instances_received_total", result="rejected") == 1


def test_compressed_transfer_syntax_kept_as_sent(scp_rig: ScpRig, tmp_path: Path) -> None:
    f = make_mr_file(tmp_path / "rle.dcm", shape=(16, 16))
    ds = pydicom.dcmread(f)
    ds.compress(RLELossless)
    ds.save_as(f, enforce_file_format=True)
    r = storescu([f], scp_rig.port, extra=["-xr"])  # propose RLE lossless
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RLE Lossless -> RLE Lossless" in r.stdout + r.stderr
    p = scp_rig.spool.instance_path("incoming", ds.SeriesInstanceUID, ds.SOPInstanceUID)
    stored = pydicom.dcmread(p)
    assert stored.file_meta.TransferSyntaxUID == RLELossless
    assert (stored.pixel_array == ds.pixel_array).all()


def test_release_marks_series_for_quiet_period(scp_rig: ScpRig, tmp_path: Path) -> None:
    f = make_mr_file(tmp_path / "a.dcm")
    assert storescu([f], scp_rig.port).returncode == 0
    uid = str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID)
    row = scp_rig.registry.series(uid)
    assert row.expected_count is None and row.state == State.RECEIVING
    assert row.last_released is not None and row.last_released >= row.last_received


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "tsyntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.5", "1.2.840.10008.1.2.1"),  # odd, odd, even
        ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.3.45", "1.2.840.10008.1.2.5"),  # even, even
    ],
)
def test_part10_bytes_match_pynetdicom_encoded_dataset(
    sop_class: str, sop_instance: str, tsyntax: str
) -> None:
    """The hand-built file meta is byte for byte pynetdicom's (Event.encoded_dataset), and
    pydicom reads it back: UIDs of odd and even length (NUL padding)."""
    import io

    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from dicom_node.scp import part10_bytes

    body = b"\x08\x00\x60\x00\x02\x00\x00\x00MR"  # (0008,0060) CS "MR", implicit VR
    ours = part10_bytes(sop_class, sop_instance, tsyntax, body)
    meta = create_file_meta(
        sop_class_uid=pydicom.uid.UID(sop_class),
        sop_instance_uid=pydicom.uid.UID(sop_instance),
        transfer_syntax=pydicom.uid.UID(tsyntax),
    )
    assert ours == b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + body
    ds = pydicom.dcmread(io.BytesIO(ours), force=True)
    assert ds.file_meta.MediaStorageSOPInstanceUID == sop_instance
    assert ds.file_meta.TransferSyntaxUID == tsyntax


def test_parallel_senders_spread_over_acceptor_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[node] acceptor_processes = 2: parallel associations land in both processes; every
    instance is stored and registered once, counted, and a SOP Instance UID stored in one
    series is refused in another whichever process receives it."""
    import subprocess
    import time

    from dicom_node import config
    from tests.conftest import require_tool

    load = config.load_settings

    def two_acceptors(*args: object, **kw: object) -> config.Settings:
        s = load(*args, **kw)  # type: ignore[arg-type]
        return dataclasses.replace(s, node=dataclasses.replace(s.node, acceptor_processes=2))

    monkeypatch.setattr(config, "load_settings", two_acceptors)
    with store_scp(tmp_path) as rig:
        pool = rig.scp._pool
        assert pool is not None
        deadline = time.monotonic() + 60
        while not pool.ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        series = [
            [
                make_mr_file(
                    tmp_path / f"s{k}" / f"{i}.dcm", series_uid=f"1.2.3.{k}", instance_number=i
                )
                for i in range(8)
            ]
            for k in range(4)
        ]
        for _ in range(2):  # 4 at a time (max_pending_per_host); the re-sends change nothing
            senders = [
                subprocess.Popen(
                    [require_tool("storescu"), "-aet", "SCANNER", "-aec", "SYNTHMR", "127.0.0.1"]
                    + [str(rig.port), *map(str, files)]
                )
                for files in series
            ]
            assert [p.wait(60) for p in senders] == [0] * 4
        assert pool.helper_associations() >= 1  # the helper took some
        for k in range(4):
            row = rig.registry.series(f"1.2.3.{k}")
            assert row is not None and row.n_instances == 8
        assert len(list(rig.spool.incoming.rglob("*.dcm"))) == 32
        assert rig.count("synthmr_instances_received_total", result="stored") == 64
        moved = make_mr_file(
            tmp_path / "moved.dcm",
            series_uid="1.2.3.9",
            sop_uid=str(pydicom.dcmread(series[0][0], stop_before_pixels=True).SOPInstanceUID),
        )
        for _ in range(2):  # each attempt may land in either process
            r = storescu([moved], rig.port)
            assert "Received Store Response (Success)" not in r.stdout + r.stderr
        assert rig.registry.series("1.2.3.9") is None
        _helper_killed_mid_association(rig, pool, tmp_path)
        # a restart that spawns its helper after stop() took its list of helpers does not
        # leave that helper running (with the node's port open) once the node stopped
        pool.stop()
        pool._spawn(1)
        late = pool._helpers.get(1)
        assert late is None or late.proc.wait(10) is not None


def _helper_killed_mid_association(rig: ScpRig, pool: Any, tmp_path: Path) -> None:
    """A helper killed (-9) in the middle of an association, its journal holding records
    (here one written in its name, as it writes them: a real one is checkpointed 1 s after
    its last instance). Its association counts as aborted (the series it carried starts
    its quiet period, as after an abort in the node process), and the node checkpoints its
    journal before it forgets it, so that a series removed before the new helper runs
    (checkpoint_all cannot ask a dead process) leaves no record that a replay at the next
    start would bring back."""
    import os
    import signal
    import time

    from pynetdicom.sop_class import MRImageStorage

    from dicom_node.journal import IngestJournal
    from dicom_node.spool import Spool

    pool.RESTART_MIN_INTERVAL_S = 3600.0  # the removal comes before the new helper
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(MRImageStorage)
    in_node, carried = [], None
    for k in range(20):  # hold the node process's associations until one lands in the helper
        before = pool.helper_associations()
        assoc = ae.associate("127.0.0.1", rig.port, ae_title="SYNTHMR")
        assert assoc.is_established
        if pool.helper_associations() == before:
            in_node.append(assoc)
            continue
        carried = f"1.2.3.7.{k}"
        f = make_mr_file(tmp_path / "carried.dcm", series_uid=carried)
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
        break
    assert carried is not None
    victim = make_mr_file(tmp_path / "victim.dcm", series_uid="1.2.3.8")
    in_its_name = Spool(rig.spool.root, journal_owner="p1.", replay=False)
    in_its_name.journal.idle_checkpoint_s = 1e9
    _, path = in_its_name.store_received(victim.read_bytes())
    helper = pool._helpers[1]
    os.kill(helper.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pool._helpers.get(1) is helper and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool._helpers.get(1) is not helper
    row = rig.registry.series(carried)
    assert row is not None and row.last_released is not None
    rig.spool.remove_series("1.2.3.8")
    assert not path.exists()
    logged = [
        name
        for log in rig.spool.journal.dir.glob("ingest-*.log")
        for kind, name, _ in IngestJournal.records(log)
        if kind == "W"
    ]
    assert str(path.relative_to(rig.spool.root)) not in logged
    for assoc in in_node:
        assoc.release()
