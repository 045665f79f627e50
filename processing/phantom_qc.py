"""Phantom QC: simulate, find and measure a quantitative phantom (ISMRM/NIST system phantom).

Pure functions on arrays (no DICOM): :mod:`dicom_node` feeds the fitted maps and the grid's
affine, and packages what comes back.

Pipeline (:func:`analyze`):

1. **Outer shell** (:func:`fit_outer_sphere`): the phantom is a sphere of known radius
   (200 mm for the NIST phantom). The in-plane edge of the signal support (per slice, holes
   filled) is fitted with a sphere; its centre holds 3 of the 6 degrees of freedom even when
   the slab covers only part of the phantom, and its radius (and the fit's RMS) is the first
   content test: a head is neither 200 mm across nor spherical.
2. **Pose** (:func:`detect_pose`, 6-DoF rigid): the spheres are placed by the definition;
   for a trial pose every voxel is softly assigned to a sphere interior, a sphere wall or the
   fill, and the cost is the within-region sum of squares of three standardized features
   (log T1, log T2, M0). This is contrast-agnostic: it needs no reference values, so a site's
   own phantom or lot works unchanged, and the PD array (whose relaxation is not certified)
   pulls its weight. A grid over rotations (+-20 deg, 10 deg steps, about the definition's
   nominal placement: the NIST phantom's plates coronal, as its manual and NIST's own
   PhantomViewer place it) and offsets along the slab normal feeds a Nelder-Mead refinement
   of all 6 parameters. ``explained`` = 1 - cost / total SS (with every sphere where step 3
   found it) is the second content test.
3. **Each sphere itself** (:func:`refine_spheres`): a real phantom is not its drawing, so
   after the rigid pose every sphere's own centre and fluid radius are searched (within
   6 mm and 30 %) against its local contrast (fluid / wall / surrounding fill).
4. **ROIs** (:func:`sphere_rois`): a voxel belongs to a sphere's ROI when its whole box (all
   corners) lies within ``radius - erosion_mm`` of the sphere's found centre, with its found
   radius, so no ROI voxel touches the wall. A sphere whose eroded ROI ball is cut by the
   slab or field-of-view edge, or that keeps fewer than ``min_voxels``, is reported as not
   measured with the reason.
5. **PD** (:func:`phantom_pd`): ``M0 = C(r) * PD``; the fill (uniform, PD known) samples the
   receive field C, fitted as a robust quadratic of log M0 over fill voxels away from spheres.
6. **Measurement** (:func:`measure`): per sphere the median and robust SD (1.4826 MAD) of
   T1, T2 and PD, voxel count, error against the reference; per array slope, intercept and
   R^2 of measured vs reference over the spheres inside the measurable range.

Measurable range (:func:`measurable_range`): a protocol property. The 8 MDME samples (4
saturation delays x 2 echoes) determine T1 only while the delays straddle the recovery and T2
only while the echoes straddle the decay: T1 much shorter than the first delay (all delays
fully recovered) or much longer than TR, T2 much shorter than the first echo (second echo in
the noise) or much longer than the echo spacing are not resolved. We make this quantitative
with the Cramer-Rao bound of one voxel at the physics notes' SNR 50 (pure water PD 100 gives
signal 100, noise SD 2), B1 free in 0.8-1.2: a value is inside the range when the bound's
relative SD is <= ``MAX_VOXEL_CV`` (16 %) and the value is inside the fit's bounds with a 25 %
margin (processing.fit: R1 0.05-10 /s, R2 0.3-100 /s). For the default protocol (TD 150-3850
ms, TE 20/100 ms, TR 4000 ms) this gives T1 ~ 240-1900 ms and T2 ~ 30-510 ms (the exact
numbers are in every report). Brain tissue (T1 600-1300, T2 60-130) sits inside, CSF
(T1 ~4300, T2 ~2000) beyond; spheres outside are still measured and flagged
``in_range = False``.

In range, per sphere (:func:`measure`): ``in_range`` = the reference is inside the range above
(``reference_in_range``, decided before measuring) AND the median is precise enough for the
tolerance it is judged by (``TOLERANCE``: T1 2 %, T2 3 %, PD 2 pu): its standard error
1.2533 x robust SD / sqrt(voxels) (``median_se``) is <= tolerance / ``PRECISION_Z`` (2, so
noise alone carries the median beyond the tolerance in < 5 % of scans). The range says which
values 8 samples can resolve; the gate says whether THIS ROI resolves it: a 7 mm sphere or a
coarse grid holds fewer voxels, a sphere near the range's edge has a wide voxel spread. A
sphere failing either is measured and flagged with the reason, never dropped. Content
recognition (rank order) uses ``reference_in_range`` only.

Units: times in ms, PD in percent units, lengths in mm, angles in degrees. Grids ``[z, y, x]``;
``affine`` maps voxel index ``(x, y, z, 1)`` to patient LPS mm (DICOM convention, as
:class:`processing.acquisition.Acquisition`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numba as nb
import numpy as np
from scipy import ndimage as ndi
from scipy import optimize

from processing.acquisition import Acquisition
from processing.phantom import (
    add_noise,
    centred_grid_affine,
    noise_metadata,
    patient_coords,
    simulated_acquisition,
)
from processing.phantoms import ARRAY_QUANTITY, PhantomDefinition
from processing.results import QuantMaps
from processing.signal import IDEAL_PROFILE, kernel_protocol, mdme_jacobian, t1_factor

__all__ = [
    "MAX_VOXEL_CV",
    "PRECISION_Z",
    "TOLERANCE",
    "Detection",
    "PhantomScan",
    "Pose",
    "SphereROI",
    "analyze",
    "compare_reports",
    "detect_pose",
    "fit_outer_sphere",
    "linearity",
    "measurable_range",
    "measure",
    "phantom_pd",
    "placed",
    "protocol_of",
    "refine_spheres",
    "rotation_matrix",
    "run_phantom",
    "shape_check",
    "simulate_phantom",
    "sphere_rois",
    "warmup",
]

#: Largest single-voxel Cramer-Rao relative SD (at SNR 50) for a value to count as measurable:
#: the median of an ROI of >= 100 voxels (the default grid, 1.5 x 1.5 x 4 mm, gives ~100 in
#: a 9 mm sphere eroded by 1 mm) then has an SE <= 1.25 x 0.16 / 10 = 2 %.
MAX_VOXEL_CV = 0.16
#: The physics notes' SNR (pure water, one sample) at which the range is stated.
NOMINAL_SNR = 50.0
#: PD is measurable when the sphere's signal is >= this many noise SDs.
_PD_MIN_SNR = 5.0
RANGE_RULE = (
    "single-voxel Cramer-Rao relative SD <= max_voxel_cv at SNR 50 with M0, T1, T2, B1 free"
    " (worst of B1 0.8/1.0/1.2), at the sphere's reference T1/T2, and inside the fit bounds"
    " (T1 100-20000 ms, T2 10-3333 ms) with a 25 % margin; PD >= 5 noise SDs; magnitude"
    " data: also the last echo >= 5 noise SDs (Rician floor)"
)
#: The Done-when tolerance of a sphere's median per quantity: relative for T1/T2, pu for PD.
TOLERANCE: dict[str, tuple[str, float]] = {
    "t1_ms": ("rel", 0.02),
    "t2_ms": ("rel", 0.03),
    "pd_pu": ("abs", 2.0),
}
#: A sphere's median counts only when its standard error (1.2533 x robust SD / sqrt(voxels),
#: the SE of the median of normal data) is <= tolerance / PRECISION_Z: with 2, noise alone
#: carries the median beyond the tolerance in < 5 % of scans (two-sided normal 1.96).
PRECISION_Z = 2.0
#: Margin inside the fit bounds (a value within 25 % of a bound is not measurable).
_BOUND_MARGIN = 1.25
#: Content tests: outer radius within this fraction of the definition's, shell RMS below
#: this many mm, sphere model explaining at least this share of the feature variance.
_RADIUS_TOLERANCE = 0.12
_SHELL_RMS_MM = 4.0
_MIN_EXPLAINED = 0.35
_MIN_RANK_CORRELATION = 0.8


# --------------------------------------------------------------------------------------
# pose


def rotation_matrix(rx_deg: float, ry_deg: float, rz_deg: float) -> np.ndarray:
    """3x3 rotation: about x, then y, then z (``Rz @ Ry @ Rx``), degrees."""
    a, b, c = (math.radians(v) for v in (rx_deg, ry_deg, rz_deg))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Pose:
    """Rigid phantom -> patient transform: ``p_lps = R @ q_phantom + translation_mm``."""

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def matrix(self) -> np.ndarray:
        return rotation_matrix(*self.rotation_deg)

    def to_patient(self, q: np.ndarray) -> np.ndarray:
        """Phantom coordinates ``[..., 3]`` -> patient LPS ``[..., 3]``."""
        return np.asarray(q, np.float64) @ self.matrix.T + np.asarray(self.translation_mm)

    def to_phantom(self, p: np.ndarray) -> np.ndarray:
        return (np.asarray(p, np.float64) - np.asarray(self.translation_mm)) @ self.matrix

    def as_dict(self) -> dict[str, list[float]]:
        return {
            "rotation_deg": [round(float(v), 3) for v in self.rotation_deg],
            "translation_mm": [round(float(v), 3) for v in self.translation_mm],
        }


def euler_deg(matrix: np.ndarray) -> tuple[float, float, float]:
    """The (rx, ry, rz) degrees :func:`rotation_matrix` turns into ``matrix``."""
    from scipy.spatial.transform import Rotation

    rx, ry, rz = Rotation.from_matrix(np.asarray(matrix, np.float64)).as_euler("xyz", True)
    return float(rx), float(ry), float(rz)


def placed(
    definition: PhantomDefinition,
    rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
    translation_mm: Sequence[float] = (0.0, 0.0, 0.0),
) -> Pose:
    """The pose of a phantom placed as its manual says (``definition.nominal_rotation_deg``),
    then rotated by ``rotation_deg`` about the patient axes (x, then y, then z) and moved to
    ``translation_mm`` (its centre, LPS)."""
    rot = rotation_matrix(*rotation_deg) @ rotation_matrix(*definition.nominal_rotation_deg)
    return Pose(euler_deg(rot), tuple(float(v) for v in translation_mm))


# --------------------------------------------------------------------------------------
# simulation


@nb.njit(cache=True)
def _fractions_kernel(aff, shape, sub, rot_t, trans, centres, radii, walls, outer, idx, fs, ff):
    """Per voxel: index of the sphere it touches (-1 none), fluid fraction of that sphere
    ``fs`` and fill fraction ``ff`` (the rest is wall or air), by ``sub`` sub-samples/axis."""
    nz, ny, nx = shape
    ns = centres.shape[0]
    r2 = radii * radii
    rw2 = (radii + walls) * (radii + walls)
    o2 = outer * outer
    n_sub = sub[0] * sub[1] * sub[2]
    counts = np.zeros(ns)
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                nf = 0
                for s in range(ns):
                    counts[s] = 0.0
                for a in range(sub[0]):
                    fx = x + (a + 0.5) / sub[0] - 0.5
                    for b in range(sub[1]):
                        fy = y + (b + 0.5) / sub[1] - 0.5
                        for c in range(sub[2]):
                            fz = z + (c + 0.5) / sub[2] - 0.5
                            px = aff[0, 0] * fx + aff[0, 1] * fy + aff[0, 2] * fz + aff[0, 3]
                            py = aff[1, 0] * fx + aff[1, 1] * fy + aff[1, 2] * fz + aff[1, 3]
                            pz = aff[2, 0] * fx + aff[2, 1] * fy + aff[2, 2] * fz + aff[2, 3]
                            px -= trans[0]
                            py -= trans[1]
                            pz -= trans[2]
                            qx = rot_t[0, 0] * px + rot_t[0, 1] * py + rot_t[0, 2] * pz
                            qy = rot_t[1, 0] * px + rot_t[1, 1] * py + rot_t[1, 2] * pz
                            qz = rot_t[2, 0] * px + rot_t[2, 1] * py + rot_t[2, 2] * pz
                            if qx * qx + qy * qy + qz * qz > o2:
                                continue
                            hit = False
                            for s in range(ns):
                                dz = qz - centres[s, 2]
                                if dz * dz > rw2[s]:
                                    continue
                                dx = qx - centres[s, 0]
                                dy = qy - centres[s, 1]
                                d2 = dx * dx + dy * dy + dz * dz
                                if d2 <= rw2[s]:
                                    hit = True
                                    if d2 <= r2[s]:
                                        counts[s] += 1.0
                                    break
                            if not hit:
                                nf += 1
                best = -1
                bc = 0.0
                for s in range(ns):
                    if counts[s] > bc:
                        bc = counts[s]
                        best = s
                idx[z, y, x] = best
                fs[z, y, x] = bc / n_sub
                ff[z, y, x] = nf / n_sub


@nb.njit(cache=True)
def _phantom_signal_kernel(
    idx, fs, ff, t1, t2, pd, fill, b1, coil, td, te, tr, th, al, ps, pw, out
):
    """out[z, delay, echo, y, x] = coil * (fs*PD_s*g_s*E2_s + ff*PD_f*g_f*E2_f)."""
    nz, ny, nx = idx.shape
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                s = idx[z, y, x]
                a = fs[z, y, x] if s >= 0 else 0.0
                f = ff[z, y, x]
                if a <= 0.0 and f <= 0.0:
                    continue
                for i in range(td.shape[0]):
                    acc_s = 0.0
                    acc_f = 0.0
                    if a > 0.0:
                        g, _gr, _gb = t1_factor(1.0 / t1[s], b1[z, y, x], td[i], tr, th, al, ps, pw)
                        acc_s = a * pd[s] * g
                    if f > 0.0:
                        g, _gr, _gb = t1_factor(
                            1.0 / fill[0], b1[z, y, x], td[i], tr, th, al, ps, pw
                        )
                        acc_f = f * fill[2] * g
                    for j in range(te.shape[0]):
                        v = 0.0
                        if a > 0.0:
                            v += acc_s * math.exp(-te[j] / t2[s])
                        if f > 0.0:
                            v += acc_f * math.exp(-te[j] / fill[1])
                        out[z, i, j, y, x] = coil[z, y, x] * v


@dataclass
class PhantomScan:
    """A simulated phantom acquisition and its truth.

    sphere_centres_lps: ``[n_spheres, 3]`` true centres (patient LPS, mm), in definition order.
    b1, coil: the flip-angle ratio and receive fields ``[z, y, x]`` used.
    sphere_index / sphere_fraction / fill_fraction: the partial-volume truth per voxel.
    truth: sphere label -> the (T1, T2, PD) simulated (reference at ``temperature_c``).
    """

    acq: Acquisition
    pose: Pose
    definition: PhantomDefinition
    sphere_centres_lps: np.ndarray
    b1: np.ndarray
    coil: np.ndarray
    sphere_index: np.ndarray
    sphere_fraction: np.ndarray
    fill_fraction: np.ndarray
    temperature_c: float
    truth: dict[str, dict[str, float]] = field(default_factory=dict)


def _patient_grid(shape, affine) -> np.ndarray:
    """``[z, y, x, 3]`` float32 LPS coordinates of voxel centres."""
    return np.stack(patient_coords(shape, affine), -1)


def _unit_field(rel: np.ndarray, inside: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """A smooth field scaled to [0, 1] over ``inside``: sum of linear, quadratic and a
    Gaussian bump terms of the phantom-relative coordinates (mm / 100)."""
    x, y, z = rel[..., 0] / 100.0, rel[..., 1] / 100.0, rel[..., 2] / 100.0
    wl, wq, wb = weights[:3], weights[3], weights[4]
    raw = wl[0] * x + wl[1] * y + wl[2] * z - wq * (x * x + y * y + 0.5 * z * z)
    raw = raw + wb * np.exp(-((x - 0.3) ** 2 + (y + 0.4) ** 2 + z * z) / 0.5)
    vals = raw[inside]
    lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
    u = (raw - lo) / (hi - lo if hi > lo else 1.0)
    return np.clip(u, 0.0, 1.0).astype(np.float32)


def _checked_grid(
    shape: Sequence[int], voxel_size_mm: Sequence[float], snr: float | None
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The grid ``(z, y, x)`` and voxel size (mm) as numbers; an error names a bad one."""
    shp = tuple(int(v) for v in shape)
    if len(shp) != 3 or min(shp) < 1:
        raise ValueError(f"shape: expected 3 positive integers (z, y, x), got {tuple(shape)}")
    vs = tuple(float(v) for v in voxel_size_mm)
    if len(vs) != 3 or min(vs) <= 0:
        raise ValueError(f"voxel_size_mm: expected 3 positive numbers, got {voxel_size_mm!r}")
    if snr is not None and not snr > 0:
        raise ValueError(f"snr: must be > 0 or None, got {snr!r}")
    return shp, vs


def _smooth_fields(
    shp: tuple[int, ...],
    affine: np.ndarray,
    pose: Pose,
    inside: np.ndarray,
    b1_range: tuple[float, float],
    coil_range: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth B1 and receive fields ``[z, y, x]`` float32 spanning the given ranges
    over the phantom (``inside``)."""
    rel = _patient_grid(shp, affine) - np.asarray(pose.translation_mm, np.float32)
    lo, hi = (float(v) for v in b1_range)
    b1 = (lo + (hi - lo) * _unit_field(rel, inside, (0.6, 0.3, 0.4, 1.0, 0.0))).astype(np.float32)
    clo, chi = (float(v) for v in coil_range)
    coil = (clo + (chi - clo) * _unit_field(rel, inside, (0.2, -0.5, 0.3, 0.3, 1.0))).astype(
        np.float32
    )
    return b1, coil


def _voxel_fractions(
    definition: PhantomDefinition,
    centres: np.ndarray,
    shp: tuple[int, ...],
    affine: np.ndarray,
    pose: Pose,
    supersample: Sequence[int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per voxel ``[z, y, x]``: the sphere index (int16), that sphere's fluid fraction and
    the fill's fraction (float32), from ``supersample`` sub-samples per axis."""
    idx = np.empty(shp, np.int16)
    fs = np.empty(shp, np.float32)
    ff = np.empty(shp, np.float32)
    _fractions_kernel(
        affine,
        np.array(shp, np.int64),
        np.array([int(v) for v in supersample], np.int64),
        np.ascontiguousarray(pose.matrix.T),
        np.asarray(pose.translation_mm, np.float64),
        centres,
        np.array([s.radius_mm for s in definition.spheres], np.float64),
        np.array([s.wall_mm for s in definition.spheres], np.float64),
        float(definition.outer_radius_mm),
        idx,
        fs,
        ff,
    )
    return idx, fs, ff


def simulate_phantom(
    definition: PhantomDefinition,
    *,
    shape: Sequence[int] = (20, 160, 160),
    voxel_size_mm: Sequence[float] = (4.0, 1.5, 1.5),
    pose: Pose | None = None,
    slab_centre_mm: Sequence[float] | None = None,
    tilt_deg: Sequence[float] | None = None,
    slab_offset_mm: float | None = None,
    snr: float | None = 50.0,
    b1_range: tuple[float, float] = (0.8, 1.2),
    coil_range: tuple[float, float] = (0.7, 1.3),
    temperature_c: float | None = None,
    magnitude: bool = False,
    seed: int = 0,
    delays_ms: Sequence[float] = (150.0, 580.0, 1900.0, 3850.0),
    echo_times_ms: Sequence[float] = (20.0, 100.0),
    tr_ms: float = 4000.0,
    saturation_deg: float = 120.0,
    excitation_deg: float = 90.0,
    supersample: Sequence[int] = (3, 3, 3),
    profile: tuple[np.ndarray, np.ndarray] = IDEAL_PROFILE,
) -> PhantomScan:
    """Simulate an MDME acquisition of the phantom with known truth.

    shape, voxel_size_mm: grid ``(z, y, x)`` and voxel size (mm); the slab is centred on
    ``slab_centre_mm`` (LPS; None: the point ``slab_offset_mm`` along the phantom's plate
    axis, default midway between its two lowest plates) and its axes are rotated by
    ``tilt_deg`` (None: the definition's nominal rotation, so the slices are parallel to the
    plates of a phantom placed as its manual says; other values give an oblique stack).
    pose: where the phantom sits (default: :func:`placed` at the origin). snr: noise SD per real
    channel = 100/snr (None: noiseless), as :func:`processing.phantom.make_phantom`.
    b1_range / coil_range: smooth fields spanning these over the phantom. temperature_c:
    relaxation times scaled by the definition's temperature coefficients (None: as
    certified). supersample: sub-samples per voxel axis for partial volume.
    Signals add (fluid of one sphere + fill); walls and air carry none.
    """
    shp, vs = _checked_grid(shape, voxel_size_mm, snr)
    pose = pose or placed(definition)
    temp = definition.temperature_c if temperature_c is None else float(temperature_c)
    if tilt_deg is None:
        tilt_deg = definition.nominal_rotation_deg
    if slab_centre_mm is None:
        if slab_offset_mm is None:
            plates = sorted({s.centre_mm[2] for s in definition.spheres})
            slab_offset_mm = sum(plates[:2]) / len(plates[:2])
        slab_centre_mm = pose.to_patient(np.array([0.0, 0.0, float(slab_offset_mm)]))
    rotation = rotation_matrix(*(float(v) for v in tilt_deg))
    affine = centred_grid_affine(shp, vs, rotation, slab_centre_mm)
    centres = definition.centres_mm()
    idx, fs, ff = _voxel_fractions(definition, centres, shp, affine, pose, supersample)
    ft1 = definition.temperature_factor("t1_ms", temp)
    ft2 = definition.temperature_factor("t2_ms", temp)
    sim = [definition.simulated_at(s, temp) for s in definition.spheres]
    t1 = np.array([v["t1_ms"] for v in sim])
    t2 = np.array([v["t2_ms"] for v in sim])
    pd = np.array([v["pd_pu"] for v in sim])
    fill = np.array(
        [definition.fill_t1_ms * ft1, definition.fill_t2_ms * ft2, definition.fill_pd_pu]
    )
    b1, coil = _smooth_fields(shp, affine, pose, (ff > 0) | (fs > 0), b1_range, coil_range)
    nz, ny, nx = shp
    signal = np.zeros((nz, len(delays_ms), len(echo_times_ms), ny, nx), np.float32)
    protocol = (delays_ms, echo_times_ms, tr_ms, saturation_deg, excitation_deg)
    _phantom_signal_kernel(
        idx,
        fs,
        ff,
        t1,
        t2,
        pd,
        fill,
        b1,
        coil,
        *kernel_protocol(*protocol, profile),
        signal,
    )
    add_noise(np.random.default_rng(seed), signal, snr, magnitude)
    metadata = {
        "source": "synthmr phantom_qc.simulate_phantom",
        "phantom": definition.name,
        "phantom_version": definition.version,
        "pose": pose.as_dict(),
        "temperature_c": temp,
        "seed": int(seed),
        **noise_metadata(snr),
    }
    acq = simulated_acquisition(signal, protocol, vs, affine, magnitude, metadata)
    truth = {
        s.label: {"t1_ms": float(t1[i]), "t2_ms": float(t2[i]), "pd_pu": float(pd[i])}
        for i, s in enumerate(definition.spheres)
    }
    return PhantomScan(
        acq=acq,
        pose=pose,
        definition=definition,
        sphere_centres_lps=pose.to_patient(centres),
        b1=b1,
        coil=coil,
        sphere_index=idx,
        sphere_fraction=fs,
        fill_fraction=ff,
        temperature_c=temp,
        truth=truth,
    )


# --------------------------------------------------------------------------------------
# outer shell


@dataclass(frozen=True)
class OuterFit:
    centre_mm: tuple[float, float, float]
    radius_mm: float
    rms_mm: float
    points: int


def _support(maps: QuantMaps | np.ndarray) -> np.ndarray:
    """Signal support with the holes (walls, low-signal spheres) filled, per slice.
    ``maps``: fitted maps (their mask) or a bool ``[z, y, x]`` signal mask."""
    mask = maps.mask if isinstance(maps, QuantMaps) else np.asarray(maps, bool)
    sup = np.zeros(mask.shape, bool)
    for z in range(sup.shape[0]):
        m = ndi.binary_opening(mask[z], iterations=1)
        lab, n = ndi.label(m)
        if n == 0:
            continue
        sizes = ndi.sum(m, lab, index=np.arange(1, n + 1))
        keep = np.isin(lab, 1 + np.flatnonzero(sizes >= max(20, 0.02 * sizes.max())))
        sup[z] = ndi.binary_fill_holes(ndi.binary_closing(keep, iterations=2, border_value=0))
    return sup


def fit_outer_sphere(
    support: np.ndarray, affine: np.ndarray, radius_mm: float | None = None
) -> OuterFit | None:
    """Sphere through the in-plane edge of ``support`` (bool ``[z, y, x]``).

    radius_mm None: free radius (algebraic least squares); else the centre with that radius
    (geometric least squares from the free fit). Edge voxels on the image border are left
    out (the object may extend beyond the field of view). None when < 20 edge points.
    """
    edge = support & ~ndi.binary_erosion(
        support, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool)
    )
    edge[:, 0, :] = edge[:, -1, :] = False
    edge[:, :, 0] = edge[:, :, -1] = False
    zz, yy, xx = np.nonzero(edge)
    if zz.size < 20:
        return None
    idx = np.stack([xx, yy, zz, np.ones_like(xx)]).astype(np.float64)
    pts = (affine @ idx)[:3].T
    a = np.column_stack([2 * pts, np.ones(len(pts))])
    b = (pts**2).sum(1)
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    c = sol[:3]
    r = float(math.sqrt(max(sol[3] + c @ c, 0.0)))
    if radius_mm is not None:
        r_fixed = float(radius_mm)

        def res(cc: np.ndarray) -> np.ndarray:
            return np.linalg.norm(pts - cc, axis=1) - r_fixed

        c = optimize.least_squares(res, c, loss="soft_l1", f_scale=2.0).x
        r = r_fixed
    rms = float(np.sqrt(np.mean((np.linalg.norm(pts - c, axis=1) - r) ** 2)))
    return OuterFit(tuple(float(v) for v in c), r, rms, int(zz.size))


# --------------------------------------------------------------------------------------
# pose detection


@nb.njit(cache=True)
def _region_cost(feat, support, cidx, lin, radii, walls, soft, box, tot0, tot1, tot2):
    """Within-region sum of squares for spheres at voxel-index centres ``cidx`` [n, 3]
    (x, y, z) with fluid radii ``radii`` and walls ``walls`` (mm, [n]). Regions: each
    sphere's fluid, each sphere's wall, the rest (fill)."""
    nf = feat.shape[0]
    nz, ny, nx = support.shape
    bg0 = tot0
    bg1 = tot1.copy()
    bg2 = tot2.copy()
    in1 = np.zeros(nf)
    in2 = np.zeros(nf)
    wa1 = np.zeros(nf)
    wa2 = np.zeros(nf)
    cost = 0.0
    for s in range(cidx.shape[0]):
        radius = radii[s]
        rout = radius + walls[s]
        cx, cy, cz = cidx[s, 0], cidx[s, 1], cidx[s, 2]
        z0 = max(0, math.floor(cz - box[2]))
        z1 = min(nz - 1, math.ceil(cz + box[2]))
        y0 = max(0, math.floor(cy - box[1]))
        y1 = min(ny - 1, math.ceil(cy + box[1]))
        x0 = max(0, math.floor(cx - box[0]))
        x1 = min(nx - 1, math.ceil(cx + box[0]))
        if z0 > z1 or y0 > y1 or x0 > x1:
            continue
        in0 = 0.0
        wa0 = 0.0
        for f in range(nf):
            in1[f] = 0.0
            in2[f] = 0.0
            wa1[f] = 0.0
            wa2[f] = 0.0
        for z in range(z0, z1 + 1):
            for y in range(y0, y1 + 1):
                for x in range(x0, x1 + 1):
                    if not support[z, y, x]:
                        continue
                    ux = x - cx
                    uy = y - cy
                    uz = z - cz
                    dx = lin[0, 0] * ux + lin[0, 1] * uy + lin[0, 2] * uz
                    dy = lin[1, 0] * ux + lin[1, 1] * uy + lin[1, 2] * uz
                    dz = lin[2, 0] * ux + lin[2, 1] * uy + lin[2, 2] * uz
                    d = math.sqrt(dx * dx + dy * dy + dz * dz)
                    wo = min(1.0, max(0.0, (rout - d) / soft + 0.5))
                    if wo <= 0.0:
                        continue
                    wi = min(1.0, max(0.0, (radius - d) / soft + 0.5))
                    ww = wo - wi
                    in0 += wi
                    wa0 += ww
                    bg0 -= wo
                    for f in range(nf):
                        v = feat[f, z, y, x]
                        in1[f] += wi * v
                        in2[f] += wi * v * v
                        wa1[f] += ww * v
                        wa2[f] += ww * v * v
                        bg1[f] -= wo * v
                        bg2[f] -= wo * v * v
        for f in range(nf):
            if in0 > 1e-6:
                cost += in2[f] - in1[f] * in1[f] / in0
            if wa0 > 1e-6:
                cost += wa2[f] - wa1[f] * wa1[f] / wa0
    for f in range(nf):
        if bg0 > 1e-6:
            cost += bg2[f] - bg1[f] * bg1[f] / bg0
    return cost


@dataclass
class Detection:
    """The pose found and how well the phantom model explains the images."""

    pose: Pose
    outer: OuterFit | None
    explained: float
    evaluations: int
    seconds: float
    is_phantom_shape: bool
    reason: str = ""
    #: rotation (deg) about the patient axes away from the definition's nominal placement
    deviation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: per sphere (definition order), after :func:`refine_spheres`: found centre (LPS mm,
    #: ``[n, 3]``), fluid radius (mm, ``[n]``) and how far the centre moved from where the
    #: rigid pose put it (mm); None before refinement
    centres_lps: np.ndarray | None = None
    radii_mm: np.ndarray | None = None
    shift_mm: np.ndarray | None = None
    refined: list[str] = field(default_factory=list)
    #: ``explained`` of the rigid model alone (``explained`` is then the refined one's)
    explained_rigid: float | None = None
    refine_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.pose.as_dict(),
            "deviation_from_nominal_deg": [round(v, 3) for v in self.deviation_deg],
            "outer_centre_mm": None if self.outer is None else list(self.outer.centre_mm),
            "outer_radius_mm": None if self.outer is None else self.outer.radius_mm,
            "outer_rms_mm": None if self.outer is None else self.outer.rms_mm,
            "explained": round(float(self.explained), 4),
            "explained_rigid": (
                None if self.explained_rigid is None else round(float(self.explained_rigid), 4)
            ),
            "spheres_refined": len(self.refined),
            "refine_seconds": round(self.refine_seconds, 3),
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 3),
            "is_phantom_shape": self.is_phantom_shape,
            "reason": self.reason,
        }


def _features(maps: QuantMaps, support: np.ndarray) -> np.ndarray:
    """float64 ``[3, z, y, x]`` standardized log T1, log T2 and M0 (0 outside ``support``)."""
    ok = maps.mask & support
    f = np.zeros((3,) + support.shape, np.float64)
    t1 = np.log(np.clip(maps.t1_ms, 10.0, 20000.0, dtype=np.float64))
    t2 = np.log(np.clip(maps.t2_ms, 2.0, 5000.0, dtype=np.float64))
    m0 = maps.m0.astype(np.float64)
    for k, v in enumerate((t1, t2, m0)):
        vals = v[ok]
        if vals.size == 0:
            continue
        if k == 2:
            fill = np.where(ok, v, 0.0)
        else:
            fill = np.where(ok, v, np.median(vals))
        q25, q50, q75 = np.percentile(vals, [25, 50, 75])
        scale = max((q75 - q25) / 1.35, 0.05 * max(abs(q50), 1e-6) if k == 2 else 0.05)
        f[k] = np.where(support, (fill - (q50 if k < 2 else 0.0)) / scale, 0.0)
    return f


def _lin_inv(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(linear part, its inverse): fresh C-contiguous writable copies, so the numba kernels
    see one array type whatever the caller's affine is (a read-only view would compile a
    second specialization)."""
    lin = np.array(np.asarray(affine, np.float64)[:3, :3], order="C")
    return lin, np.linalg.inv(lin)


def detect_pose(
    maps: QuantMaps,
    affine: np.ndarray,
    definition: PhantomDefinition,
    *,
    max_rotation_deg: float = 20.0,
    support: np.ndarray | None = None,
) -> Detection:
    """Find the phantom's 6-DoF pose from fitted maps (module doc, steps 1-2)."""
    t0 = time.perf_counter()
    affine = np.asarray(affine, np.float64)
    sup = _support(maps) if support is None else support
    free = fit_outer_sphere(sup, affine)
    r_def = definition.outer_radius_mm
    if free is None:
        return Detection(Pose(), None, 0.0, 0, time.perf_counter() - t0, False, "no signal")
    shape_ok = (
        abs(free.radius_mm - r_def) <= _RADIUS_TOLERANCE * r_def and free.rms_mm <= _SHELL_RMS_MM
    )
    if not shape_ok:
        return Detection(
            Pose(translation_mm=free.centre_mm),
            free,
            0.0,
            0,
            time.perf_counter() - t0,
            False,
            f"the object is not a {2 * r_def:.0f} mm sphere: best sphere through its outline"
            f" has radius {free.radius_mm:.1f} mm, RMS {free.rms_mm:.1f} mm",
        )
    outer = fit_outer_sphere(sup, affine, r_def) or free
    feat = np.ascontiguousarray(_features(maps, sup))
    sw = sup.astype(np.float64)
    tot0 = float(sw.sum())
    tot1 = np.array([(feat[k] * sw).sum() for k in range(3)])
    tot2 = np.array([(feat[k] ** 2 * sw).sum() for k in range(3)])
    total_ss = float(np.sum(tot2 - tot1**2 / max(tot0, 1.0)))
    lin, inv = _lin_inv(affine)
    origin = affine[:3, 3]
    centres = definition.centres_mm()
    radii = np.array([s.radius_mm for s in definition.spheres], np.float64)
    walls = np.array([s.wall_mm for s in definition.spheres], np.float64)
    vox = np.linalg.norm(lin, axis=0)
    soft = float(max(1.0, 0.75 * min(vox[0], vox[1])))
    reach = float((radii + walls).max()) + soft
    box = reach / vox
    n_eval = 0

    nominal = rotation_matrix(*definition.nominal_rotation_deg)

    def cost(theta: np.ndarray) -> float:
        nonlocal n_eval
        n_eval += 1
        rot = rotation_matrix(theta[0], theta[1], theta[2]) @ nominal
        p = centres @ rot.T + theta[3:6]
        cidx = (p - origin) @ inv.T
        return _region_cost(
            feat,
            sup,
            np.ascontiguousarray(cidx),
            lin,
            radii,
            walls,
            soft,
            box,
            tot0,
            tot1,
            tot2,
        )

    c0 = np.asarray(outer.centre_mm)
    steps = np.arange(-max_rotation_deg, max_rotation_deg + 1e-9, 10.0)
    axis = lin[:, 2] / vox[2]
    trials = []
    for rx in steps:
        for ry in steps:
            for rz in steps:
                for dz in (-8.0, -4.0, 0.0, 4.0, 8.0):
                    th = np.array([rx, ry, rz, *(c0 + dz * axis)])
                    trials.append((cost(th), th))
    trials.sort(key=lambda t: t[0])
    best_val, best = math.inf, trials[0][1]
    for _, th in trials[:3]:
        simplex = np.array([th] + [th + np.eye(6)[k] * (4.0 if k < 3 else 3.0) for k in range(6)])
        res = optimize.minimize(
            cost,
            th,
            method="Nelder-Mead",
            options={"initial_simplex": simplex, "xatol": 0.02, "fatol": 1e-3, "maxfev": 1500},
        )
        if res.fun < best_val:
            best_val, best = float(res.fun), np.asarray(res.x)
    pose = Pose(euler_deg(rotation_matrix(*best[:3]) @ nominal), tuple(float(v) for v in best[3:]))
    explained = 1.0 - best_val / total_ss if total_ss > 0 else 0.0
    det = Detection(pose, outer, explained, n_eval, time.perf_counter() - t0, True)
    det.deviation_deg = tuple(float(v) for v in best[:3])
    t_refine = time.perf_counter()
    refine_spheres(det, feat, sup, affine, definition)
    det.refine_seconds = time.perf_counter() - t_refine
    if det.refined:  # how well the phantom as found (each sphere's place and size) explains
        cidx = (det.centres_lps - origin) @ inv.T
        found_radii = np.asarray(det.radii_mm, np.float64)
        box_found = (float((found_radii + walls).max()) + soft) / vox
        fc = _region_cost(
            feat,
            sup,
            np.ascontiguousarray(cidx),
            lin,
            found_radii,
            walls,
            soft,
            box_found,
            tot0,
            tot1,
            tot2,
        )
        det.explained_rigid = det.explained
        det.explained = max(det.explained, 1.0 - fc / total_ss if total_ss > 0 else 0.0)
    det.seconds = time.perf_counter() - t0
    return det


@nb.njit(cache=True)
def _local_cost(feat, support, cdom, rdom, excl, excl_r, c, lin, vox, radius, wall):
    """Within-region sum of squares of the features in the ball of ``rdom`` mm about
    ``cdom`` (voxel index x, y, z), voxels within ``excl_r`` mm of an ``excl`` centre (the
    neighbours) left out. Regions: fluid (closer than ``radius`` to ``c``), wall (closer than
    ``radius + wall``), the rest (local fill); a voxel's share of each follows its width
    along the radial direction (partial volume of a box against a sphere's surface)."""
    nf = feat.shape[0]
    nz, ny, nx = support.shape
    x0 = max(0, math.floor(cdom[0] - rdom / vox[0]))
    x1 = min(nx - 1, math.ceil(cdom[0] + rdom / vox[0]))
    y0 = max(0, math.floor(cdom[1] - rdom / vox[1]))
    y1 = min(ny - 1, math.ceil(cdom[1] + rdom / vox[1]))
    z0 = max(0, math.floor(cdom[2] - rdom / vox[2]))
    z1 = min(nz - 1, math.ceil(cdom[2] + rdom / vox[2]))
    s0 = np.zeros(3)
    s1 = np.zeros((3, nf))
    s2 = np.zeros((3, nf))
    w = np.zeros(3)
    for z in range(z0, z1 + 1):
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                if not support[z, y, x]:
                    continue
                ax = (x - cdom[0]) * vox[0]
                ay = (y - cdom[1]) * vox[1]
                az = (z - cdom[2]) * vox[2]
                if ax * ax + ay * ay + az * az > rdom * rdom:
                    continue
                skip = False
                for e in range(excl.shape[0]):
                    ex = (x - excl[e, 0]) * vox[0]
                    ey = (y - excl[e, 1]) * vox[1]
                    ez = (z - excl[e, 2]) * vox[2]
                    if ex * ex + ey * ey + ez * ez < excl_r[e] * excl_r[e]:
                        skip = True
                        break
                if skip:
                    continue
                px = (x - c[0]) * vox[0]
                py = (y - c[1]) * vox[1]
                pz = (z - c[2]) * vox[2]
                d = math.sqrt(px * px + py * py + pz * pz)
                if d > 1e-6:
                    width = (abs(px) * vox[0] + abs(py) * vox[1] + abs(pz) * vox[2]) / d
                else:
                    width = min(vox[0], min(vox[1], vox[2]))
                width = max(width, 0.5)
                fi = min(1.0, max(0.0, (radius - d) / width + 0.5))
                fo = min(1.0, max(0.0, (radius + wall - d) / width + 0.5))
                w[0] = fi
                w[1] = fo - fi
                w[2] = 1.0 - fo
                for r in range(3):
                    if w[r] <= 0.0:
                        continue
                    s0[r] += w[r]
                    for f in range(nf):
                        v = feat[f, z, y, x]
                        s1[r, f] += w[r] * v
                        s2[r, f] += w[r] * v * v
    cost = 0.0
    for r in range(3):
        if s0[r] > 1e-6:
            for f in range(nf):
                cost += s2[r, f] - s1[r, f] * s1[r, f] / s0[r]
    return cost


#: Per-sphere refinement bounds: a sphere may sit this far (mm) from where the rigid pose
#: puts it, and its fluid radius may differ from the definition's by this fraction.
MAX_SPHERE_SHIFT_MM = 6.0
MAX_RADIUS_CHANGE = 0.3


def _refine_one(
    k: int,
    rigid: np.ndarray,
    r_def: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    walls: np.ndarray,
    feat: np.ndarray,
    support: np.ndarray,
    affine: np.ndarray,
    max_shift_mm: float,
    max_radius_change: float,
) -> tuple[bool, np.ndarray, float]:
    """One sphere's search (:func:`refine_spheres`) from its current estimate
    (``centres[k]``, ``radii[k]``); the bounds count from the rigid position ``rigid[k]`` and
    the definition's radius ``r_def[k]``. Returns (accepted, centre LPS, radius)."""
    lin, inv = _lin_inv(affine)
    vox = np.linalg.norm(lin, axis=0)
    origin = affine[:3, 3]
    shp = np.array([support.shape[2], support.shape[1], support.shape[0]], np.float64)
    r0 = float(r_def[k])
    cidx = inv @ (rigid[k] - origin)
    # skip only when even the smallest sphere the bounds allow would be cut: a sphere near
    # the edge is searched too (voxels beyond the grid simply do not count)
    ext = r0 * (1 - max_radius_change) / vox
    if np.any(cidx - ext < -0.5) or np.any(cidx + ext > shp - 0.5):
        return False, centres[k], float(radii[k])  # cut by or beyond the grid's edge
    rdom = r0 * (1 + max_radius_change) + walls[k] + 2.0
    cdom = np.ascontiguousarray(inv @ (centres[k] - origin))
    near = np.linalg.norm(centres - centres[k], axis=1) < rdom + radii + walls
    near[k] = False
    excl = np.ascontiguousarray(((centres[near] - origin) @ inv.T).reshape(-1, 3))
    excl_r = np.ascontiguousarray(radii[near] + walls[near] + 0.5)
    base = np.concatenate([centres[k] - rigid[k], [radii[k] - r0]])

    def cost(p: np.ndarray) -> float:
        if np.linalg.norm(p[:3]) > max_shift_mm or abs(p[3]) > max_radius_change * r0:
            return 1e30
        c = np.ascontiguousarray(inv @ (rigid[k] + p[:3] - origin))
        return _local_cost(
            feat, support, cdom, rdom, excl, excl_r, c, lin, vox, r0 + p[3], walls[k]
        )

    steps = np.array([1.0, 1.0, 1.0, 0.5])
    simplex = np.array([base] + [base + np.eye(4)[i] * steps[i] for i in range(4)])
    res = optimize.minimize(
        cost,
        base,
        method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": 0.1, "fatol": 0.5, "maxfev": 400},
    )
    p = np.asarray(res.x)
    # a radius on its bound is kept (the smallest: a dark sphere whose fluid and wall look
    # alike; the ROI is then the smaller, safe one); a centre on its bound is not found
    if not res.fun < cost(base) or np.linalg.norm(p[:3]) > 0.98 * max_shift_mm:
        return False, centres[k], float(radii[k])
    return True, rigid[k] + p[:3], r0 + float(p[3])


def refine_spheres(
    det: Detection,
    feat: np.ndarray,
    support: np.ndarray,
    affine: np.ndarray,
    definition: PhantomDefinition,
    *,
    max_shift_mm: float = MAX_SPHERE_SHIFT_MM,
    max_radius_change: float = MAX_RADIUS_CHANGE,
    passes: int = 2,
) -> None:
    """Find every sphere's own centre and fluid radius after the rigid pose (in place:
    ``det.centres_lps``, ``det.radii_mm``, ``det.shift_mm``, ``det.refined``).

    A real phantom is not its drawing: spheres sit a few mm from their nominal places and
    their size differs from the definition's. Per sphere whose fluid the grid holds, a
    Nelder-Mead search over (centre, radius) minimizes :func:`_local_cost` in a ball around
    the rigid position (neighbouring spheres left out), within ``max_shift_mm`` and
    ``max_radius_change``. A sphere cut by the grid's edge, or whose search ends on a bound
    or does not lower the cost, keeps the rigid position and the definition's radius. The
    second pass leaves the neighbours out where the first found them (a neighbour larger or
    moved towards the sphere would otherwise count as its fill).
    """
    rigid = det.pose.to_patient(definition.centres_mm())
    centres = rigid.copy()
    r_def = np.array([s.radius_mm for s in definition.spheres], np.float64)
    radii = r_def.copy()
    walls = np.array([s.wall_mm for s in definition.spheres], np.float64)
    done: set[str] = set()
    for _ in range(max(1, passes)):
        for k, s in enumerate(definition.spheres):
            ok, c_k, r_k = _refine_one(
                k,
                rigid,
                r_def,
                centres,
                radii,
                walls,
                feat,
                support,
                affine,
                max_shift_mm,
                max_radius_change,
            )
            if ok:
                centres[k], radii[k] = c_k, r_k
                done.add(s.label)
    det.refined = [s.label for s in definition.spheres if s.label in done]
    det.centres_lps = centres
    det.radii_mm = radii
    det.shift_mm = np.linalg.norm(centres - rigid, axis=1)


# --------------------------------------------------------------------------------------
# ROIs


@dataclass
class SphereROI:
    """One sphere's ROI: flat voxel indices into ``[z, y, x]`` (empty when not measured)."""

    label: str
    array: str
    centre_mm: tuple[float, float, float]
    voxels: np.ndarray
    measured: bool
    reason: str = ""
    #: the fluid radius the ROI was eroded from (mm) and the centre's distance from where
    #: the rigid pose put the sphere (mm)
    radius_mm: float = 0.0
    shift_mm: float = 0.0


def sphere_rois(
    definition: PhantomDefinition,
    pose: Pose,
    affine: np.ndarray,
    shape: Sequence[int],
    *,
    erosion_mm: float = 1.0,
    min_voxels: int = 10,
    centres_lps: np.ndarray | None = None,
    radii_mm: np.ndarray | None = None,
) -> list[SphereROI]:
    """Eroded spherical ROIs (module doc, step 3), one per sphere, in definition order.

    centres_lps / radii_mm: each sphere's found centre and fluid radius
    (:func:`refine_spheres`); None: where the rigid pose puts it, the definition's radius.
    The ROI is eroded by ``erosion_mm`` from that radius."""
    affine = np.asarray(affine, np.float64)
    lin, inv = _lin_inv(affine)
    vox = np.linalg.norm(lin, axis=0)  # x, y, z spacing
    half = vox / 2.0
    shp = np.array([shape[2], shape[1], shape[0]], np.float64)  # x, y, z counts
    out: list[SphereROI] = []
    rigid = pose.to_patient(definition.centres_mm())
    centres = rigid if centres_lps is None else np.asarray(centres_lps, np.float64)
    radii = [s.radius_mm for s in definition.spheres] if radii_mm is None else radii_mm
    shifts = np.linalg.norm(centres - rigid, axis=1)
    names = ("field of view (columns)", "field of view (rows)", "slab")
    for k, (s, c) in enumerate(zip(definition.spheres, centres, strict=True)):
        cidx = inv @ (c - affine[:3, 3])
        r = float(radii[k])
        geo = {"radius_mm": round(r, 2), "shift_mm": round(float(shifts[k]), 2)}
        # the eroded ROI ball must lie inside the grid: a slab edge through the sphere's
        # outer erosion_mm leaves its ROI whole, deeper it does not
        ext_fluid = max(r - erosion_mm, 0.0) / vox
        ext_out = (r + s.wall_mm) / vox
        reason = ""
        for a in (2, 0, 1):
            if cidx[a] + ext_out[a] < -0.5 or cidx[a] - ext_out[a] > shp[a] - 0.5:
                reason = f"outside the {names[a]}"
                break
            if cidx[a] - ext_fluid[a] < -0.5 or cidx[a] + ext_fluid[a] > shp[a] - 0.5:
                where = "slab edge" if a == 2 else names[a] + " edge"
                reason = f"cut by the {where}"
                break
        centre = tuple(float(v) for v in c)
        if reason:
            out.append(
                SphereROI(s.label, s.array, centre, np.zeros(0, np.int64), False, reason, **geo)
            )
            continue
        lo = np.maximum(np.floor(cidx - ext_fluid), 0).astype(int)
        hi = np.minimum(np.ceil(cidx + ext_fluid), shp - 1).astype(int)
        xs = np.arange(lo[0], hi[0] + 1)
        ys = np.arange(lo[1], hi[1] + 1)
        zs = np.arange(lo[2], hi[2] + 1)
        zz, yy, xx = np.meshgrid(zs, ys, xs, indexing="ij")
        # offsets along the voxel axes (mm): the grid is orthogonal, so the farthest corner
        # is at |offset| + half voxel on every axis
        off = np.stack([(xx - cidx[0]) * vox[0], (yy - cidx[1]) * vox[1], (zz - cidx[2]) * vox[2]])
        far = np.sqrt(((np.abs(off) + half[:, None, None, None]) ** 2).sum(0))
        keep = far <= r - erosion_mm
        flat = np.ravel_multi_index((zz[keep], yy[keep], xx[keep]), tuple(int(v) for v in shape))
        if flat.size < min_voxels:
            out.append(
                SphereROI(
                    s.label,
                    s.array,
                    centre,
                    flat.astype(np.int64),
                    False,
                    f"too few voxels: {flat.size} inside the eroded ROI (minimum {min_voxels})",
                    **geo,
                )
            )
            continue
        out.append(SphereROI(s.label, s.array, centre, flat.astype(np.int64), True, **geo))
    return out


# --------------------------------------------------------------------------------------
# PD from the fill


def _sphere_shell_mask(
    definition: PhantomDefinition,
    pose: Pose,
    affine: np.ndarray,
    shape: Sequence[int],
    pad_mm: float,
    centres_lps: np.ndarray | None = None,
    radii_mm: np.ndarray | None = None,
) -> np.ndarray:
    """bool ``[z, y, x]``: voxel centres within ``radius + wall + pad_mm`` of any sphere
    (found centres and radii when given, else the rigid pose and the definition's)."""
    lin, inv = _lin_inv(affine)
    vox = np.linalg.norm(lin, axis=0)
    out = np.zeros(tuple(int(v) for v in shape), bool)
    lim = np.array([shape[2], shape[1], shape[0]]) - 1
    centres = pose.to_patient(definition.centres_mm()) if centres_lps is None else centres_lps
    radii = [s.radius_mm for s in definition.spheres] if radii_mm is None else radii_mm
    for k, (s, c) in enumerate(zip(definition.spheres, centres, strict=True)):
        reach = float(radii[k]) + s.wall_mm + pad_mm
        cidx = inv @ (c - affine[:3, 3])
        lo = np.maximum(np.floor(cidx - reach / vox), 0).astype(int)
        hi = np.minimum(np.ceil(cidx + reach / vox), lim).astype(int)
        if np.any(lo > hi):
            continue
        zz, yy, xx = np.meshgrid(
            np.arange(lo[2], hi[2] + 1),
            np.arange(lo[1], hi[1] + 1),
            np.arange(lo[0], hi[0] + 1),
            indexing="ij",
        )
        off = lin @ np.stack([xx - cidx[0], yy - cidx[1], zz - cidx[2]]).reshape(3, -1)
        near = (off**2).sum(0) <= reach**2
        out[zz.ravel()[near], yy.ravel()[near], xx.ravel()[near]] = True
    return out


def phantom_pd(
    maps: QuantMaps,
    affine: np.ndarray,
    definition: PhantomDefinition,
    pose: Pose,
    support: np.ndarray,
    *,
    margin_mm: float = 3.0,
    order: int = 3,
    centres_lps: np.ndarray | None = None,
    radii_mm: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """PD (pu) ``[z, y, x]`` = M0 / C, C from a robust polynomial of log M0 over the fill.

    Fill voxels: fitted, not failed, inside the support, farther than ``margin_mm`` from
    every sphere wall and from the outer shell. The polynomial has total degree ``order``
    in-plane; its degree along the slab axis drops to what the slab's extent supports
    (0 below 20 mm, 1 below 40 mm, else 2). Returns (pd, info).
    """
    affine = np.asarray(affine, np.float64)
    shape = maps.m0.shape
    pts = _patient_grid(shape, affine)
    centre = np.asarray(pose.translation_mm, np.float32)
    rel = (pts - centre) @ pose.matrix.astype(np.float32) / 100.0  # phantom frame, 1/100 mm
    del pts
    near = _sphere_shell_mask(definition, pose, affine, shape, margin_mm, centres_lps, radii_mm)
    rad = np.sqrt((rel**2).sum(-1)) * 100.0
    # failed voxels stay in: in the fill they are mostly T2 on its upper bound, and leaving
    # them out would select low-T2 (low-M0) voxels and bias C
    fill = (
        maps.mask & support & ~near & (rad < definition.outer_radius_mm - margin_mm) & (maps.m0 > 0)
    )
    n = int(fill.sum())
    if n < 50:
        raise ValueError(f"phantom PD: only {n} fill voxels to estimate the receive field")
    zext = float(np.ptp(rel[..., 2][fill])) * 100.0
    z_order = 0 if zext < 20.0 else (1 if zext < 40.0 else 2)
    terms = [
        (i, j, k)
        for k in range(z_order + 1)
        for i in range(order + 1)
        for j in range(order + 1)
        if i + j + k <= order
    ]

    def design(r: np.ndarray) -> np.ndarray:
        x, y, z = (r[..., a].astype(np.float64) for a in range(3))
        return np.stack([x**i * y**j * z**k for i, j, k in terms], -1)

    sel = np.flatnonzero(fill.ravel())[:: max(1, n // 40000)]  # <= ~40k voxels suffice
    a = design(rel.reshape(-1, 3)[sel])
    b = np.log(maps.m0.ravel()[sel].astype(np.float64))
    w = np.ones(sel.size)
    sd = 0.0
    for _ in range(4):  # Tukey biweight IRLS: walls' partial volume, outliers
        coef, *_ = np.linalg.lstsq(a * w[:, None], b * w, rcond=None)
        res = b - a @ coef
        sd = 1.4826 * float(np.median(np.abs(res))) + 1e-9
        u = res / (4.685 * sd)
        w = np.where(np.abs(u) < 1, (1 - u * u) ** 2, 0.0)
    pd = np.zeros(shape, np.float32)
    idx = np.flatnonzero(maps.mask.ravel())
    flat_rel = rel.reshape(-1, 3)
    flat_pd = pd.reshape(-1)
    m0 = maps.m0.reshape(-1)
    for k in range(0, idx.size, 65536):
        part = idx[k : k + 65536]
        with np.errstate(over="ignore"):
            c = np.exp(design(flat_rel[part]) @ coef) / definition.fill_pd_pu
        flat_pd[part] = (m0[part] / c).astype(np.float32)
    info = {"fill_voxels": n, "terms": len(terms), "z_order": z_order, "fit_sd_log": round(sd, 5)}
    return pd, info


# --------------------------------------------------------------------------------------
# range, measurement, linearity


def _cvs(t1, t2, pd, protocol: dict[str, Any], snr: float) -> tuple[np.ndarray, np.ndarray]:
    """Worst-case (B1 0.8, 1.0, 1.2) single-voxel Cramer-Rao relative SDs of T1 and T2 for
    arrays of (T1, T2, PD); all four MDME parameters (M0, R1, R2, B1) free."""
    t1a, t2a, pda = np.broadcast_arrays(
        np.asarray(t1, np.float64), np.asarray(t2, np.float64), np.asarray(pd, np.float64)
    )
    sigma = 100.0 / snr
    w1 = np.zeros(t1a.shape)
    w2 = np.zeros(t1a.shape)
    for b1 in (0.8, 1.0, 1.2):
        _, jac = mdme_jacobian(
            pda,
            t1a,
            t2a,
            b1,
            protocol["delays_ms"],
            protocol["echo_times_ms"],
            protocol["tr_ms"],
            protocol.get("saturation_deg", 120.0),
            protocol.get("excitation_deg", 90.0),
            magnitude=bool(protocol.get("is_magnitude")),
        )
        # relative parameters (d/d log p): well conditioned whatever the units
        scale = np.stack([pda, 1.0 / t1a, 1.0 / t2a, np.full_like(pda, b1)], -1)
        jr = jac * scale[..., None, :]
        fim = np.einsum("...si,...sj->...ij", jr, jr) / sigma**2
        cov = np.linalg.pinv(fim, hermitian=True)
        w1 = np.maximum(w1, np.sqrt(np.abs(cov[..., 1, 1])))
        w2 = np.maximum(w2, np.sqrt(np.abs(cov[..., 2, 2])))
    return w1, w2


def _bounds_ms() -> dict[str, tuple[float, float]]:
    from processing.fit import R1_BOUNDS_PER_S, R2_BOUNDS_PER_S

    return {
        "t1_ms": (
            1000.0 / R1_BOUNDS_PER_S[1] * _BOUND_MARGIN,
            1000.0 / R1_BOUNDS_PER_S[0] / _BOUND_MARGIN,
        ),
        "t2_ms": (
            1000.0 / R2_BOUNDS_PER_S[1] * _BOUND_MARGIN,
            1000.0 / R2_BOUNDS_PER_S[0] / _BOUND_MARGIN,
        ),
    }


def measurable_range(
    protocol: dict[str, Any], *, snr: float = NOMINAL_SNR, max_cv: float = MAX_VOXEL_CV
) -> dict[str, Any]:
    """The protocol's T1 and T2 ranges (ms), for the report (module doc): single-voxel
    Cramer-Rao relative SD <= ``max_cv`` at ``snr`` (PD 100, worst B1 of 0.8-1.2), inside
    the fit's bounds with a 25 % margin. T1 is scanned at T2 = 80 ms, T2 at T1 = 1000 ms; a
    sphere is judged at its own reference (T1, T2) by :func:`sphere_in_range`."""
    grid = np.geomspace(5.0, 20000.0, 300)
    out: dict[str, Any] = {"snr": snr, "max_voxel_cv": max_cv, "rule": RANGE_RULE}
    bounds = _bounds_ms()
    cv1, _ = _cvs(grid, 80.0, 100.0, protocol, snr)
    _, cv2 = _cvs(1000.0, grid, 100.0, protocol, snr)
    for name, cv in (("t1_ms", cv1), ("t2_ms", cv2)):
        ok = (cv <= max_cv) & (grid >= bounds[name][0]) & (grid <= bounds[name][1])
        if not ok.any():
            out[name] = None
            continue
        best = int(np.argmin(np.where(ok, cv, np.inf)))
        lo = hi = best
        while lo > 0 and ok[lo - 1]:
            lo -= 1
        while hi < ok.size - 1 and ok[hi + 1]:
            hi += 1
        out[name] = [round(float(grid[lo]), 1), round(float(grid[hi]), 1)]
    out["pd_pu"] = [round(_PD_MIN_SNR * 100.0 / snr, 1), 100.0]
    return out


def sphere_in_range(
    reference: dict[str, float | None],
    quantity: str,
    protocol: dict[str, Any],
    *,
    snr: float = NOMINAL_SNR,
    max_cv: float = MAX_VOXEL_CV,
) -> tuple[bool, float | None]:
    """Whether a sphere's certified ``quantity`` is measurable (and its voxel CV)."""
    v = reference.get(quantity)
    if v is None:
        return False, None
    if quantity == "pd_pu":
        return bool(v >= _PD_MIN_SNR * 100.0 / snr), None
    lo, hi = _bounds_ms()[quantity]
    t1 = reference.get("t1_ms") or 1000.0
    t2 = reference.get("t2_ms") or 80.0
    cv1, cv2 = _cvs(t1, t2, 100.0, protocol, snr)
    cv = float(cv1 if quantity == "t1_ms" else cv2)
    ok = lo <= v <= hi and cv <= max_cv
    if protocol.get("is_magnitude"):
        # magnitude data: the Rician floor biases samples below a few noise SDs, which the
        # Cramer-Rao bound does not see; the last echo at the longest delay must stand out
        last = 100.0 * math.exp(-float(protocol["echo_times_ms"][-1]) / t2)
        ok = ok and last >= _PD_MIN_SNR * 100.0 / snr
    return bool(ok), round(cv, 4)


def _median_se(
    median: float | None, robust_sd: float | None, voxels: int, quantity: str
) -> tuple[float | None, float]:
    """Standard error of an ROI median and the largest the tolerance allows, both in the
    tolerance's unit (fraction of the median for T1/T2, pu for PD): the median of ``voxels``
    normal values of SD ``robust_sd`` has SE 1.2533 SD / sqrt(n) (asymptotic, pi/2 ratio)."""
    kind, tol = TOLERANCE[quantity]
    allowed = round(tol / PRECISION_Z, 4)
    if median is None or robust_sd is None or voxels < 1:
        return None, allowed
    se = 1.2533 * robust_sd / math.sqrt(voxels)
    if kind == "rel":
        if median <= 0:
            return None, allowed
        se /= median
    return round(se, 4), allowed


def linearity(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Ordinary least squares ``y = slope * x + intercept`` and R^2 (None below 3 points)."""
    xa = np.asarray(x, np.float64)
    ya = np.asarray(y, np.float64)
    if xa.size < 3 or np.ptp(xa) == 0:
        return {"slope": None, "intercept": None, "r2": None, "n": int(xa.size)}
    slope, intercept = np.polyfit(xa, ya, 1)
    res = ya - (slope * xa + intercept)
    ss_tot = float(((ya - ya.mean()) ** 2).sum())
    r2 = 1.0 - float((res**2).sum()) / ss_tot if ss_tot > 0 else None
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2, "n": int(xa.size)}


def _robust(v: np.ndarray) -> tuple[float, float]:
    med = float(np.median(v))
    return med, float(1.4826 * np.median(np.abs(v - med)))


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def measure(
    maps: QuantMaps,
    pd_pu: np.ndarray,
    rois: list[SphereROI],
    definition: PhantomDefinition,
    protocol: dict[str, Any],
    *,
    temperature_c: float | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-sphere rows (phantom_qc.json ``spheres``) and per-array ``linearity``."""
    t1 = maps.t1_ms.ravel()
    t2 = maps.t2_ms.ravel()
    pd = pd_pu.ravel()
    mask = maps.mask.ravel()
    failed = maps.failed.ravel()
    rows: list[dict[str, Any]] = []
    for roi, s in zip(rois, definition.spheres, strict=True):
        ref = definition.reference_at(s, temperature_c)
        q = s.quantity
        in_range, voxel_cv = sphere_in_range(ref, q, protocol)
        row: dict[str, Any] = {
            "array": s.array,
            "label": s.label,
            "index": s.index,
            "centre_mm": [round(v, 2) for v in roi.centre_mm],
            "voxels": int(roi.voxels.size),
            "radius_mm": roi.radius_mm,
            "shift_mm": roi.shift_mm,
            "measured": roi.measured,
            "reason": roi.reason,
            "t1_ms": None,
            "t2_ms": None,
            "pd_pu": None,
            "sd": {"t1_ms": None, "t2_ms": None, "pd_pu": None},
            "reference": ref,
            "reference_sd": dict(s.reference_sd),
            "reference_source": s.sources.get(q, ""),
            "reference_temperature": definition.value_at(s, q, temperature_c)[1],
            "quantity": q,
            "in_range": in_range,
            "reference_in_range": in_range,
            "voxel_cv": voxel_cv,
            "error": None,
            "error_percent": None,
            "failed_fraction": None,
            "median_se": None,
            "se_allowed": None,
        }
        if roi.measured:
            v = roi.voxels[mask[roi.voxels]]
            if v.size < max(3, roi.voxels.size // 2):
                row["measured"] = False
                row["reason"] = (
                    f"only {v.size} of {roi.voxels.size} ROI voxels have signal above the noise"
                )
            else:
                row["failed_fraction"] = round(float(failed[v].mean()), 4)
                for name, arr in (("t1_ms", t1), ("t2_ms", t2), ("pd_pu", pd)):
                    med, sd = _robust(arr[v].astype(np.float64))
                    row[name] = round(med, 3)
                    row["sd"][name] = round(sd, 3)
                if ref.get(q) is not None:
                    err = row[q] - ref[q]
                    row["error"] = round(err, 3)
                    row["error_percent"] = round(100.0 * err / ref[q], 3) if ref[q] else None
                se, allowed = _median_se(row[q], row["sd"][q], v.size, q)
                row["median_se"] = se
                row["se_allowed"] = allowed
                if not row["in_range"]:
                    row["reason"] = (
                        f"reference {q} {ref.get(q)} outside the measurable range (voxel CV"
                        f" {voxel_cv}): measured, not used for linearity"
                    )
                elif se is None or se > allowed:
                    row["in_range"] = False
                    row["reason"] = (
                        f"imprecise median: {q} standard error {se} (robust SD"
                        f" {row['sd'][q]}, {v.size} voxels) > {allowed} (tolerance /"
                        f" {PRECISION_Z:g}): measured, not used for linearity"
                    )
        rows.append(row)
    lin: dict[str, Any] = {}
    for array in definition.arrays:
        q = ARRAY_QUANTITY.get(array, "t1_ms")
        use = [r for r in rows if r["array"] == array and r["measured"] and r["in_range"]]
        fit = linearity([r["reference"][q] for r in use], [r[q] for r in use])
        fit["spheres"] = [r["label"] for r in use]
        fit["quantity"] = q
        lin[array] = fit
    return rows, lin


def recognise(detection: Detection, rows: list[dict[str, Any]]) -> tuple[bool, str]:
    """Content test: a phantom-shaped object whose sphere model explains the images and whose
    measured T1 / T2 / PD order follows the reference order in every array measured."""
    if not detection.is_phantom_shape:
        return False, detection.reason
    if detection.explained < _MIN_EXPLAINED:
        return False, (
            f"the sphere model explains {100 * detection.explained:.0f} % of the image variance"
            f" (< {100 * _MIN_EXPLAINED:.0f} %)"
        )
    checked = 0
    for array in sorted({r["array"] for r in rows}):
        # spheres whose reference is in range: outside it the order may legitimately break
        # (a Rician floor under the shortest T2s, T1 on the fit's bound); the precision gate
        # is not needed for an order (and would leave coarse grids too few spheres)
        use = [
            r
            for r in rows
            if r["array"] == array and r["measured"] and r.get("reference_in_range", r["in_range"])
        ]
        q = use[0]["quantity"] if use else None
        use = [r for r in use if r["reference"].get(q) is not None and r[q] is not None]
        if len(use) < 4:
            continue
        rho = _spearman([r["reference"][q] for r in use], [r[q] for r in use])
        if rho < _MIN_RANK_CORRELATION:
            return (
                False,
                f"{array} array: measured {q} do not follow the reference order (rho {rho:.2f})",
            )
        checked += 1
    if not checked:
        return False, "no array has 4 measured spheres to check the contrast against"
    return (
        True,
        f"{checked} array(s) follow the reference order; explained {detection.explained:.2f}",
    )


def analyze(
    maps: QuantMaps,
    affine: np.ndarray,
    definition: PhantomDefinition,
    protocol: dict[str, Any],
    *,
    temperature_c: float | None = None,
    erosion_mm: float = 1.0,
    min_voxels: int = 10,
    acq: Acquisition | None = None,
) -> dict[str, Any]:
    """Everything of phantom_qc.json except the scanner/acquired fields (set by the node).

    protocol: ``delays_ms, echo_times_ms, tr_ms, saturation_deg, excitation_deg,
    is_magnitude`` of the acquisition (for the measurable range). Returns a dict with
    ``phantom, version, recognised, reason, pose, measurable_range, spheres, linearity,
    pd_correction, temperature_c`` and ``roi_labels`` (int16 ``[z, y, x]``: 1-based
    sphere number in definition order, 0 elsewhere) and ``pd_map`` (float32 PD): arrays,
    not JSON, popped by the caller. ``acq``: when given, ROI voxels the noise mask left out
    (spheres with little signal: PD 5 pu, T2 < 10 ms) are fitted too, so that such spheres
    are measured and flagged rather than dropped; ``maps`` is then a merged copy.
    """
    t0 = time.perf_counter()
    sup = _support(maps)
    det = detect_pose(maps, affine, definition, support=sup)
    ranges = measurable_range(protocol)
    out: dict[str, Any] = {
        "phantom": definition.name,
        "title": definition.title,
        "version": definition.version,
        "reference_conditions": {
            "field_strength_t": definition.field_strength_t,
            "temperature_c": definition.temperature_c,
        },
        "temperature_c": temperature_c,
        "certificate": dict(definition.certificate),
        "definition_file": definition.source_file,
        "pose": det.as_dict(),
        "measurable_range": ranges,
        "spheres": [],
        "linearity": {},
        "recognised": False,
        "reason": det.reason,
        "roi_labels": None,
    }
    if not det.is_phantom_shape:
        out["seconds"] = round(time.perf_counter() - t0, 3)
        return out
    rois = sphere_rois(
        definition,
        det.pose,
        affine,
        maps.t1_ms.shape,
        erosion_mm=erosion_mm,
        min_voxels=min_voxels,
        centres_lps=det.centres_lps,
        radii_mm=det.radii_mm,
    )
    if acq is not None:
        maps = _fit_roi_gaps(maps, acq, rois)
    try:
        pd, pd_info = phantom_pd(
            maps,
            affine,
            definition,
            det.pose,
            sup,
            centres_lps=det.centres_lps,
            radii_mm=det.radii_mm,
        )
    except ValueError as exc:
        pd, pd_info = maps.pd_pu, {"error": str(exc)}
    rows, lin = measure(maps, pd, rois, definition, protocol, temperature_c=temperature_c)
    ok, why = recognise(det, rows)
    labels = np.zeros(maps.t1_ms.size, np.int16)
    for k, roi in enumerate(rois):
        if roi.measured:
            labels[roi.voxels] = k + 1
    out.update(
        spheres=rows,
        linearity=lin,
        recognised=ok,
        reason=why,
        pd_correction=pd_info,
        roi_labels=labels.reshape(maps.t1_ms.shape),
        pd_map=pd,
    )
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _fit_roi_gaps(maps: QuantMaps, acq: Acquisition, rois: list[SphereROI]) -> QuantMaps:
    """Fit the ROI voxels outside ``maps.mask`` (returns a merged copy, or ``maps``)."""
    from dataclasses import replace

    from processing.fit import fit_mdme

    extra = np.zeros(maps.mask.size, bool)
    for roi in rois:
        if roi.measured:
            extra[roi.voxels] = True
    extra &= ~maps.mask.ravel()
    if not extra.any():
        return maps
    extra = extra.reshape(maps.mask.shape)
    more = fit_mdme(acq, mask=extra, noise_sd=maps.noise_sd if maps.noise_sd > 0 else None)
    merged = {}
    for name in ("t1_ms", "t2_ms", "pd_pu", "b1", "m0", "residual", "failed", "mask"):
        a = getattr(maps, name).copy()
        a[extra] = getattr(more, name)[extra]
        merged[name] = a
    return replace(maps, **merged)


def shape_check(acq: Acquisition, definition: PhantomDefinition) -> tuple[bool, str]:
    """Cheap first content test on the raw signal (no fit): is the object a sphere of the
    definition's radius? A head fails here in ~0.1 s."""
    from processing.fit import background_mask

    sup = _support(background_mask(acq))
    fit = fit_outer_sphere(sup, np.asarray(acq.affine, np.float64))
    r = definition.outer_radius_mm
    if fit is None:
        return False, "no signal"
    if abs(fit.radius_mm - r) > _RADIUS_TOLERANCE * r or fit.rms_mm > _SHELL_RMS_MM:
        return False, (
            f"the object is not a {2 * r:.0f} mm sphere: best sphere through its outline has"
            f" radius {fit.radius_mm:.1f} mm, RMS {fit.rms_mm:.1f} mm"
        )
    return True, f"outline: sphere radius {fit.radius_mm:.1f} mm, RMS {fit.rms_mm:.1f} mm"


def protocol_of(acq: Acquisition) -> dict[str, Any]:
    """The acquisition's timing, as :func:`analyze` wants it."""
    return {
        "delays_ms": [float(v) for v in acq.delays_ms],
        "echo_times_ms": [float(v) for v in acq.echo_times_ms],
        "tr_ms": float(acq.tr_ms),
        "saturation_deg": float(acq.saturation_deg),
        "excitation_deg": float(acq.excitation_deg),
        "is_magnitude": bool(acq.is_magnitude),
    }


def run_phantom(
    acq: Acquisition,
    definition: PhantomDefinition,
    *,
    temperature_c: float | None = None,
    erosion_mm: float = 1.0,
    min_voxels: int = 10,
) -> tuple[Any, str]:
    """The phantom path of a series (in a worker): ``(SeriesResult, reason)`` when the
    content is the phantom, ``(None, reason)`` when it is not (the caller then treats the
    series as a brain). Fit without B1 smoothing (the fill's T1 is above the smoothing's
    weight cut-off, so a per-voxel B1 is what the spheres get), no segmentation, myelin or
    synthesis. ``result.maps.pd_pu`` is the fill-referenced PD."""
    from dataclasses import replace

    from processing._version import __version__
    from processing.fit import fit_mdme
    from processing.results import SeriesResult

    t0 = time.perf_counter()
    ok, why = shape_check(acq, definition)
    if not ok:
        return None, why
    timings: dict[str, float] = {"phantom_shape": round(time.perf_counter() - t0, 4)}
    t = time.perf_counter()
    maps = fit_mdme(acq, b1_smoothing=False)
    timings["fit"] = round(time.perf_counter() - t, 4)
    t = time.perf_counter()
    rep = analyze(
        maps,
        acq.affine,
        definition,
        protocol_of(acq),
        temperature_c=temperature_c,
        erosion_mm=erosion_mm,
        min_voxels=min_voxels,
        acq=acq,
    )
    timings["phantom_qc"] = round(time.perf_counter() - t, 4)
    if not rep["recognised"]:
        return None, rep["reason"]
    labels = rep.pop("roi_labels")
    pd = rep.pop("pd_map")
    maps = replace(maps, pd_pu=pd)
    n_mask = int(maps.mask.sum())
    result = SeriesResult(
        shape=acq.shape,
        voxel_size_mm=acq.voxel_size_mm,
        affine=np.asarray(acq.affine),
        maps=maps,
        timings_s=timings,
        qc={
            "status": "ok",
            "fit_failed_fraction": float(maps.failed.sum()) / n_mask if n_mask else 0.0,
            "phantom_explained": float(rep["pose"]["explained"]),
        },
        phantom_qc=rep,
        phantom_rois=labels,
        provenance={
            "software": "synthmr",
            "software_version": __version__,
            "settings": {
                "phantom": definition.name,
                "phantom_version": definition.version,
                "temperature_c": temperature_c,
                "erosion_mm": erosion_mm,
                "min_voxels": min_voxels,
                "b1_smoothing": False,
            },
            "model_sha256": None,
            "delay_source": acq.delay_source,
            "acquisition": protocol_of(acq),
        },
    )
    return result, rep["reason"]


def warmup() -> None:
    """Compile the pose-search kernel with the argument types :func:`detect_pose` passes
    (called from :func:`processing.run.warmup`, so a node's first phantom does not wait)."""
    affine = np.eye(4)
    lin, _ = _lin_inv(affine)
    feat = np.zeros((3, 2, 4, 4))
    sup = np.ones((2, 4, 4), bool)
    one = np.ones(1)
    _region_cost(
        feat, sup, np.zeros((1, 3)), lin, one, one, 1.0, np.ones(3), 32.0, np.zeros(3), np.zeros(3)
    )
    _local_cost(
        feat,
        sup,
        np.zeros(3),
        2.0,
        np.zeros((0, 3)),
        np.zeros(0),
        np.zeros(3),
        lin,
        np.ones(3),
        1.0,
        0.5,
    )


# --------------------------------------------------------------------------------------
# several reports: the seed's table


def compare_reports(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """R^2 per array per scanner, and per sphere the CV within a scanner (repeats) and
    between scanners.

    Within-scanner CV of a sphere: for each scanner with >= 2 reports measuring it, SD/mean
    (ddof 1) over its repeats; reported as the root-mean-square over scanners. Between-
    scanner CV: SD/mean (ddof 1) of the per-scanner means (>= 2 scanners). Values are the
    sphere's certified quantity (T1 for the T1 array ...), for the spheres measured and in
    range in EVERY report: the in-range rule includes the measured precision of the median
    (:func:`measure`), so a sphere near its edge can pass on one scan and not on another; a
    CV over the scans where it happened to pass would be biased low, so such a sphere is
    left out of the table altogether (``excluded`` names it with the count).
    """
    by_scanner: dict[str, list[dict[str, Any]]] = {}
    for rep in reports:
        by_scanner.setdefault(str(rep.get("scanner", "?")), []).append(rep)
    r2: dict[str, dict[str, Any]] = {}
    for scanner, reps in by_scanner.items():
        r2[scanner] = {}
        for rep in reps:
            for array, fit in (rep.get("linearity") or {}).items():
                r2[scanner].setdefault(array, []).append(fit.get("r2"))
        r2[scanner] = {
            a: (
                float(np.mean([v for v in vals if v is not None]))
                if any(v is not None for v in vals)
                else None
            )
            for a, vals in r2[scanner].items()
        }
    values: dict[str, dict[str, list[float]]] = {}
    meta: dict[str, dict[str, Any]] = {}
    usable: dict[str, int] = {}
    for rep in reports:
        for row in rep.get("spheres", []):
            q = row.get("quantity") or ARRAY_QUANTITY.get(row["array"], "t1_ms")
            ok = row.get("measured") and row.get("in_range") and row.get(q) is not None
            usable[row["label"]] = usable.get(row["label"], 0) + bool(ok)
    everywhere = {label for label, n in usable.items() if n == len(reports)}
    excluded = {label: n for label, n in usable.items() if 0 < n < len(reports)}
    for scanner, reps in by_scanner.items():
        for rep in reps:
            for row in rep.get("spheres", []):
                q = row.get("quantity") or ARRAY_QUANTITY.get(row["array"], "t1_ms")
                if row["label"] not in everywhere:
                    continue
                values.setdefault(row["label"], {}).setdefault(scanner, []).append(float(row[q]))
                meta[row["label"]] = {
                    "array": row["array"],
                    "quantity": q,
                    "reference": (row.get("reference") or {}).get(q),
                }
    spheres = []
    for label in sorted(values, key=lambda s: (s.split("-")[0], int(s.split("-")[1]))):
        per = values[label]
        within = [
            float(np.std(v, ddof=1) / np.mean(v))
            for v in per.values()
            if len(v) >= 2 and np.mean(v)
        ]
        means = [float(np.mean(v)) for v in per.values()]
        between = (
            float(np.std(means, ddof=1) / np.mean(means))
            if len(means) >= 2 and np.mean(means)
            else None
        )
        spheres.append(
            {
                "label": label,
                **meta[label],
                "scanners": len(per),
                "n": int(sum(len(v) for v in per.values())),
                "mean": float(np.mean(means)),
                "cv_within": float(np.sqrt(np.mean(np.square(within)))) if within else None,
                "cv_between": between,
            }
        )
    return {
        "scanners": sorted(by_scanner),
        "r2": r2,
        "spheres": spheres,
        "reports": len(reports),
        "excluded": {
            label: f"in range in {n} of {len(reports)} reports" for label, n in excluded.items()
        },
    }
