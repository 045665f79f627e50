"""3D-QALAS through the vendor adapters: emulator layouts -> vendors.normalize -> fit."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from dicom_node import vendors
from dicom_node.qalas_emulator import QALAS_LAYOUTS, make_qalas_datasets
from dicom_node.vendors import NormalizationError, expected_count
from processing.qalas_fit import fit_qalas
from processing.qalas_phantom import make_qalas_phantom


@pytest.fixture(scope="module")
def phantom():
    # Oblique 3D slab, magnitude, SNR 100: the layouts must agree on every voxel.
    return make_qalas_phantom((12, 32, 32), snr=100.0, seed=1, magnitude=True, oblique=True)


def test_every_layout_gives_the_same_acquisition_and_maps(phantom):
    acq = phantom.acq
    maps = {}
    for layout in QALAS_LAYOUTS:
        dss = make_qalas_datasets(acq, layout)
        det = vendors.detect(dss)
        assert det.is_mdme and "QALAS" in det.reason
        assert expected_count(dss[0]) == len(dss), layout
        got = vendors.normalize(dss)
        assert got.sequence_kind == "QALAS" and got.is_magnitude
        q = float(dss[0].get("RescaleSlope", 0) or 0) or 2.0**-10
        assert np.abs(got.signal - acq.signal).max() <= q, layout
        np.testing.assert_allclose(got.affine, acq.affine, atol=1e-4)
        assert dataclasses.replace(got.sequence, source=acq.sequence.source) == acq.sequence
        assert "rules:" in got.delay_source
        maps[layout] = fit_qalas(got, phantom.truth.head)
    ref = maps["ge"]
    for layout, m in maps.items():
        for name in ("t1_ms", "t2_ms", "m0"):
            a, b = getattr(m, name), getattr(ref, name)
            rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-6)
            assert float(rel.max()) <= 1e-4, (layout, name)


def test_missing_image_is_named(phantom):
    dss = make_qalas_datasets(phantom.acq, "ge")
    with pytest.raises(NormalizationError, match="missing"):
        vendors.normalize(dss[:-1])
    one_image = [d for d in dss if int(d.TemporalPositionIdentifier) != 3]
    with pytest.raises(NormalizationError, match="5 images"):
        vendors.normalize(one_image)


def test_cli_simulate_qalas(tmp_path):
    out = tmp_path / "qalas"
    cmd = [sys.executable, "-m", "dicom_node.cli", "simulate", "--sequence", "qalas"]
    cmd += ["--vendor", "philips_enhanced", "--shape", "8,32,32", "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(list(out.glob("*.dcm"))) == 1
    bad = subprocess.run(
        [*cmd[:6], "--vendor", "toshiba", "-o", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "toshiba" in bad.stderr
