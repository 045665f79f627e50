"""Reference Bloch simulation of the 3D-QALAS cycle, to check :mod:`processing.qalas`.

Independent of the steady-state model: it shares no code with it, walks a time-ordered list
of every RF event of the cycle (the T2-prep's hard pulses, every readout pulse, the
inversion) and applies 3x3 rotations and exact Bloch relaxation to the full magnetization
vector ``(Mx, My, Mz)`` of one on-resonance isochromat per parameter set, cycle after cycle
from thermal equilibrium. The T2-prep is 90x - TE/4 - 180y - TE/2 - 180y - TE/4 - (-90x), a
crusher after it and after the inversion; spoiling after each readout pulse interval is ideal
(transverse magnetization set to 0), which is what the model assumes (``QALAS.md``).

The sample of block i is the transverse magnetization right after its k-space-centre pulse
(signed: ``-My``, the pulse being about x), divided by ``sin(alpha)`` (the model's
normalization).

Slow by design (a Python loop over events, vectorized over parameter sets); for tests only.
"""

from __future__ import annotations

import math

import numpy as np

from processing.qalas import QalasProtocol

__all__ = ["bloch_qalas"]


def _rot_x(angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    z, o = np.zeros_like(c), np.ones_like(c)
    return np.stack(
        [np.stack([o, z, z], -1), np.stack([z, c, -s], -1), np.stack([z, s, c], -1)], -2
    )


def _rot_y(angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    z, o = np.zeros_like(c), np.ones_like(c)
    return np.stack(
        [np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2
    )


def bloch_qalas(
    t1_ms: np.ndarray,
    t2_ms: np.ndarray,
    b1: np.ndarray,
    protocol: QalasProtocol,
    *,
    n_cycles: int = 40,
    return_history: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Samples ``[n, 5]`` (per unit M0) of the last of ``n_cycles`` cycles from equilibrium.

    ``return_history=True`` also returns ``[n_cycles, n, 5]``: the samples of every cycle.
    """
    t1 = np.atleast_1d(np.asarray(t1_ms, np.float64))
    t2 = np.atleast_1d(np.asarray(t2_ms, np.float64))
    b1v = np.atleast_1d(np.asarray(b1, np.float64))
    t1, t2, b1v = np.broadcast_arrays(t1, t2, b1v)
    n = t1.size
    alpha = math.radians(protocol.flip_deg)
    # Event list: (time, kind, argument).
    events: list[tuple[float, str, int]] = []
    te = protocol.t2prep_ms
    events += [(0.0, "prep90", 0), (te / 4, "prep180", 0), (3 * te / 4, "prep180", 0)]
    events += [(te, "prep_up", 0)]
    events.append((protocol.inversion_ms, "inv", 0))
    for i, t0 in enumerate(protocol.block_starts_ms):
        for k in range(protocol.n_pulses):
            t = t0 + k * protocol.pulse_spacing_ms
            events.append((t, "read_centre" if k == protocol.centre_index else "read", i))
    events.sort(key=lambda e: e[0])
    r90 = _rot_x(np.full(n, math.pi / 2))
    r90m = _rot_x(np.full(n, -math.pi / 2))
    r180y = _rot_y(np.full(n, math.pi))
    r_inv = _rot_x(np.full(n, math.acos(-protocol.inversion_efficiency)))
    r_read = _rot_x(b1v * alpha)

    m = np.zeros((n, 3))
    m[:, 2] = 1.0
    history = np.zeros((n_cycles, n, 5))

    def relax(m: np.ndarray, dt: float) -> np.ndarray:
        if dt <= 0:
            return m
        e1 = np.exp(-dt / t1)
        e2 = np.exp(-dt / t2)
        return np.stack([m[:, 0] * e2, m[:, 1] * e2, 1.0 + (m[:, 2] - 1.0) * e1], -1)

    def rotate(rot: np.ndarray, m: np.ndarray) -> np.ndarray:
        return np.einsum("nij,nj->ni", rot, m)

    for cyc in range(n_cycles):
        t = 0.0
        for t_ev, kind, arg in events:
            m = relax(m, t_ev - t)
            t = t_ev
            if kind.startswith("read"):
                # Ideal spoiling: the previous pulse's transverse magnetization is gone.
                m[:, :2] = 0.0
                m = rotate(r_read, m)
                if kind == "read_centre":
                    # Rotation about x maps Mz to My = -sin * Mz: -My keeps Mz's sign.
                    history[cyc, :, arg] = -m[:, 1] / math.sin(alpha)
            elif kind == "prep90":
                m[:, :2] = 0.0  # whatever a previous readout left is spoiled first
                m = rotate(r90, m)
            elif kind == "prep180":
                m = rotate(r180y, m)
            elif kind == "prep_up":
                m = rotate(r90m, m)
                m[:, :2] = 0.0  # crusher
            elif kind == "inv":
                m[:, :2] = 0.0
                m = rotate(r_inv, m)
                m[:, :2] = 0.0  # crusher
        m[:, :2] = 0.0
        m = relax(m, protocol.tr_ms - t)
    return (history[-1], history) if return_history else history[-1]
