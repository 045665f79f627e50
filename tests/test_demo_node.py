"""``synthmr demo`` with the node: phantom -> C-STORE -> node -> PACS stand-in, on loopback.

A 2 x 48 x 48 phantom (GE layout, magnitude + phase, SNR 50, seed 0) keeps it to seconds
with a warm numba cache. Checks what the stand-in PACS stored (kinds and counts, read
from the files themselves), the node's log lines, and the printed summary against the
phantom truth the demo states.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pydicom
import pytest

from dicom_node import cli
from processing.phantom import make_phantom

pytestmark = [pytest.mark.integration]

SHAPE = (2, 48, 48)


def test_demo_round_trip_through_node_to_pacs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    before = {t.name for t in threading.enumerate()}
    rc = cli.main(
        ["demo", "--out", str(out), "--shape", ",".join(map(str, SHAPE)), "--timeout", "300"]
    )
    text = capsys.readouterr().out
    assert rc == 0, text

    # What the PACS stand-in holds, from the files: one folder per output series.
    files = sorted((out / "pacs").rglob("*.dcm"))
    kinds: dict[str, int] = {}
    series: dict[str, tuple[str, str]] = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        kinds[ds.SOPClassUID.name] = kinds.get(ds.SOPClassUID.name, 0) + 1
        series[str(ds.SeriesInstanceUID)] = (ds.SOPClassUID.name, str(ds.SeriesDescription))
    z = SHAPE[0]
    mr_series = [d for k, d in series.values() if k == "MR Image Storage"]
    assert kinds["MR Image Storage"] == z * len(mr_series)  # one image per slice and contrast
    assert {"SYNTHETIC T1W", "SYNTHETIC FLAIR", "SYNTHETIC DIR"} <= {
        " ".join(d.split()[:2]) for d in mr_series
    }
    assert kinds["Parametric Map Storage"] >= 3  # T1, T2, PD at least
    assert kinds["Segmentation Storage"] == 1
    assert sum(v for k, v in kinds.items() if "SR" in k) == 1

    # The printed table of received kinds matches the files.
    for kind, n in kinds.items():
        assert re.search(rf"^{re.escape(kind)}\s+{n}$", text, re.M), (kind, n, text)
    assert re.search(rf"^total\s+{len(files)}\s", text, re.M), text
    # Outputs were shown as they arrived, and the series went all the way to DELIVERED.
    assert text.count("x Parametric Map Storage") >= 1
    assert "node: first instance -> delivered" in text

    # Fitted T1 of pure WM read back from the received map, vs the phantom truth.
    truth = make_phantom(SHAPE, seed=0, snr=50.0).truth
    row = next(ln for ln in text.splitlines() if ln.startswith("WM "))
    t1_fit, t1_true = (float(v) for v in row.split()[1:3])
    assert t1_true == truth.tissues["WM"].t1_ms
    assert abs(t1_fit - t1_true) / t1_true < 0.05, row
    icv = next(ln for ln in text.splitlines() if ln.startswith("Intracranial volume"))
    measured, true_icv = (float(v) for v in icv.split()[-2:])
    assert abs(measured - true_icv) / true_icv < 0.05, icv
    assert "QC: status=" in text and "residual_to_noise=" in text
    assert (out / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The node's log: JSON lines; the ones about the series carry its UID.
    series_uid = str(
        pydicom.dcmread(
            next((out / "scanner").glob("*.dcm")), stop_before_pixels=True
        ).SeriesInstanceUID
    )
    lines = [json.loads(ln) for ln in (out / "node.log").read_text().splitlines()]
    by_event = {ln["event"]: ln for ln in lines}
    for event in ("job_started", "job_finished", "pushed"):
        assert by_event[event]["series_uid"] == series_uid, event
    assert by_event["job_finished"]["processing_timings_s"]["fit"] >= 0

    # Everything the demo started is stopped: no server threads left behind.
    left = {t.name for t in threading.enumerate()} - before
    assert not [n for n in left if "server" in n.lower() or n in ("outbox", "completion")], left
