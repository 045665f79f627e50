"""Normative references of the report's figures (published values only).

The bundled table ``processing/data/normative_brain.json`` cites its source per entry; a
site may pass its own table of the same form. :func:`reference_at` tells, for a figure,
an age and a sex, what the table says there - or that it has nothing for that age, which
the report prints instead of a range.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FIGURES", "ReferenceAt", "load_table", "reference_at"]

#: The report's figures, in order (keys of SeriesResult.volumes_ml).
FIGURES: tuple[str, ...] = ("WM", "GM", "CSF", "MYELIN", "BPV", "ICV", "BPF")
BUNDLED = Path(__file__).parent / "data" / "normative_brain.json"


def load_table(path: str | Path | None = None) -> dict[str, Any]:
    """The bundled table, or a site's (same form); a site table replaces the figures it has."""
    table = json.loads(BUNDLED.read_text("utf-8"))
    if path:
        site = json.loads(Path(path).read_text("utf-8"))
        for fig, entries in (site.get("figures") or {}).items():
            table["figures"][fig] = entries
            table.get("no_reference", {}).pop(fig, None)
    return table


@dataclass(frozen=True)
class ReferenceAt:
    """What the table says for one figure at one age: ``low``..``high`` around ``mean``
    (None when no entry covers the age), the entries used (for plotting) and a note."""

    figure: str
    mean: float | None
    low: float | None
    high: float | None
    note: str
    entries: tuple[dict[str, Any], ...]


def _sex_ok(entry: dict[str, Any], sex: str | None) -> bool:
    s = str(entry.get("sex", "any")).upper()
    return s in ("ANY", "") or (sex or "").upper() == s


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            t = (x - xs[i]) / (xs[i + 1] - xs[i]) if xs[i + 1] > xs[i] else 0.0
            return ys[i] + t * (ys[i + 1] - ys[i])
    raise ValueError("outside")


def reference_at(
    table: dict[str, Any], figure: str, age: float | None, sex: str | None = None
) -> ReferenceAt:
    every = list((table.get("figures") or {}).get(figure, []))
    entries = [e for e in every if _sex_ok(e, sex)]
    if every and not entries:  # sex-specific references only, and none for this sex
        sexes = sorted({str(e.get("sex")) for e in every})
        note = f"the references for {figure} are by sex ({', '.join(sexes)}); none for "
        return ReferenceAt(
            figure, None, None, None, note + f"patient sex {sex or 'unknown'}", tuple(every)
        )
    if not entries:
        note = (table.get("no_reference") or {}).get(
            figure, f"no published reference for {figure} in the table"
        )
        return ReferenceAt(figure, None, None, None, note, ())
    if age is None:
        return ReferenceAt(figure, None, None, None, "patient age unknown", tuple(entries))
    for e in entries:  # a curve covering the age wins
        if e.get("kind") == "curve":
            ages = [float(a) for a in e["ages"]]
            if ages[0] <= age <= ages[-1]:
                m, lo, hi = (
                    _interp(ages, [float(v) for v in e[k]], age) for k in ("mean", "low", "high")
                )
                return ReferenceAt(figure, m, lo, hi, e.get("source", ""), tuple(entries))
    for e in entries:  # then the first age-pooled entry covering the age (table order)
        if e.get("kind") not in ("pooled", "group") or not e["age_min"] <= age <= e["age_max"]:
            continue
        if e["kind"] == "pooled":
            m, half = float(e["median"]), float(e["iqr"]) / 2
            what = "age-pooled median and IQR"
        else:  # one healthy group: mean +- 1.96 SD holds 95 % of it if normally distributed
            m, half = float(e["mean"]), 1.96 * float(e["sd"])
            what = f"age-pooled healthy group mean +- 1.96 SD (sex {e.get('sex', 'any')})"
        return ReferenceAt(
            figure, m, m - half, m + half,
            f"{what}, n={e.get('n', 'not given')}, ages {e['age_min']}-{e['age_max']}: "
            + e.get("source", "") + (f" ({e['where']})" if e.get("where") else ""),
            tuple(entries),
        )  # fmt: skip
    return ReferenceAt(
        figure, None, None, None,
        f"no reference range for age {age:.0f} in the table (entries shown for orientation)",
        tuple(entries),
    )  # fmt: skip
