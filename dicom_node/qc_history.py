"""Phantom QC history per scanner: stored in the node's registry database, printed by
``synthmr qc history``, compared across files by ``synthmr qc compare``, exported as
Prometheus gauges.

Table ``phantom_qc`` (created on first use, same SQLite file as the registry, WAL):
one row per phantom series: scanner (DeviceSerialNumber, else StationName), acquisition
time, series UID (a re-run replaces its row), time recorded, the phantom_qc.json text.

Gauges (read from the table at scrape time, so a restart loses nothing):
- ``synthmr_phantom_qc_max_abs_error_percent{scanner, array}``: largest |error| (% of the
  reference) over the in-range spheres of the scanner's last phantom (PD array: pu);
- ``synthmr_phantom_qc_r2{scanner, array}``: linearity R^2 of that phantom;
- ``synthmr_phantom_qc_last_timestamp_seconds{scanner}``: when it was acquired (recorded,
  when the headers hold no date); the alert on "no QC for 35 days" uses ``time() - it``.
"""

from __future__ import annotations

import datetime as _dt
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "PhantomQCCollector",
    "QCHistory",
    "array_errors",
    "format_compare",
    "format_history",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS phantom_qc (
    series_uid TEXT PRIMARY KEY,
    scanner TEXT NOT NULL,
    acquired TEXT NOT NULL DEFAULT '',
    acquired_ts REAL NOT NULL,
    recorded_ts REAL NOT NULL,
    phantom TEXT NOT NULL DEFAULT '',
    report TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS phantom_qc_scanner ON phantom_qc (scanner, acquired_ts);
"""


def _ts(iso: str, default: float) -> float:
    try:
        d = _dt.datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return default
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.UTC)
    return d.timestamp()


def array_errors(report: dict[str, Any]) -> dict[str, float]:
    """array -> largest |error| over measured in-range spheres: % of the reference for T1
    and T2, pu for PD."""
    out: dict[str, float] = {}
    for row in report.get("spheres", []):
        if not row.get("measured") or not row.get("in_range"):
            continue
        q = row.get("quantity", "")
        v = row.get("error") if q == "pd_pu" else row.get("error_percent")
        if v is None:
            continue
        out[row["array"]] = max(out.get(row["array"], 0.0), abs(float(v)))
    return out


class QCHistory:
    """The phantom_qc table of a registry database (``path``: registry.sqlite3)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def record(self, report: dict[str, Any], recorded_ts: float | None = None) -> None:
        """Insert (or replace, same series UID) one phantom_qc.json report."""
        now = time.time() if recorded_ts is None else recorded_ts
        uid = str(report.get("series_uid") or f"no-uid-{now}")
        self._db.execute(
            "INSERT OR REPLACE INTO phantom_qc VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                uid,
                str(report.get("scanner") or "unknown"),
                str(report.get("acquired") or ""),
                _ts(str(report.get("acquired") or ""), now),
                now,
                str(report.get("phantom") or ""),
                json.dumps(report),
            ),
        )

    def reports(self, scanner: str | None = None) -> list[dict[str, Any]]:
        """Reports in acquisition order (one scanner or all)."""
        q = "SELECT report FROM phantom_qc"
        args: tuple = ()
        if scanner:
            q += " WHERE scanner = ?"
            args = (scanner,)
        rows = self._db.execute(q + " ORDER BY scanner, acquired_ts", args).fetchall()
        return [json.loads(r[0]) for r in rows]

    def latest(self) -> list[tuple[str, float, dict[str, Any]]]:
        """(scanner, acquired_ts, report) of each scanner's most recent phantom."""
        rows = self._db.execute(
            "SELECT scanner, acquired_ts, report FROM phantom_qc p WHERE acquired_ts = "
            "(SELECT MAX(acquired_ts) FROM phantom_qc q WHERE q.scanner = p.scanner)"
        ).fetchall()
        return [(r[0], float(r[1]), json.loads(r[2])) for r in rows]


class PhantomQCCollector(Collector):
    """Scrape-time gauges from :class:`QCHistory` (module doc)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        err = GaugeMetricFamily(
            "synthmr_phantom_qc_max_abs_error_percent",
            "Largest |error| of the in-range spheres of the scanner's last phantom "
            "(percent of the reference; PD array: pu)",
            labels=["scanner", "array"],
        )
        r2 = GaugeMetricFamily(
            "synthmr_phantom_qc_r2",
            "Linearity R^2 per array of the scanner's last phantom",
            labels=["scanner", "array"],
        )
        last = GaugeMetricFamily(
            "synthmr_phantom_qc_last_timestamp_seconds",
            "Acquisition time of the scanner's last phantom (Unix seconds)",
            labels=["scanner"],
        )
        try:
            if Path(self.path).is_file():
                h = QCHistory(self.path)
                try:
                    latest = h.latest()
                finally:
                    h.close()
            else:
                latest = []
        except Exception:  # a scrape never fails because the DB is busy
            latest = []
        for scanner, ts, rep in latest:
            last.add_metric([scanner], ts)
            for array, v in sorted(array_errors(rep).items()):
                err.add_metric([scanner, array], v)
            for array, fit in sorted((rep.get("linearity") or {}).items()):
                if fit.get("r2") is not None:
                    r2.add_metric([scanner, array], float(fit["r2"]))
        yield err
        yield r2
        yield last


def _f(v: Any, fmt: str = "{:.4f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_history(reports: Sequence[dict[str, Any]]) -> str:
    """One line per phantom and array: date, scanner, R^2, slope, largest error, spheres."""
    lines = [
        f"{'acquired':19}  {'scanner':16} {'array':5} {'R2':>8} {'slope':>7} {'intercept':>9}"
        f" {'max|err|':>8} {'n':>3}  drift"
    ]
    prev: dict[tuple[str, str], float] = {}
    for rep in reports:
        errs = array_errors(rep)
        for array, fit in (rep.get("linearity") or {}).items():
            key = (str(rep.get("scanner")), array)
            slope = fit.get("slope")
            drift = ""
            if slope is not None and key in prev:
                drift = f"slope {100 * (slope - prev[key]) / prev[key]:+.2f} %"
            if slope is not None:
                prev[key] = slope
            unit = " pu" if array == "PD" else " %"
            lines.append(
                f"{str(rep.get('acquired', ''))[:19]:19}  {key[0][:16]:16} {array:5}"
                f" {_f(fit.get('r2'), '{:.5f}'):>8} {_f(slope, '{:.4f}'):>7}"
                f" {_f(fit.get('intercept'), '{:.2f}'):>9}"
                f" {(_f(errs.get(array), '{:.2f}') + unit) if array in errs else '-':>8}"
                f" {fit.get('n', 0):>3}  {drift}"
            )
    return "\n".join(lines)


def format_compare(table: dict[str, Any]) -> str:
    """The seed's table: R^2 per array per scanner, then per sphere within/between CV."""
    arrays = sorted({a for per in table["r2"].values() for a in per})
    lines = [f"R^2 per array ({table['reports']} reports, {len(table['scanners'])} scanners)"]
    lines.append(f"{'scanner':16} " + " ".join(f"{a:>9}" for a in arrays))
    for scanner in table["scanners"]:
        per = table["r2"].get(scanner, {})
        lines.append(
            f"{scanner[:16]:16} " + " ".join(f"{_f(per.get(a), '{:.5f}'):>9}" for a in arrays)
        )
    lines.append("")
    lines.append(
        f"{'sphere':7} {'quantity':8} {'reference':>10} {'mean':>10} {'CV within %':>12}"
        f" {'CV between %':>13} {'scanners':>8} {'n':>3}"
    )
    for row in table["spheres"]:
        cvw = None if row["cv_within"] is None else 100 * row["cv_within"]
        cvb = None if row["cv_between"] is None else 100 * row["cv_between"]
        lines.append(
            f"{row['label']:7} {row['quantity']:8} {_f(row.get('reference'), '{:.2f}'):>10}"
            f" {row['mean']:>10.2f} {_f(cvw, '{:.2f}'):>12} {_f(cvb, '{:.2f}'):>13}"
            f" {row['scanners']:>8} {row['n']:>3}"
        )
    for label, why in sorted((table.get("excluded") or {}).items()):
        lines.append(f"{label:7} left out: {why} (a CV over some scans only would mislead)")
    return "\n".join(lines)
