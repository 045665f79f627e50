"""Retention of ``<spool>/results/`` (stored maps, thumbnails, report renders per series).

``[retention] results_days`` removes a series' results once its ``meta.json`` (written
when the series was processed) is older than that; ``results_max_gb`` then removes the
oldest until the whole area fits. Neither ever removes a series whose work is not done:
a series the registry has in a non-final state (it is being received or processed), or
one with outbox items PENDING (still being pushed) or DEAD (waiting for the operator's
resend). Results of series the registry does not know (older node, restored backup) are
kept or removed by age and size alone. Each removal is a ``results_removed`` log line and
``synthmr_results_removed_total{reason}``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dicom_node.logging import log_event
from dicom_node.registry import FINAL_STATES, Registry

__all__ = ["ResultsEntry", "prune_results", "results_entries"]

log = logging.getLogger("synthmr.retention")
GB = 1024**3


@dataclass(frozen=True)
class ResultsEntry:
    """One series' results directory: its series UID, when it was processed, its size."""

    path: Path
    series_uid: str
    processed_at: float
    n_bytes: int


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def results_entries(spool_root: str | Path) -> list[ResultsEntry]:
    """Every series directory under ``<spool>/results/``, oldest first."""
    area = Path(spool_root) / "results"
    out = []
    for d in area.iterdir() if area.is_dir() else ():
        meta = d / "meta.json"
        if not d.is_dir() or not meta.is_file() or d.name.endswith(".tmp"):
            continue  # a directory being written (save_series: <uid>.tmp) is not ours to judge
        try:
            uid = str(json.loads(meta.read_text("utf-8")).get("series_uid") or d.name)
            entry = ResultsEntry(d, uid, meta.stat().st_mtime, _size(d))
        except (OSError, ValueError):
            continue
        out.append(entry)
    return sorted(out, key=lambda e: e.processed_at)


def _busy(registry: Registry, series_uid: str) -> str:
    """Why this series' results must stay ('' = they may go)."""
    row = registry.series(series_uid)
    if row is not None and row.state not in FINAL_STATES:
        return f"series is {row.state.value}"
    for dest, counts in registry.outbox_of(series_uid).items():
        if counts.get("PENDING") or counts.get("DEAD"):
            return f"outbox to {dest} not done"
    return ""


def prune_results(
    spool_root: str | Path,
    registry: Registry,
    max_age_days: float,
    max_gb: float,
    now: float | None = None,
) -> list[tuple[ResultsEntry, str]]:
    """Remove results older than ``max_age_days`` (0 = no age limit), then the oldest until
    the area is within ``max_gb`` (0 = no size limit). Returns ``(entry, reason)`` removed."""
    now = time.time() if now is None else now
    entries = results_entries(spool_root)
    total = sum(e.n_bytes for e in entries)
    removed: list[tuple[ResultsEntry, str]] = []
    for e in entries:  # oldest first
        old = max_age_days > 0 and now - e.processed_at > max_age_days * 86400.0
        big = max_gb > 0 and total > max_gb * GB
        if not (old or big):
            continue
        why_not = _busy(registry, e.series_uid)
        if why_not:
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        total -= e.n_bytes
        reason = "age" if old else "size"
        removed.append((e, reason))
        log_event(
            log, "results_removed", series_uid=e.series_uid, reason=reason,
            bytes=e.n_bytes, age_days=round((now - e.processed_at) / 86400.0, 2),
            results_bytes_left=total,
        )  # fmt: skip
    return removed
