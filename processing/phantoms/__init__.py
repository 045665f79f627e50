"""Quantitative phantom definitions as data: geometry and certified reference values.

A definition is a TOML file (see ``nist_model130.toml``, the ISMRM/NIST system phantom):
``[phantom]`` (name, aliases, outer radius, field strength and temperature of the reference
values), ``[geometry]`` (sphere radius, wall, ring layout), ``[arrays.<NAME>]`` (plate
position along the phantom axis, the quantity the array certifies), ``[fill]``,
``[temperature]`` and ``[versions.<v>.<ARRAY>]`` (14 values per quantity, each with its
``source_*`` string). A site adds its own phantom by dropping a TOML file with the same
layout into a directory named in the node config, and its lot's certificate with a small
TOML file that overrides values of one version (:func:`load_definition` ``certificate=``)::

    version = "v2"            # optional: which version the certificate amends
    serial = "0123"           # optional, recorded in the report
    temperature_c = 20.0      # optional
    [T1]
    t1_ms = [1880.0, ...]     # 14 values; any quantity of any array
    source_t1 = "CaliberMRI certificate lot 0123"

Phantom coordinates: mm, origin at the phantom centre, z along the phantom axis (see the
TOML). Units: times in ms, PD in percent units (pure water = 100).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ARRAY_QUANTITY",
    "PhantomDefinition",
    "PhantomDefinitionError",
    "Sphere",
    "available_definitions",
    "load_definition",
]

#: quantity each array certifies (the phantom_qc.json "array" field).
ARRAY_QUANTITY: dict[str, str] = {"T1": "t1_ms", "T2": "t2_ms", "PD": "pd_pu"}
_QUANTITIES = ("t1_ms", "t2_ms", "pd_pu")


class PhantomDefinitionError(ValueError):
    """A phantom definition or certificate is invalid. The message names the file and key."""


@dataclass(frozen=True)
class Sphere:
    """One sphere of an array. ``centre_mm``: phantom coordinates (x, y, z), mm.

    reference: quantity -> certified value (None when the source certifies none).
    reference_sd: quantity -> stated uncertainty (None when not stated).
    sources: quantity -> where the value comes from.
    sim_*: what the emulator puts in the sphere (the reference where there is one).
    """

    array: str
    index: int
    centre_mm: tuple[float, float, float]
    radius_mm: float
    wall_mm: float
    reference: dict[str, float | None]
    reference_sd: dict[str, float | None]
    sources: dict[str, str]
    sim_t1_ms: float
    sim_t2_ms: float
    sim_pd_pu: float

    @property
    def label(self) -> str:
        return f"{self.array}-{self.index:02d}"

    @property
    def quantity(self) -> str:
        return ARRAY_QUANTITY.get(self.array, "t1_ms")


@dataclass(frozen=True)
class PhantomDefinition:
    """A phantom: its spheres (in array order), fill, and the conditions of its references."""

    name: str
    title: str
    version: str
    outer_radius_mm: float
    field_strength_t: float
    temperature_c: float
    spheres: tuple[Sphere, ...]
    fill_t1_ms: float
    fill_t2_ms: float
    fill_pd_pu: float
    t1_per_c: float = 0.0
    t2_per_c: float = 0.0
    source_file: str = ""
    certificate: dict[str, Any] = field(default_factory=dict)

    @property
    def arrays(self) -> tuple[str, ...]:
        seen: list[str] = []
        for s in self.spheres:
            if s.array not in seen:
                seen.append(s.array)
        return tuple(seen)

    def centres_mm(self) -> np.ndarray:
        """float64 ``[n_spheres, 3]`` phantom coordinates."""
        return np.array([s.centre_mm for s in self.spheres], np.float64)

    def temperature_factor(self, quantity: str, temperature_c: float | None) -> float:
        """Multiplier of a relaxation time at ``temperature_c`` (1 at the reference)."""
        if temperature_c is None or quantity == "pd_pu":
            return 1.0
        per_c = self.t1_per_c if quantity == "t1_ms" else self.t2_per_c
        return float(1.0 + per_c * (float(temperature_c) - self.temperature_c))

    def reference_at(self, sphere: Sphere, temperature_c: float | None = None) -> dict:
        """The sphere's reference values at ``temperature_c`` (None: as certified)."""
        out: dict[str, float | None] = {}
        for q in _QUANTITIES:
            v = sphere.reference.get(q)
            out[q] = None if v is None else float(v) * self.temperature_factor(q, temperature_c)
        return out


def _builtin_dir() -> Path:
    return Path(str(resources.files("processing.phantoms")))


def available_definitions(extra_dirs: list[str | Path] | tuple = ()) -> dict[str, Path]:
    """name and alias -> TOML path, shipped definitions first, then ``extra_dirs``."""
    out: dict[str, Path] = {}
    dirs = [_builtin_dir(), *(Path(d) for d in extra_dirs if d)]
    for d in dirs:
        if not d.is_dir():
            raise PhantomDefinitionError(f"phantom definitions directory {d} does not exist")
        for path in sorted(d.glob("*.toml")):
            try:
                head = tomllib.loads(path.read_text("utf-8")).get("phantom", {})
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise PhantomDefinitionError(f"{path}: not a readable TOML file: {exc}") from None
            if "name" not in head:
                continue
            for n in [head["name"], *head.get("aliases", [])]:
                out[str(n).lower()] = path
    return out


def _floats(path: Path, key: str, v: Any, n: int | None = None) -> list[float]:
    if not isinstance(v, list) or not all(isinstance(x, (int, float)) for x in v):
        raise PhantomDefinitionError(f"{path}: {key}: expected a list of numbers, got {v!r}")
    if n is not None and len(v) != n:
        raise PhantomDefinitionError(f"{path}: {key}: expected {n} values, got {len(v)}")
    return [float(x) for x in v]


def _layout(geo: dict[str, Any], n: int) -> list[tuple[float, float]]:
    """(x, y) of spheres 1..n: ``ring_count`` (default 10) on the ring, the rest inside."""
    ring_n = int(geo.get("ring_count", 10))
    r_ring = float(geo["ring_radius_mm"])
    r_in = float(geo["inner_radius_mm"])
    a0 = math.radians(float(geo.get("ring_start_deg", -90.0)))
    d = float(geo.get("ring_direction", 1))
    b0 = math.radians(float(geo.get("inner_start_deg", -135.0)))
    inner_n = max(n - ring_n, 1)
    xy = []
    for i in range(n):
        if i < ring_n:
            a = a0 + d * 2.0 * math.pi * i / ring_n
            xy.append((r_ring * math.cos(a), r_ring * math.sin(a)))
        else:
            a = b0 + d * 2.0 * math.pi * (i - ring_n) / inner_n
            xy.append((r_in * math.cos(a), r_in * math.sin(a)))
    return xy


def _read_certificate(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PhantomDefinitionError(
            f"certificate {path}: not a readable TOML file: {exc}"
        ) from None


def _array_spheres(
    path: Path,
    ver: str,
    array: str,
    atab: dict[str, Any],
    vtab: dict[str, Any],
    cert: dict[str, Any],
    geo: dict[str, Any],
    radius: float,
    wall: float,
) -> list[Sphere]:
    """The spheres of one array of version ``ver`` (a lot certificate's values override)."""
    spheres: list[Sphere] = []
    if array not in vtab:
        raise PhantomDefinitionError(f"{path}: versions.{ver} has no [{array}] table")
    vals = dict(vtab[array])
    if array in cert:  # lot certificate overrides
        vals.update(cert[array])
    n = None
    for q in _QUANTITIES:
        if q in vals:
            n = len(vals[q]) if n is None else n
    if not n:
        raise PhantomDefinitionError(f"{path}: versions.{ver}.{array}: no values")
    xy = _layout(geo, n)
    z = float(atab["plate_z_mm"])
    quantity = str(atab.get("quantity", ARRAY_QUANTITY.get(array, "t1_ms")))
    cols = {
        q: _floats(path, f"versions.{ver}.{array}.{q}", vals[q], n)
        for q in _QUANTITIES
        if q in vals
    }
    sds = {
        q: _floats(path, f"versions.{ver}.{array}.{q[:2]}_sd", vals[f"{q[:2]}_sd_{q[3:]}"], n)
        for q in _QUANTITIES
        if f"{q[:2]}_sd_{q[3:]}" in vals
    }
    if quantity not in cols:
        raise PhantomDefinitionError(
            f"{path}: versions.{ver}.{array}: the array certifies {quantity} but has no values"
        )
    for i in range(n):
        ref = {q: (cols[q][i] if q in cols else None) for q in _QUANTITIES}
        sd = {
            q: (sds[q][i] if q in sds and math.isfinite(sds[q][i]) else None) for q in _QUANTITIES
        }
        src = {q: str(vals.get(f"source_{q[:2]}", "")) for q in _QUANTITIES if q in cols}
        sim_t1 = ref["t1_ms"] if ref["t1_ms"] is not None else float(vals.get("sim_t1_ms", 1000))
        sim_t2 = ref["t2_ms"] if ref["t2_ms"] is not None else float(vals.get("sim_t2_ms", 100))
        sim_pd = ref["pd_pu"] if ref["pd_pu"] is not None else float(vals.get("sim_pd_pu", 100))
        spheres.append(
            Sphere(
                array=str(array),
                index=i + 1,
                centre_mm=(xy[i][0], xy[i][1], z),
                radius_mm=radius,
                wall_mm=wall,
                reference=ref,
                reference_sd=sd,
                sources=src,
                sim_t1_ms=float(sim_t1),
                sim_t2_ms=float(sim_t2),
                sim_pd_pu=float(sim_pd),
            )
        )
    return spheres


def load_definition(
    name_or_path: str | Path = "nist",
    version: str | None = None,
    *,
    certificate: str | Path | None = None,
    extra_dirs: list[str | Path] | tuple = (),
) -> PhantomDefinition:
    """Load a phantom definition by name/alias (shipped or in ``extra_dirs``) or TOML path.

    ``version``: e.g. ``"v1"``/``"v2"`` (default: the file's ``default_version`` or the
    certificate's ``version``). ``certificate``: TOML with lot-specific values (module doc).
    """
    p = Path(str(name_or_path))
    if p.suffix == ".toml" and p.is_file():
        path = p
    else:
        known = available_definitions(extra_dirs)
        key = str(name_or_path).lower()
        if key not in known:
            raise PhantomDefinitionError(
                f"unknown phantom {name_or_path!r}; known: {sorted(known)}"
            )
        path = known[key]
    try:
        doc = tomllib.loads(path.read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PhantomDefinitionError(f"{path}: not a readable TOML file: {exc}") from None
    cert: dict[str, Any] = {}
    if certificate:
        cert = _read_certificate(Path(certificate))
    try:
        head = doc["phantom"]
        geo = doc["geometry"]
        arrays = doc["arrays"]
        versions = doc["versions"]
    except KeyError as exc:
        raise PhantomDefinitionError(f"{path}: missing table [{exc.args[0]}]") from None
    ver = version or cert.get("version") or head.get("default_version") or next(iter(versions))
    if ver not in versions:
        raise PhantomDefinitionError(
            f"{path}: unknown version {ver!r}; the file has {sorted(versions)}"
        )
    vtab = versions[ver]
    radius = float(geo["sphere_radius_mm"])
    wall = float(geo.get("wall_mm", 0.0))
    fill = doc.get("fill", {})
    spheres: list[Sphere] = []
    for array, atab in arrays.items():
        spheres += _array_spheres(path, ver, array, atab, vtab, cert, geo, radius, wall)
    temp = doc.get("temperature", {})
    return PhantomDefinition(
        name=str(head["name"]),
        title=str(head.get("title", head["name"])),
        version=str(ver),
        outer_radius_mm=float(head["outer_radius_mm"]),
        field_strength_t=float(head.get("field_strength_t", 3.0)),
        temperature_c=float(cert.get("temperature_c", head.get("temperature_c", 20.0))),
        spheres=tuple(spheres),
        fill_t1_ms=float(fill.get("t1_ms", 2700.0)),
        fill_t2_ms=float(fill.get("t2_ms", 2400.0)),
        fill_pd_pu=float(fill.get("pd_pu", 100.0)),
        t1_per_c=float(temp.get("t1_per_c", 0.0)),
        t2_per_c=float(temp.get("t2_per_c", 0.0)),
        source_file=str(path),
        certificate={k: v for k, v in cert.items() if not isinstance(v, dict)}
        | ({"file": str(certificate)} if certificate else {}),
    )
