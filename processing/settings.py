"""Every parameter of :func:`processing.run.run`, as plain frozen dataclasses.

Light on purpose (no numerics imported): :mod:`dicom_node.config` types the ``[processing]``
TOML table with :class:`ProcessingSettings` when the configuration is loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ContrastOverride", "ProcessingSettings"]


@dataclass(frozen=True)
class ContrastOverride:
    """Override of a synthesis preset's timing (ms); None keeps the preset's value."""

    tr_ms: float | None = None
    te_ms: float | None = None
    ti_ms: float | None = None
    ti2_ms: float | None = None


@dataclass(frozen=True)
class ProcessingSettings:
    """Every parameter of :func:`run`. Recorded verbatim in the result's provenance.

    contrasts: preset names to synthesize (see processing.synthesis.PRESETS).
    overrides: preset name -> timing override.
    b1_smoothing: run the second fit pass with a smoothed, fixed B1.
    b1_smoothing_fwhm_mm: FWHM of the in-plane Gaussian used to smooth B1, mm.
    slice_profile: model the slice profile with isochromats ("ideal" or "gaussian").
    segmentation / myelin / enhance: enable the optional stages.
    dir_null: per-patient DIR nulls "WM" (default, lesion/GM conspicuity) or "GM".
    model_path: ONNX FLAIR model (None = the shipped model).
    onnx_threads: intra-op threads for onnxruntime.
    seg_output: "FRACTIONAL" or "BINARY" (export choice, recorded here for provenance).
    per_patient_flair: FLAIR and T1-FLAIR null the series' measured CSF T1 (else 4300 ms).
    mixture_contrasts: synthesized contrasts also rendered with each voxel's nulled-tissue
    share drawn as that tissue (processing.mixture), as ``"<name>_MIX"``; needs the
    segmentation. Default: the per-patient DIR, whose nulled CSF and WM plain synthesis
    shows as grain at clinical SNR. FLAIR is opt-in: its mixture image keeps CSF black but
    dims lesions that look like GM + a little CSF (lesion-to-WM contrast 55-99 % on the
    phantoms of benchmarks/csf_null.py); FLAIR_AI is the default fix there.
    """

    contrasts: tuple[str, ...] = (
        "T1W",
        "T2W",
        "PDW",
        "FLAIR",
        "T1FLAIR",
        "STIR",
        "PSIR",
        "DIR",
    )
    overrides: dict[str, ContrastOverride] = field(default_factory=dict)
    b1_smoothing: bool = True
    b1_smoothing_fwhm_mm: float = 20.0
    slice_profile: str = "ideal"
    segmentation: bool = True
    myelin: bool = True
    enhance: bool = True
    dir_null: str = "WM"
    model_path: str | None = None
    onnx_threads: int = 1
    seg_output: str = "FRACTIONAL"
    per_patient_flair: bool = True
    mixture_contrasts: tuple[str, ...] = ("DIR",)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["contrasts"] = list(self.contrasts)
        return d
