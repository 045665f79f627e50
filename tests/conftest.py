"""Shared fixtures: free ports, a real Orthanc PACS, dcmtk helpers, small DICOM files.

Every server binds 127.0.0.1 on a free port, lives in a temp dir and is stopped by PID.
Others may add fixtures here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

# The [processing] section of a node test that checks delivery, not images: three contrasts,
# no segmentation, myelin, AI or B1 smoothing (seconds per series on a small phantom).
FAST_PROCESSING = (
    '[processing]\ncontrasts = ["T1W", "T2W", "FLAIR"]\nsegmentation = false\n'
    "myelin = false\nenhance = false\nb1_smoothing = false\n"
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    end = time.time() + timeout
    while time.time() < end:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def wait_for(
    pred: Any, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Poll ``pred()`` until truthy; return its value or raise naming ``what``."""
    end = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() > end:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def stop_pid(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Stop a process we started, by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


# --------------------------------------------------------------------------- dcmtk
def sqlite_rows(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """Rows of one query on an SQLite file opened read-only (a running node keeps writing)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return list(con.execute(sql, args).fetchall())
    finally:
        con.close()


def registry_rows(spool: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """Rows of one read-only query on the registry of the node whose spool is ``spool``."""
    return sqlite_rows(spool / "registry.sqlite3", sql, args)


def durably_received(spool: Path) -> set[str]:
    """Names (``<sop>.dcm``) of the received instances that are on disk: in their spool
    files, or in the ingest journal whose records the write-behind has not turned into
    files yet (``dicom_node.spool``). The logs are read first: a checkpoint that drops
    one has written its files before, so they are found by the listing after."""
    from dicom_node.journal import IngestJournal

    names = set()
    for log in sorted((spool / "journal").glob("ingest-*.log")):
        try:
            names |= {
                Path(name).name
                for _, kind, name, _ in IngestJournal.timed_records(log)
                if kind == "W" and name.startswith("incoming/")
            }
        except FileNotFoundError:  # checkpointed meanwhile: its files are listed below
            continue
    return names | {p.name for p in (spool / "incoming").rglob("*.dcm")}


def require_tool(name: str) -> str:
    """Path of a system tool. dcmtk and pynetdicom both install ``echoscu``/``storescu``;
    the system directories come first so that the real dcmtk binaries are used."""
    path = shutil.which(name, path="/usr/bin:/usr/local/bin:/usr/sbin") or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def storescu(
    files: Sequence[str | Path],
    port: int,
    *,
    calling: str = "SCANNER",
    called: str = "SYNTHMR",
    extra: Sequence[str] = (),
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu of ``files`` over one association to 127.0.0.1:port (verbose log)."""
    cmd = [require_tool("storescu"), "-v", "-aet", calling, "-aec", called, *extra]
    cmd += ["127.0.0.1", str(port), *[str(f) for f in files]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def echoscu(
    port: int, *, calling: str = "SCANNER", called: str = "SYNTHMR"
) -> subprocess.CompletedProcess[str]:
    cmd = [require_tool("echoscu"), "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


# --------------------------------------------------------------------------- data
def make_mr_file(
    path: Path,
    *,
    series_uid: str | None = None,
    study_uid: str | None = None,
    sop_uid: str | None = None,
    shape: tuple[int, int] = (8, 8),
    description: str = "T2 TSE AX",
    instance_number: int = 1,
) -> Path:
    """Write a small, valid classic MR image (not MDME) and return its path."""
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "MR"
    ds.PatientName = "Test^Node"
    ds.PatientID = "NODE001"
    ds.SeriesDescription = description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.InstanceNumber = instance_number
    ds.SeriesNumber = 3
    ds.EchoTime = 90.0
    ds.RepetitionTime = 4000.0
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(shape[0] * shape[1], dtype=np.uint16) % 4096).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_config(
    tmp: Path,
    text: str = "",
    *,
    port: int = 0,
    spool: Path | None = None,
    metrics_port: int | None = None,
) -> Path:
    """A node TOML for tests: 127.0.0.1, given port, spool under ``tmp``, metrics on a free port,
    plus ``text`` (extra sections; must not repeat [node], [spool] or [metrics])."""
    spool = spool or tmp / "spool"
    base = (
        f'[node]\nbind_address = "127.0.0.1"\nport = {port}\nae_title = "SYNTHMR"\n'
        f'[spool]\npath = "{spool}"\nmin_free_bytes = 0\n'
        f'[metrics]\naddress = "127.0.0.1"\nport = {metrics_port or free_port()}\n'
        '[logging]\nlevel = "INFO"\n'
    )
    p = tmp / "node.toml"
    p.write_text(base + text)
    return p


# --------------------------------------------------------------------------- Orthanc
@dataclass
class OrthancServer:
    proc: subprocess.Popen[Any] | None
    dicom_port: int
    http_port: int
    workdir: Path
    log: Path
    #: TCP_NODELAY=1 in Orthanc's environment: DCMTK (Orthanc's DICOM layer) keeps Nagle on
    #: otherwise, and each C-STORE response then waits for a delayed ACK (~20 instances/s
    #: instead of ~200 on loopback). deploy/compose.yaml sets it for the stack's Orthanc.
    tcp_nodelay: bool = True

    def rest(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def instances(self) -> list[str]:
        return list(self.rest("/instances"))

    def start(self) -> None:
        """(Re)start on the same ports and storage."""
        exe = require_tool("Orthanc")
        cfg = self.workdir / "orthanc.json"
        env = dict(os.environ, TCP_NODELAY="1" if self.tcp_nodelay else "0")
        self.proc = subprocess.Popen(
            [exe, str(cfg)], stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env
        )
        wait_port(self.http_port, 20)
        wait_port(self.dicom_port, 20)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None


def make_orthanc(workdir: Path, start: bool = True, tcp_nodelay: bool = True) -> OrthancServer:
    """An Orthanc PACS on free 127.0.0.1 ports with storage in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    cfg = {
        "Name": "TestPACS",
        "StorageDirectory": str(workdir / "db"),
        "IndexDirectory": str(workdir / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomModalities": {},
        "Plugins": [],
    }
    (workdir / "orthanc.json").write_text(json.dumps(cfg))
    srv = OrthancServer(
        None, dicom_port, http_port, workdir, workdir / "orthanc.log", tcp_nodelay=tcp_nodelay
    )
    if start:
        srv.start()
    return srv


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    srv = make_orthanc(tmp_path / "orthanc")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[OrthancServer]:
    """The PACS a node delivers to: an Orthanc configured but not started (the test starts
    it, or delivers while it is down); resumed if the test left it frozen, then stopped."""
    srv = make_orthanc(tmp_path / "orthanc", start=False)
    try:
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            os.kill(srv.proc.pid, signal.SIGCONT)
        srv.stop()


# --------------------------------------------------------------------------- MDME series
@pytest.fixture(scope="session")
def mdme_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A tiny GE-flavoured MDME series (2 slices x 32 x 32, 4 delays, 2 echoes, magnitude +
    phase = 32 files) made by the phantom and the scanner emulator."""
    from dicom_node import emulator
    from processing.phantom import make_phantom

    ph = make_phantom((2, 32, 32), seed=3, snr=50.0, anatomy="ellipsoid")
    return emulator.write_series(ph.acq, "ge", tmp_path_factory.mktemp("mdme_ge"))


# --------------------------------------------------------------------------- SCP rig
@dataclass
class ScpRig:
    """The node's receive path without the node: a started StoreSCP on a free port with its
    spool, registry, metrics and series completion (``completed``: series it completed)."""

    scp: Any  # dicom_node.scp.StoreSCP
    spool: Any  # dicom_node.spool.Spool
    registry: Any  # dicom_node.registry.Registry
    metrics: Any  # dicom_node.metrics.NodeMetrics
    completion: Any  # dicom_node.completion.Completion
    completed: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.scp.port)

    def count(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (other labels,
        e.g. calling_ae, are summed over)."""
        return sum(
            s.value
            for fam in self.metrics.registry.collect()
            for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


@contextmanager
def store_scp(
    tmp_path: Path,
    extra: str = "",
    *,
    min_free: int = 0,
    on_complete: Callable[[ScpRig, str], None] | None = None,
    run_completion: bool = False,
) -> Iterator[ScpRig]:
    """Start the node's StoreSCP the way ``dicom_node.service.Node`` wires it (completion by
    grid from the C-STORE handler, vendors' expected counts), configured by
    ``write_config(tmp_path, extra)``; the spool refuses below ``min_free`` free bytes.
    ``on_complete(rig, series_uid)`` runs for a completed series before ``rig.completed``
    records it; ``run_completion`` also starts the quiet-period poll loop."""
    from dicom_node import vendors
    from dicom_node.completion import Completion
    from dicom_node.config import load_settings
    from dicom_node.metrics import NodeMetrics
    from dicom_node.registry import Registry
    from dicom_node.scp import StoreSCP
    from dicom_node.spool import Spool

    settings = load_settings(write_config(tmp_path, extra), env={})
    spool = Spool(settings.spool.path, min_free)
    reg = Registry(Path(settings.spool.path) / "registry.sqlite3")
    metrics = NodeMetrics()
    rig = ScpRig(None, spool, reg, metrics, None)

    def completed(series_uid: str) -> None:
        if on_complete is not None:
            on_complete(rig, series_uid)
        rig.completed.append(series_uid)  # after on_complete: a test that sees it sees both

    rig.completion = Completion(settings.completion, reg, metrics, completed)
    rig.scp = StoreSCP(
        settings,
        spool,
        reg,
        metrics,
        on_instance=rig.completion.instance_stored,
        expected_count=vendors.expected_count,
    )
    rig.scp.start()
    if run_completion:
        rig.completion.start()
    try:
        yield rig
    finally:
        if run_completion:
            rig.completion.stop()
        rig.scp.stop()
        reg.close()


@pytest.fixture
def scp_rig(tmp_path: Path) -> Iterator[ScpRig]:
    """``store_scp`` with the default configuration (no quiet-period loop)."""
    with store_scp(tmp_path) as rig:
        yield rig


# --------------------------------------------------------------------------- cold start
#: the test that needs a node started on an empty numba cache (tests/test_warmup.py)
COLD_START_TEST = "test_warmup.py::test_node_on_an_empty_cache_is_warming_until_its_worker_is_warm"


@dataclass
class ColdStart:
    """A node started on an empty numba cache (NUMBA_CACHE_DIR a fresh folder, one worker)
    and what its /readyz answered, polled every 0.5 s until 200, the node's exit or 600 s;
    then the node is stopped and, if it got ready, ``synthmr warmup`` run on that cache.
    ``done`` is set when all that ended."""

    cache: Path
    env: dict[str, str]
    log: Path
    seen: list[tuple[int, str]] = field(default_factory=list)
    exited: str | None = None  # the end of the node's log if it exited on its own
    warmup: subprocess.CompletedProcess[str] | None = None  # `synthmr warmup` afterwards
    done: threading.Event = field(default_factory=threading.Event)


def http_get(port: int, path: str) -> tuple[int, str]:
    """GET ``http://127.0.0.1:{port}{path}``: (status, body), error statuses included;
    raises OSError when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _readyz(port: int) -> tuple[int, str]:
    try:
        return http_get(port, "/readyz")
    except OSError:
        return 0, ""  # metrics endpoint not up yet (the node warms its own kernels first)


@pytest.fixture(scope="session", autouse=True)
def cold_start_node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ColdStart | None]:
    """Started when the session starts if COLD_START_TEST is selected: compiling every
    kernel takes its node a minute or more of one core, which the tests running meanwhile
    would otherwise leave idle (2 cores); the test reads the outcome. None when not
    selected."""
    if not any(item.nodeid.endswith(COLD_START_TEST) for item in request.session.items):
        yield None
        return
    root = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("cold_start")
    cache = tmp / "numba-cache"
    cache.mkdir()
    env = dict(os.environ, PYTHONPATH=str(root), NUMBA_CACHE_DIR=str(cache))
    mport = free_port()
    cfg = write_config(tmp, "[workers]\nprocesses = 1\n", metrics_port=mport)
    cold = ColdStart(cache, env, tmp / "node.log")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.service", "--config", str(cfg)],
        cwd=root,
        env=env,
        stdout=open(cold.log, "wb"),
        stderr=subprocess.STDOUT,
    )

    def poll() -> None:
        try:
            deadline = time.time() + 600
            while time.time() < deadline:
                code, body = _readyz(mport)
                if code:
                    cold.seen.append((code, body.splitlines()[0]))
                if code == 200:
                    break
                if proc.poll() is not None:
                    cold.exited = cold.log.read_text()[-3000:]
                    break
                time.sleep(0.5)
            stop_pid(proc, 30)
            if cold.seen and cold.seen[-1][0] == 200:
                cold.warmup = subprocess.run(
                    [sys.executable, "-m", "dicom_node.cli", "warmup"],
                    cwd=root,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
        finally:
            stop_pid(proc, 30)
            cold.done.set()

    poller = threading.Thread(target=poll, name="cold-start-readyz", daemon=True)
    poller.start()
    try:
        yield cold
    finally:
        stop_pid(proc, 30)
        poller.join(700)
