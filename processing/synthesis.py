"""Synthetic contrasts from quantitative maps (physics.md section 3).

Every contrast is ``PD * w(R1, R2)`` with E(t) = exp(-t*R1) and a per-unit-PD weighting:

    spin echo (T1W, T2W, PDW)        (1 - E(TR)) * exp(-TE*R2)
    inversion recovery, magnitude    |1 - 2E(TI) + E(TR)| * exp(-TE*R2)      (FLAIR, T1FLAIR, STIR)
    PSIR (signed)                    (1 - 2E(TI) + E(TR)) * exp(-TE*R2)
    DIR, TI1 > TI2, both to exc.     |1 - 2E(TI2) + 2E(TI1) - E(TR)| * exp(-TE*R2)

(ideal 90/180 pulses, TE << TR; derived from the Bloch steady state.)

Inversion times that null a tissue are computed, not typed: :func:`ti_null` for one tissue,
:func:`dir_times` for two (DIR). Presets carry the T1s they null, so overriding TR keeps
the null (the TI is recomputed) unless TI is overridden too.

Image scale: the physical signal (pu) is multiplied by ONE factor for the whole volume,
chosen so that the 99.5th percentile of |signal| inside the mask maps to 16000 (a quarter
of the unsigned 16-bit range, half of the signed range: headroom for the brightest 0.5 %
before clipping). ``SyntheticImage.scale`` records it, so ``image / scale`` is back in pu.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import brentq
from scipy.signal import find_peaks

from processing.results import QuantMaps, SyntheticImage

__all__ = [
    "CSF_T1_MS",
    "FAT_T1_MS",
    "PRESETS",
    "WM_T1_MS",
    "ContrastKind",
    "ContrastSpec",
    "DirTiming",
    "SynthesisError",
    "dir_times",
    "dir_weight",
    "ir_weight",
    "per_patient_dir",
    "physical_signals_in_mask",
    "resolve_spec",
    "se_weight",
    "signed_weight",
    "synthesize",
    "synthesize_all",
    "ti_null",
    "tissue_t1_from_histogram",
]

#: T1 of CSF at 3T used to null it (ms): physics.md sections 3 and 6 (3500-4500).
CSF_T1_MS: float = 4300.0
#: T1 of fat at 3T (ms), physics.md section 3 (~380 ms -> STIR TI ~260 ms) [L].
FAT_T1_MS: float = 380.0
#: T1 of WM at 3T MDME (ms), physics.md section 6 (550-650), for the default DIR.
WM_T1_MS: float = 600.0
#: GM T1 (ms), cortical, physics.md section 6 (950-1300); the histogram fallback.
GM_T1_MS: float = 1100.0
#: |signal| percentile (inside the mask) mapped to IMAGE_TARGET.
SCALE_PERCENTILE: float = 99.5
IMAGE_TARGET: float = 16000.0


class SynthesisError(ValueError):
    """A contrast specification or the maps are unusable (the message says which)."""


class ContrastKind(StrEnum):
    """Equation family of a contrast."""

    SE = "SE"
    IR = "IR"
    PSIR = "PSIR"
    DIR = "DIR"


EQUATIONS: dict[ContrastKind, str] = {
    ContrastKind.SE: "S = PD * (1 - exp(-TR/T1)) * exp(-TE/T2)",
    ContrastKind.IR: "S = PD * |1 - 2 exp(-TI/T1) + exp(-TR/T1)| * exp(-TE/T2)",
    ContrastKind.PSIR: "S = PD * (1 - 2 exp(-TI/T1) + exp(-TR/T1)) * exp(-TE/T2)",
    ContrastKind.DIR: (
        "S = PD * |1 - 2 exp(-TI2/T1) + 2 exp(-TI1/T1) - exp(-TR/T1)| * exp(-TE/T2)"
    ),
}


# --------------------------------------------------------------------------------------
# weightings (per unit PD); R1, R2 in 1/ms, times in ms


def se_weight(r1: np.ndarray, r2: np.ndarray, tr_ms: float, te_ms: float) -> np.ndarray:
    """Spin echo: ``(1 - E(TR)) * exp(-TE*R2)`` (R1, R2 in 1/ms)."""
    return (1.0 - np.exp(-tr_ms * r1)) * np.exp(-te_ms * r2)


def ir_weight(
    r1: np.ndarray,
    r2: np.ndarray,
    tr_ms: float,
    te_ms: float,
    ti_ms: float,
    *,
    signed: bool = False,
) -> np.ndarray:
    """Inversion recovery: ``(1 - 2E(TI) + E(TR)) * exp(-TE*R2)``; magnitude unless signed."""
    mz = 1.0 - 2.0 * np.exp(-ti_ms * r1) + np.exp(-tr_ms * r1)
    return (mz if signed else np.abs(mz)) * np.exp(-te_ms * r2)


def dir_weight(
    r1: np.ndarray,
    r2: np.ndarray,
    tr_ms: float,
    te_ms: float,
    ti1_ms: float,
    ti2_ms: float,
    *,
    signed: bool = False,
) -> np.ndarray:
    """Double inversion recovery (TI1 > TI2, both to excitation); magnitude unless signed."""
    mz = 1.0 - 2.0 * np.exp(-ti2_ms * r1) + 2.0 * np.exp(-ti1_ms * r1) - np.exp(-tr_ms * r1)
    return (mz if signed else np.abs(mz)) * np.exp(-te_ms * r2)


# --------------------------------------------------------------------------------------
# nulling


def ti_null(t1_ms: float, tr_ms: float) -> float:
    """Inversion time (ms) that nulls a tissue of ``t1_ms``: ``T1 * ln[2 / (1 + exp(-TR/T1))]``."""
    if not (t1_ms > 0 and tr_ms > 0):
        raise SynthesisError(f"ti_null: T1 and TR must be > 0 ms, got T1={t1_ms}, TR={tr_ms}")
    return float(t1_ms * math.log(2.0 / (1.0 + math.exp(-tr_ms / t1_ms))))


def _ti2_for_null(ti1_ms: float, t1_ms: float, tr_ms: float) -> float:
    """TI2 nulling ``t1_ms`` for a given TI1 (closed form, physics.md section 3)."""
    arg = math.exp(-ti1_ms / t1_ms) + (1.0 - math.exp(-tr_ms / t1_ms)) / 2.0
    return -t1_ms * math.log(arg)


def dir_times(t1_null_a_ms: float, t1_null_b_ms: float, tr_ms: float) -> tuple[float, float]:
    """DIR inversion times ``(TI1, TI2)`` (ms, TI1 > TI2) nulling two tissues.

    ``t1_null_a_ms`` is the long T1 (CSF): for each TI1 the TI2 that nulls it is closed
    form; a 1-D root search on TI1 then nulls ``t1_null_b_ms`` (WM or GM). CSF 4300, WM 600,
    TR 15000 -> (3693, 413).
    """
    ta, tb = float(t1_null_a_ms), float(t1_null_b_ms)
    if not (ta > 0 and tb > 0 and tr_ms > 0):
        raise SynthesisError(f"dir_times: T1s and TR must be > 0 ms, got {ta}, {tb}, {tr_ms}")
    if tb >= ta:
        raise SynthesisError(
            f"dir_times: the first T1 ({ta} ms, e.g. CSF) must be longer than the second ({tb} ms)"
        )

    def residual(ti1: float) -> float:
        ti2 = _ti2_for_null(ti1, ta, tr_ms)
        return 1.0 - 2.0 * math.exp(-ti2 / tb) + 2.0 * math.exp(-ti1 / tb) - math.exp(-tr_ms / tb)

    # TI2 exists (>0) only for TI1 above the single-inversion null of tissue a.
    lo = ti_null(ta, tr_ms) + 1e-6
    grid = np.linspace(lo, tr_ms - 1e-6, 2000)
    vals = np.array([residual(t) for t in grid])
    sign = np.flatnonzero(np.sign(vals[:-1]) * np.sign(vals[1:]) <= 0)
    if sign.size == 0:
        raise SynthesisError(f"dir_times: no TI1 < TR={tr_ms} ms nulls both T1 {ta} and {tb} ms")
    i = int(sign[0])
    ti1 = float(brentq(residual, grid[i], grid[i + 1], xtol=1e-6))
    return ti1, float(_ti2_for_null(ti1, ta, tr_ms))


# --------------------------------------------------------------------------------------
# contrast specifications


@dataclass(frozen=True)
class ContrastSpec:
    """A synthetic contrast: equation family and timing (ms).

    ``ti_ms`` / ``ti2_ms`` None with ``null_t1_ms`` set means "compute": IR/PSIR null
    ``null_t1_ms[0]``; DIR nulls ``null_t1_ms = (long T1, short T1)`` (CSF, then WM/GM).
    Use :meth:`resolved` to get concrete times.
    """

    name: str
    kind: ContrastKind
    tr_ms: float
    te_ms: float
    ti_ms: float | None = None
    ti2_ms: float | None = None
    null_t1_ms: tuple[float, ...] = ()

    def override(
        self,
        *,
        tr_ms: float | None = None,
        te_ms: float | None = None,
        ti_ms: float | None = None,
        ti2_ms: float | None = None,
    ) -> ContrastSpec:
        """A copy with the given times replaced (None keeps the current value)."""
        out = replace(
            self,
            tr_ms=self.tr_ms if tr_ms is None else float(tr_ms),
            te_ms=self.te_ms if te_ms is None else float(te_ms),
            ti_ms=self.ti_ms if ti_ms is None else float(ti_ms),
            ti2_ms=self.ti2_ms if ti2_ms is None else float(ti2_ms),
        )
        return out

    def resolved(self) -> ContrastSpec:
        """Concrete TI/TI2 (computed from ``null_t1_ms`` where not given), validated."""
        tr, te = float(self.tr_ms), float(self.te_ms)
        if not (math.isfinite(tr) and tr > 0 and math.isfinite(te) and te >= 0):
            raise SynthesisError(f"{self.name}: need TR > 0 and TE >= 0 ms, got TR={tr}, TE={te}")
        ti, ti2 = self.ti_ms, self.ti2_ms
        if self.kind in (ContrastKind.IR, ContrastKind.PSIR):
            if ti is None:
                if not self.null_t1_ms:
                    raise SynthesisError(f"{self.name}: inversion recovery needs ti_ms")
                ti = ti_null(self.null_t1_ms[0], tr)
            if not (0 < ti < tr):
                raise SynthesisError(f"{self.name}: need 0 < TI < TR, got TI={ti}, TR={tr}")
            ti2 = None
        elif self.kind is ContrastKind.DIR:
            if ti is None or ti2 is None:
                if len(self.null_t1_ms) != 2:
                    raise SynthesisError(f"{self.name}: DIR needs ti_ms and ti2_ms or two null T1s")
                c1, c2 = dir_times(self.null_t1_ms[0], self.null_t1_ms[1], tr)
                ti = c1 if ti is None else ti
                ti2 = c2 if ti2 is None else ti2
            if not (0 < ti2 < ti < tr):
                raise SynthesisError(
                    f"{self.name}: DIR needs 0 < TI2 < TI1 < TR, got TI1={ti}, TI2={ti2}, TR={tr}"
                )
        else:
            ti = ti2 = None
        return replace(self, tr_ms=tr, te_ms=te, ti_ms=ti, ti2_ms=ti2)

    @property
    def description(self) -> str:
        """``"SYNTHETIC FLAIR TR15000 TE100 TI2851"``; DIR ``"... TI3693/413"`` (resolved)."""
        r = self.resolved()
        s = f"SYNTHETIC {r.name} TR{r.tr_ms:.0f} TE{r.te_ms:.0f}"
        if r.ti_ms is not None:
            s += f" TI{r.ti_ms:.0f}"
        if r.ti2_ms is not None:  # DIR: "TI3693/413" (TI1/TI2)
            s += f"/{r.ti2_ms:.0f}"
        return s


#: 3T presets of physics.md section 3 [L, adjustable]. FLAIR/T1FLAIR null CSF (T1 4300),
#: STIR nulls fat (T1 380), DIR nulls CSF and WM (T1 600); PSIR uses a fixed TI of 425 ms
#: (the 400-450 ms of the table: between the WM and GM nulls, so WM/GM have opposite signs).
PRESETS: dict[str, ContrastSpec] = {
    "T1W": ContrastSpec("T1W", ContrastKind.SE, 500.0, 10.0),
    "T2W": ContrastSpec("T2W", ContrastKind.SE, 4500.0, 100.0),
    "PDW": ContrastSpec("PDW", ContrastKind.SE, 4000.0, 10.0),
    "FLAIR": ContrastSpec("FLAIR", ContrastKind.IR, 15000.0, 100.0, null_t1_ms=(CSF_T1_MS,)),
    "T1FLAIR": ContrastSpec("T1FLAIR", ContrastKind.IR, 2500.0, 10.0, null_t1_ms=(CSF_T1_MS,)),
    "STIR": ContrastSpec("STIR", ContrastKind.IR, 6000.0, 40.0, null_t1_ms=(FAT_T1_MS,)),
    "PSIR": ContrastSpec("PSIR", ContrastKind.PSIR, 4000.0, 10.0, ti_ms=425.0),
    "DIR": ContrastSpec("DIR", ContrastKind.DIR, 15000.0, 100.0, null_t1_ms=(CSF_T1_MS, WM_T1_MS)),
}


def _get_override(overrides: Any, name: str) -> dict[str, float | None]:
    if overrides is None:
        return {}
    ov = overrides.get(name) if isinstance(overrides, Mapping) else None
    if ov is None:
        return {}
    keys = ("tr_ms", "te_ms", "ti_ms", "ti2_ms")
    if isinstance(ov, Mapping):
        unknown = set(ov) - set(keys)
        if unknown:
            raise SynthesisError(f"overrides[{name!r}]: unknown keys {sorted(unknown)}; use {keys}")
        return {k: ov.get(k) for k in keys}
    return {k: getattr(ov, k, None) for k in keys}


def resolve_spec(preset_or_spec: str | ContrastSpec, override: Any = None) -> ContrastSpec:
    """A resolved :class:`ContrastSpec` from a preset name (case-insensitive) or a spec.

    ``override``: a mapping or object with ``tr_ms, te_ms, ti_ms, ti2_ms`` (None = keep).
    """
    if isinstance(preset_or_spec, ContrastSpec):
        spec = preset_or_spec
    else:
        key = str(preset_or_spec).upper().replace("-", "").replace("_", "")
        aliases = {"T2FLAIR": "FLAIR"}
        key = aliases.get(key, key)
        if key not in PRESETS:
            raise SynthesisError(
                f"unknown contrast {preset_or_spec!r}; presets: {', '.join(PRESETS)}"
            )
        spec = PRESETS[key]
    if override is not None:
        ov = _get_override({spec.name: override}, spec.name)
        spec = spec.override(**ov)
    return spec.resolved()


# --------------------------------------------------------------------------------------
# per-patient tissue T1 and DIR


def tissue_t1_from_histogram(maps: QuantMaps, *, smoothing_bins: float = 2.0) -> dict[str, float]:
    """WM, GM and CSF T1 (ms) from the peaks of the series' own T1 histogram.

    Histogram of log T1 over ``mask & ~failed`` (100 bins per decade, 200-8000 ms, Gaussian
    smoothed); each peak is refined to the median T1 within +-7 % of it. Tissue: the two highest peaks below 2000 ms, the shorter is WM, the longer GM.
    CSF: the median T1 of voxels with R1 < 0.3 /s (and T2 > 1000 ms when >= 20 such voxels
    exist) when there are >= 20, else the highest
    peak above 2000 ms. Returns ``{"WM", "GM", "CSF"}`` T1s in ms and
    flags ``{"WM_peak", "GM_peak", "CSF_peak"}`` (1.0 = from a peak, 0.0 = no peak found:
    the 3T default WM 600, GM 1100, CSF 4300 ms was kept).
    """
    t1 = np.asarray(maps.t1_ms, np.float64)
    sel = np.asarray(maps.mask, bool) & ~np.asarray(maps.failed, bool) & np.isfinite(t1) & (t1 > 0)
    vals = np.log10(t1[sel])
    edges = np.arange(math.log10(200.0), math.log10(8000.0) + 1e-9, 0.01)
    hist, _ = np.histogram(vals, bins=edges)
    h = ndi.gaussian_filter1d(hist.astype(np.float64), smoothing_bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    out: dict[str, float] = {
        "WM": WM_T1_MS,
        "GM": GM_T1_MS,
        "CSF": CSF_T1_MS,
        "WM_peak": 0.0,
        "GM_peak": 0.0,
        "CSF_peak": 0.0,
    }
    if h.max() <= 0:
        return out
    peaks, _ = find_peaks(h, prominence=0.02 * h.max())

    def refine(p: int) -> float:
        # median of the raw log T1 values within +-0.03 decade (+-7 %) of the peak bin:
        # unbiased for a symmetric peak and free of the bin grid
        near = vals[np.abs(vals - centres[p]) < 0.03]
        return float(10 ** np.median(near)) if near.size else float(10 ** centres[p])

    split = math.log10(2000.0)
    tissue = [p for p in peaks if centres[p] < split]
    csf = [p for p in peaks if centres[p] >= split]
    tissue = sorted(sorted(tissue, key=lambda p: h[p], reverse=True)[:2])
    if len(tissue) == 2:
        out["WM"], out["GM"] = refine(tissue[0]), refine(tissue[1])
        out["WM_peak"] = out["GM_peak"] = 1.0
    elif len(tissue) == 1:
        t = refine(tissue[0])
        # one peak: assign it to the nearer default (in log T1)
        if abs(math.log(t / WM_T1_MS)) < abs(math.log(t / GM_T1_MS)):
            out["WM"], out["WM_peak"] = t, 1.0
        else:
            out["GM"], out["GM_peak"] = t, 1.0
    # CSF: its noisy-fit T1 spreads over +-20 % and partial-volume voxels (2-3.5 s) can
    # outnumber it, so prefer the median over the pure-CSF definition R1 < 0.3 /s (as in
    # processing.pd); fall back to a histogram peak above 2 s.
    t2 = np.asarray(maps.t2_ms, np.float64)[sel]
    long_t1 = t1[sel]
    pure_csf = long_t1 > 1000.0 / 0.3
    if np.count_nonzero(pure_csf & (t2 > 1000.0)) >= 20:
        pure_csf &= t2 > 1000.0  # drop CSF/tissue partial volume (see processing.pd)
    long_t1 = long_t1[pure_csf]
    if long_t1.size >= 20:
        out["CSF"] = float(np.median(long_t1))
        out["CSF_peak"] = 1.0
    elif csf:
        out["CSF"] = refine(max(csf, key=lambda p: h[p]))
        out["CSF_peak"] = 1.0
    return out


@dataclass(frozen=True)
class DirTiming:
    """Per-patient DIR timing: TI1/TI2 (ms) nulling CSF and ``nulled`` (WM or GM)."""

    ti1_ms: float
    ti2_ms: float
    tr_ms: float
    te_ms: float
    nulled: str
    csf_t1_ms: float
    tissue_t1_ms: float
    source: str

    def spec(self) -> ContrastSpec:
        """The DIR contrast; it carries the nulled T1s, so a TR override keeps both nulls."""
        return ContrastSpec(
            "DIR",
            ContrastKind.DIR,
            self.tr_ms,
            self.te_ms,
            null_t1_ms=(self.csf_t1_ms, self.tissue_t1_ms),
        )

    def as_dict(self) -> dict[str, float | str]:
        return {
            "ti1_ms": self.ti1_ms,
            "ti2_ms": self.ti2_ms,
            "tr_ms": self.tr_ms,
            "te_ms": self.te_ms,
            "nulled": self.nulled,
            "csf_t1_ms": self.csf_t1_ms,
            "tissue_t1_ms": self.tissue_t1_ms,
            "source": self.source,
        }


def per_patient_dir(
    maps: QuantMaps | None,
    wm_t1_ms: float | None = None,
    csf_t1_ms: float | None = None,
    *,
    null: str = "WM",
    gm_t1_ms: float | None = None,
    tr_ms: float = 15000.0,
    te_ms: float = 100.0,
) -> DirTiming:
    """DIR timing that nulls CSF and WM (default) or GM with this patient's own T1s.

    T1s not given are estimated from ``maps`` with :func:`tissue_t1_from_histogram`
    (e.g. pass the segmentation's tissue means when available). ``null="GM"`` needs
    ``gm_t1_ms`` or maps.
    """
    null = null.upper()
    if null not in ("WM", "GM"):
        raise SynthesisError(f"per_patient_dir: null must be 'WM' or 'GM', got {null!r}")
    given = {"WM": wm_t1_ms, "GM": gm_t1_ms, "CSF": csf_t1_ms}
    need = ["CSF", null]
    source = "given"
    if any(given[k] is None for k in need):
        if maps is None:
            raise SynthesisError(f"per_patient_dir: need maps or the {'/'.join(need)} T1s")
        est = tissue_t1_from_histogram(maps)
        for k in need:
            if given[k] is None:
                given[k] = est[k]
        source = "histogram"
    csf_t1, tis_t1 = float(given["CSF"]), float(given[null])  # type: ignore[arg-type]
    ti1, ti2 = dir_times(csf_t1, tis_t1, tr_ms)
    return DirTiming(ti1, ti2, float(tr_ms), float(te_ms), null, csf_t1, tis_t1, source)


# --------------------------------------------------------------------------------------
# synthesis


def signed_weight(spec: ContrastSpec, r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """A resolved contrast's weighting per unit PD *before* any magnitude (rates in 1/ms):
    what signals of tissues mixed in one voxel add up in (processing.mixture)."""
    if spec.kind is ContrastKind.SE:
        return se_weight(r1, r2, spec.tr_ms, spec.te_ms)
    if spec.kind in (ContrastKind.IR, ContrastKind.PSIR):
        return ir_weight(r1, r2, spec.tr_ms, spec.te_ms, spec.ti_ms, signed=True)  # type: ignore[arg-type]
    return dir_weight(r1, r2, spec.tr_ms, spec.te_ms, spec.ti_ms, spec.ti2_ms, signed=True)  # type: ignore[arg-type]


def _weight(spec: ContrastSpec, r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """The image weighting: signed for PSIR, the magnitude otherwise."""
    w = signed_weight(spec, r1, r2)
    return w if spec.kind is ContrastKind.PSIR else np.abs(w)


@dataclass(frozen=True)
class _MaskedMaps:
    """The fitted voxels' rates and PD (float64 ``[n]``, n = voxels in ``mask``), extracted
    once and shared by every contrast of :func:`synthesize_all`."""

    mask: np.ndarray  # [z, y, x] bool
    ok: np.ndarray  # [n] finite T1, T2, PD and T1, T2 > 0
    r1: np.ndarray  # [n] 1/ms (0 where not ok)
    r2: np.ndarray
    pd: np.ndarray

    @classmethod
    def of(cls, maps: QuantMaps) -> _MaskedMaps:
        if maps.t1_ms.shape != maps.mask.shape:
            raise SynthesisError(
                f"maps: t1_ms {maps.t1_ms.shape} and mask {maps.mask.shape} differ"
            )
        mask = np.asarray(maps.mask, bool)
        # select first, then widen: only the mask's voxels are converted to float64
        t1 = np.asarray(maps.t1_ms)[mask].astype(np.float64)
        t2 = np.asarray(maps.t2_ms)[mask].astype(np.float64)
        pd = np.asarray(maps.pd_pu)[mask].astype(np.float64)
        ok = np.isfinite(t1) & np.isfinite(t2) & np.isfinite(pd) & (t1 > 0) & (t2 > 0)
        r1 = np.where(ok, 1.0 / np.where(ok, t1, 1.0), 0.0)
        r2 = np.where(ok, 1.0 / np.where(ok, t2, 1.0), 0.0)
        return cls(mask, ok, r1, r2, pd)

    def signal(self, spec: ContrastSpec) -> np.ndarray:
        """PD times the weighting of ``spec`` (resolved), float64 ``[n]``."""
        return np.where(self.ok, self.pd * _weight(spec, self.r1, self.r2), 0.0)


def physical_signal(maps: QuantMaps, spec: ContrastSpec) -> np.ndarray:
    """PD (pu) times the contrast weighting, float64 ``[z, y, x]``; 0 outside the mask."""
    masked = _MaskedMaps.of(maps)
    out = np.zeros(masked.mask.shape, np.float64)
    out[masked.mask] = masked.signal(spec.resolved())
    return out


def physical_signals_in_mask(
    maps: QuantMaps, specs: Iterable[ContrastSpec]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(mask, [physical_signal(maps, spec)[mask] for spec in specs])``: the values inside
    the mask only, float64 ``[n]`` each, without the whole-grid float64 volumes (40 x 512
    x 512: 80 MiB each, at the node's report)."""
    masked = _MaskedMaps.of(maps)
    return masked.mask, [masked.signal(spec.resolved()) for spec in specs]


def synthesize(
    maps: QuantMaps,
    preset_or_spec: str | ContrastSpec,
    *,
    scale: float | None = None,
    _masked: _MaskedMaps | None = None,
) -> SyntheticImage:
    """Synthesize one contrast.

    ``image = scale * PD * w(T1, T2)`` (float32, rounded to integers, clipped to the
    16-bit range: 0..65535, PSIR -32768..32767). ``scale`` None: one factor for the whole
    volume mapping the 99.5th percentile of |signal| in the mask to 16000 (see module
    docstring); pass a number to share a scale between series. Display window from brain
    percentiles (1-99 %; PSIR centred on 0).
    """
    spec = resolve_spec(preset_or_spec)
    if maps.t1_ms.shape != maps.mask.shape:
        raise SynthesisError(f"maps: t1_ms {maps.t1_ms.shape} and mask {maps.mask.shape} differ")
    # Only the mask's voxels are computed (outside it the image is 0, as rint(0 * scale)).
    masked = _masked if _masked is not None else _MaskedMaps.of(maps)
    mask = masked.mask
    signed = spec.kind is ContrastKind.PSIR
    inside = masked.signal(spec.resolved())
    if scale is None:
        ref = float(np.percentile(np.abs(inside), SCALE_PERCENTILE)) if inside.size else 0.0
        scale = IMAGE_TARGET / ref if ref > 0 else 1.0
    elif not (math.isfinite(scale) and scale > 0):
        raise SynthesisError(f"scale: must be a finite number > 0, got {scale!r}")
    lo, hi = (-32768.0, 32767.0) if signed else (0.0, 65535.0)
    vals = np.clip(np.rint(inside * scale), lo, hi).astype(np.float32)
    image = np.zeros(mask.shape, np.float32)
    image[mask] = vals
    if vals.size:
        if signed:
            half = max(float(np.percentile(np.abs(vals), 99.0)), 1.0)
            center, width = 0.0, 2.0 * half
        else:
            p1, p99 = (float(v) for v in np.percentile(vals, [1.0, 99.0]))
            center, width = 0.5 * (p1 + p99), max(p99 - p1, 1.0)
    else:
        center, width = 0.0, 1.0
    return SyntheticImage(
        name=spec.name,
        kind=spec.kind.value,
        image=image,
        tr_ms=spec.tr_ms,
        te_ms=spec.te_ms,
        ti_ms=spec.ti_ms,
        ti2_ms=spec.ti2_ms,
        scale=float(scale),
        equation=EQUATIONS[spec.kind],
        window_center=center,
        window_width=width,
        signed=signed,
        description=spec.description,
        parameters={
            "tr_ms": spec.tr_ms,
            "te_ms": spec.te_ms,
            "ti_ms": spec.ti_ms,
            "ti2_ms": spec.ti2_ms,
            "null_t1_ms": list(spec.null_t1_ms),
            "scale_rule": f"p{SCALE_PERCENTILE}(|S| in mask) -> {IMAGE_TARGET:.0f}",
        },
    )


#: Presets whose inversion nulls CSF (aliases included) -> preset key.
_CSF_NULLED = {"FLAIR": "FLAIR", "T2FLAIR": "FLAIR", "T1FLAIR": "T1FLAIR"}


def synthesize_all(
    maps: QuantMaps,
    names: Iterable[str],
    overrides: Mapping[str, Any] | None = None,
    *,
    dir_timing: DirTiming | None = None,
    csf_t1_ms: float | None = None,
) -> dict[str, SyntheticImage]:
    """Synthesize several presets, in order. ``overrides``: name -> object or mapping with
    ``tr_ms, te_ms, ti_ms, ti2_ms`` (e.g. :class:`processing.run.ContrastOverride`).
    ``dir_timing``: the per-patient DIR (from :func:`per_patient_dir`) used for ``"DIR"``
    instead of the preset; explicit overrides still win. ``csf_t1_ms``: the series' measured
    CSF T1; FLAIR and T1-FLAIR then null it instead of the preset's 4300 ms (an explicit TI
    override still wins).
    """
    out: dict[str, SyntheticImage] = {}
    masked = _MaskedMaps.of(maps)
    for name in names:
        key = str(name).upper()
        base: str | ContrastSpec = name
        if key == "DIR" and dir_timing is not None:
            base = dir_timing.spec()
        elif csf_t1_ms is not None and key.replace("-", "").replace("_", "") in _CSF_NULLED:
            # Null this patient's CSF (measured T1), as for the per-patient DIR: a fixed
            # 4300 ms leaves CSF at a few % of GM when the series' CSF T1 differs.
            preset = PRESETS[_CSF_NULLED[key.replace("-", "").replace("_", "")]]
            base = replace(preset, null_t1_ms=(float(csf_t1_ms),))
        spec = resolve_spec(
            base, _get_override(overrides, key) or _get_override(overrides, name) or None
        )
        out[spec.name] = synthesize(maps, spec, _masked=masked)
    return out
