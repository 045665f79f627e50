"""The one canonical input: :class:`Acquisition` (MDME or 3D-QALAS).

Every vendor adapter produces one, the phantom produces one, and every fit consumes one.
Construction validates every field and names the field in the error message.

The sequence is described by ``sequence``: None means the 2D MDME acquisition described by
the legacy fields (delays, echoes, TR, flip angles); a :class:`processing.qalas.QalasProtocol`
means 3D-QALAS, whose five images sit on the delay axis (``[z, 5, 1, y, x]``; build it with
:meth:`Acquisition.from_qalas`). ``z`` is then the 3D partition axis. Fits dispatch on
:attr:`Acquisition.sequence_kind`.

Units: times in ms, angles in degrees, lengths in mm. Axes ``(z, y, x)``; the signal is
``(z, delay, echo, y, x)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Acquisition", "AcquisitionError"]


class AcquisitionError(ValueError):
    """An :class:`Acquisition` field is invalid. The message names the field."""


def _as_1d_increasing(name: str, value: Any, *, strictly: bool = True) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise AcquisitionError(f"{name}: expected a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise AcquisitionError(f"{name}: contains NaN or infinite values: {arr.tolist()}")
    if np.any(arr <= 0):
        raise AcquisitionError(f"{name}: every value must be > 0 ms, got {arr.tolist()}")
    if strictly and arr.size > 1 and np.any(np.diff(arr) <= 0):
        raise AcquisitionError(f"{name}: must be strictly increasing, got {arr.tolist()}")
    return arr


@dataclass(frozen=True, eq=False)
class Acquisition:
    """A 2D multi-dynamic multi-echo (MDME / QRAPMASTER) acquisition.

    Parameters
    ----------
    signal:
        float32 array ``[z, delay, echo, y, x]``. Real and phase-corrected (signed) when
        phase or real/imaginary images were available, else magnitude
        (``is_magnitude=True``). Arbitrary units.
    delays_ms:
        saturation-to-excitation delays TD, ``[delay]``, strictly increasing, ms.
    echo_times_ms:
        echo times TE, ``[echo]``, strictly increasing, ms.
    tr_ms:
        repetition time, ms.
    saturation_deg:
        nominal saturation flip angle theta, degrees (~120).
    excitation_deg:
        nominal excitation flip angle alpha, degrees (~90).
    voxel_size_mm:
        ``(z, y, x)`` voxel size in mm; z is the slice spacing.
    affine:
        4x4 voxel index ``(x, y, z, 1)``-to-patient (LPS, mm) matrix, DICOM convention:
        column 0 = x (column) direction * spacing, column 1 = y (row) direction * spacing,
        column 2 = slice direction * spacing, column 3 = position of voxel (z=0, y=0, x=0).
    is_magnitude:
        True when ``signal`` is a magnitude (so it cannot be negative).
    delay_source:
        where the delays came from (``"InversionTime"``, ``"phantom"``, ...), for provenance.
    metadata:
        free-form provenance (vendor, series UID, ...); never used by the numerics.
    sequence:
        None (MDME, described by the fields above) or a
        :class:`processing.qalas.QalasProtocol` (3D-QALAS; see :meth:`from_qalas`).
    """

    signal: np.ndarray
    delays_ms: np.ndarray
    echo_times_ms: np.ndarray
    tr_ms: float
    saturation_deg: float
    excitation_deg: float
    voxel_size_mm: tuple[float, float, float]
    affine: np.ndarray
    is_magnitude: bool = False
    delay_source: str = "unknown"
    metadata: dict[str, Any] = field(default_factory=dict)
    sequence: Any = None

    def __post_init__(self) -> None:
        sig = self.signal
        if not isinstance(sig, np.ndarray):
            raise AcquisitionError(f"signal: expected a numpy array, got {type(sig).__name__}")
        if sig.ndim != 5:
            raise AcquisitionError(
                f"signal: expected 5 axes [z, delay, echo, y, x], got shape {sig.shape}"
            )
        if np.iscomplexobj(sig):
            raise AcquisitionError(
                "signal: must be real (phase-corrected) or magnitude, not complex"
            )
        if sig.dtype != np.float32:
            sig = sig.astype(np.float32)
        if not np.isfinite(sig).all():
            bad = np.argwhere(~np.isfinite(sig))[0].tolist()
            raise AcquisitionError(
                f"signal: contains NaN or infinite values (first at [z, delay, echo, y, x] = {bad})"
            )
        delays = _as_1d_increasing("delays_ms", self.delays_ms)
        echoes = _as_1d_increasing("echo_times_ms", self.echo_times_ms)
        if sig.shape[1] != delays.size:
            raise AcquisitionError(
                f"delays_ms: {delays.size} delays but signal has {sig.shape[1]} on axis 1"
            )
        if sig.shape[2] != echoes.size:
            raise AcquisitionError(
                f"echo_times_ms: {echoes.size} echoes but signal has {sig.shape[2]} on axis 2"
            )
        if min(sig.shape) < 1:
            raise AcquisitionError(f"signal: empty axis in shape {sig.shape}")
        for name in ("tr_ms", "saturation_deg", "excitation_deg"):
            v = getattr(self, name)
            if v is None:
                raise AcquisitionError(f"{name}: missing")
            try:
                fv = float(v)
            except (TypeError, ValueError):
                raise AcquisitionError(f"{name}: not a number: {v!r}") from None
            if not math.isfinite(fv) or fv <= 0:
                raise AcquisitionError(f"{name}: must be a finite number > 0, got {v!r}")
            object.__setattr__(self, name, fv)
        if self.saturation_deg >= 180.0 or self.excitation_deg >= 180.0:
            raise AcquisitionError(
                "saturation_deg/excitation_deg: flip angles must be below 180 degrees, got "
                f"{self.saturation_deg}/{self.excitation_deg}"
            )
        if delays[-1] >= self.tr_ms:
            raise AcquisitionError(
                f"delays_ms: the longest delay {delays[-1]} ms must be shorter than tr_ms {self.tr_ms}"
            )
        vs = np.asarray(self.voxel_size_mm, dtype=np.float64)
        if vs.shape != (3,) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
            raise AcquisitionError(
                f"voxel_size_mm: expected 3 positive finite values (z, y, x), got {self.voxel_size_mm!r}"
            )
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
            raise AcquisitionError(f"affine: expected a finite 4x4 matrix, got shape {aff.shape}")
        if abs(np.linalg.det(aff[:3, :3])) < 1e-9:
            raise AcquisitionError("affine: the 3x3 part is singular")
        if self.is_magnitude and float(sig.min()) < 0:
            raise AcquisitionError("signal: is_magnitude=True but the signal has negative values")
        if self.sequence is not None:
            self._check_sequence(sig, delays)
        sig.setflags(write=False)
        delays.setflags(write=False)
        echoes.setflags(write=False)
        aff.setflags(write=False)
        object.__setattr__(self, "signal", sig)
        object.__setattr__(self, "delays_ms", delays)
        object.__setattr__(self, "echo_times_ms", echoes)
        object.__setattr__(self, "voxel_size_mm", tuple(float(v) for v in vs))
        object.__setattr__(self, "affine", aff)
        object.__setattr__(self, "is_magnitude", bool(self.is_magnitude))
        object.__setattr__(self, "metadata", dict(self.metadata))

    def _check_sequence(self, sig: np.ndarray, delays: np.ndarray) -> None:
        from processing.qalas import N_SAMPLES, QalasProtocol

        seq = self.sequence
        if not isinstance(seq, QalasProtocol):
            raise AcquisitionError(
                f"sequence: expected None (MDME) or a QalasProtocol, got {type(seq).__name__}"
            )
        if sig.shape[1] != N_SAMPLES or sig.shape[2] != 1:
            raise AcquisitionError(
                f"signal: a 3D-QALAS acquisition has {N_SAMPLES} images and one echo "
                f"([z, {N_SAMPLES}, 1, y, x]), got shape {sig.shape}"
            )
        if not np.allclose(delays, seq.sample_times_ms(), rtol=0, atol=1e-6):
            raise AcquisitionError(
                f"delays_ms: {delays.tolist()} disagree with the QALAS protocol's sample times "
                f"{seq.sample_times_ms().tolist()} (build it with Acquisition.from_qalas)"
            )

    @classmethod
    def from_qalas(
        cls,
        signal: np.ndarray,
        protocol: Any,
        voxel_size_mm: tuple[float, float, float],
        affine: np.ndarray,
        *,
        is_magnitude: bool = False,
        metadata: dict[str, Any] | None = None,
        delay_source: str | None = None,
    ) -> Acquisition:
        """A 3D-QALAS acquisition from ``signal`` ``[z, 5, y, x]`` (or ``[z, 5, 1, y, x]``).

        The legacy MDME fields are filled so that generic code keeps working: ``delays_ms``
        = each image's k-space-centre time from the T2-prep start, ``echo_times_ms`` = the
        gradient-echo TE, ``tr_ms`` = the cycle length, ``saturation_deg`` = 90 (the
        T2-prep's tip angle), ``excitation_deg`` = the readout flip.
        """
        sig = np.asarray(signal)
        if sig.ndim == 4:
            sig = sig[:, :, None]
        return cls(
            signal=sig,
            delays_ms=protocol.sample_times_ms(),
            echo_times_ms=np.array([protocol.echo_time_ms]),
            tr_ms=protocol.tr_ms,
            saturation_deg=90.0,
            excitation_deg=protocol.flip_deg,
            voxel_size_mm=voxel_size_mm,
            affine=affine,
            is_magnitude=is_magnitude,
            delay_source=delay_source or protocol.source,
            metadata=dict(metadata or {}),
            sequence=protocol,
        )

    @property
    def sequence_kind(self) -> str:
        """``"MDME"`` or ``"QALAS"``."""
        return "MDME" if self.sequence is None else "QALAS"

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled arrays (a worker process, Dask) come back writeable. Freeze them as the
        # constructor does: numba compiles a separate specialization for writeable arrays,
        # which the worker's warm-up (on read-only ones) would not have covered, and the
        # first series would pay ~18 s of compilation.
        object.__setattr__(self, "sequence", None)  # pickles from before the field existed
        for key, value in state.items():
            object.__setattr__(self, key, value)
        for name in ("signal", "delays_ms", "echo_times_ms", "affine"):
            arr = getattr(self, name, None)
            if isinstance(arr, np.ndarray) and arr.flags.writeable:
                arr.setflags(write=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image grid ``(z, y, x)``."""
        s = self.signal.shape
        return (s[0], s[3], s[4])

    @property
    def n_delays(self) -> int:
        return int(self.signal.shape[1])

    @property
    def n_echoes(self) -> int:
        return int(self.signal.shape[2])

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (1 mL = 1000 mm^3)."""
        z, y, x = self.voxel_size_mm
        return z * y * x / 1000.0

    def masked_samples(self, mask: np.ndarray) -> np.ndarray:
        """``samples()[mask]``: ``[voxel, delay*echo]`` float32 rows of the voxels in the
        boolean ``mask [z, y, x]`` in flat C order, gathered one slice at a time, so no
        whole transposed copy of the signal is made (336 MB at 40 x 512 x 512)."""
        nz, nd, ne, ny, nx = self.signal.shape
        mask = np.asarray(mask, bool)
        if mask.shape != (nz, ny, nx):
            raise ValueError(f"mask: expected shape {(nz, ny, nx)}, got {mask.shape}")
        out = np.empty((int(np.count_nonzero(mask)), nd * ne), np.float32)
        at = 0
        for z in range(nz):
            sel = mask[z].ravel()
            m = int(np.count_nonzero(sel))
            if m:
                out[at : at + m] = self.signal[z].reshape(nd * ne, ny * nx)[:, sel].T
            at += m
        return out

    def samples(self) -> np.ndarray:
        """Signal as ``[z, y, x, delay*echo]`` (delay-major), float32, C-contiguous, a new
        writable array (never a view of the read-only signal: numba compiles read-only and
        writable arrays separately, and a (1, 1, 1) grid would otherwise hit a kernel
        specialization that start-up warming never compiled)."""
        z, d, e, y, x = self.signal.shape
        out = np.ascontiguousarray(self.signal.transpose(0, 3, 4, 1, 2).reshape(z, y, x, d * e))
        return out if out.flags.writeable else out.copy()
