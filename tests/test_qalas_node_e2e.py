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

import pytest

from dicom_node.export.enhanced_mr import ENHANCED_MR_IMAGE_STORAGE
from dicom_node.qalas_emulator import QALAS_LAYOUTS, write_qalas_series
from tests.test_node_vendors_e2e import PARAMETRIC_MAP, delivered_into_orthanc, grid_latencies

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_every_qalas_layout_end_to_end_into_orthanc(tmp_path: Path) -> None:
    from processing.qalas_phantom import make_qalas_phantom

    ph = make_qalas_phantom((8, 32, 32), seed=12, snr=60.0, magnitude=True, anatomy="ellipsoid")
    series = {
        layout: write_qalas_series(ph.acq, layout, tmp_path / "in" / layout, seed=12)
        for layout in QALAS_LAYOUTS
    }
    with delivered_into_orthanc(tmp_path, series) as run:
        for layout in run.uids:
            expected = run.outbox(layout)
            kinds = Counter(expected.values())
            assert kinds[PARAMETRIC_MAP] >= 1, (layout, kinds)
            # 3D: each synthetic contrast is one multi-frame Enhanced MR instance
            assert kinds[ENHANCED_MR_IMAGE_STORAGE] >= 3, (layout, kinds)
            assert {s: run.in_pacs.get(s) for s in expected} == expected, layout
        for layout, uid in run.uids.items():
            complete_s, _ = grid_latencies(run.spool, uid)
            reason = run.complete_reason(layout)
            assert "grid full" in reason, (layout, reason)
            assert 0.0 <= complete_s < 1.0, (layout, complete_s)
