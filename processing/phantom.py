"""Digital brain phantom with known truth -> simulated MDME acquisition.

The phantom is a set of partial-volume compartments (WM, GM, CSF, LESION) on an image grid
placed in patient coordinates (LPS, mm). Each compartment has one (T1, T2, PD); a voxel's
signal is the *mixture of compartment signals* ``S = coil * sum_k f_k * PD_k * g_k``
(physics.md section 5, "signals add linearly"), never the signal of mixed parameters.

Anatomy:

- ``"mni"``: the MNI152 2009a GM/WM probability maps that nilearn ships inside its wheel
  (``nilearn/datasets/data/mni_icbm152_{gm,wm,t1}_tal_nlin_sym_09a_converted.nii.gz``),
  read with nibabel from the installed package (never downloaded). The intracranial mask is
  the brain-extracted T1 template's support (plus GM+WM > 0.1), closed, hole-filled and
  dilated by 1 mm, so ventricles and sulci become CSF = mask - GM - WM.
- ``"ellipsoid"``: a procedural brain (nested ellipsoids, a wavy cortical ribbon, lateral
  ventricles, deep GM) for use without nilearn and as an "other phantom" in tests.

Both are sampled through the acquisition's affine, so oblique acquisitions see the same
head rotated. Partial volume comes from pre-smoothing the 1 mm maps with the voxel's box
width (Gaussian sigma = size / sqrt(12)) or, for the ellipsoids, a soft edge one voxel wide.

Noise: complex Gaussian, SD per real channel = 100 / snr (i.e. 1/snr of the fully relaxed
signal of pure water, PD 100, unit coil, TE -> 0). Real output = real part of the
phase-corrected signal (signed); magnitude output = ``|S + n|`` (Rician).

Units: times in ms, PD in percent units (pure water = 100), lengths in mm.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numba as nb
import numpy as np
from scipy import ndimage as ndi

from processing.acquisition import Acquisition
from processing.results import QuantMaps
from processing.signal import IDEAL_PROFILE, kernel_protocol, t1_factor

__all__ = [
    "COMPARTMENTS",
    "DEFAULT_TISSUES",
    "Phantom",
    "PhantomError",
    "PhantomTruth",
    "TissueParams",
    "add_noise",
    "centred_grid_affine",
    "make_phantom",
    "mni_available",
    "noise_metadata",
    "patient_coords",
    "simulate_voxels",
    "simulated_acquisition",
    "truth_quantmaps",
]

#: Phantom compartments, in this order in every array with a compartment axis.
COMPARTMENTS: tuple[str, ...] = ("WM", "GM", "CSF", "LESION")


class PhantomError(ValueError):
    """A phantom parameter is invalid. The message names the parameter."""


@dataclass(frozen=True)
class TissueParams:
    """Relaxation and proton density of one compartment (T1, T2 in ms; PD in pu)."""

    t1_ms: float
    t2_ms: float
    pd_pu: float

    @property
    def r1_per_s(self) -> float:
        return 1000.0 / self.t1_ms


#: 3T MDME values, each inside the range of physics.md section 6 (compiled there from
#: MAGiC/QRAPMASTER literature, e.g. Hagiwara et al. Invest Radiol 2019;54:39 and Warntjes
#: et al. MRM 2008;60:320; MDME T1 is shorter than inversion-recovery T1):
#: - WM: T1 600 (range 550-650), T2 70 (60-75), PD 68 (62-70).
#: - GM (cortical): T1 1100 (950-1300), T2 90 (80-100), PD 82 (78-88).
#: - CSF: T1 4300 (3500-4500; the value physics.md section 3 uses for the FLAIR null),
#:   T2 2000 (">= 1000", poorly determined with TE <= 100 ms), PD 100 (pure water).
#: - LESION (MS plaque): T1 1200 (800-1600), T2 130 (90-180), PD 85 (72-92).
#: These points satisfy 1/PD = a + b*R1 with a = 0.918, b = 0.332 s to within 1.5 pu
#: (see processing.pd), which makes them mutually consistent.
DEFAULT_TISSUES: dict[str, TissueParams] = {
    "WM": TissueParams(600.0, 70.0, 68.0),
    "GM": TissueParams(1100.0, 90.0, 82.0),
    "CSF": TissueParams(4300.0, 2000.0, 100.0),
    "LESION": TissueParams(1200.0, 130.0, 85.0),
}

_MNI_FILES = {
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
}

#: Head centre of the default grid, LPS mm (MNI (0, -18, +15): through the lateral
#: ventricles, so a thin slab still holds WM, GM and CSF).
_HEAD_CENTRE_LPS = np.array([0.0, 18.0, 15.0])
_PURE_FRACTION = 0.95


@dataclass
class PhantomTruth:
    """Ground truth of a phantom. Arrays are ``[z, y, x]``.

    fractions: compartment -> float32 fraction; they sum to 1 inside ``head`` and are 0
    outside. tissues: compartment -> :class:`TissueParams` used. t1_ms, t2_ms, pd_pu:
    float32 maps of the *dominant* compartment's values inside ``head`` (0 outside); they
    are the truth only where ``pure`` (dominant fraction >= 0.95). b1: flip-angle ratio map.
    coil: receive field (multiplies M0). head: boolean intracranial mask. pure: boolean.
    label: int8 index into :data:`COMPARTMENTS` of the dominant compartment, -1 outside.
    lesion_centres_mm: lesion centres, LPS. corrupted: details of ``corrupt_delay`` or None.
    """

    fractions: dict[str, np.ndarray]
    tissues: dict[str, TissueParams]
    t1_ms: np.ndarray
    t2_ms: np.ndarray
    pd_pu: np.ndarray
    b1: np.ndarray
    coil: np.ndarray
    head: np.ndarray
    pure: np.ndarray
    label: np.ndarray
    anatomy: str
    lesion_centres_mm: list[tuple[float, float, float]] = field(default_factory=list)
    corrupted: dict[str, Any] | None = None

    def pure_mask(self, compartment: str) -> np.ndarray:
        """Voxels where ``compartment`` holds at least 95 % of the voxel."""
        return self.fractions[compartment] >= _PURE_FRACTION


@dataclass
class Phantom:
    """A simulated acquisition and its ground truth."""

    acq: Acquisition
    truth: PhantomTruth


# --------------------------------------------------------------------------------------
# signal simulation


@nb.njit(cache=True)
def _mixture_kernel(frac, t1, t2, pd, b1, coil, td, te, tr, theta, alpha, ps, pw, out):
    """out[n, i, j] = coil[n] * sum_k frac[n,k] * pd[n,k] * g(T1_nk, B1_n; TD_i) * E2_nkj."""
    nk = frac.shape[1]
    for n in range(frac.shape[0]):
        for i in range(td.shape[0]):
            for j in range(te.shape[0]):
                out[n, i, j] = 0.0
        for k in range(nk):
            f = frac[n, k]
            if f <= 0.0:
                continue
            m0 = coil[n] * f * pd[n, k]
            r1 = 1.0 / t1[n, k]
            r2 = 1.0 / t2[n, k]
            for i in range(td.shape[0]):
                g, _gr, _gb = t1_factor(r1, b1[n], td[i], tr, theta, alpha, ps, pw)
                for j in range(te.shape[0]):
                    out[n, i, j] += m0 * g * math.exp(-r2 * te[j])


@nb.njit(cache=True)
def _grid_kernel(stack, head, t1, t2, pd, b1, coil, td, te, tr, theta, alpha, ps, pw, out):
    """Like _mixture_kernel on a grid: stack [K, z, y, x], out float32 [z, delay, echo, y, x].

    Writes straight into the Acquisition layout: no per-voxel temporaries or transposes.
    """
    nk = stack.shape[0]
    e2 = np.empty((nk, te.shape[0]))
    for k in range(nk):
        for j in range(te.shape[0]):
            e2[k, j] = math.exp(-te[j] / t2[k])
    w = np.empty(nk)  # f_k * PD_k * g_k for one delay
    for z in range(stack.shape[1]):
        for y in range(stack.shape[2]):
            for x in range(stack.shape[3]):
                if not head[z, y, x]:
                    continue
                for i in range(td.shape[0]):
                    for k in range(nk):
                        f = stack[k, z, y, x]
                        if f > 0.0:
                            g, _gr, _gb = t1_factor(
                                1.0 / t1[k], b1[z, y, x], td[i], tr, theta, alpha, ps, pw
                            )
                            w[k] = f * pd[k] * g
                        else:
                            w[k] = 0.0
                    for j in range(te.shape[0]):
                        acc = 0.0
                        for k in range(nk):
                            acc += w[k] * e2[k, j]
                        out[z, i, j, y, x] = coil[z, y, x] * acc


def simulate_voxels(
    fractions: np.ndarray,
    t1_ms: np.ndarray,
    t2_ms: np.ndarray,
    pd_pu: np.ndarray,
    b1: np.ndarray | float,
    coil: np.ndarray | float,
    delays_ms: Sequence[float],
    echo_times_ms: Sequence[float],
    tr_ms: float,
    saturation_deg: float = 120.0,
    excitation_deg: float = 90.0,
    *,
    profile: tuple[np.ndarray, np.ndarray] = IDEAL_PROFILE,
) -> np.ndarray:
    """Noiseless MDME signal of partial-volume mixtures (signals add, parameters do not).

    fractions: ``[n, K]`` compartment fractions. t1_ms, t2_ms, pd_pu: ``[K]`` (the same
    tissues in every voxel) or ``[n, K]`` (per-voxel jitter). b1, coil: scalars or ``[n]``.
    Returns float64 ``[n, delay, echo]``, real (signed, phase-corrected).
    """
    frac = np.ascontiguousarray(np.atleast_2d(np.asarray(fractions, np.float64)))
    n, nk = frac.shape

    def per_voxel(name: str, v: Any) -> np.ndarray:
        a = np.asarray(v, np.float64)
        try:
            return np.ascontiguousarray(np.broadcast_to(a, (n, nk)))
        except ValueError:
            raise PhantomError(
                f"{name}: shape {a.shape} does not match fractions {frac.shape}"
            ) from None

    t1 = per_voxel("t1_ms", t1_ms)
    t2 = per_voxel("t2_ms", t2_ms)
    pd = per_voxel("pd_pu", pd_pu)
    if np.any(t1 <= 0) or np.any(t2 <= 0):
        raise PhantomError("t1_ms/t2_ms: relaxation times must be > 0 ms")
    b1v = np.ascontiguousarray(np.broadcast_to(np.asarray(b1, np.float64), (n,)))
    coilv = np.ascontiguousarray(np.broadcast_to(np.asarray(coil, np.float64), (n,)))
    proto = kernel_protocol(
        delays_ms, echo_times_ms, tr_ms, saturation_deg, excitation_deg, profile
    )
    out = np.empty((n, proto[0].size, proto[1].size))
    _mixture_kernel(frac, t1, t2, pd, b1v, coilv, *proto, out)
    return out


# --------------------------------------------------------------------------------------
# geometry


def _rotation(deg_about_x: float, deg_about_y: float) -> np.ndarray:
    a, b = math.radians(deg_about_x), math.radians(deg_about_y)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    return ry @ rx


def _grid_affine(
    shape: tuple[int, int, int], voxel_size_mm: tuple[float, float, float], oblique: bool
) -> np.ndarray:
    """Axial grid centred on the head; oblique = 18 deg about L-R then 12 deg about A-P."""
    rot = _rotation(18.0, 12.0) if oblique else np.eye(3)
    return centred_grid_affine(shape, voxel_size_mm, rot, _HEAD_CENTRE_LPS)


def centred_grid_affine(
    shape: Sequence[int], voxel_size_mm: Sequence[float], rotation: np.ndarray, centre_lps: Any
) -> np.ndarray:
    """4x4 affine (voxel ``(x, y, z)`` index -> LPS mm) of a ``(z, y, x)`` grid whose axes are
    the columns of the 3x3 ``rotation`` scaled by ``voxel_size_mm`` ``(z, y, x)`` and whose
    middle sits at ``centre_lps`` (mm)."""
    nz, ny, nx = shape
    dz, dy, dx = voxel_size_mm
    rot = rotation
    aff = np.eye(4)
    aff[:3, 0] = rot[:, 0] * dx
    aff[:3, 1] = rot[:, 1] * dy
    aff[:3, 2] = rot[:, 2] * dz
    half = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0, (nz - 1) / 2.0])
    aff[:3, 3] = np.asarray(centre_lps, np.float64) - aff[:3, :3] @ half
    return aff


def patient_coords(shape: Sequence[int], affine: np.ndarray) -> list[np.ndarray]:
    """LPS coordinates (px, py, pz) of every voxel, float32 ``[z, y, x]`` each."""
    nz, ny, nx = shape
    k = np.arange(nz, dtype=np.float32)[:, None, None]
    j = np.arange(ny, dtype=np.float32)[None, :, None]
    i = np.arange(nx, dtype=np.float32)[None, None, :]
    a = affine.astype(np.float32)
    return [a[r, 0] * i + a[r, 1] * j + a[r, 2] * k + a[r, 3] for r in range(3)]


# --------------------------------------------------------------------------------------
# anatomy


def _mni_dir() -> str:
    import nilearn

    return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")


def mni_available() -> bool:
    """True when nilearn (with its shipped MNI152 maps) and nibabel can be imported."""
    try:
        import nibabel  # noqa: F401

        d = _mni_dir()
    except ImportError:
        return False
    return all(os.path.exists(os.path.join(d, f)) for f in _MNI_FILES.values())


@functools.lru_cache(maxsize=1)
def _mni_raw() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gm, wm, intracranial mask) float32 on the 1 mm MNI grid, and the vox->RAS affine."""
    import nibabel as nib

    d = _mni_dir()
    imgs = {k: nib.load(os.path.join(d, f)) for k, f in _MNI_FILES.items()}
    # stored as uint8 (0..255): keep them so until cropped (peak memory)
    gm8 = np.asarray(imgs["gm"].dataobj)
    wm8 = np.asarray(imgs["wm"].dataobj)
    t1 = np.asarray(imgs["t1"].dataobj)
    # The shipped T1 template is brain-extracted: its support is the intracranial space.
    ic = (t1 > 0) | ((gm8.astype(np.uint16) + wm8) > 25)  # GM + WM > 0.1
    del t1
    ic = ndi.binary_closing(ic, ndi.generate_binary_structure(3, 1), iterations=2)
    ic = ndi.binary_fill_holes(ic)
    ic = ndi.binary_dilation(ic, iterations=1)  # a thin outer CSF layer over the cortex
    affine = np.asarray(imgs["gm"].affine, dtype=np.float64)
    # crop to the head (+8 voxels for smoothing) to save time and memory
    nzi = np.nonzero(ic)
    lo = [max(int(a.min()) - 8, 0) for a in nzi]
    sl = tuple(slice(a, int(b.max()) + 9) for a, b in zip(lo, nzi, strict=True))
    del nzi
    gm = gm8[sl].astype(np.float32) / 255.0
    wm = wm8[sl].astype(np.float32) / 255.0
    ic = ic[sl].astype(np.float32)
    affine[:3, 3] += affine[:3, :3] @ np.asarray(lo, np.float64)
    # A population-average probability map is blurrier than one subject's partial volumes:
    # sharpen the (GM, WM, CSF) probabilities with a power of 3 and renormalize, so pure
    # voxels exist at clinical resolution; partial volume then comes from the voxel size.
    csf = np.clip(ic - gm - wm, 0.0, 1.0)
    for v in (gm, wm, csf):  # in place: these are ~20 MB each
        np.power(v, 3, out=v)
    tot = gm + wm + csf
    del csf
    norm = np.zeros_like(tot)
    np.divide(ic, tot, out=norm, where=tot > 0)
    gm *= norm
    wm *= norm
    return gm, wm, ic, affine


@functools.lru_cache(maxsize=2)
def _mni_smoothed(sigmas: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    gm, wm, ic, _ = _mni_raw()
    if max(sigmas) < 0.3:
        return gm, wm, ic
    return tuple(ndi.gaussian_filter(v, sigmas, mode="constant") for v in (gm, wm, ic))


def _mni_fractions(
    coords: list[np.ndarray], voxel_size_mm: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(GM, WM, intracranial) fractions sampled at LPS coordinates."""
    _, _, _, ras_affine = _mni_raw()
    dz, dy, dx = voxel_size_mm
    # box-car of the voxel ~ Gaussian with sigma = width / sqrt(12), per MNI axis (x, y, z)
    sig = tuple(round(s / math.sqrt(12.0), 2) for s in (dx, dy, dz))
    gm, wm, ic = _mni_smoothed(sig)
    px, py, pz = coords
    inv = np.linalg.inv(ras_affine).astype(np.float32)
    ras = (-px, -py, pz)  # LPS -> RAS
    vox = [
        inv[r, 0] * ras[0] + inv[r, 1] * ras[1] + inv[r, 2] * ras[2] + inv[r, 3] for r in range(3)
    ]
    pts = np.stack([v.ravel() for v in vox])
    shape = px.shape
    out = [
        ndi.map_coordinates(v, pts, order=1, mode="constant", cval=0.0).reshape(shape)
        for v in (gm, wm, ic)
    ]
    return out[0], out[1], out[2]


def _soft_ellipsoid(
    coords: list[np.ndarray],
    centre: Sequence[float],
    semi_axes: Sequence[float],
    width_mm: float,
    modulation: np.ndarray | None = None,
) -> np.ndarray:
    """Fraction of each voxel inside an axis-aligned ellipsoid (edge ramp ``width_mm`` wide)."""
    d = [c - float(c0) for c, c0 in zip(coords, centre, strict=True)]
    rho = np.sqrt(sum((di / float(a)) ** 2 for di, a in zip(d, semi_axes, strict=True)))
    if modulation is not None:
        rho = rho / modulation
    r = np.sqrt(sum(di * di for di in d))
    # radial distance to the surface: r * (1 - 1/rho), negative inside
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = np.where(rho > 1e-6, r * (rho - 1.0) / rho, -float(min(semi_axes)))
    return np.clip(0.5 - dist / width_mm, 0.0, 1.0).astype(np.float32)


def _ellipsoid_fractions(
    coords: list[np.ndarray], voxel_size_mm: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(GM, WM, intracranial) fractions of the procedural brain, centred near the MNI head."""
    c = np.array([0.0, 18.0, 10.0])
    w = float(np.mean(voxel_size_mm))
    ic = _soft_ellipsoid(coords, c, (68.0, 84.0, 58.0), w)
    pial = _soft_ellipsoid(coords, c, (64.0, 80.0, 54.0), w)
    # gyri: the WM surface undulates by +-8 %, giving a cortex 4-10 mm thick
    d = [ci - c0 for ci, c0 in zip(coords, c, strict=True)]
    az = np.arctan2(d[1], d[0])
    el = np.arctan2(d[2], np.sqrt(d[0] ** 2 + d[1] ** 2))
    mod = 1.0 + 0.08 * np.sin(9.0 * az) * np.cos(7.0 * el)
    inner = _soft_ellipsoid(coords, c, (53.0, 68.0, 43.0), w, modulation=mod)
    vent = np.maximum(
        _soft_ellipsoid(coords, c + (-11.0, 4.0, 12.0), (6.0, 24.0, 9.0), w),
        _soft_ellipsoid(coords, c + (11.0, 4.0, 12.0), (6.0, 24.0, 9.0), w),
    )
    deep = np.maximum(
        _soft_ellipsoid(coords, c + (-21.0, 2.0, 0.0), (9.0, 14.0, 9.0), w),
        _soft_ellipsoid(coords, c + (21.0, 2.0, 0.0), (9.0, 14.0, 9.0), w),
    ) * (1.0 - vent)
    pial = np.minimum(pial, ic)
    inner = np.minimum(inner, pial)
    wm = inner * (1.0 - vent - deep)
    gm = (pial - inner) + inner * deep
    return gm.astype(np.float32), wm.astype(np.float32), ic


def _unit_field_raw(
    coords: list[np.ndarray], centre: np.ndarray, sigma_mm: float, tilt: np.ndarray
) -> np.ndarray:
    """A Gaussian bump plus a linear tilt at LPS ``coords`` (before normalization)."""
    d = [ci - float(c0) for ci, c0 in zip(coords, centre, strict=True)]
    u = np.exp(-sum(di * di for di in d) / (2.0 * sigma_mm**2))
    return u + sum(float(t) * di for t, di in zip(tilt, d, strict=True)) / 1000.0


def _smooth_unit_field(
    coords: list[np.ndarray],
    head: np.ndarray,
    centre: np.ndarray,
    sigma_mm: float,
    tilt: np.ndarray,
) -> np.ndarray:
    """A smooth field, min-max normalized to [0, 1] over the head voxels."""
    u = _unit_field_raw(coords, centre, sigma_mm, tilt)
    ref = u[head] if head.any() else u.ravel()
    lo, hi = float(ref.min()), float(ref.max())
    if hi - lo < 1e-12:
        return np.full(u.shape, 0.5, dtype=np.float32)
    return ((u - lo) / (hi - lo)).astype(np.float32)


# --------------------------------------------------------------------------------------
# the phantom


def _check_tissues(tissues: Mapping[str, Any] | None) -> dict[str, TissueParams]:
    out = dict(DEFAULT_TISSUES)
    if tissues is None:
        return out
    for name, value in tissues.items():
        if name not in COMPARTMENTS:
            raise PhantomError(
                f"tissues: unknown compartment {name!r}; expected one of {COMPARTMENTS}"
            )
        if isinstance(value, TissueParams):
            tp = value
        elif isinstance(value, Mapping):
            unknown = set(value) - {"t1_ms", "t2_ms", "pd_pu"}
            if unknown:
                raise PhantomError(f"tissues[{name!r}]: unknown keys {sorted(unknown)}")
            tp = replace(out[name], **{k: float(v) for k, v in value.items()})
        else:
            tp = TissueParams(*(float(v) for v in value))
        if not (tp.t1_ms > 0 and tp.t2_ms > 0 and tp.pd_pu >= 0) or not all(
            math.isfinite(v) for v in (tp.t1_ms, tp.t2_ms, tp.pd_pu)
        ):
            raise PhantomError(f"tissues[{name!r}]: need T1, T2 > 0 ms and PD >= 0 pu, got {tp}")
        out[name] = tp
    return out


def _place_lesions(
    rng: np.random.Generator,
    coords: list[np.ndarray],
    wm: np.ndarray,
    voxel_size_mm: tuple[float, float, float],
    n_max: int = 4,
) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """Ellipsoidal MS-like lesions centred in deep WM; returns (lesion share of WM, centres)."""
    cand = np.flatnonzero(wm.ravel() >= 0.95)
    lesion = np.zeros(wm.shape, dtype=np.float32)
    centres: list[tuple[float, float, float]] = []
    if cand.size == 0:
        return lesion, centres
    pts = np.stack([c.ravel()[cand] for c in coords], axis=1)
    w = float(np.mean(voxel_size_mm))
    for idx in rng.permutation(cand.size)[:200]:
        p = pts[idx]
        if any(np.linalg.norm(p - np.asarray(q)) < 20.0 for q in centres):
            continue
        r = rng.uniform(3.0, 6.0)
        axes = (r, r * rng.uniform(0.8, 1.2), r * rng.uniform(1.0, 1.6))
        lesion = np.maximum(lesion, _soft_ellipsoid(coords, p, axes, w))
        centres.append(tuple(float(v) for v in p))
        if len(centres) >= n_max:
            break
    return lesion, centres


def make_phantom(
    shape: Sequence[int] = (30, 256, 256),
    *,
    seed: int = 0,
    snr: float | None = 50.0,
    magnitude: bool = False,
    oblique: bool = False,
    delays_ms: Sequence[float] = (150.0, 580.0, 1900.0, 3850.0),
    echo_times_ms: Sequence[float] = (20.0, 100.0),
    tr_ms: float = 4000.0,
    saturation_deg: float = 120.0,
    excitation_deg: float = 90.0,
    b1_range: tuple[float, float] = (0.8, 1.2),
    coil: bool = True,
    coil_range: tuple[float, float] = (0.7, 1.3),
    lesions: bool = True,
    tissues: Mapping[str, Any] | None = None,
    corrupt_delay: int | None = None,
    voxel_size_mm: Sequence[float] | None = None,
    anatomy: str = "mni",
    profile: tuple[np.ndarray, np.ndarray] = IDEAL_PROFILE,
) -> Phantom:
    """Simulate an MDME acquisition of a digital brain with known truth.

    Parameters
    ----------
    shape:
        image grid ``(z, y, x)``; any size (a few slices are placed through the lateral
        ventricles).
    seed:
        seeds lesion placement, noise and the ``corrupt_delay`` perturbation.
    snr:
        noise SD per real channel = 100 / snr; None or inf gives a noiseless signal.
    magnitude:
        False: real, phase-corrected (signed) signal; True: magnitude.
    oblique:
        rotate the slice stack 18 deg about L-R and 12 deg about A-P.
    delays_ms, echo_times_ms, tr_ms, saturation_deg, excitation_deg:
        the MDME protocol (ms, degrees).
    b1_range:
        (min, max) of the smooth flip-angle ratio field over the head.
    coil, coil_range:
        a smooth receive field spanning ``coil_range`` over the head (else 1 everywhere).
    lesions:
        add up to 4 ellipsoidal lesions (3-6 mm semi-axes) in WM.
    tissues:
        overrides of :data:`DEFAULT_TISSUES`: ``{"WM": {"t1_ms": 800}, ...}`` or
        :class:`TissueParams` or ``(t1, t2, pd)`` tuples.
    corrupt_delay:
        index of one delay image to corrupt (flow/motion: a random scaling 0.5-0.8 and a
        shift of 2-4 voxels along y), for QC tests.
    voxel_size_mm:
        ``(z, y, x)``; default ``(4, 230/ny, 230/nx)`` (4 mm slices, 230 mm FOV).
    anatomy:
        ``"mni"`` (nilearn's MNI152 maps; falls back to ``"ellipsoid"`` with a warning when
        nilearn is missing) or ``"ellipsoid"``.
    profile:
        slice profile ``(scales, weights)`` used to simulate (see processing.signal).
    """
    shp, vs, anatomy, tis = _checked_arguments(
        shape, voxel_size_mm, snr, b1_range, coil_range, len(delays_ms), corrupt_delay, anatomy,
        tissues,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    affine = _grid_affine(shp, vs, oblique)
    coords = patient_coords(shp, affine)
    if anatomy == "mni":
        gm, wm, ic = _mni_fractions(coords, vs)
    else:
        gm, wm, ic = _ellipsoid_fractions(coords, vs)
    fractions, head, centres = _compartments(rng, coords, vs, shp, gm, wm, ic, lesions)
    b1, coil_map = _fields(coords, head, shp, b1_range, coil, coil_range)

    stack, label, pure, (t1_map, t2_map, pd_map) = _truth_maps(fractions, head, tis)
    protocol = (delays_ms, echo_times_ms, tr_ms, saturation_deg, excitation_deg)
    signal = _mixture_signal(stack, head, tis, b1, coil_map, protocol, profile)

    corrupted = _corrupt_and_add_noise(rng, signal, corrupt_delay, snr, magnitude)

    metadata = {
        "source": "synthmr phantom",
        "anatomy": anatomy,
        "seed": int(seed),
        **noise_metadata(snr),
        "oblique": bool(oblique),
    }
    acq = simulated_acquisition(signal, protocol, vs, affine, magnitude, metadata)
    truth = PhantomTruth(
        fractions=fractions,
        tissues=tis,
        t1_ms=t1_map,
        t2_ms=t2_map,
        pd_pu=pd_map,
        b1=b1,
        coil=coil_map,
        head=head,
        pure=pure,
        label=label,
        anatomy=anatomy,
        lesion_centres_mm=centres,
        corrupted=corrupted,
    )
    return Phantom(acq=acq, truth=truth)


def _truth_maps(
    fractions: dict[str, np.ndarray], head: np.ndarray, tis: Mapping[str, TissueParams]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(compartment stack, label, pure mask, (T1, T2, PD) of the dominant compartment)."""
    stack = np.stack([fractions[c] for c in COMPARTMENTS])
    dom = np.argmax(stack, axis=0)
    label = np.where(head, dom, -1).astype(np.int8)
    pure = head & (np.max(stack, axis=0) >= _PURE_FRACTION)
    maps = []
    for q in ("t1_ms", "t2_ms", "pd_pu"):
        tab = np.array([getattr(tis[c], q) for c in COMPARTMENTS], np.float32)
        maps.append(np.where(head, tab[dom], 0.0).astype(np.float32))
    return stack, label, pure, (maps[0], maps[1], maps[2])


def _mixture_signal(
    stack: np.ndarray,
    head: np.ndarray,
    tis: Mapping[str, TissueParams],
    b1: np.ndarray,
    coil_map: np.ndarray,
    protocol: tuple,
    profile: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Noise-free partial-volume signal ``[z, delay, echo, y, x]``; only head voxels carry
    signal. ``protocol``: (delays ms, echo times ms, TR ms, saturation deg, excitation deg)."""
    nz, ny, nx = head.shape
    signal = np.zeros((nz, len(protocol[0]), len(protocol[1]), ny, nx), dtype=np.float32)
    tabs = [
        np.array([getattr(tis[c], q) for c in COMPARTMENTS], np.float32).astype(np.float64)
        for q in ("t1_ms", "t2_ms", "pd_pu")
    ]
    _grid_kernel(
        np.ascontiguousarray(stack),
        np.ascontiguousarray(head),
        tabs[0],
        tabs[1],
        tabs[2],
        np.ascontiguousarray(b1),
        np.ascontiguousarray(coil_map),
        *kernel_protocol(*protocol, profile),
        signal,
    )
    return signal


def _checked_arguments(
    shape: Sequence[int],
    voxel_size_mm: Sequence[float] | None,
    snr: float | None,
    b1_range: tuple[float, float],
    coil_range: tuple[float, float],
    n_delays: int,
    corrupt_delay: int | None,
    anatomy: str,
    tissues: Mapping[str, Any] | None,
) -> tuple[tuple[int, ...], tuple[float, ...], str, dict[str, TissueParams]]:
    """(grid, voxel size mm, anatomy, tissues) of :func:`make_phantom`'s arguments, or a
    PhantomError naming the bad one."""
    shp = tuple(int(s) for s in shape)
    if len(shp) != 3 or min(shp) < 1:
        raise PhantomError(f"shape: expected 3 positive integers (z, y, x), got {tuple(shape)}")
    if voxel_size_mm is None:
        vs = (4.0, 230.0 / shp[1], 230.0 / shp[2])
    else:
        vs = tuple(float(v) for v in voxel_size_mm)
        if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
            raise PhantomError(f"voxel_size_mm: expected 3 positive numbers, got {voxel_size_mm!r}")
    if snr is not None and not (snr > 0):
        raise PhantomError(f"snr: must be > 0 (or None for no noise), got {snr!r}")
    lo, hi = (float(v) for v in b1_range)
    if not (0 < lo <= hi):
        raise PhantomError(f"b1_range: expected 0 < min <= max, got {b1_range!r}")
    clo, chi = (float(v) for v in coil_range)
    if not (0 < clo <= chi):
        raise PhantomError(f"coil_range: expected 0 < min <= max, got {coil_range!r}")
    if corrupt_delay is not None and not (0 <= int(corrupt_delay) < n_delays):
        raise PhantomError(
            f"corrupt_delay: must be a delay index in [0, {n_delays}), got {corrupt_delay}"
        )
    if anatomy not in ("mni", "ellipsoid"):
        raise PhantomError(f"anatomy: expected 'mni' or 'ellipsoid', got {anatomy!r}")
    tis = _check_tissues(tissues)
    if anatomy == "mni" and not mni_available():
        warnings.warn(
            "make_phantom: nilearn (with its MNI152 maps) or nibabel is not installed; using the "
            "procedural 'ellipsoid' brain instead (pip install 'synthmr[phantom]' for MNI anatomy)",
            RuntimeWarning,
            stacklevel=3,
        )
        anatomy = "ellipsoid"

    return shp, vs, anatomy, tis


def _compartments(
    rng: np.random.Generator,
    coords: np.ndarray,
    vs: tuple[float, ...],
    shp: tuple[int, ...],
    gm: np.ndarray,
    wm: np.ndarray,
    ic: np.ndarray,
    lesions: bool,
) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple[float, float, float]]]:
    """(fractions per compartment, head mask, lesion centres mm) from the atlas's GM, WM
    and intracranial fractions, with lesions placed in WM."""
    # Fractions sum to 1 inside the head (intracranial fraction >= 0.5), 0 outside.
    head = ic >= 0.5
    gm = np.clip(gm, 0.0, None)
    wm = np.clip(wm, 0.0, None)
    tissue_sum = gm + wm
    with np.errstate(divide="ignore", invalid="ignore"):
        over = np.where(tissue_sum > ic, ic / tissue_sum, 1.0)  # interpolation can overshoot
        gm, wm = gm * over, wm * over
        inv_ic = np.where(head, 1.0 / np.maximum(ic, 1e-6), 0.0)
    gm = (gm * inv_ic).astype(np.float32)
    wm = (wm * inv_ic).astype(np.float32)
    csf = np.where(head, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
    les = np.zeros(shp, dtype=np.float32)
    centres: list[tuple[float, float, float]] = []
    if lesions:
        share, centres = _place_lesions(rng, coords, wm, vs)
        les = (share * wm).astype(np.float32)
        wm = (wm - les).astype(np.float32)
    # Drop sub-2 % tails (interpolation/atlas blur, not anatomy) so that ventricles hold
    # pure CSF, then renormalize inside the head.
    stack = np.stack([wm, gm, csf, les])
    stack[stack < 0.02] = 0.0
    tot = stack.sum(axis=0)
    stack = np.where(head & (tot > 0), stack / np.where(tot > 0, tot, 1.0), 0.0).astype(np.float32)
    fractions = dict(zip(COMPARTMENTS, stack, strict=True))

    return fractions, head, centres


# the B1 field's bump (offset from the head centre, width) and tilt
_B1_OFFSET_MM = (10.0, -15.0, 5.0)
_B1_SIGMA_MM = 90.0
_B1_TILT = np.array([0.2, 0.0, 0.1])


def b1_field_on_grid(
    truth: PhantomTruth,
    phantom_affine: np.ndarray,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    margin_mm: float = 8.0,
) -> np.ndarray:
    """The phantom's smooth B1 field (the one its signal used) evaluated on another grid
    (``shape`` ``[z, y, x]``, ``affine`` index -> LPS mm, any orientation): float32, 0
    outside the head grown by ``margin_mm`` (a B1 map has no value outside the body).

    The field is ``a + b u(p)`` with ``u`` the analytic bump + tilt; ``a``, ``b`` are
    recovered from ``truth.b1`` over the head (exact up to float32 rounding)."""
    shp = tuple(int(s) for s in truth.b1.shape)
    centre = _HEAD_CENTRE_LPS + _B1_OFFSET_MM
    u_ph = _unit_field_raw(patient_coords(shp, phantom_affine), centre, _B1_SIGMA_MM, _B1_TILT)
    head = truth.head
    if np.ptp(u_ph[head]) > 0:
        b, a = np.polyfit(u_ph[head].astype(np.float64), truth.b1[head].astype(np.float64), 1)
    else:
        b, a = 0.0, float(np.mean(truth.b1[head]))
    coords = patient_coords(tuple(int(s) for s in shape), np.asarray(affine, np.float64))
    values = (a + b * _unit_field_raw(coords, centre, _B1_SIGMA_MM, _B1_TILT)).astype(np.float32)
    # inside: the head grown by the margin, looked up at the nearest phantom voxel
    vox = float(np.min(np.linalg.norm(np.asarray(phantom_affine)[:3, :3], axis=0)))
    grown = ndi.binary_dilation(head, iterations=max(1, int(np.ceil(margin_mm / vox))))
    inv = np.linalg.inv(np.asarray(phantom_affine, np.float64))
    pts = np.stack([c.astype(np.float64).ravel() for c in coords])
    idx = np.rint(inv[:3, :3] @ pts + inv[:3, 3:4]).astype(np.int64)  # (x, y, z)
    ok = np.all((idx >= 0) & (idx < np.array(shp[::-1])[:, None]), axis=0)
    inside = np.zeros(ok.shape, dtype=bool)
    inside[ok] = grown[idx[2, ok], idx[1, ok], idx[0, ok]]
    values[~inside.reshape(values.shape)] = 0.0
    return values


def _fields(
    coords: np.ndarray,
    head: np.ndarray,
    shp: tuple[int, ...],
    b1_range: tuple[float, float],
    coil: bool,
    coil_range: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth B1 (flip-angle ratio) and receive fields over the head."""
    lo, hi = (float(v) for v in b1_range)
    clo, chi = (float(v) for v in coil_range)
    centre = _HEAD_CENTRE_LPS
    b1u = _smooth_unit_field(coords, head, centre + _B1_OFFSET_MM, _B1_SIGMA_MM, _B1_TILT)
    b1 = (lo + (hi - lo) * b1u).astype(np.float32)
    if coil:
        cu = _smooth_unit_field(
            coords, head, centre + (40.0, 110.0, 30.0), 160.0, np.array([0.0, 0.0, 0.0])
        )
        coil_map = (clo + (chi - clo) * cu).astype(np.float32)
    else:
        coil_map = np.ones(shp, dtype=np.float32)

    return b1, coil_map


def _corrupt_and_add_noise(
    rng: np.random.Generator,
    signal: np.ndarray,
    corrupt_delay: int | None,
    snr: float | None,
    magnitude: bool,
) -> dict[str, Any] | None:
    """Corrupt one delay image (when asked) and add noise, in place; the corruption done."""
    corrupted = None
    if corrupt_delay is not None:
        k = int(corrupt_delay)
        factor = float(rng.uniform(0.5, 0.8))
        shift = int(rng.integers(2, 5)) * int(rng.choice([-1, 1]))
        signal[:, k] = np.roll(signal[:, k] * factor, shift, axis=2)  # axis 2 of [z,e,y,x] = y
        corrupted = {"delay_index": k, "scale": factor, "shift_voxels_y": shift}
    add_noise(rng, signal, snr, magnitude)
    return corrupted


def add_noise(
    rng: np.random.Generator, signal: np.ndarray, snr: float | None, magnitude: bool
) -> None:
    """Add Gaussian noise of SD 100/snr per real channel to the float32 ``signal`` in place
    (None or inf: none); for magnitude data, take the modulus with a second (imaginary)
    noise channel."""
    if snr is not None and math.isfinite(snr):
        sd = np.float32(100.0 / float(snr))
        noise = rng.standard_normal(signal.shape, dtype=np.float32)
        noise *= sd
        signal += noise  # real channel (phase-corrected signal is real)
        if magnitude:
            noise = rng.standard_normal(signal.shape, dtype=np.float32, out=noise)
            noise *= sd
            np.hypot(signal, noise, out=signal)
        del noise
    elif magnitude:
        np.abs(signal, out=signal)


def simulated_acquisition(
    signal: np.ndarray,
    protocol: tuple[Sequence[float], Sequence[float], float, float, float],
    voxel_size_mm: tuple[float, float, float],
    affine: np.ndarray,
    magnitude: bool,
    metadata: dict[str, Any],
) -> Acquisition:
    """The :class:`Acquisition` of a simulated MDME ``signal`` ``[z, delay, echo, y, x]``;
    protocol: (delays_ms, echo_times_ms, tr_ms, saturation_deg, excitation_deg)."""
    delays_ms, echo_times_ms, tr_ms, saturation_deg, excitation_deg = protocol
    return Acquisition(
        signal=signal,
        delays_ms=np.asarray(delays_ms, np.float64),
        echo_times_ms=np.asarray(echo_times_ms, np.float64),
        tr_ms=float(tr_ms),
        saturation_deg=float(saturation_deg),
        excitation_deg=float(excitation_deg),
        voxel_size_mm=voxel_size_mm,
        affine=affine,
        is_magnitude=bool(magnitude),
        delay_source="phantom",
        metadata=metadata,
    )


def noise_metadata(snr: float | None) -> dict[str, float | None]:
    """``snr`` and the noise SD per real channel it gives (:func:`add_noise`), for metadata."""
    return {
        "snr": None if snr is None else float(snr),
        "noise_sd": 0.0 if snr is None or not math.isfinite(snr) else 100.0 / float(snr),
    }


def truth_quantmaps(
    truth: PhantomTruth, *, mixed: str = "weighted", noise_sd: float = 0.0
) -> QuantMaps:
    """QuantMaps built from the truth, as an ideal fit would give them (no fit involved).

    ``mixed="weighted"``: mixed voxels get fraction-weighted rates ``R = sum f_k R_k`` (an
    approximation of what a mono-exponential fit returns) and ``m0 = coil * sum f_k PD_k``;
    pure compartments keep their exact values. ``mixed="dominant"``: every voxel carries
    the dominant compartment's exact T1/T2/PD (``truth.t1_ms`` etc.), ``m0 = coil * PD``.
    ``pd_pu`` is left equal to ``m0`` (uncorrected, like the fit leaves it);
    ``receive_field`` is None.
    """
    if mixed not in ("weighted", "dominant"):
        raise PhantomError(f"mixed: expected 'weighted' or 'dominant', got {mixed!r}")
    r1 = np.zeros(truth.head.shape, np.float64)
    r2 = np.zeros_like(r1)
    pd = np.zeros_like(r1)
    if mixed == "dominant":
        with np.errstate(divide="ignore"):
            r1 = np.where(truth.head, 1.0 / truth.t1_ms, 0.0)
            r2 = np.where(truth.head, 1.0 / truth.t2_ms, 0.0)
        pd = truth.pd_pu.astype(np.float64)
    else:
        for c in COMPARTMENTS:
            f = truth.fractions[c]
            tp = truth.tissues[c]
            r1 += f / tp.t1_ms
            r2 += f / tp.t2_ms
            pd += f * tp.pd_pu
    head = truth.head
    with np.errstate(divide="ignore"):
        t1 = np.where(head, 1.0 / r1, 0.0).astype(np.float32)
        t2 = np.where(head, 1.0 / r2, 0.0).astype(np.float32)
    m0 = np.where(head, pd * truth.coil, 0.0).astype(np.float32)
    return QuantMaps(
        t1_ms=t1,
        t2_ms=t2,
        pd_pu=m0.copy(),
        b1=np.where(head, truth.b1, 0.0).astype(np.float32),
        m0=m0,
        residual=np.zeros(head.shape, np.float32),
        mask=head.copy(),
        failed=np.zeros(head.shape, bool),
        noise_sd=float(noise_sd),
    )
