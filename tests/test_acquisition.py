"""Acquisition validation: every construction error names the offending field."""

from __future__ import annotations

import numpy as np
import pytest

from processing.acquisition import Acquisition, AcquisitionError


def _kw(**over):
    kw = dict(
        signal=np.ones((2, 4, 2, 3, 3), np.float32),
        delays_ms=[150.0, 580.0, 1900.0, 3850.0],
        echo_times_ms=[20.0, 100.0],
        tr_ms=4000.0,
        saturation_deg=120.0,
        excitation_deg=90.0,
        voxel_size_mm=(5.0, 1.0, 1.0),
        affine=np.eye(4),
    )
    kw.update(over)
    return kw


def test_valid_acquisition():
    acq = Acquisition(**_kw())
    assert acq.shape == (2, 3, 3)
    assert acq.samples().shape == (2, 3, 3, 8)
    assert acq.signal.dtype == np.float32


@pytest.mark.parametrize(
    ("over", "field"),
    [
        (dict(signal=np.ones((4, 2, 3, 3), np.float32)), "signal"),  # bad shape
        (dict(signal=np.ones((2, 3, 2, 3, 3), np.float32)), "delays_ms"),  # axis mismatch
        (dict(delays_ms=[150.0, 1900.0, 580.0, 3850.0]), "delays_ms"),  # unsorted
        (dict(delays_ms=[150.0, 580.0, float("nan"), 3850.0]), "delays_ms"),
        (dict(echo_times_ms=[100.0, 20.0]), "echo_times_ms"),
        (dict(saturation_deg=None), "saturation_deg"),  # missing angle
        (dict(excitation_deg=None), "excitation_deg"),
        (dict(tr_ms=float("nan")), "tr_ms"),
        (dict(tr_ms=3000.0), "delays_ms"),  # longest delay beyond TR
        (dict(voxel_size_mm=(5.0, 0.0, 1.0)), "voxel_size_mm"),
        (dict(affine=np.zeros((4, 4))), "affine"),
    ],
)
def test_errors_name_the_field(over, field):
    with pytest.raises(AcquisitionError, match=field):
        Acquisition(**_kw(**over))


def test_nan_in_signal_is_located():
    sig = np.ones((2, 4, 2, 3, 3), np.float32)
    sig[1, 2, 0, 1, 2] = np.nan
    with pytest.raises(AcquisitionError, match=r"signal.*\[1, 2, 0, 1, 2\]"):
        Acquisition(**_kw(signal=sig))


def test_negative_magnitude_rejected():
    sig = np.ones((2, 4, 2, 3, 3), np.float32)
    sig[0, 0, 0, 0, 0] = -1
    with pytest.raises(AcquisitionError, match="is_magnitude"):
        Acquisition(**_kw(signal=sig, is_magnitude=True))
