"""A measured B1 (transmit flip-angle ratio) map of the same study, brought onto the grid
of the acquisition it corrects (3D-QALAS).

Pure functions on arrays and 4x4 affines; no DICOM here (the node's
:mod:`dicom_node.vendors.b1map` reads the series and converts its vendor unit).

Conventions: arrays are ``[z, y, x]``; an affine maps the voxel index ``(x, y, z, 1)`` to
patient LPS millimetres, as :class:`processing.acquisition.Acquisition` documents.

Resampling: trilinear in world coordinates, as a *normalized* interpolation: the map's
valid voxels (finite, within :data:`VALID_RATIO`) are interpolated together with their
indicator, and a target voxel takes ``interp(value * valid) / interp(valid)`` where the
valid weight is at least 0.5. A B1 map is smooth but has no value outside the body (zero
or noise there); plain trilinear interpolation would drag the head's edge towards zero.
Target voxels beyond half a voxel of the map's valid voxels are *not covered*: NaN, which
:func:`processing.qalas_fit.fit_qalas` replaces by the nominal B1 = 1 (and
:func:`processing.run.run` says how many voxels of the fit mask that concerned).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["VALID_RATIO", "B1Map", "B1MapError", "resample_b1_map", "resample_to_grid"]

#: flip-angle ratios a B1 map can hold inside the body; outside it is "no value"
VALID_RATIO = (0.2, 2.5)


class B1MapError(ValueError):
    """A B1 map that cannot be used (shape, affine, values)."""


@dataclass
class B1Map:
    """A B1 map as measured: ``values`` flip-angle ratio (actual / nominal, 1 = nominal)
    ``[z, y, x]`` on its own grid ``affine`` (index ``(x, y, z, 1)`` -> LPS mm).
    ``source``: provenance (series UID, vendor rule, unit), copied into the result."""

    values: np.ndarray
    affine: np.ndarray
    source: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = np.asarray(self.values, dtype=np.float32)
        if v.ndim != 3 or min(v.shape) < 1:
            raise B1MapError(f"values: expected a 3D array [z, y, x], got shape {v.shape}")
        a = np.asarray(self.affine, dtype=np.float64)
        if a.shape != (4, 4) or not np.all(np.isfinite(a)):
            raise B1MapError(f"affine: expected a finite 4x4 matrix, got shape {a.shape}")
        if abs(np.linalg.det(a[:3, :3])) < 1e-9:
            raise B1MapError("affine: the 3x3 part is singular")
        self.values, self.affine = v, a
        self.source = dict(self.source)


def resample_to_grid(
    values: np.ndarray,
    source_affine: np.ndarray,
    target_shape: tuple[int, int, int],
    target_affine: np.ndarray,
    valid_range: tuple[float, float] = VALID_RATIO,
) -> np.ndarray:
    """``values`` ``[z, y, x]`` on ``source_affine`` resampled onto the grid
    ``target_shape`` / ``target_affine`` (any orientation, field of view and resolution):
    float32 ``[z, y, x]``, NaN where the source does not cover the target voxel.

    Normalized trilinear interpolation over the source voxels whose value is finite and
    within ``valid_range`` (see the module docstring). Works slice by slice of the target
    (memory: a few target slices of float64 coordinates, whatever the volume)."""
    src = np.asarray(values, dtype=np.float64)
    if src.ndim != 3:
        raise B1MapError(f"values: expected a 3D array [z, y, x], got shape {src.shape}")
    nz, ny, nx = (int(s) for s in target_shape)
    lo, hi = valid_range
    valid = np.isfinite(src) & (src >= lo) & (src <= hi)
    weighted = np.where(valid, src, 0.0)
    weight = valid.astype(np.float64)
    # target index (x, y, z) -> source index (x, y, z): one affine
    to_src = np.linalg.inv(np.asarray(source_affine, np.float64)) @ np.asarray(
        target_affine, np.float64
    )
    out = np.full((nz, ny, nx), np.nan, dtype=np.float32)
    jj, ii = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64),
                         indexing="ij")  # fmt: skip
    sz, sy, sx = src.shape
    for k in range(nz):
        xs = to_src[0, 0] * ii + to_src[0, 1] * jj + (to_src[0, 2] * k + to_src[0, 3])
        ys = to_src[1, 0] * ii + to_src[1, 1] * jj + (to_src[1, 2] * k + to_src[1, 3])
        zs = to_src[2, 0] * ii + to_src[2, 1] * jj + (to_src[2, 2] * k + to_src[2, 3])
        # within half a voxel of the source grid: covered (clamped to the edge voxel)
        inside = (
            (xs >= -0.5) & (xs <= sx - 0.5) & (ys >= -0.5) & (ys <= sy - 0.5)
            & (zs >= -0.5) & (zs <= sz - 0.5)
        )  # fmt: skip
        if not inside.any():
            continue
        coords = np.stack(
            [np.clip(zs[inside], 0, sz - 1), np.clip(ys[inside], 0, sy - 1),
             np.clip(xs[inside], 0, sx - 1)]
        )  # fmt: skip
        num = ndimage.map_coordinates(weighted, coords, order=1, mode="nearest")
        den = ndimage.map_coordinates(weight, coords, order=1, mode="nearest")
        ok = den >= 0.5
        vals = np.full(num.shape, np.nan)
        vals[ok] = num[ok] / den[ok]
        plane = out[k]
        plane[inside] = vals.astype(np.float32)
    return out


def resample_b1_map(
    b1_map: B1Map, target_shape: tuple[int, int, int], target_affine: np.ndarray
) -> np.ndarray:
    """:func:`resample_to_grid` of a :class:`B1Map` (flip-angle ratios, NaN = not covered)."""
    return resample_to_grid(b1_map.values, b1_map.affine, target_shape, target_affine)
