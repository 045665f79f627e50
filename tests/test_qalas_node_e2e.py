"""3D-QALAS end to end: dcmtk ``storescu`` sends one emulated QALAS series per layout in
``qalas_emulator.QALAS_LAYOUTS`` to ``synthmr serve`` (a real subprocess); every output
arrives in a real Orthanc (the synthetic contrasts as multi-frame Enhanced MR). Completion
by grid must hold for 3D: 5 x nz classic instances (ImagesInAcquisition), five multi-frame
instances (a concatenation: InConcatenationTotalNumber) and one Enhanced MR instance
holding all 5 x nz frames.

Phantom: 8 x 32 x 32 ellipsoid anatomy (7.2 mm isotropic), seed 12, SNR 60, magnitude;
segmentation, myelin and enhancement off.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pydicom
import pytest

from dicom_node.export.enhanced_mr import ENHANCED_MR_IMAGE_STORAGE
from dicom_node.qalas_emulator import QALAS_LAYOUTS, write_qalas_series
from tests.conftest import free_port, make_orthanc, storescu, wait_for, write_config
from tests.test_node_e2e import NodeProcess, _db_state
from tests.test_node_vendors_e2e import (
    FAST_PROCESSING,
    PARAMETRIC_MAP,
    grid_latencies,
    orthanc_sop_classes,
    registry_rows,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_every_qalas_layout_end_to_end_into_orthanc(tmp_path: Path) -> None:
    from processing.qalas_phantom import make_qalas_phantom

    ph = make_qalas_phantom((8, 32, 32), seed=12, snr=60.0, magnitude=True, anatomy="ellipsoid")
    series = {
        layout: write_qalas_series(ph.acq, layout, tmp_path / "in" / layout, seed=12)
        for layout in QALAS_LAYOUTS
    }
    orth = make_orthanc(tmp_path / "orthanc")
    port = free_port()
    spool = tmp_path / "spool"
    dest = (
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
        f"port = {orth.dicom_port}\ntimeout_s = 10\n"
    )
    cfg = write_config(
        tmp_path,
        dest
        + FAST_PROCESSING
        + "[completion]\nquiet_period_s = 3\nceiling_s = 600\npoll_interval_s = 0.2\n",
        port=port,
        spool=spool,
    )
    node = NodeProcess(cfg, tmp_path / "node.log", cli=True)
    uids = {
        layout: str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        for layout, files in series.items()
    }
    assert len(set(uids.values())) == len(uids)
    try:
        node.start(port)
        for layout, files in series.items():
            r = storescu(files, port, extra=["-R"])
            assert r.returncode == 0, f"{layout}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
        for layout, uid in uids.items():
            wait_for(
                lambda uid=uid: _db_state(spool, uid) in ("DELIVERED", "FAILED", "QUARANTINED"),
                300,
                0.2,
                f"{layout} delivered",
            )
            assert _db_state(spool, uid) == "DELIVERED", (
                layout,
                registry_rows(spool, "SELECT reason FROM series WHERE series_uid=?", (uid,)),
            )
        in_pacs = orthanc_sop_classes(orth)
        for layout, uid in uids.items():
            expected = dict(
                registry_rows(
                    spool, "SELECT sop_uid, sop_class_uid FROM outbox WHERE series_uid=?", (uid,)
                )
            )
            kinds = Counter(expected.values())
            assert kinds[PARAMETRIC_MAP] >= 1, (layout, kinds)
            # 3D: each synthetic contrast is one multi-frame Enhanced MR instance
            assert kinds[ENHANCED_MR_IMAGE_STORAGE] >= 3, (layout, kinds)
            assert {s: in_pacs.get(s) for s in expected} == expected, layout
        for layout, uid in uids.items():
            complete_s, _ = grid_latencies(spool, uid)
            reason = registry_rows(
                spool,
                "SELECT reason FROM transitions WHERE series_uid=? AND to_state='COMPLETE'",
                (uid,),
            )[0][0]
            assert "grid full" in reason, (layout, reason)
            assert 0.0 <= complete_s < 1.0, (layout, complete_s)
    finally:
        node.stop()
        orth.stop()
