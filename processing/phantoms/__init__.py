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

import itertools
import math
import tomllib
from dataclasses import dataclass, field, replace
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
    #: quantity -> (temperatures C ascending, this sphere's certified values there)
    temperature_table: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = field(
        default_factory=dict
    )
    temperature_source: str = ""

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
    #: the pose rotation (deg, about x then y then z) of the phantom as the manual places
    #: it; the pose search covers +-20 deg about it
    nominal_rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)

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

    def value_at(
        self, sphere: Sphere, quantity: str, temperature_c: float | None
    ) -> tuple[float | None, str]:
        """The sphere's certified ``quantity`` at ``temperature_c`` and how it was found.

        A temperature table (``[versions.<v>.<ARRAY>.temperature]``, applied as relative change
        to the certified value, so a lot certificate keeps the table's temperature dependence)
        is interpolated linearly between its two neighbouring temperatures (outside it: the
        end segment, and the note says "extrapolated"); without a table the definition's
        per-degree coefficient scales the value at the reference temperature. None: as
        certified.
        """
        v = sphere.reference.get(quantity)
        if v is None:
            return None, ""
        if temperature_c is None:
            return float(v), "as certified"
        t = float(temperature_c)
        table = sphere.temperature_table.get(quantity)
        if table is None:
            note = f"coefficient {self.t1_per_c if quantity == 't1_ms' else self.t2_per_c}/C"
            return float(v) * self.temperature_factor(quantity, t), note
        temps, vals = table
        if len(temps) == 1:
            return float(vals[0]), "table (one temperature)"
        k = int(np.clip(np.searchsorted(temps, t) - 1, 0, len(temps) - 2))
        t0, t1 = temps[k], temps[k + 1]
        w = (t - t0) / (t1 - t0)
        out = float(vals[k] + w * (vals[k + 1] - vals[k]))
        inside = temps[0] <= t <= temps[-1]
        note = "table, interpolated" if inside else "table, EXTRAPOLATED"
        return out, f"{note} {temps[0]:g}-{temps[-1]:g} C ({sphere.temperature_source})"

    def reference_at(self, sphere: Sphere, temperature_c: float | None = None) -> dict:
        """The sphere's reference values at ``temperature_c`` (None: as certified)."""
        return {q: self.value_at(sphere, q, temperature_c)[0] for q in _QUANTITIES}

    def simulated_at(self, sphere: Sphere, temperature_c: float | None) -> dict[str, float]:
        """What the emulator puts in the sphere at ``temperature_c``: the reference where
        there is one (temperature tables included), else the ``sim_*`` value scaled by the
        per-degree coefficient."""
        sim = {"t1_ms": sphere.sim_t1_ms, "t2_ms": sphere.sim_t2_ms, "pd_pu": sphere.sim_pd_pu}
        out = {}
        for q in _QUANTITIES:
            v, _ = self.value_at(sphere, q, temperature_c)
            out[q] = v if v is not None else sim[q] * self.temperature_factor(q, temperature_c)
        return out

    def with_geometry(
        self, centres_mm: np.ndarray, radius_mm: np.ndarray | float | None = None
    ) -> PhantomDefinition:
        """A copy whose spheres sit at ``centres_mm`` (``[n, 3]`` phantom mm) with fluid radii
        ``radius_mm`` (None: unchanged): a phantom built differently from this definition
        (the tests simulate one and analyse it with the shipped definition)."""
        c = np.asarray(centres_mm, np.float64).reshape(len(self.spheres), 3)
        r = (
            [s.radius_mm for s in self.spheres]
            if radius_mm is None
            else np.broadcast_to(np.asarray(radius_mm, np.float64), (len(self.spheres),))
        )
        spheres = tuple(
            replace(s, centre_mm=tuple(float(v) for v in c[i]), radius_mm=float(r[i]))
            for i, s in enumerate(self.spheres)
        )
        return replace(self, spheres=spheres)


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


def _table_rows(path: Path, key: str, ttab: dict[str, Any], n: int) -> dict[str, np.ndarray]:
    """quantity -> float64 ``[n_temperatures, n]`` of a temperature table."""
    temps = _floats(path, f"{key}.temperatures_c", ttab.get("temperatures_c"))
    if not temps or any(b <= a for a, b in itertools.pairwise(temps)):
        raise PhantomDefinitionError(f"{path}: {key}.temperatures_c must be ascending")
    rows = {}
    for q in _QUANTITIES:
        if q not in ttab:
            continue
        m = ttab[q]
        if not isinstance(m, list) or len(m) != len(temps):
            raise PhantomDefinitionError(
                f"{path}: {key}.{q}: expected {len(temps)} rows (one per temperature)"
            )
        rows[q] = np.array([_floats(path, f"{key}.{q}", r, n) for r in m], np.float64)
    return rows


def _temperature_tables(
    path: Path,
    ver: str,
    array: str,
    vals: dict[str, Any],
    versions: dict[str, Any],
    cols: dict[str, list[float]],
    ref_temp: float,
    n: int,
) -> tuple[dict[str, tuple[tuple[float, ...], np.ndarray]], str]:
    """quantity -> (temperatures, ``[n_temperatures, n]`` values) of one array (module doc
    of the TOML: an own table, or another version's as relative change)."""
    ttab = vals.get("temperature")
    if not isinstance(ttab, dict):
        return {}, ""
    key = f"versions.{ver}.{array}.temperature"
    src = str(ttab.get("source", ""))
    other = ttab.get("relative_to")
    if other is not None:
        ttab = versions.get(str(other), {}).get(array, {}).get("temperature")
        key = f"versions.{other}.{array}.temperature"
        if not isinstance(ttab, dict) or "relative_to" in ttab:
            raise PhantomDefinitionError(
                f"{path}: versions.{ver}.{array}.temperature.relative_to = {other!r}: that"
                f" version has no own table for {array}"
            )
    rows = _table_rows(path, key, ttab, n)
    temps = tuple(float(t) for t in ttab["temperatures_c"])
    out = {}
    for q, r in rows.items():
        if q not in cols:
            continue
        # relative change: value(T) = value(ref) * table(T) / table(ref). For the table's
        # own values this is the table; a version or a lot certificate with other values at
        # the reference temperature keeps its values and the table's temperature dependence
        at_ref = np.array([np.interp(ref_temp, temps, r[:, i]) for i in range(n)])
        out[q] = (temps, np.asarray(cols[q])[None, :] * r / at_ref[None, :])
    return out, src


def _array_spheres(
    path: Path,
    ver: str,
    array: str,
    atab: dict[str, Any],
    versions: dict[str, Any],
    cert: dict[str, Any],
    geo: dict[str, Any],
    radius: float,
    wall: float,
    ref_temp: float,
) -> list[Sphere]:
    """The spheres of one array of version ``ver`` (a lot certificate's values override)."""
    spheres: list[Sphere] = []
    vtab = versions[ver]
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
    tables, tsrc = _temperature_tables(path, ver, array, vals, versions, cols, ref_temp, n)
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
                temperature_table={
                    q: (temps, tuple(float(v) for v in rows[:, i]))
                    for q, (temps, rows) in tables.items()
                },
                temperature_source=tsrc,
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
    radius = float(geo["sphere_radius_mm"])
    wall = float(geo.get("wall_mm", 0.0))
    fill = doc.get("fill", {})
    ref_temp = float(cert.get("temperature_c", head.get("temperature_c", 20.0)))
    spheres: list[Sphere] = []
    for array, atab in arrays.items():
        spheres += _array_spheres(
            path, ver, array, atab, versions, cert, geo, radius, wall, ref_temp
        )
    temp = doc.get("temperature", {})
    nominal = _floats(
        path, "phantom.nominal_rotation_deg", head.get("nominal_rotation_deg", [0.0] * 3), 3
    )
    return PhantomDefinition(
        name=str(head["name"]),
        title=str(head.get("title", head["name"])),
        version=str(ver),
        outer_radius_mm=float(head["outer_radius_mm"]),
        field_strength_t=float(head.get("field_strength_t", 3.0)),
        temperature_c=ref_temp,
        spheres=tuple(spheres),
        fill_t1_ms=float(fill.get("t1_ms", 2700.0)),
        fill_t2_ms=float(fill.get("t2_ms", 2400.0)),
        fill_pd_pu=float(fill.get("pd_pu", 100.0)),
        t1_per_c=float(temp.get("t1_per_c", 0.0)),
        t2_per_c=float(temp.get("t2_per_c", 0.0)),
        source_file=str(path),
        certificate={k: v for k, v in cert.items() if not isinstance(v, dict)}
        | ({"file": str(certificate)} if certificate else {}),
        nominal_rotation_deg=(nominal[0], nominal[1], nominal[2]),
    )
