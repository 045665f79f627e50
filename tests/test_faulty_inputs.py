"""Broken or hostile instances: each gets a failure status before anything is stored; a
deflate bomb is refused without the memory it would cost; re-sent series start no job and
a corrected one starts exactly one; an allow-listed sender cannot move a SOP Instance UID to
another series."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from dicom_node.registry import Registry
from dicom_node.scp import StoreSCP
from dicom_node.spool import Spool
from tests.conftest import (
    ScpRig,
    durably_received,
    make_mr_file,
    store_scp,
    storescu,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[StoreSCP, Registry, Spool, list[str]]]:
    """The receive path (tests.conftest.store_scp), quiet period 0.5 s; a completed series
    is enqueued as a job as the node's _on_complete does, without processing."""

    def enqueue(rig: ScpRig, series_uid: str) -> None:
        rig.registry.enqueue(series_uid)

    cfg = "[completion]\nquiet_period_s = 0.5\npoll_interval_s = 0.05\n"
    with store_scp(tmp_path, cfg, on_complete=enqueue, run_completion=True) as r:
        yield r.scp, r.registry, r.spool, r.completed


# ----------------------------------------------------------------------- broken pixels
def _broken_files(d: Path) -> dict[str, Path]:
    """One file per kind of broken image, each otherwise a valid 8 x 8 MR image."""
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def variant(kind: str, change) -> None:  # type: ignore[no-untyped-def]
        ds = pydicom.dcmread(make_mr_file(d / f"{kind}_src.dcm"))
        change(ds)
        ds.save_as(d / f"{kind}.dcm", enforce_file_format=True)
        out[kind] = d / f"{kind}.dcm"

    variant("short_pixels", lambda ds: setattr(ds, "PixelData", ds.PixelData[:-2]))
    variant("rows_zero", lambda ds: setattr(ds, "Rows", 0))
    variant("long_pixels", lambda ds: setattr(ds, "PixelData", ds.PixelData * 2))

    def no_image(ds: Dataset) -> None:
        for kw in ("Rows", "Columns", "PixelData", "BitsAllocated", "BitsStored", "HighBit"):
            delattr(ds, kw)

    variant("mr_without_pixels", no_image)

    def random_jpeg(ds: Dataset) -> None:
        rng = np.random.default_rng(7)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = encapsulate([rng.integers(0, 256, 300, dtype=np.uint8).tobytes()])

    variant("random_jpeg_fragments", random_jpeg)
    # RLE Lossless named in the file meta over native pixel data (same UID length: patched)
    raw = make_mr_file(d / "rle_src.dcm").read_bytes()
    explicit = str(ExplicitVRLittleEndian).encode() + b"\0"
    assert len(explicit) == len(str(RLELossless).encode() + b"\0")
    (d / "compressed_ts_native_pixels.dcm").write_bytes(
        raw.replace(explicit, str(RLELossless).encode() + b"\0", 1)
    )
    out["compressed_ts_native_pixels"] = d / "compressed_ts_native_pixels.dcm"

    # the file meta (so the C-STORE request) says CT, the dataset is MR: patched bytes, as
    # pydicom would rewrite the meta from the dataset
    mr, ct = (str(u).encode() + b"\0" for u in (MRImageStorage, CTImageStorage))
    raw = make_mr_file(d / "mismatch_src.dcm").read_bytes()
    (d / "sop_class_mismatch.dcm").write_bytes(raw.replace(mr, ct, 1))
    out["sop_class_mismatch"] = d / "sop_class_mismatch.dcm"
    return out


def _send_raw(port: int, files: list[Path]) -> list[int]:
    """C-STORE each file's bytes exactly as they are (pynetdicom's raw, chunked send)."""
    old = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="SCANNER")
        for cls in (MRImageStorage, CTImageStorage):
            for ts in (
                ExplicitVRLittleEndian,
                RLELossless,
                JPEGBaseline8Bit,
                DeflatedExplicitVRLittleEndian,
            ):
                ae.add_requested_context(cls, ts)
        assoc = ae.associate("127.0.0.1", port, ae_title="SYNTHMR")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(f).Status) for f in files]
        assoc.release()
        return statuses
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = old


def test_each_broken_pixel_kind_gets_a_failure_status_and_nothing_is_stored(
    tmp_path: Path, rig
) -> None:  # type: ignore[no-untyped-def]
    scp, reg, spool, _jobs = rig
    files = _broken_files(tmp_path / "broken")
    statuses = dict(zip(files, _send_raw(scp.port, list(files.values())), strict=True))
    print({k: f"0x{v:04X}" for k, v in statuses.items()})
    for kind, status in statuses.items():
        assert status >= 0xA000, f"{kind}: answered 0x{status:04X}"
    assert statuses["sop_class_mismatch"] == 0xA900
    assert list(spool.incoming.rglob("*.dcm")) == []
    assert reg.state_counts()["RECEIVING"] == 0
    # dcmtk's storescu too: the short pixel data and Rows = 0 are refused
    r = storescu([files["short_pixels"], files["rows_zero"]], scp.port)
    assert r.stdout.count("Received Store Response (Success)") == 0, r.stdout
    assert list(spool.incoming.rglob("*.dcm")) == []
    # and a valid image still goes in
    assert _send_raw(scp.port, [make_mr_file(tmp_path / "good.dcm")]) == [0]


def test_sop_instance_uid_cannot_move_to_another_series(tmp_path: Path, rig) -> None:  # type: ignore[no-untyped-def]
    scp, reg, spool, _jobs = rig
    sop = generate_uid()
    a = make_mr_file(tmp_path / "a.dcm", sop_uid=sop, series_uid="1.2.3.1")
    b = make_mr_file(tmp_path / "b.dcm", sop_uid=sop, series_uid="1.2.3.2")
    assert _send_raw(scp.port, [a]) == [0]
    assert _send_raw(scp.port, [b])[0] == 0xC000
    assert reg.series("1.2.3.2") is None
    assert [p.parent.name for p in spool.incoming.rglob("*.dcm")] == ["1.2.3.1"]


# ----------------------------------------------------------------------- job storms
def _corrected(files: list[Path], out: Path, which: slice) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    result = []
    for i, f in enumerate(files):
        if i in range(len(files))[which]:
            ds = pydicom.dcmread(f)
            px = ds.pixel_array
            ds.PixelData = (px // 2).astype(px.dtype).tobytes()
            ds.save_as(out / f.name, enforce_file_format=True)
            result.append(out / f.name)
        else:
            result.append(f)
    return result


def test_resent_series_makes_no_job_and_a_corrected_one_exactly_one(
    tmp_path: Path, rig, mdme_series: list[Path]
) -> None:  # type: ignore[no-untyped-def]
    scp, reg, _spool, jobs = rig
    uid = str(pydicom.dcmread(mdme_series[0], stop_before_pixels=True).SeriesInstanceUID)
    assert storescu(mdme_series, scp.port).returncode == 0
    wait_for(lambda: len(jobs) == 1, 20, 0.05, "first job")
    job = reg.claim_job()
    assert job is not None
    reg.finish_job(job[0], uid, reg.series(uid).state.__class__("IGNORED"), "test: processed")
    # the scanner re-sends the whole series, twice: nothing changed, no job
    assert storescu(mdme_series, scp.port).returncode == 0
    assert storescu(mdme_series, scp.port).returncode == 0
    time.sleep(1.5)  # three quiet periods
    print(f"jobs after two identical re-sends: {len(jobs) - 1}")
    assert len(jobs) == 1
    assert reg.series(uid).state.value == "IGNORED"
    # a corrected re-send (a third of the images changed): one new version, after the quiet
    corrected = _corrected(mdme_series, tmp_path / "corrected", slice(0, None, 3))
    assert storescu(corrected, scp.port).returncode == 0
    wait_for(lambda: len(jobs) == 2, 20, 0.05, "the corrected version's job")
    time.sleep(1.5)
    assert len(jobs) == 2
    assert reg.series(uid).revision == 1


# ----------------------------------------------------------------------- deflate bomb
_SCP_SCRIPT = """
import sys, time
from pathlib import Path
from dicom_node.config import load_settings
from dicom_node.metrics import NodeMetrics
from dicom_node.registry import Registry
from dicom_node.scp import StoreSCP
from dicom_node.spool import Spool
s = load_settings(sys.argv[1], env={})
reg = Registry(Path(s.spool.path) / "registry.sqlite3")
scp = StoreSCP(s, Spool(s.spool.path), reg, NodeMetrics())
scp.start()
print(scp.port, flush=True)
time.sleep(3600)
"""


def _deflate_bomb(path: Path, inflated: int = 200 << 20) -> Path:
    """An MR image of 10240 x 10240 x 16 bit (200 MiB of zero pixels), deflated to ~200 KB:
    built in 1 MiB steps, never whole in memory."""
    ds = pydicom.dcmread(make_mr_file(path.with_suffix(".src.dcm")))
    del ds.PixelData
    ds.Rows = ds.Columns = 10240
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buf, ds)
    n_pixels = 10240 * 10240 * 2
    header = buf.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + n_pixels.to_bytes(4, "little")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [deflater.compress(header)]
    zeros = bytes(1 << 20)
    for _ in range(n_pixels // len(zeros)):
        body.append(deflater.compress(zeros))
    body.append(deflater.flush())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    mbuf = pydicom.filebase.DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(mbuf, meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + mbuf.getvalue() + b"".join(body))
    return path


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_deflate_bomb_is_refused_without_the_memory(tmp_path: Path) -> None:
    bomb = _deflate_bomb(tmp_path / "bomb.dcm")
    print(f"bomb: {bomb.stat().st_size} bytes deflated, 200 MiB of pixels inflated")
    cfg = write_config(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCP_SCRIPT, str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        good = make_mr_file(tmp_path / "good.dcm")
        assert _send_raw(port, [good]) == [0]  # the receive path is warm
        time.sleep(0.5)
        base = _rss(proc.pid)
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(_rss(proc.pid))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            [status] = _send_raw(port, [bomb])
        finally:
            done.set()
            sampler.join()
        grew = max(peak) - base
        print(f"deflate bomb: status 0x{status:04X}, node RSS +{grew / 2**20:.1f} MiB")
        assert status == 0xA700
        assert grew < 50 * 2**20
        assert len(durably_received(tmp_path / "spool")) == 1  # the good one
    finally:
        proc.kill()
        proc.wait()
