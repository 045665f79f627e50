"""Tissue-mixture synthesis: the conventional image of each voxel's estimated tissue mix.

Plain synthesis (:mod:`processing.synthesis`) evaluates a contrast equation on each voxel's
mono-exponential fit. That fails in two ways exactly where inversion contrasts matter
(physics.md section 7):

* partial volume: a WM+CSF voxel's fitted T1 lands far from both nulls, so it comes out
  brighter than either tissue (the FLAIR/DIR rim);
* noise: near a null the equation is steep, so the per-voxel T1 scatter of an SNR-50 fit
  turns the nulled tissue into bright grain (pure CSF at ~60 % of the GM signal in plain
  synthetic DIR, ~25 % in FLAIR, on the brain phantoms of benchmarks/csf_null.py).

Signals mix linearly, and a conventional acquisition measures the mixture of its tissues'
signals. The segmentation (:mod:`processing.segmentation`) already unmixes each voxel's
raw samples into WM/GM/CSF fractions against the series' own tissue reference points, with
a fourth NON class for what those three do not explain (lesions, ...). So, per voxel,

    S = sum_{k in WM, GM, CSF} f_k * PD_k * w(T1_k, T2_k)  +  f_NON * PD * w(T1, T2)

with ``w`` the contrast's *signed* weighting (the magnitude is taken of the sum, as a
magnitude reconstruction does; PSIR stays signed), ``(T1_k, T2_k, PD_k)`` the class
parameters of this series and ``(T1, T2, PD)`` the voxel's own fit for the NON share.
Outside the intracranial mask (scalp, where there are no fractions) the plain per-voxel
signal is used.

Class T1s are the series' measured class T1s (the median fitted T1 of nearly pure voxels,
``processing.run.class_t1_ms``): the numbers the per-patient FLAIR and DIR null, so a pure
nulled tissue is black by construction, as in a conventional sequence set up for this
patient. T2 and PD are the segmentation's reference points, the ones its fractions were
computed with.

What it is not: a noise-free picture of everything. Within-class variation smaller than
the noise is not shown (a WM voxel is rendered as the series' WM); tissue the three classes
explain poorly is shown through the NON share, i.e. as plain synthesis. The images are
written as separate series (``FLAIR_MIX``, ``DIR_MIX``) next to the plain ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from processing.results import QuantMaps, SyntheticImage, TissueFractions
from processing.synthesis import (
    ContrastKind,
    ContrastSpec,
    SynthesisError,
    dir_weight,
    ir_weight,
    se_weight,
)

__all__ = ["CLASSES", "class_parameters", "mixture_signal", "synthesize_mixture"]

#: The classes rendered from their parameters; NON is rendered from the voxel's own fit.
CLASSES: tuple[str, ...] = ("WM", "GM", "CSF")
#: NON fraction from which a voxel is rendered from its own fit alone (linear blend below).
NON_FULL_WEIGHT: float = 0.5


def _signed_weight(spec: ContrastSpec, r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """The contrast's weighting per unit PD *before* any magnitude (1/ms rates)."""
    if spec.kind is ContrastKind.SE:
        return se_weight(r1, r2, spec.tr_ms, spec.te_ms)
    if spec.kind in (ContrastKind.IR, ContrastKind.PSIR):
        return ir_weight(r1, r2, spec.tr_ms, spec.te_ms, spec.ti_ms, signed=True)  # type: ignore[arg-type]
    return dir_weight(r1, r2, spec.tr_ms, spec.te_ms, spec.ti_ms, spec.ti2_ms, signed=True)  # type: ignore[arg-type]


def class_parameters(
    centres: Mapping[str, Mapping[str, float]],
) -> dict[str, dict[str, float]]:
    """``{class: {"t1_ms", "t2_ms", "pd_pu"}}`` for WM/GM/CSF from the pipeline's centres.

    T1 is the measured class T1 (``class_t1_ms``) where present, else the reference point's
    ``t1_ms``. Raises :class:`SynthesisError` naming a class that is missing or not finite.
    """
    out: dict[str, dict[str, float]] = {}
    for k in CLASSES:
        c = centres.get(k)
        if not c:
            raise SynthesisError(f"tissue-mixture synthesis: no parameters for {k}")
        p = {
            "t1_ms": float(c.get("class_t1_ms", c.get("t1_ms", np.nan))),
            "t2_ms": float(c.get("t2_ms", np.nan)),
            "pd_pu": float(c.get("pd_pu", np.nan)),
        }
        if not all(np.isfinite(v) and v > 0 for v in p.values()):
            raise SynthesisError(f"tissue-mixture synthesis: {k} parameters not usable: {p}")
        out[k] = p
    return out


def mixture_signal(
    maps: QuantMaps,
    fractions: TissueFractions,
    spec: ContrastSpec,
    classes: Mapping[str, Mapping[str, float]],
) -> np.ndarray:
    """Physical signal (pu) of each voxel's estimated tissue mixture, float64 ``[z, y, x]``.

    maps: the fit (PD in pu; used for the NON share and outside the intracranial mask).
    fractions: WM/GM/CSF/NON fractions and ``icmask``. spec: a resolved contrast.
    classes: ``{class: {"t1_ms", "t2_ms", "pd_pu"}}`` (see :func:`class_parameters`).
    Magnitude contrasts return ``|sum|`` (>= 0), PSIR the signed sum; 0 outside maps.mask.
    """
    spec = spec.resolved()
    mask = np.asarray(maps.mask, bool)
    if fractions.icmask.shape != mask.shape:
        raise SynthesisError(
            f"fractions shape {fractions.icmask.shape} does not match the maps {mask.shape}"
        )
    t1 = np.asarray(maps.t1_ms, np.float64)
    t2 = np.asarray(maps.t2_ms, np.float64)
    pd = np.asarray(maps.pd_pu, np.float64)
    ok = mask & np.isfinite(t1) & np.isfinite(t2) & np.isfinite(pd) & (t1 > 0) & (t2 > 0)
    own = np.zeros(mask.shape, np.float64)
    own[ok] = pd[ok] * _signed_weight(spec, 1.0 / t1[ok], 1.0 / t2[ok])

    inside = mask & np.asarray(fractions.icmask, bool)
    mix = np.zeros(int(inside.sum()), np.float64)
    for k in CLASSES:
        c = classes[k]
        w = float(_signed_weight(spec, np.array(1.0 / c["t1_ms"]), np.array(1.0 / c["t2_ms"])))
        mix += np.asarray(fractions.fractions[k], np.float64)[inside] * c["pd_pu"] * w
    non = fractions.fractions.get("NON")
    f_non = np.zeros_like(mix) if non is None else np.asarray(non, np.float64)[inside]
    # Where the classes do not explain the samples (NON, i.e. lesions) the reader needs the
    # voxel's own tissue: lean on its fit, fully from NON_FULL_WEIGHT on.
    alpha = np.minimum(f_non / NON_FULL_WEIGHT, 1.0)
    out = own.copy()
    out[inside] = (1.0 - alpha) * (mix + f_non * own[inside]) + alpha * own[inside]
    return out if spec.kind is ContrastKind.PSIR else np.abs(out)


def synthesize_mixture(
    maps: QuantMaps,
    fractions: TissueFractions,
    plain: SyntheticImage,
    classes: Mapping[str, Mapping[str, float]],
) -> SyntheticImage:
    """The tissue-mixture version of the plain synthetic image ``plain``: same equation,
    timing and integer scale (the two series compare pixel for pixel), named
    ``"<name>_MIX"``. classes: see :func:`class_parameters`.
    """
    spec = ContrastSpec(
        plain.name, ContrastKind(plain.kind), plain.tr_ms, plain.te_ms, plain.ti_ms, plain.ti2_ms
    )
    phys = mixture_signal(maps, fractions, spec, classes)
    lo, hi = (-32768.0, 32767.0) if plain.signed else (0.0, 65535.0)
    image = np.clip(np.rint(phys * plain.scale), lo, hi).astype(np.float32)
    params = dict(plain.parameters)
    params.update(
        {
            "method": "tissue mixture",
            "class_parameters": {k: dict(v) for k, v in classes.items()},
            "source_contrast": plain.name,
        }
    )
    timing = plain.description.split(plain.name, 1)[-1].strip()
    total = "sum_k f_k PD_k w(T1_k, T2_k) + f_NON PD w(T1, T2)"
    return replace(
        plain,
        name=f"{plain.name}_MIX",
        image=image,
        equation=(total if plain.signed else f"|{total}|")
        + f" over the series' WM, GM, CSF classes; w signed: {plain.equation}",
        description=f"SYNTHETIC {plain.name} TISSUE MIXTURE {timing}".strip(),
        parameters=params,
    )
