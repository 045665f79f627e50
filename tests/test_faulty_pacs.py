"""A faulty environment around a running node: a PACS that keeps old objects under a re-sent
UID (Orthanc's default, OverwriteInstances false), a sender that re-sends or corrects a
series, an outage longer than a few minutes."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.config import RetrySettings, load_settings
from dicom_node.registry import State
from dicom_node.service import Node
from tests.conftest import OrthancServer, make_orthanc, storescu, wait_for, write_config
from tests.test_node_e2e import _dest, _series_uid

pytestmark = pytest.mark.integration


def test_default_retry_schedule_rides_out_a_one_hour_outage() -> None:
    r = RetrySettings()
    # attempt k (1-based) failing waits min(max, base * 2**(k-1)) * (1 +- jitter); the
    # item is a dead letter at attempt max_attempts: the sure window is the low-jitter sum
    window = sum(
        min(r.max_delay_s, r.base_delay_s * 2.0 ** (k - 1)) * (1.0 - r.jitter)
        for k in range(1, r.max_attempts)
    )
    print(f"default outbox retry window (jitter at its low end): {window:.0f} s")
    assert window >= 3600.0


def _orthanc_file(orth: OrthancServer, sop_uid: str) -> pydicom.Dataset | None:
    """The object Orthanc holds under ``sop_uid`` (None: not there)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{orth.http_port}/tools/lookup", data=sop_uid.encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        found = [x for x in json.loads(r.read()) if x["Type"] == "Instance"]
    if not found:
        return None
    url = f"http://127.0.0.1:{orth.http_port}/instances/{found[0]['ID']}/file"
    with urllib.request.urlopen(url, timeout=10) as r:
        return pydicom.dcmread(io.BytesIO(r.read()))


def _sent(node: Node) -> dict[str, str]:
    """SOP UID -> file of every output the node counts as sent and live (rejection notes
    left out)."""
    with node.registry._lock:
        rows = node.registry._db.execute(
            "SELECT sop_uid, path FROM outbox WHERE state='SENT'"
            " AND sop_class_uid!='1.2.840.10008.5.1.4.1.1.88.59'"
        ).fetchall()
    return {r[0]: r[1] for r in rows}


def _changed_copy(files: list[Path], out: Path) -> list[Path]:
    """The same instances (same UIDs) with changed pixels: the scanner's corrected re-send.
    The centre 8 x 8 block is scaled by 0.9, each image's extremes kept (the phase images
    still span their turn)."""
    out.mkdir(parents=True, exist_ok=True)
    changed = []
    for f in files:
        ds = pydicom.dcmread(f)
        px = ds.pixel_array.copy()
        block = px[12:20, 12:20]
        keep = (block == px.min()) | (block == px.max())
        block[~keep] = (block[~keep].astype(np.float64) * 0.9).astype(px.dtype)
        ds.PixelData = px.tobytes()
        ds.save_as(out / f.name, enforce_file_format=True)
        changed.append(out / f.name)
    return changed


def test_changed_rerun_gets_new_uids_and_retires_the_old_in_orthanc(
    tmp_path: Path, mdme_series: list[Path]
) -> None:
    orth = make_orthanc(tmp_path / "orthanc")  # OverwriteInstances: false (the default)
    cfg = write_config(
        tmp_path,
        _dest(orth)
        + "[completion]\nquiet_period_s = 1.0\npoll_interval_s = 0.1\n"
        + "[retry]\nbase_delay_s = 0.3\nmax_delay_s = 1.0\npoll_interval_s = 0.1\n",
    )
    node = Node(load_settings(cfg, env={})).start()
    uid = _series_uid(mdme_series)
    try:
        assert storescu(mdme_series, node.port).returncode == 0
        wait_for(lambda: node.registry.series(uid).state == State.DELIVERED, 300, 0.2, "first")
        first = set(_sent(node))
        assert first
        # the scanner re-sends the series with corrected pixels under the same UIDs
        changed = _changed_copy(mdme_series, tmp_path / "changed")
        assert storescu(changed, node.port).returncode == 0

        def second_delivery() -> bool:
            jobs = node.registry.transitions_of(uid).count(("QUEUED", "PROCESSING"))
            return jobs >= 2 and node.registry.series(uid).state == State.DELIVERED

        wait_for(second_delivery, 300, 0.2, "second version delivered")
        seen = [node.registry.timeline(uid)]

        def settled() -> bool:  # no state change for 2 s, two quiet periods (every job
            time.sleep(2.0)  # the re-send started ran)
            seen.append(node.registry.timeline(uid))
            return seen[-1] == seen[-2] and node.registry.series(uid).state == State.DELIVERED

        wait_for(settled, 600, 0.0, "the node settled")
        sent = _sent(node)
        # PACS holds what we sent under every live UID: no stale object under a live UID
        for sop, path in sent.items():
            held = _orthanc_file(orth, sop)
            assert held is not None, sop
            mine = pydicom.dcmread(path)
            if "PixelData" in mine:
                assert held.PixelData == mine.PixelData, f"PACS holds stale pixels under {sop}"
        second = set(sent)
        assert second and not second & first  # every output of the new version: a new UID
        # the old version is still in PACS, rejected by an IOCM note that lists all of it
        notes = []
        for iid in orth.instances():
            meta = orth.rest(f"/instances/{iid}/simplified-tags")
            if meta.get("SOPClassUID") == "1.2.840.10008.5.1.4.1.1.88.59":
                notes.append(_orthanc_file(orth, meta["SOPInstanceUID"]))
        assert len(notes) == 1
        note = notes[0]
        assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
        rejected = {
            ref.ReferencedSOPInstanceUID
            for st in note.CurrentRequestedProcedureEvidenceSequence
            for se in st.ReferencedSeriesSequence
            for ref in se.ReferencedSOPSequence
        }
        assert rejected == first
        # exactly two jobs: the first version and the changed one
        assert node.registry.transitions_of(uid).count(("QUEUED", "PROCESSING")) == 2
    finally:
        node.stop()
        orth.stop()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 320 MiB file system (tmpfs) for the spool: it can really fill up (and holds
    one instance of the default node.max_instance_bytes, 256 MiB, once emptied)."""
    mnt = tmp_path / "smallfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320m", "tmpfs", str(mnt)])
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(fs: Path, leave: int) -> Path:
    """Fill ``fs`` up to ``leave`` free bytes with one file."""
    filler = fs / "filler"
    free = shutil.disk_usage(fs).free
    with open(filler, "wb") as f:
        f.write(bytes(max(0, free - leave)))
    return filler


def test_full_disk_mid_export_recovers_by_itself(
    tmp_path: Path, small_fs: Path, mdme_series: list[Path]
) -> None:
    cfg = write_config(
        tmp_path,
        "[completion]\nquiet_period_s = 0.5\npoll_interval_s = 0.1\n"
        "[workers]\ndebug_job_delay_s = 2.0\n",
        spool=small_fs / "spool",
    )
    node = Node(load_settings(cfg, env={})).start()
    uid = _series_uid(mdme_series)
    try:
        assert storescu(mdme_series, node.port).returncode == 0
        wait_for(lambda: node.registry.series(uid).state == State.PROCESSING, 120, 0.05, "job")
        filler = _fill(small_fs, 40_000)  # room for the registry, not for ~33 outputs
        wait_for(
            lambda: "waiting for spool space" in node.registry.series(uid).reason,
            300,
            0.2,
            "job deferred on the full disk",
        )
        assert node.registry.series(uid).state == State.QUEUED  # not FAILED for good
        assert list(node.spool.outbox.rglob("*.dcm")) == []  # no partial outputs left
        assert node.ready()[1]["spool_above_watermark"] is False  # /readyz says not ready
        filler.unlink()  # space returns: the job runs again by itself
        wait_for(lambda: node.registry.series(uid).state == State.EXPORTED, 300, 0.2, "EXPORTED")
        live = node.registry.live_outputs(uid)
        assert sorted(p.stem for p in node.spool.outbox.rglob("*.dcm")) == sorted(live)
        assert node.ready()[1]["spool_above_watermark"] is True
    finally:
        node.stop()
