"""3D-QALAS forward model: steady-state longitudinal magnetization of the whole cycle.

3D-QALAS (3D quantification using an interleaved Look-Locker acquisition sequence with a
T2-preparation pulse; Kvernby et al., J Cardiovasc Magn Reson 2014;16:102) repeats one cycle
until k-space is full:

    T2-prep (TE_prep) -> readout block 1 -> inversion -> blocks 2, 3, 4, 5 -> (next cycle)

Each readout block is a spoiled gradient-echo train of ``n_pulses`` pulses of flip ``alpha``
(actual flip ``B1 * alpha``) at spacing ``pulse_spacing_ms``; one block per cycle fills one
k-space segment of one of the five images. Every assumption and its source is listed in
``processing/QALAS.md``.

Model (per unit M0; all pieces are affine maps ``m -> a*m + b`` of the longitudinal
magnetization ``m = Mz/M0``):

- free relaxation for t:    ``a = E = exp(-R1 t)``, ``b = 1 - E``
- T2-prep (ideal, crushed): ``a = exp(-R2 TE_prep)``, ``b = 0``  (regrowth during the prep
  is tipped to the transverse plane by the tip-up pulse and crushed)
- inversion (efficiency eta): ``a = -eta``, ``b = 0``
- k readout pulses (pulse, then relax for the spacing; ideal spoiling):
  per pulse ``p = cos(B1 alpha) * E_esp``, ``q = 1 - E_esp``; after k pulses
  ``a = p^k``, ``b = q (1 - p^k) / (1 - p)``.

The cycle is one affine map of ``m``; the steady state is its fixed point, solved exactly.
It is written with the cycle starting just after the T2-prep, so that with ``e2 =
exp(-R2 TE_prep)`` the steady state is ``x* = e2 B' / (1 - e2 A')`` where ``(A', B')`` is the
map from the end of the prep to the start of the next prep (independent of R2).

Sample of block i = the magnetization just before its k-space-centre pulse (index
``centre_index``; ``n_pulses // 2`` for linear ordering, 0 for centric) times the actual
transverse fraction: ``S_i = M0 * m_i * sin(B1 alpha) / sin(alpha)``. The ``1/sin(alpha)``
normalization makes M0 the equilibrium magnetization in signal units at nominal flip, as
for MDME; the ``sin(B1 alpha)`` makes the transmit field's effect on the signal amplitude
part of the model (PD is then free of transmit bias).

Units: times in ms, R1/R2 in 1/ms inside the kernels, angles in radians inside the kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numba as nb
import numpy as np

__all__ = [
    "N_SAMPLES",
    "QalasError",
    "QalasProtocol",
    "qalas_jacobian",
    "qalas_signal",
]

#: Number of images (readout blocks) per cycle.
N_SAMPLES = 5


class QalasError(ValueError):
    """A QALAS protocol field is invalid. The message names the field."""


def _pos(name: str, v: Any, *, zero_ok: bool = False) -> float:
    try:
        fv = float(v)
    except (TypeError, ValueError):
        raise QalasError(f"{name}: not a number: {v!r}") from None
    if not math.isfinite(fv) or fv < 0 or (fv == 0 and not zero_ok):
        raise QalasError(f"{name}: must be a finite number {'>=' if zero_ok else '>'} 0, got {v!r}")
    return fv


@dataclass(frozen=True)
class QalasProtocol:
    """Timing of one 3D-QALAS cycle (ms, degrees); defaults: ``processing/QALAS.md``.

    Times are measured from the start of the T2-prep module (t = 0).

    tr_ms: cycle length (T2-prep start to the next T2-prep start).
    t2prep_ms: T2-preparation echo time (duration the magnetization spends transverse).
    block_starts_ms: time of the first readout pulse of each of the 5 blocks.
    inversion_ms: time of the inversion pulse (between block 1 and block 2).
    n_pulses: readout pulses per block per cycle (turbo factor / echo-train length).
    pulse_spacing_ms: repetition time of the gradient-echo train.
    flip_deg: nominal readout flip angle.
    centre_index: the pulse (0-based) that samples the k-space centre; None = linear
        ordering (``n_pulses // 2``); 0 = centric.
    inversion_efficiency: eta in ``Mz+ = -eta * Mz-`` (1 = perfect adiabatic inversion).
    echo_time_ms: gradient-echo TE; informational (the T2* weighting is common to the 5
        images and is absorbed in M0).
    source: where the timing came from (``"default"``, ``"header"``, ``"rules:GE"``, ...).
    """

    tr_ms: float = 4500.0
    t2prep_ms: float = 100.0
    block_starts_ms: tuple[float, ...] = (110.0, 1010.0, 1910.0, 2810.0, 3710.0)
    inversion_ms: float = 910.0
    n_pulses: int = 128
    pulse_spacing_ms: float = 5.8
    flip_deg: float = 4.0
    centre_index: int | None = None
    inversion_efficiency: float = 1.0
    echo_time_ms: float = 2.3
    source: str = "default"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("tr_ms", "t2prep_ms", "pulse_spacing_ms", "flip_deg", "echo_time_ms"):
            object.__setattr__(self, name, _pos(name, getattr(self, name)))
        object.__setattr__(self, "inversion_ms", _pos("inversion_ms", self.inversion_ms))
        eta = _pos("inversion_efficiency", self.inversion_efficiency)
        if eta > 1.0:
            raise QalasError(f"inversion_efficiency: must be in (0, 1], got {eta}")
        object.__setattr__(self, "inversion_efficiency", eta)
        if self.flip_deg >= 90.0:
            raise QalasError(f"flip_deg: a QALAS readout flip is small (< 90), got {self.flip_deg}")
        try:
            n = int(self.n_pulses)
        except (TypeError, ValueError):
            raise QalasError(f"n_pulses: not an integer: {self.n_pulses!r}") from None
        if n < 1 or n != self.n_pulses:
            raise QalasError(f"n_pulses: must be a positive integer, got {self.n_pulses!r}")
        object.__setattr__(self, "n_pulses", n)
        kc = n // 2 if self.centre_index is None else int(self.centre_index)
        if not 0 <= kc < n:
            raise QalasError(f"centre_index: must be in [0, {n - 1}], got {self.centre_index!r}")
        object.__setattr__(self, "centre_index", kc)
        starts = tuple(_pos("block_starts_ms", v) for v in self.block_starts_ms)
        if len(starts) != N_SAMPLES:
            raise QalasError(f"block_starts_ms: expected {N_SAMPLES} values, got {len(starts)}")
        object.__setattr__(self, "block_starts_ms", starts)
        dur = self.block_ms
        if starts[0] < self.t2prep_ms:
            raise QalasError(
                f"block_starts_ms: block 1 starts at {starts[0]} ms, inside the T2-prep "
                f"(0-{self.t2prep_ms} ms)"
            )
        if not starts[0] + dur <= self.inversion_ms <= starts[1]:
            raise QalasError(
                f"inversion_ms: {self.inversion_ms} ms must lie between the end of block 1 "
                f"({starts[0] + dur} ms) and the start of block 2 ({starts[1]} ms)"
            )
        for i in range(1, N_SAMPLES):
            if starts[i] < starts[i - 1] + dur:
                raise QalasError(
                    f"block_starts_ms: block {i + 1} starts at {starts[i]} ms, before block {i} "
                    f"ends ({starts[i - 1] + dur} ms; {self.n_pulses} x {self.pulse_spacing_ms} ms)"
                )
        if starts[-1] + dur > self.tr_ms:
            raise QalasError(
                f"tr_ms: {self.tr_ms} ms is shorter than the end of block 5 ({starts[-1] + dur} ms)"
            )

    @property
    def block_ms(self) -> float:
        """Duration of one readout block."""
        return self.n_pulses * self.pulse_spacing_ms

    def sample_times_ms(self) -> np.ndarray:
        """Time of each block's k-space-centre pulse from the T2-prep start, ``[5]``."""
        return np.array(self.block_starts_ms) + self.centre_index * self.pulse_spacing_ms

    def kernel_args(self) -> tuple:
        """Arguments of the numba kernels: (starts[5], t_inv, tr, te_prep, n, esp, alpha,
        centre, eta)."""
        return (
            np.ascontiguousarray(self.block_starts_ms, np.float64),
            float(self.inversion_ms),
            float(self.tr_ms),
            float(self.t2prep_ms),
            int(self.n_pulses),
            float(self.pulse_spacing_ms),
            math.radians(self.flip_deg),
            int(self.centre_index),
            float(self.inversion_efficiency),
        )

    def describe(self) -> dict[str, Any]:
        """Plain-data description for provenance."""
        return {
            "sequence": "3D-QALAS",
            "tr_ms": self.tr_ms,
            "t2prep_ms": self.t2prep_ms,
            "block_starts_ms": list(self.block_starts_ms),
            "inversion_ms": self.inversion_ms,
            "n_pulses": self.n_pulses,
            "pulse_spacing_ms": self.pulse_spacing_ms,
            "flip_deg": self.flip_deg,
            "centre_index": self.centre_index,
            "inversion_efficiency": self.inversion_efficiency,
            "echo_time_ms": self.echo_time_ms,
            "source": self.source,
        }


# --------------------------------------------------------------------------------------
# numba kernels
# --------------------------------------------------------------------------------------


@nb.njit(cache=True, inline="always")
def _compose(st, a, da_r, da_b, b, db_r, db_b):
    """Follow the accumulated map st = (A, dA/dR1, dA/dB1, B, dB/dR1, dB/dB1) by m -> a m + b."""
    A = st[0]
    B = st[3]
    st[1] = da_r * A + a * st[1]
    st[2] = da_b * A + a * st[2]
    st[4] = da_r * B + a * st[4] + db_r
    st[5] = da_b * B + a * st[5] + db_b
    st[0] = a * A
    st[3] = a * B + b


@nb.njit(cache=True, inline="always")
def _relax(st, r1, t):
    e = math.exp(-r1 * t)
    _compose(st, e, -t * e, 0.0, 1.0 - e, t * e, 0.0)


@nb.njit(cache=True, inline="always")
def _train(st, k, p, dp_r, dp_b, q, dq_r):
    """k readout pulses of the per-pulse map m -> p m + q."""
    if k == 0:
        return
    pk1 = p ** (k - 1)
    pk = pk1 * p
    om = 1.0 - p
    s = (1.0 - pk) / om
    ds = (s - k * pk1) / om  # d/dp of (1 - p^k)/(1 - p)
    dpk = k * pk1
    _compose(st, pk, dpk * dp_r, dpk * dp_b, q * s, dq_r * s + q * ds * dp_r, q * ds * dp_b)


@nb.njit(cache=True)
def cycle_maps(r1, b1, starts, t_inv, tr, te_prep, n, esp, alpha, kc, eta, st, cen):
    """Affine maps of the cycle that starts right after the T2-prep (R1 in 1/ms).

    st[6] <- (A', dA'/dR1, dA'/dB1, B', dB'/dR1, dB'/dB1): end of prep -> start of next prep.
    cen[5, 6] <- the same for end of prep -> just before each block's k-space-centre pulse.
    """
    for j in range(6):
        st[j] = 0.0
    st[0] = 1.0
    c = math.cos(b1 * alpha)
    e = math.exp(-r1 * esp)
    p = c * e
    dp_r = -esp * p
    dp_b = -alpha * math.sin(b1 * alpha) * e
    q = 1.0 - e
    dq_r = esp * e
    t = te_prep
    for i in range(5):
        if i == 1:
            _relax(st, r1, t_inv - t)
            _compose(st, -eta, 0.0, 0.0, 0.0, 0.0, 0.0)
            t = t_inv
        _relax(st, r1, starts[i] - t)
        _train(st, kc, p, dp_r, dp_b, q, dq_r)
        for j in range(6):
            cen[i, j] = st[j]
        _train(st, n - kc, p, dp_r, dp_b, q, dq_r)
        t = starts[i] + n * esp
    _relax(st, r1, tr - t)


@nb.njit(cache=True, inline="always")
def _then(A, dA, B, dB, a, da, b, db):
    """The accumulated map (A, B) and its R1 derivatives, followed by m -> a m + b."""
    return a * A, da * A + a * dA, a * B + b, da * B + a * dB + db


@nb.njit(cache=True, inline="always")
def _relax_map(r1, t):
    e = math.exp(-r1 * t)
    return e, -t * e, 1.0 - e, t * e


@nb.njit(cache=True, inline="always")
def _train_map(k, r1, c, log_c, esp, e, q, dq):
    """k readout pulses (per pulse m -> p m + q, p = c E) as one affine map and its R1
    derivative: ``p^k`` and the geometric sum ``q (1 - p^k) / (1 - p)`` in closed form."""
    if k == 0:
        return 1.0, 0.0, 0.0, 0.0
    p = c * e
    pk = math.exp(k * (log_c - r1 * esp))
    dpk = -k * esp * pk
    om = 1.0 - p
    s = (1.0 - pk) / om
    ds = (s - k * pk / p) / om * (-esp * p)  # d/dR1 of (1 - p^k)/(1 - p)
    return pk, dpk, q * s, dq * s + q * ds


@nb.njit(cache=True)
def basis_fixed_b1(r1, log_c, f, starts, t_inv, tr, te_prep, n, esp, kc, eta, gu, gv, dgu, dgv):
    """The two linear basis vectors of the samples for a known B1, and their R1 derivatives.

    With ``u = M0 / (1 - e2 A')`` and ``v = e2 u`` (``e2 = exp(-R2 TE_prep)``) the samples
    are exactly ``u * gu + v * gv``: linear in (u, v), nonlinear in R1 only (variable
    projection). r1 in 1/ms; ``log_c = log(cos(B1 alpha))``, ``f = sin(B1 alpha) /
    sin(alpha)``. Fills gu, gv, dgu, dgv ``[5]`` (derivatives w.r.t. R1 [1/ms]); returns
    ``(A', dA'/dR1)`` (M0 = u - A' v). Every readout train is one closed-form affine map
    (:func:`_train_map`), so the cost is independent of the train length: 10 exponentials.
    """
    c = math.exp(log_c)
    e = math.exp(-r1 * esp)
    q = 1.0 - e
    dq = esp * e
    h0, dh0, h1, dh1 = _train_map(kc, r1, c, log_c, esp, e, q, dq)  # start -> centre pulse
    t0, dt0, t1, dt1 = _train_map(n - kc, r1, c, log_c, esp, e, q, dq)  # centre -> end
    A, dA, B, dB = 1.0, 0.0, 0.0, 0.0
    t = te_prep
    for i in range(5):
        if i == 1:
            a, da, b, db = _relax_map(r1, t_inv - t)
            A, dA, B, dB = _then(A, dA, B, dB, a, da, b, db)
            A, dA, B, dB = -eta * A, -eta * dA, -eta * B, -eta * dB
            t = t_inv
        a, da, b, db = _relax_map(r1, starts[i] - t)
        A, dA, B, dB = _then(A, dA, B, dB, a, da, b, db)
        A, dA, B, dB = _then(A, dA, B, dB, h0, dh0, h1, dh1)
        gu[i] = A  # temporarily: the map to the centre pulse (A_i, B_i) -> gu, gv below
        gv[i] = B
        dgu[i] = dA
        dgv[i] = dB
        A, dA, B, dB = _then(A, dA, B, dB, t0, dt0, t1, dt1)
        t = starts[i] + n * esp
    a, da, b, db = _relax_map(r1, tr - t)
    ap, dap, bp, dbp = _then(A, dA, B, dB, a, da, b, db)
    for i in range(5):
        ai = gu[i]
        bi = gv[i]
        dai = dgu[i]
        dbi = dgv[i]
        gu[i] = f * bi
        gv[i] = f * (ai * bp - bi * ap)
        dgu[i] = f * dbi
        dgv[i] = f * (dai * bp + ai * dbp - dbi * ap - bi * dap)
    return ap, dap


@nb.njit(cache=True)
def model_eval(m0, r1, r2, b1, starts, t_inv, tr, te_prep, n, esp, alpha, kc, eta, st, cen, s, jac):
    """Signal s[5] and Jacobian jac[5, 4] w.r.t. (M0, R1 [1/ms], R2 [1/ms], B1)."""
    cycle_maps(r1, b1, starts, t_inv, tr, te_prep, n, esp, alpha, kc, eta, st, cen)
    e2 = math.exp(-r2 * te_prep)
    A = st[0]
    B = st[3]
    den = 1.0 - e2 * A
    x = e2 * B / den
    dx_r = e2 * (st[4] * den + B * e2 * st[1]) / (den * den)
    dx_b = e2 * (st[5] * den + B * e2 * st[2]) / (den * den)
    dx_r2 = -te_prep * e2 * B / (den * den)
    sa = math.sin(alpha)
    f = math.sin(b1 * alpha) / sa
    df = alpha * math.cos(b1 * alpha) / sa
    for i in range(5):
        ac = cen[i, 0]
        m = ac * x + cen[i, 3]
        dm_r = cen[i, 1] * x + ac * dx_r + cen[i, 4]
        dm_b = cen[i, 2] * x + ac * dx_b + cen[i, 5]
        dm_r2 = ac * dx_r2
        s[i] = m0 * f * m
        jac[i, 0] = f * m
        jac[i, 1] = m0 * f * dm_r
        jac[i, 2] = m0 * f * dm_r2
        jac[i, 3] = m0 * (f * dm_b + df * m)


@nb.njit(cache=True)
def _signal_kernel(m0, r1, r2, b1, starts, t_inv, tr, te_prep, n, esp, alpha, kc, eta, out, jac):
    st = np.empty(6)
    cen = np.empty((5, 6))
    for v in range(m0.shape[0]):
        model_eval(
            m0[v], r1[v], r2[v], b1[v], starts, t_inv, tr, te_prep, n, esp, alpha, kc, eta,
            st, cen, out[v], jac[v],
        )  # fmt: skip


def qalas_jacobian(
    m0, t1_ms, t2_ms, b1, protocol: QalasProtocol, *, magnitude: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Signal and Jacobian for broadcastable parameter arrays (T1/T2 in ms, B1 ratio).

    Returns ``(signal, jac)``: ``param_shape + (5,)`` and ``param_shape + (5, 4)``, the
    Jacobian w.r.t. ``(M0, R1 [1/ms], R2 [1/ms], B1)``. ``magnitude=True`` returns ``|S|``
    (and the Jacobian of ``|S|``).
    """
    arrs = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (m0, t1_ms, t2_ms, b1)))
    shape = arrs[0].shape
    m0v, t1v, t2v, b1v = (np.ascontiguousarray(a.ravel()) for a in arrs)
    out = np.empty((m0v.size, N_SAMPLES))
    jac = np.empty((m0v.size, N_SAMPLES, 4))
    _signal_kernel(m0v, 1.0 / t1v, 1.0 / t2v, b1v, *protocol.kernel_args(), out, jac)
    if magnitude:
        sign = np.where(out < 0, -1.0, 1.0)
        out = out * sign
        jac = jac * sign[..., None]
    return out.reshape(shape + (N_SAMPLES,)), jac.reshape(shape + (N_SAMPLES, 4))


def qalas_signal(
    m0, t1_ms, t2_ms, b1, protocol: QalasProtocol, *, magnitude: bool = False
) -> np.ndarray:
    """Steady-state QALAS samples ``param_shape + (5,)`` (see the module docstring)."""
    return qalas_jacobian(m0, t1_ms, t2_ms, b1, protocol, magnitude=magnitude)[0]
