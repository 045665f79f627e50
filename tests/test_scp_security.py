"""Association security against real peers: mutual TLS with dcmtk's echoscu, and SIGHUP
reloading the allow-list of a running node without dropping an association in flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import (
    echoscu,
    free_port,
    make_mr_file,
    require_tool,
    stop_pid,
    store_scp,
    wait_for,
    wait_port,
    write_config,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def _openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{d}/ca.key",
        "-out",
        f"{d}/ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=synthmr-test-ca",
    )
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{d}/{name}.key",
            "-out",
            f"{d}/{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{d}/{name}.csr",
            "-CA",
            f"{d}/ca.crt",
            "-CAkey",
            f"{d}/ca.key",
            "-CAcreateserial",
            "-out",
            f"{d}/{name}.crt",
            "-days",
            "2",
            "-extfile",
            f"{d}/ext",
        )
    return d


def _tls_echo(port: int, pki: Path, with_client_cert: bool) -> subprocess.CompletedProcess[str]:
    cmd = [require_tool("echoscu"), "-v", "-aet", "SCANNER", "-aec", "SYNTHMR"]
    cmd += (
        ["+tls", str(pki / "client.key"), str(pki / "client.crt")] if with_client_cert else ["+tla"]
    )
    cmd += ["+cf", str(pki / "ca.crt"), "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def test_mutual_tls_with_dcmtk(tmp_path: Path, pki: Path) -> None:
    tls = (
        f'[security.tls]\nenabled = true\ncert_file = "{pki}/server.crt"\n'
        f'key_file = "{pki}/server.key"\nca_file = "{pki}/ca.crt"\nrequire_client_cert = true\n'
    )
    with store_scp(tmp_path, tls) as rig:
        ok = _tls_echo(rig.port, pki, with_client_cert=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "Received Echo Response (Success)" in ok.stdout + ok.stderr
        # a C-STORE over TLS (the lean receive path reads and answers on the TLS socket)
        mr = make_mr_file(tmp_path / "tls.dcm", shape=(96, 96))
        store = [require_tool("storescu"), "-v", "-aet", "SCANNER", "-aec", "SYNTHMR", "+tls"]
        store += [str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")]
        stored = subprocess.run(
            [*store, "127.0.0.1", str(rig.port), str(mr)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "Received Store Response (Success)" in stored.stdout + stored.stderr
        assert len(list(rig.spool.incoming.rglob("*.dcm"))) == 1
        anon = _tls_echo(rig.port, pki, with_client_cert=False)  # no client certificate
        assert anon.returncode != 0
        plain = echoscu(rig.port)  # no TLS at all
        assert plain.returncode != 0


def test_sighup_reloads_allow_list_keeping_associations(tmp_path: Path) -> None:
    port = free_port()
    allow = (
        '[security]\nrequire_known_callers = true\n[[security.allowed_callers]]\nae_title = "{}"\n'
    )
    cfg = write_config(tmp_path, allow.format("SCANNER"), port=port)
    base = cfg.read_text()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = tmp_path / "node.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.service", "--config", str(cfg)],
        cwd=ROOT,
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, 60)
        assert echoscu(port, calling="NEWMR").returncode != 0
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="SYNTHMR")
        assert assoc.is_established
        cfg.write_text(base.replace(allow.format("SCANNER"), allow.format("NEWMR")))
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: "config_reloaded" in log.read_text(), 20, 0.1, "config_reloaded log")
        assert echoscu(port, calling="NEWMR").returncode == 0  # newly allowed
        assert echoscu(port, calling="SCANNER").returncode != 0  # no longer allowed
        assert int(assoc.send_c_echo().Status) == 0  # the association in flight continues
        assoc.release()
        assert proc.poll() is None
    finally:
        stop_pid(proc, 30)
    assert proc.returncode == 0  # SIGTERM: clean shutdown
