"""Tissue-mixture synthesis: nulled tissue rendered as the class it is, black.

Plain synthesis (:mod:`processing.synthesis`) evaluates a contrast equation on each voxel's
mono-exponential fit. Near a null that equation is steep, so the per-voxel T1 scatter of
an SNR-50 fit turns the nulled tissue into bright grain: pure CSF at ~60 % of the GM signal
in plain synthetic DIR, ~25 % in FLAIR, and WM at ~6 % in DIR, on the brain phantoms of
benchmarks/csf_null.py. Partial-volume voxels add a bright rim (physics.md section 7).

Signals mix linearly, and the segmentation (:mod:`processing.segmentation`) already unmixes
each voxel's raw samples into WM/GM/CSF fractions (plus NON, what those three do not
explain). So the share of a voxel that belongs to a tissue the contrast nulls is rendered
from that tissue's class parameters, i.e. as the conventional sequence shows it, and the
rest of the voxel from its own fit, as plain synthesis does:

    S = sum_{k nulled} f_k * PD_k * w(T1_k, T2_k)  +  (1 - sum_{k nulled} f_k) * PD * w(T1, T2)

with ``w`` the contrast's *signed* weighting; the image is ``|S|`` (a magnitude
reconstruction; PSIR stays signed). A class is "nulled" when its signal is below
:data:`NULL_FRACTION` of the brightest class's: CSF and WM (or GM) in the per-patient DIR,
CSF in FLAIR, none in T1W (then the image equals plain synthesis). Outside the
intracranial mask (no fractions) the plain per-voxel signal is used.

Why only the nulled share. Rendering every class from its parameters (the full mixture
``sum_k f_k S_k``) also removes the rim, but a lesion whose 8 samples look like GM plus a
little CSF within noise is then drawn as GM: on a phantom with long-T1/T2 lesions (1500 ms,
160 ms) the full mixture kept only 60 % of the DIR lesion/GM ratio, and a cortical lesion
would vanish into the cortex. Substituting only the nulled share keeps each voxel's own
(non-nulled) tissue as measured: 79-98 % there, with pure CSF and WM black and about half
of the plain image's error against the conventional DIR.

Class T1s are the series' measured class T1s (the median fitted T1 of nearly pure voxels,
``processing.run.class_t1_ms``): the numbers the per-patient FLAIR and DIR null, so a pure
nulled tissue is black by construction, as in a conventional sequence set up for this
patient. T2 and PD are the segmentation's reference points. The images are written as
separate series (``DIR_MIX``, ``FLAIR_MIX``) next to the plain ones.
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
    signed_weight,
)

__all__ = [
    "CLASSES",
    "NULL_FRACTION",
    "class_parameters",
    "class_signals",
    "mixture_signal",
    "nulled_classes",
    "synthesize_mixture",
]

#: The classes that can be rendered from their parameters (when the contrast nulls them).
CLASSES: tuple[str, ...] = ("WM", "GM", "CSF")
#: A class whose |signal| is below this fraction of the brightest class's counts as nulled.
NULL_FRACTION: float = 0.05


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


def class_signals(
    spec: ContrastSpec, classes: Mapping[str, Mapping[str, float]]
) -> dict[str, float]:
    """Signed signal (pu) of each pure class under ``spec`` (resolved)."""
    spec = spec.resolved()
    return {
        k: c["pd_pu"]
        * float(signed_weight(spec, np.array(1.0 / c["t1_ms"]), np.array(1.0 / c["t2_ms"])))
        for k, c in classes.items()
    }


def nulled_classes(
    spec: ContrastSpec, classes: Mapping[str, Mapping[str, float]]
) -> tuple[str, ...]:
    """The classes ``spec`` nulls: |signal| <= :data:`NULL_FRACTION` x the brightest class's."""
    sig = class_signals(spec, classes)
    top = max(abs(v) for v in sig.values())
    return tuple(k for k in CLASSES if k in sig and abs(sig[k]) <= NULL_FRACTION * top)


def mixture_signal(
    maps: QuantMaps,
    fractions: TissueFractions,
    spec: ContrastSpec,
    classes: Mapping[str, Mapping[str, float]],
) -> np.ndarray:
    """Physical signal (pu), float64 ``[z, y, x]``: each voxel's nulled-class share from the
    class parameters, the rest from its own fit (module docstring).

    maps: the fit (PD in pu). fractions: WM/GM/CSF/NON fractions and ``icmask``. spec: a
    contrast. classes: ``{class: {"t1_ms", "t2_ms", "pd_pu"}}`` (see :func:`class_parameters`).
    Magnitude contrasts return ``|S|`` (>= 0), PSIR the signed S; 0 outside maps.mask.
    """
    mask, inside = _mixture_in_mask(maps, fractions, spec, classes)
    out = np.zeros(mask.shape, np.float64)
    out[mask] = inside
    return out


def _mixture_in_mask(
    maps: QuantMaps,
    fractions: TissueFractions,
    spec: ContrastSpec,
    classes: Mapping[str, Mapping[str, float]],
) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, S[mask])`` of :func:`mixture_signal`: only the mask's voxels are computed
    and widened to float64 (outside the mask the signal is 0)."""
    spec = spec.resolved()
    mask = np.asarray(maps.mask, bool)
    if fractions.icmask.shape != mask.shape:
        raise SynthesisError(
            f"fractions shape {fractions.icmask.shape} does not match the maps {mask.shape}"
        )
    t1 = np.asarray(maps.t1_ms)[mask].astype(np.float64)
    t2 = np.asarray(maps.t2_ms)[mask].astype(np.float64)
    pd = np.asarray(maps.pd_pu)[mask].astype(np.float64)
    ok = np.isfinite(t1) & np.isfinite(t2) & np.isfinite(pd) & (t1 > 0) & (t2 > 0)
    out = np.zeros(t1.shape, np.float64)
    out[ok] = pd[ok] * signed_weight(spec, 1.0 / t1[ok], 1.0 / t2[ok])

    inside = np.asarray(fractions.icmask, bool)[mask]
    sig = class_signals(spec, classes)
    nulled = nulled_classes(spec, classes)
    if nulled:
        share = np.zeros(int(inside.sum()), np.float64)
        drawn = np.zeros_like(share)
        for k in nulled:
            f = np.asarray(fractions.fractions[k])[mask][inside].astype(np.float64)
            share += f
            drawn += f * sig[k]
        out[inside] = drawn + (1.0 - np.minimum(share, 1.0)) * out[inside]
    return mask, (out if spec.kind is ContrastKind.PSIR else np.abs(out))


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
    mask, phys = _mixture_in_mask(maps, fractions, spec, classes)
    lo, hi = (-32768.0, 32767.0) if plain.signed else (0.0, 65535.0)
    image = np.zeros(mask.shape, np.float32)  # 0 outside the mask, as rint(0 * scale)
    phys = phys * plain.scale  # then in place: the same values, one temporary
    image[mask] = np.clip(np.rint(phys, out=phys), lo, hi, out=phys)
    params = dict(plain.parameters)
    nulled = nulled_classes(spec, classes)
    params.update(
        {
            "method": "tissue mixture",
            "nulled_classes": list(nulled),
            "class_parameters": {k: dict(v) for k, v in classes.items()},
            "source_contrast": plain.name,
        }
    )
    timing = plain.description.split(plain.name, 1)[-1].strip()
    total = "sum_{k nulled} f_k PD_k w(T1_k, T2_k) + (1 - sum_{k nulled} f_k) PD w(T1, T2)"
    return replace(
        plain,
        name=f"{plain.name}_MIX",
        image=image,
        equation=(total if plain.signed else f"|{total}|")
        + f", nulled classes {'/'.join(nulled) or 'none'} of this series; w signed: "
        + plain.equation,
        description=f"SYNTHETIC {plain.name} TISSUE MIXTURE {timing}".strip(),
        parameters=params,
    )
