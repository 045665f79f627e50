"""Which B1-map series of the study goes with a 3D-QALAS series (the node's job).

Rules (conservative; every "no" is a warning in the result, never a guess):

- candidates: the other series of the same StudyInstanceUID whose first instance is a
  B1-map acquisition (:func:`dicom_node.vendors.b1map.is_b1_map_series`) and holds map
  images (a companion-only series, e.g. Siemens' anatomical tfl_b1map series, is kept
  but not a candidate);
- same FrameOfReferenceUID as the QALAS series, required: another frame of reference
  means the patient coordinates of the two were not the same (re-positioned, another
  session); matching on the patient position alone is not attempted;
- among the candidates, the nearest acquisition time (AcquisitionTime, else SeriesTime);
- waiting: a B1-map candidate of the study still being received (RECEIVING .. PROCESSING)
  or none at all yet -> the QALAS job is deferred (durably, in the registry) until
  ``b1_map_wait_s`` after the QALAS series' last instance, extended for a B1-map series
  still being received to its last instance + the quiet period + ``b1_map_wait_s``;
  then the fit runs with the nominal B1 and says so;
- a B1-map series that arrives after its study's QALAS series was processed is not
  applied by itself (no silent re-processing): the node logs ``b1_map_after_qalas``
  naming the series and ``synthmr retry`` re-processes with it.

Reading headers and pixels only; the resampling is :mod:`processing.b1map`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pydicom
from pydicom.dataset import Dataset

from dicom_node.registry import Registry, SeriesRow, State
from dicom_node.vendors.b1map import (
    B1MapUnitError,
    acquisition_seconds,
    b1_series_info,
    is_b1_map_series,
    read_b1_map,
)
from dicom_node.vendors.qalas import is_qalas
from processing.b1map import B1Map

__all__ = ["B1Match", "match_b1_map", "qalas_series_processed_before"]

log = logging.getLogger("synthmr.b1match")

_PENDING = {State.RECEIVING, State.COMPLETE, State.QUEUED, State.PROCESSING}


@dataclass
class B1Match:
    """``wait_until``: defer the QALAS job until then (a B1 map may still come); else
    ``b1_map`` (or None) and ``notes`` (warnings for the result)."""

    wait_until: float | None = None
    b1_map: B1Map | None = None
    notes: list[str] = field(default_factory=list)
    waiting_for: str = ""


def _header(path: str) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def match_b1_map(
    registry: Registry,
    series_uid: str,
    wait_s: float,
    quiet_s: float,
    now: float,
    load: Callable[[Sequence[str]], list[Dataset]],
) -> B1Match | None:
    """The B1 map for ``series_uid`` if it is a 3D-QALAS series (None: not QALAS, nothing
    to do). ``load(paths)`` reads a series' datasets with pixels."""
    paths = registry.instance_paths(series_uid)
    row = registry.series(series_uid)
    if not paths or row is None:
        return None
    first = _header(paths[0])
    if not is_qalas([first]) or is_b1_map_series([first]):
        return None
    study = row.study_uid or str(first.get("StudyInstanceUID", ""))
    for_uid = str(first.get("FrameOfReferenceUID", "") or "")
    t_qalas = acquisition_seconds(first)
    deadline = row.last_received + wait_s
    usable: list[tuple[float, SeriesRow, str]] = []
    notes: list[str] = []
    pending = ""
    for other in registry.series_of_study(study):
        if other.series_uid == series_uid:
            continue
        other_paths = registry.instance_paths(other.series_uid)
        if not other_paths:
            continue
        try:
            head = _header(other_paths[0])
            if not is_b1_map_series([head]):
                continue
            if other.state in _PENDING:
                pending = other.series_uid
                deadline = max(deadline, other.last_received + quiet_s + wait_s)
                continue
            info = b1_series_info([_header(p) for p in other_paths])
        except Exception as exc:  # an unreadable candidate: say so, go on
            notes.append(f"B1-map candidate {other.series_uid} unreadable: {exc}")
            continue
        if not info.has_map:
            continue
        if info.frame_of_reference_uid != for_uid or not for_uid:
            notes.append(
                f"QALAS: B1-map series {other.series_uid} not used: its FrameOfReferenceUID"
                f" ({info.frame_of_reference_uid or 'none'}) differs from this series'"
                f" ({for_uid or 'none'}): the two are not in one patient coordinate system"
            )
            continue
        dt = (
            abs(info.acquisition_time_s - t_qalas)
            if info.acquisition_time_s is not None and t_qalas is not None
            else float("inf")
        )
        usable.append((dt, other, info.description))
    if not usable and now < deadline:
        return B1Match(wait_until=deadline, waiting_for=pending)
    if not usable:
        why = (
            f"the B1-map series {pending} of this study was still being received"
            if pending
            else "no B1-map series of this study was received"
        )
        notes.append(
            f"QALAS: {why} within completion.b1_map_wait_s = {wait_s:g} s; a B1 map that"
            " arrives later is not applied automatically (`synthmr retry "
            f"{series_uid}` re-processes with it)"
        )
        return B1Match(notes=notes)
    usable.sort(key=lambda u: u[0])
    _, chosen, _ = usable[0]
    if len(usable) > 1:
        notes.append(
            f"QALAS: {len(usable)} B1-map series in this study; used {chosen.series_uid}"
            " (nearest acquisition time)"
        )
    try:
        b1 = read_b1_map(load(registry.instance_paths(chosen.series_uid)))
    except (B1MapUnitError, ValueError) as exc:
        notes.append(f"QALAS: B1 map not used, nominal B1 = 1 assumed: {exc}")
        return B1Match(notes=notes)
    return B1Match(b1_map=b1, notes=notes)


def qalas_series_processed_before(registry: Registry, b1_series_uid: str) -> list[str]:
    """QALAS series of the B1-map series' study already processed (EXPORTED, DELIVERED,
    HELD): the B1 map came too late for them."""
    row = registry.series(b1_series_uid)
    if row is None:
        return []
    out = []
    for other in registry.series_of_study(row.study_uid):
        if other.series_uid == b1_series_uid or other.state not in (
            State.EXPORTED,
            State.DELIVERED,
            State.HELD,
        ):
            continue
        paths = registry.instance_paths(other.series_uid)
        try:
            if paths and is_qalas([_header(paths[0])]):
                out.append(other.series_uid)
        except Exception:
            continue
    return out
