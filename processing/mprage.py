"""Synthetic MPRAGE-like T1-weighted volume from quantitative maps.

For users who run FreeSurfer, FastSurfer or SynthSeg on synthetic data. The MPRAGE cycle
(Mugler & Brookeman, Magn Reson Med 1990;15:152; steady-state form as in Deichmann et al.,
Magn Reson Med 2000;44:795) is: inversion (efficiency eta) -> delay -> an echo train of
``n_pulses`` spoiled gradient-echo pulses (flip alpha, spacing ``echo_spacing_ms``) -> delay
to the next inversion, repeated with period ``tr_ms``. ``ti_ms`` is the time from the
inversion to the k-space-centre pulse (``centre_index``, linear ordering by default).

Same algebra as the QALAS model (processing.qalas): each piece is an affine map of Mz/M0,
the cycle's fixed point is solved exactly, and the image is
``PD * Mz(centre) * sin(alpha) * exp(-TE/T2)`` (T2 stands in for T2*, TE is ~3 ms).
Defaults: a common 3T ADNI-like protocol (TR 2300, TI 900, 9 deg, 7.1 ms spacing, 176
pulses, TE 2.98 ms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from processing.results import QuantMaps, SyntheticImage

__all__ = ["MprageParams", "mprage_signal", "synthesize_mprage"]


@dataclass(frozen=True)
class MprageParams:
    """MPRAGE timing (ms, degrees); see the module docstring."""

    tr_ms: float = 2300.0
    ti_ms: float = 900.0
    flip_deg: float = 9.0
    echo_spacing_ms: float = 7.1
    n_pulses: int = 176
    centre_index: int | None = None
    te_ms: float = 2.98
    inversion_efficiency: float = 0.96

    def __post_init__(self) -> None:
        n = int(self.n_pulses)
        if n < 1:
            raise ValueError(f"n_pulses: must be >= 1, got {self.n_pulses!r}")
        kc = n // 2 if self.centre_index is None else int(self.centre_index)
        if not 0 <= kc < n:
            raise ValueError(f"centre_index: must be in [0, {n - 1}], got {self.centre_index!r}")
        object.__setattr__(self, "centre_index", kc)
        for name in ("tr_ms", "ti_ms", "flip_deg", "echo_spacing_ms", "inversion_efficiency"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {v!r}")
        if not self.inversion_efficiency <= 1.0:
            raise ValueError(f"inversion_efficiency: must be <= 1, got {self.inversion_efficiency}")
        lead = self.ti_ms - kc * self.echo_spacing_ms
        if lead < 0:
            raise ValueError(
                f"ti_ms: {self.ti_ms} ms is shorter than the train before the k-space centre "
                f"({kc} x {self.echo_spacing_ms} ms)"
            )
        if lead + n * self.echo_spacing_ms > self.tr_ms:
            raise ValueError(
                f"tr_ms: {self.tr_ms} ms is shorter than inversion + TI + echo train "
                f"({lead + n * self.echo_spacing_ms:.1f} ms)"
            )


def mprage_signal(t1_ms, t2_ms, params: MprageParams = MprageParams()) -> np.ndarray:
    """MPRAGE signal per unit PD (float64, broadcast shape of the inputs)."""
    t1 = np.asarray(t1_ms, np.float64)
    t2 = np.asarray(t2_ms, np.float64)
    p = params
    kc = int(p.centre_index)
    n = int(p.n_pulses)
    alpha = math.radians(p.flip_deg)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r1 = np.where(t1 > 0, 1.0 / t1, 0.0)
        e = np.exp(-r1 * p.echo_spacing_ms)
        pp = math.cos(alpha) * e
        qq = 1.0 - e

        def train(k: int):
            pk = pp**k
            return pk, qq * (1.0 - pk) / (1.0 - pp)

        lead = p.ti_ms - kc * p.echo_spacing_ms
        tail = p.tr_ms - lead - n * p.echo_spacing_ms
        # Map from just before the inversion to the k-space centre, then to the cycle end.
        e_lead = np.exp(-r1 * lead)
        a, b = -p.inversion_efficiency * e_lead, 1.0 - e_lead
        ak, bk = train(kc)
        a_c, b_c = ak * a, ak * b + bk
        ar, br = train(n - kc)
        e_tail = np.exp(-r1 * tail)
        a_end = e_tail * ar * a_c
        b_end = e_tail * (ar * b_c + br) + 1.0 - e_tail
        m_star = b_end / (1.0 - a_end)
        mz = a_c * m_star + b_c
        s = mz * math.sin(alpha) * np.exp(-np.where(t2 > 0, p.te_ms / t2, np.inf))
    return np.where(np.isfinite(s), s, 0.0)


def synthesize_mprage(
    maps: QuantMaps, params: MprageParams = MprageParams(), *, scale: float | None = None
) -> SyntheticImage:
    """Synthetic MPRAGE-like T1W image (magnitude; WM bright, CSF dark), 16-bit scaled as
    :func:`processing.synthesis.synthesize` (99.5th percentile in the mask -> 16000)."""
    mask = np.asarray(maps.mask, bool)
    # only the mask's voxels are computed (the image is 0 outside it)
    pd = np.asarray(maps.pd_pu)[mask].astype(np.float64)
    inside = np.abs(
        pd * mprage_signal(np.asarray(maps.t1_ms)[mask], np.asarray(maps.t2_ms)[mask], params)
    )
    if scale is None:
        ref = float(np.percentile(inside, 99.5)) if inside.size else 0.0
        scale = 16000.0 / ref if ref > 0 else 1.0
    vals = np.clip(np.rint(inside * scale), 0, 65535).astype(np.float32)
    image = np.zeros(mask.shape, np.float32)
    image[mask] = vals
    p1, p99 = (float(v) for v in np.percentile(vals, [1, 99])) if vals.size else (0.0, 1.0)
    desc = (
        f"SYNTHETIC MPRAGE TR{params.tr_ms:g} TI{params.ti_ms:g} FA{params.flip_deg:g} "
        f"ESP{params.echo_spacing_ms:g} N{params.n_pulses}"
    )
    return SyntheticImage(
        name="MPRAGE",
        kind="MPRAGE",
        image=image,
        tr_ms=params.tr_ms,
        te_ms=params.te_ms,
        ti_ms=params.ti_ms,
        scale=float(scale),
        equation="PD * |Mz_ss(centre)| * sin(alpha) * exp(-TE/T2), MPRAGE fixed point",
        window_center=0.5 * (p1 + p99),
        window_width=max(p99 - p1, 1.0),
        description=desc,
        parameters={
            "tr_ms": params.tr_ms,
            "ti_ms": params.ti_ms,
            "flip_deg": params.flip_deg,
            "echo_spacing_ms": params.echo_spacing_ms,
            "n_pulses": params.n_pulses,
            "centre_index": params.centre_index,
            "inversion_efficiency": params.inversion_efficiency,
        },
    )
