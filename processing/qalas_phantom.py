"""Digital brain phantom with known truth -> simulated 3D-QALAS acquisition.

The anatomy, partial-volume fractions, B1 and receive fields come from
:func:`processing.phantom.make_phantom` (same grid, same truth); the signal is the mixture of
the compartments' steady-state QALAS samples (:func:`processing.qalas.qalas_signal`),
``S = coil * sum_k f_k * PD_k * s_k(T1_k, T2_k, B1)``, never the signal of mixed parameters.
Noise as in processing.phantom: complex Gaussian, SD per real channel ``100 / snr``; real
output = real part (signed), magnitude output = ``|S + n|``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from processing.acquisition import Acquisition
from processing.phantom import COMPARTMENTS, Phantom, make_phantom
from processing.qalas import N_SAMPLES, QalasProtocol, qalas_signal

__all__ = ["make_qalas_phantom", "qalas_mixture_signal"]


def qalas_mixture_signal(truth: Any, protocol: QalasProtocol) -> np.ndarray:
    """Noise-free QALAS signal ``[z, 5, y, x]`` (float64) of a :class:`PhantomTruth`."""
    shape = truth.head.shape
    out = np.zeros((N_SAMPLES,) + shape)
    head = truth.head | (sum(truth.fractions[c] for c in COMPARTMENTS) > 0)
    b1 = truth.b1[head].astype(np.float64)
    coil = truth.coil[head].astype(np.float64)
    acc = np.zeros((b1.size, N_SAMPLES))
    for comp in COMPARTMENTS:
        f = truth.fractions[comp][head].astype(np.float64)
        sel = f > 0
        if not sel.any():
            continue
        tp = truth.tissues[comp]
        s = qalas_signal(tp.pd_pu, tp.t1_ms, tp.t2_ms, b1[sel], protocol)
        acc[sel] += f[sel, None] * s
    acc *= coil[:, None]
    for i in range(N_SAMPLES):
        out[i][head] = acc[:, i]
    return out.transpose(1, 0, 2, 3)


def make_qalas_phantom(
    shape: Sequence[int] = (48, 64, 64),
    *,
    protocol: QalasProtocol | None = None,
    voxel_size_mm: Sequence[float] | None = None,
    seed: int = 0,
    snr: float | None = 50.0,
    magnitude: bool = False,
    oblique: bool = False,
    b1_range: tuple[float, float] = (0.85, 1.15),
    coil: bool = True,
    lesions: bool = False,
    tissues: Mapping[str, Any] | None = None,
    anatomy: str = "mni",
) -> Phantom:
    """Simulate a 3D-QALAS acquisition of the digital brain (see processing.phantom).

    voxel_size_mm: default isotropic, ``230 / nx`` mm (a 230 mm field of view). Everything
    else as :func:`processing.phantom.make_phantom`. Returns a :class:`Phantom` whose
    ``acq.sequence`` is the protocol.
    """
    protocol = protocol or QalasProtocol()
    shp = tuple(int(s) for s in shape)
    if voxel_size_mm is None:
        v = 230.0 / shp[2]
        voxel_size_mm = (v, v, v)
    base = make_phantom(
        shp,
        seed=seed,
        snr=None,
        oblique=oblique,
        b1_range=b1_range,
        coil=coil,
        lesions=lesions,
        tissues=tissues,
        voxel_size_mm=voxel_size_mm,
        anatomy=anatomy,
    )
    sig = qalas_mixture_signal(base.truth, protocol)
    if snr is not None and np.isfinite(snr):
        rng = np.random.default_rng(seed + 7919)
        sd = 100.0 / float(snr)
        nr = rng.normal(0.0, sd, sig.shape)
        if magnitude:
            ni = rng.normal(0.0, sd, sig.shape)
            sig = np.hypot(sig + nr, ni)
        else:
            sig = sig + nr
    elif magnitude:
        sig = np.abs(sig)
    acq = Acquisition.from_qalas(
        sig.astype(np.float32),
        protocol,
        base.acq.voxel_size_mm,
        np.asarray(base.acq.affine),
        is_magnitude=magnitude,
        delay_source="phantom",
        metadata={"phantom": True, "anatomy": base.truth.anatomy, "snr": snr},
    )
    return Phantom(acq=acq, truth=base.truth)
