"""Result containers shared by every processing stage and by the export layer.

Pure data: numpy arrays with documented shapes and units, no behaviour beyond
convenience accessors. Arrays are float32 ``[z, y, x]`` unless stated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "TISSUES",
    "MyelinMaps",
    "QuantMaps",
    "SeriesResult",
    "SyntheticImage",
    "TissueFractions",
]

#: Tissue classes of the partial-volume segmentation, in this order everywhere.
TISSUES: tuple[str, ...] = ("WM", "GM", "CSF", "NON")


@dataclass
class QuantMaps:
    """Per-voxel quantitative maps, float32 ``[z, y, x]``.

    t1_ms, t2_ms: relaxation times in ms. pd_pu: proton density in percent units (pure
    water = 100), NaN-free, 0 outside ``mask``; filled by :mod:`processing.pd` (the fit
    leaves it equal to ``m0`` scaled so that it is at least finite). b1: flip-angle ratio
    (actual/nominal). m0: fitted equilibrium signal (receive field x PD, scanner units).
    residual: root-mean-square fit residual per sample, in signal units. mask: voxels
    fitted. failed: voxels whose fit did not converge or hit a bound (subset of mask).
    """

    t1_ms: np.ndarray
    t2_ms: np.ndarray
    pd_pu: np.ndarray
    b1: np.ndarray
    m0: np.ndarray
    residual: np.ndarray
    mask: np.ndarray
    failed: np.ndarray
    noise_sd: float = float("nan")  # estimated noise SD per sample (signal units)
    receive_field: np.ndarray | None = None  # C(r) from processing.pd, [z, y, x]

    @property
    def r1_per_s(self) -> np.ndarray:
        """R1 = 1000/T1 in 1/s (0 outside the mask)."""
        with np.errstate(divide="ignore"):
            return np.where(self.mask, 1000.0 / self.t1_ms, 0.0).astype(np.float32)

    @property
    def r2_per_s(self) -> np.ndarray:
        """R2 = 1000/T2 in 1/s (0 outside the mask)."""
        with np.errstate(divide="ignore"):
            return np.where(self.mask, 1000.0 / self.t2_ms, 0.0).astype(np.float32)


@dataclass
class SyntheticImage:
    """A synthesized contrast.

    image: float32 ``[z, y, x]``, already scaled for 16-bit storage (0..65535 for
    magnitude contrasts; PSIR is signed, -32768..32767). name: preset name (``"FLAIR"``).
    kind: equation family (``"SE"``, ``"IR"``, ``"PSIR"``, ``"DIR"``). tr_ms, te_ms, ti_ms,
    ti2_ms: the synthetic timing (ti2 only for DIR; None where not applicable).
    scale: factor applied to the physical signal (PD pu x relaxation weighting) to get
    ``image``; the same for every slice. equation: human-readable equation used.
    window_center / window_width: a sensible display window. ai_enhanced: produced by the
    ONNX FLAIR network. description: e.g. ``"SYNTHETIC FLAIR TR15000 TE100 TI2850"``.
    """

    name: str
    kind: str
    image: np.ndarray
    tr_ms: float
    te_ms: float
    ti_ms: float | None = None
    ti2_ms: float | None = None
    scale: float = 1.0
    equation: str = ""
    window_center: float = 0.0
    window_width: float = 1.0
    signed: bool = False
    ai_enhanced: bool = False
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class TissueFractions:
    """Partial-volume fractions per voxel, float32 ``[z, y, x]`` each, in [0, 1].

    ``fractions[t]`` for t in :data:`TISSUES`; they sum to 1 inside ``icmask`` and are 0
    outside. icmask: boolean intracranial mask. centres: tissue reference points used
    (``{"WM": {"t1_ms":..., "t2_ms":..., "pd_pu":...}, ...}``).
    """

    fractions: dict[str, np.ndarray]
    icmask: np.ndarray
    centres: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class MyelinMaps:
    """Myelin model outputs, float32 ``[z, y, x]`` in percent of voxel volume.

    mypv: myelin partial volume. epw: excess parenchymal water partial volume.
    myelin_volume_ml / epw_volume_ml: integrals over the intracranial mask.
    constants: the compartment constants used (documented in processing.myelin).
    calibration_warnings: why the series' pure WM or GM lies outside the tissue values the
    constants were calibrated on (processing.myelin.CALIBRATION_DOMAIN); empty when inside
    or when no segmentation was given to check with.
    """

    mypv: np.ndarray
    epw: np.ndarray
    myelin_volume_ml: float
    epw_volume_ml: float
    constants: dict[str, Any] = field(default_factory=dict)
    calibration_warnings: list[str] = field(default_factory=list)


@dataclass
class SeriesResult:
    """Everything :func:`processing.run.run` computed for one series.

    maps: the quantitative maps. synthetic: contrast name -> image (ordered as
    configured; ``"FLAIR_AI"`` holds the enhanced FLAIR when the model ran).
    segmentation / myelin: None when disabled or failed. volumes_ml: ``WM, GM, CSF, NON,
    BPV, ICV, MYELIN`` in mL and ``BPF`` (a fraction, 0..1). tissue_stats: per tissue
    ``{"t1_ms", "t2_ms", "pd_pu"}`` means over pure voxels. qc: fit-quality figures and
    flags. dir_parameters: the per-patient DIR timing and the T1s it nulled.
    provenance: software version, every parameter used, model sha256, delay source.
    timings_s: stage -> seconds. warnings: non-fatal problems (e.g. model missing).
    phantom_qc / phantom_rois: set instead of segmentation and synthesis for a phantom.
    """

    shape: tuple[int, int, int]
    voxel_size_mm: tuple[float, float, float]
    affine: np.ndarray
    maps: QuantMaps
    synthetic: dict[str, SyntheticImage] = field(default_factory=dict)
    segmentation: TissueFractions | None = None
    myelin: MyelinMaps | None = None
    volumes_ml: dict[str, float] = field(default_factory=dict)
    tissue_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    qc: dict[str, Any] = field(default_factory=dict)
    dir_parameters: dict[str, float | str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: phantom series only (processing.phantom_qc): the phantom_qc.json report and the
    #: int16 ``[z, y, x]`` sphere ROI labels (1-based sphere number, 0 elsewhere)
    phantom_qc: dict[str, Any] | None = None
    phantom_rois: np.ndarray | None = None
