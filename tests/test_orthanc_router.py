"""A PACS as the sender: Orthanc forwards an MDME series to synthmr (its C-STORE SCU, its
own presentation contexts and AE title) and receives the synthetic outputs back.

This is how many sites will wire the node: the scanner sends to the PACS or a router, which
forwards the MDME series. Tiny GE-flavoured phantom series (2 x 32 x 32, magnitude + phase,
32 instances); everything on 127.0.0.1, free ports, stopped by PID.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pydicom
import pytest

from tests.conftest import durably_received, make_orthanc, wait_for, write_config
from tests.test_node_e2e import NodeProcess, _db_state, _dest, _outbox_sops

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _post(port: int, path: str, body: bytes, ctype: str = "application/dicom") -> object:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, headers={"Content-Type": ctype}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_orthanc_forwards_the_series_and_gets_the_outputs_back(
    tmp_path: Path, mdme_series: list[Path]
) -> None:
    from tests.conftest import free_port

    port = free_port()
    orth = make_orthanc(tmp_path / "orthanc", start=False)
    cfg_path = orth.workdir / "orthanc.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["DicomModalities"] = {"synthmr": ["SYNTHMR", "127.0.0.1", port]}
    cfg_path.write_text(json.dumps(cfg))
    orth.start()
    spool = tmp_path / "spool"
    node = NodeProcess(
        write_config(tmp_path, _dest(orth), port=port, spool=spool), tmp_path / "n.log"
    )
    try:
        node.start(port)
        ids = [_post(orth.http_port, "/instances", p.read_bytes())["ID"] for p in mdme_series]
        uid = str(pydicom.dcmread(mdme_series[0], stop_before_pixels=True).SeriesInstanceUID)
        series_id = orth.rest(f"/instances/{ids[0]}/series")["ID"]
        # Orthanc's C-STORE SCU sends the series to the node (synchronous job)
        job = _post(
            orth.http_port,
            "/modalities/synthmr/store",
            json.dumps({"Resources": [series_id], "Synchronous": True}).encode(),
            "application/json",
        )
        assert job.get("FailedInstancesCount", 0) == 0, job
        assert len(durably_received(spool)) == len(mdme_series)
        wait_for(lambda: _db_state(spool, uid) == "DELIVERED", 240, 0.2, "outputs delivered")
        outputs = _outbox_sops(spool)
        assert len(outputs) >= 3
        in_pacs = {
            orth.rest(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
            for i in orth.instances()
        }
        assert outputs <= in_pacs  # every output is back in the PACS that sent the series
        assert len(in_pacs) == len(mdme_series) + len(outputs)
        # ... and filed under the source study
        study = orth.rest(f"/instances/{ids[0]}/study")["ID"]
        assert len(orth.rest(f"/studies/{study}/instances")) == len(in_pacs)
    finally:
        node.stop()
        orth.stop()
