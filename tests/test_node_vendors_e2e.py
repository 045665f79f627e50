"""End to end, every vendor flavour: dcmtk ``storescu`` (the scanner) sends one emulated
MDME series per layout in ``emulator.VENDOR_LAYOUTS`` to ``synthmr serve`` (a real
subprocess), and every output arrives in a real Orthanc, checked by SOP class and count
through Orthanc's REST API.

The same run measures completion by grid: a series whose first instance announces the
instance count (classic layouts via their vendor count tags; an Enhanced MR instance that
holds the whole multi-slice grid counts as the whole series, ``philips_enhanced``) must be
COMPLETE < 1 s after its last instance, with the reason "grid full", although the quiet
period is 3 s. ``siemens_xa_enhanced`` writes one file per slice and announces no count:
it completes by the quiet-period fallback after the association is released, which this
test checks as well.

Phantom: 2 x 32 x 32 ellipsoid anatomy, seed 11, SNR 60, magnitude + phase; processing
with segmentation, myelin and enhancement off (they do not change the node's behaviour).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from dicom_node import emulator
from tests.conftest import (
    FAST_PROCESSING,
    OrthancServer,
    free_port,
    make_orthanc,
    registry_rows,
    storescu,
    wait_for,
    write_config,
)
from tests.test_node_e2e import NodeProcess, _db_state

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
#: layouts whose instances do not announce the series' instance count (quiet-period fallback)
NO_COUNT = {"siemens_xa_enhanced"}


def orthanc_sop_classes(orth: OrthancServer) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of every instance Orthanc stores (REST API)."""
    out: dict[str, str] = {}
    for iid in orth.instances():
        tags = orth.rest(f"/instances/{iid}/simplified-tags")
        out[str(tags["SOPInstanceUID"])] = str(tags["SOPClassUID"])
    return out


def grid_latencies(spool: Path, series_uid: str) -> tuple[float, float]:
    """(COMPLETE, PROCESSING) transition time minus the last instance's ``received_at``, s."""
    last = registry_rows(
        spool, "SELECT MAX(received_at) FROM instances WHERE series_uid=?", (series_uid,)
    )[0][0]

    def first_at(state: str) -> float:
        rows = registry_rows(
            spool,
            "SELECT MIN(at) FROM transitions WHERE series_uid=? AND to_state=?",
            (series_uid, state),
        )
        return float(rows[0][0]) - float(last)

    return first_at("COMPLETE"), first_at("PROCESSING")


@dataclass(frozen=True)
class Delivered:
    """Series sent to ``synthmr serve`` and delivered into a real Orthanc."""

    spool: Path
    uids: dict[str, str]  # layout -> SeriesInstanceUID
    in_pacs: dict[str, str]  # every instance in Orthanc: SOP Instance UID -> SOP Class UID
    orthanc: OrthancServer  # still running inside the ``with``

    def outbox(self, layout: str) -> dict[str, str]:
        """The node's outputs for the series of ``layout``: SOP Instance -> SOP Class UID."""
        sql = "SELECT sop_uid, sop_class_uid FROM outbox WHERE series_uid=?"
        return dict(registry_rows(self.spool, sql, (self.uids[layout],)))

    def complete_reason(self, layout: str) -> str:
        """Why the series of ``layout`` became COMPLETE (the transition's reason)."""
        sql = "SELECT reason FROM transitions WHERE series_uid=? AND to_state='COMPLETE'"
        return str(registry_rows(self.spool, sql, (self.uids[layout],))[0][0])


@contextmanager
def delivered_into_orthanc(
    tmp_path: Path,
    series: dict[str, list[Path]],
    processing: str = FAST_PROCESSING,
    *,
    completion: str = "quiet_period_s = 3\n",
    not_delivered: Collection[str] = (),
) -> Iterator[Delivered]:
    """Start a real Orthanc and ``synthmr serve`` (``processing``: its [processing] section;
    ``completion``: lines of its [completion] section, default a 3 s quiet period), send
    each layout's files with dcmtk ``storescu`` in order and wait until every series is
    DELIVERED (asserted), but for the layouts in ``not_delivered`` (sent, not waited for,
    not in ``uids``); both servers stop on exit."""
    orth = make_orthanc(tmp_path / "orthanc")
    try:
        port = free_port()
        spool = tmp_path / "spool"
        dest = (
            f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
            f"port = {orth.dicom_port}\ntimeout_s = 20\n"
        )
        cfg = write_config(
            tmp_path,
            dest
            + processing
            + "[completion]\nceiling_s = 600\npoll_interval_s = 0.2\n"
            + completion,
            port=port,
            spool=spool,
        )
        node = NodeProcess(cfg, tmp_path / "node.log", cli=True)
        uids = {
            layout: str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            for layout, files in series.items()
            if layout not in not_delivered
        }
        assert len(set(uids.values())) == len(uids)
        try:
            node.start(port)
            for layout, files in series.items():
                # /usr/bin/storescu (dcmtk); -R: propose only the SOP classes of these files
                r = storescu(files, port, extra=["-R"])
                assert r.returncode == 0, f"{layout}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
            for layout, uid in uids.items():
                wait_for(
                    lambda uid=uid: _db_state(spool, uid) in ("DELIVERED", "FAILED", "QUARANTINED"),
                    400,  # cold numba cache compiles on the first series
                    0.2,
                    f"{layout} delivered",
                )
                assert _db_state(spool, uid) == "DELIVERED", (
                    layout,
                    registry_rows(spool, "SELECT reason FROM series WHERE series_uid=?", (uid,)),
                )
            yield Delivered(spool, uids, orthanc_sop_classes(orth), orth)
        finally:
            node.stop()
    finally:
        orth.stop()


@pytest.fixture(scope="module")
def vendor_series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    from processing.phantom import make_phantom

    ph = make_phantom((2, 32, 32), seed=11, snr=60.0, anatomy="ellipsoid")
    root = tmp_path_factory.mktemp("vendors")
    return {
        layout: emulator.write_series(ph.acq, layout, root / layout, seed=11)
        for layout in emulator.VENDOR_LAYOUTS
    }


def test_every_vendor_flavour_end_to_end_into_orthanc(
    tmp_path: Path, vendor_series: dict[str, list[Path]]
) -> None:
    with delivered_into_orthanc(tmp_path, vendor_series) as run:
        spool, uids, in_pacs = run.spool, run.uids, run.in_pacs
        for layout, uid in uids.items():
            expected = run.outbox(layout)
            kinds = Counter(expected.values())
            # parametric maps, plus synthetic contrasts as MR (classic or Enhanced) images
            assert kinds[PARAMETRIC_MAP] >= 1, (layout, kinds)
            assert kinds[MR_IMAGE] + kinds[ENHANCED_MR] >= 3, (layout, kinds)
            got = {s: in_pacs.get(s) for s in expected}
            assert got == expected, f"{layout}: Orthanc differs from the outbox"
            sent = registry_rows(
                spool,
                "SELECT COUNT(*) FROM outbox WHERE series_uid=? AND state='SENT'",
                (uid,),
            )[0][0]
            assert sent == len(expected)
        total = sum(
            registry_rows(spool, "SELECT COUNT(*) FROM outbox WHERE series_uid=?", (u,))[0][0]
            for u in uids.values()
        )
        assert len(in_pacs) == total  # nothing else, nothing twice
        # completion by grid, for every series: COMPLETE < 1 s after its last instance
        lat = {layout: grid_latencies(spool, uid) for layout, uid in uids.items()}
        print("grid completion latency (COMPLETE, PROCESSING) s:", lat)
        reasons = {layout: run.complete_reason(layout) for layout in uids}
        for layout, (complete_s, _) in lat.items():
            if layout in NO_COUNT:
                assert "quiet for 3 s" in reasons[layout], reasons[layout]
                assert 3.0 <= complete_s < 3.0 + 5.0, (layout, complete_s)
            else:
                assert "grid full" in reasons[layout], (layout, reasons[layout])
                assert 0.0 <= complete_s < 1.0, (layout, complete_s)
        # the first series found an idle worker: processing started < 1 s after its last
        first = next(iter(lat))
        assert first not in NO_COUNT
        assert 0.0 <= lat[first][1] < 1.0, lat[first]
