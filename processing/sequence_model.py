"""The forward model of an :class:`~processing.acquisition.Acquisition`, whatever its sequence.

Downstream stages that simulate the acquired samples (segmentation's unmixing, QC
residuals) call these instead of :mod:`processing.signal` directly, so they work on MDME
and 3D-QALAS alike. For MDME (``acq.sequence is None``) they call exactly the MDME functions
with the same arguments (results bit-identical to before).

Samples are ordered as :meth:`Acquisition.samples` (delay-major; QALAS: the 5 images).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numba as nb
import numpy as np

from processing.acquisition import Acquisition
from processing.qalas import N_SAMPLES, model_eval
from processing.signal import IDEAL_PROFILE, mdme_jacobian, mdme_signal

__all__ = ["acquisition_jacobian", "acquisition_signal", "single_thread", "warmup"]

# Below this many voxels a parallel launch costs more than it saves (on a loaded 2-core
# machine a launch waited ~30 ms for its threads: 7 s over the 200 small basis tables of
# one segmentation).
_PARALLEL_MIN_VOXELS = 20_000


@contextmanager
def single_thread() -> Iterator[None]:
    """Run numba parallel kernels in the calling thread (results are identical: the
    chunks are independent); for many small calls."""
    previous = nb.get_num_threads()
    nb.set_num_threads(1)
    try:
        yield
    finally:
        nb.set_num_threads(previous)


def acquisition_signal(
    acq: Acquisition, m0, t1_ms, t2_ms, b1, *, profile=IDEAL_PROFILE, magnitude: bool = False
) -> np.ndarray:
    """Model samples ``param_shape + (n_samples,)`` of ``acq``'s sequence (float64)."""
    if acq.sequence is None:
        return mdme_signal(
            m0, t1_ms, t2_ms, b1, acq.delays_ms, acq.echo_times_ms, acq.tr_ms,
            acq.saturation_deg, acq.excitation_deg, magnitude=magnitude, profile=profile,
        )  # fmt: skip
    arrs = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (m0, t1_ms, t2_ms, b1)))
    shape = arrs[0].shape
    m0v, t1v, t2v, b1v = (np.ascontiguousarray(a.ravel()) for a in arrs)
    out = np.empty((m0v.size, N_SAMPLES))
    args = (m0v, 1.0 / t1v, 1.0 / t2v, b1v, *acq.sequence.kernel_args(), out)
    if m0v.size >= _PARALLEL_MIN_VOXELS:
        _qalas_signal_parallel(*args)
    else:
        with single_thread():
            _qalas_signal_parallel(*args)
    if magnitude:
        np.abs(out, out=out)
    return out.reshape(shape + (N_SAMPLES,))


# nogil: called from the QC thread beside synthesis + enhancement (processing.run)
@nb.njit(cache=True, parallel=True, nogil=True)
def _qalas_signal_parallel(m0, r1, r2, b1, starts, t_inv, tr, te_prep, n, esp, alpha, kc, eta, out):
    """``processing.qalas.qalas_signal`` for many voxels: the same per-voxel model
    (``model_eval``, identical values), in parallel chunks and without the [n, 5, 4]
    Jacobian array (320 MB for the 2 M head voxels of a 1 mm volume)."""
    nv = m0.shape[0]
    n_chunks = min(nv, 64)
    for ch in nb.prange(n_chunks):
        st = np.empty(6)
        cen = np.empty((5, 6))
        jac = np.empty((5, 4))
        for v in range(ch * nv // n_chunks, (ch + 1) * nv // n_chunks):
            model_eval(
                m0[v], r1[v], r2[v], b1[v], starts, t_inv, tr, te_prep, n, esp, alpha, kc, eta,
                st, cen, out[v], jac,
            )  # fmt: skip


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


def warmup() -> None:
    """Compile (or load from the cache) the parallel QALAS forward model."""
    from processing.qalas import QalasProtocol

    one = np.ones(2)
    out = np.empty((2, N_SAMPLES))
    _qalas_signal_parallel(one, one / 1000.0, one / 80.0, one, *QalasProtocol().kernel_args(), out)
