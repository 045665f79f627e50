"""The forward model of an :class:`~processing.acquisition.Acquisition`, whatever its sequence.

Downstream stages that simulate the acquired samples (segmentation's unmixing, QC
residuals) call these instead of :mod:`processing.signal` directly, so they work on MDME
and 3D-QALAS alike. For MDME (``acq.sequence is None``) they call exactly the MDME functions
with the same arguments (results bit-identical to before).

Samples are ordered as :meth:`Acquisition.samples` (delay-major; QALAS: the 5 images).
"""

from __future__ import annotations

import numpy as np

from processing.acquisition import Acquisition
from processing.signal import IDEAL_PROFILE, mdme_jacobian, mdme_signal

__all__ = ["acquisition_jacobian", "acquisition_signal"]


def acquisition_signal(
    acq: Acquisition, m0, t1_ms, t2_ms, b1, *, profile=IDEAL_PROFILE, magnitude: bool = False
) -> np.ndarray:
    """Model samples ``param_shape + (n_samples,)`` of ``acq``'s sequence (float64)."""
    if acq.sequence is None:
        return mdme_signal(
            m0, t1_ms, t2_ms, b1, acq.delays_ms, acq.echo_times_ms, acq.tr_ms,
            acq.saturation_deg, acq.excitation_deg, magnitude=magnitude, profile=profile,
        )  # fmt: skip
    from processing.qalas import qalas_signal

    return qalas_signal(m0, t1_ms, t2_ms, b1, acq.sequence, magnitude=magnitude)


def acquisition_jacobian(
    acq: Acquisition, m0, t1_ms, t2_ms, b1, *, profile=IDEAL_PROFILE, magnitude: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(signal, jac)``; jac w.r.t. ``(M0, R1 [1/ms], R2 [1/ms], B1)``, ``[..., ns, 4]``."""
    if acq.sequence is None:
        return mdme_jacobian(
            m0, t1_ms, t2_ms, b1, acq.delays_ms, acq.echo_times_ms, acq.tr_ms,
            acq.saturation_deg, acq.excitation_deg, magnitude=magnitude, profile=profile,
        )  # fmt: skip
    from processing.qalas import qalas_jacobian

    return qalas_jacobian(m0, t1_ms, t2_ms, b1, acq.sequence, magnitude=magnitude)
