"""Phantom series in the node: the recognition rule, the worker call, phantom_qc.json.

Orchestration only: the numerics are :func:`processing.phantom_qc.run_phantom` (run in a
worker), the DICOM packaging :mod:`dicom_node.export.phantom_sr`.

A series is a phantom candidate when (1) the configured rule matches its headers (default:
PatientName or StudyDescription contains PHANTOM or QC) or its outline is a sphere of the
phantom's size (a cheap test on the raw signal, so that a phantom sent under a misleading
description is never segmented as a brain); it is a phantom only when (2) its content is
the phantom (outline, a sphere model that explains the images, sphere contrast in the
reference order). A candidate that fails (2) is processed as a brain, with the reason
logged. ``enabled = false`` turns both off.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.logging import log_event
from processing._version import __version__

__all__ = [
    "PhantomOutcome",
    "acquired_of",
    "load_phantom_definition",
    "matches_rule",
    "phantom_json",
    "record_history",
    "run_phantom_series",
    "scanner_of",
    "try_phantom",
    "write_phantom_json",
]

log = logging.getLogger("synthmr.phantom")


def _text(ds: Dataset, keyword: str) -> str:
    v = ds.get(keyword, "")
    return "" if v is None else str(v)


def matches_rule(datasets: Sequence[Dataset], qc_settings: Any) -> tuple[bool, str]:
    """(match, why) of the header rule on the series' first instance."""
    if not qc_settings.enabled or not datasets:
        return False, "phantom QC disabled" if not qc_settings.enabled else "no instances"
    ds = datasets[0]
    for field_name in qc_settings.fields:
        value = _text(ds, field_name)
        for pattern in qc_settings.patterns:
            try:
                if re.search(pattern, value, flags=re.IGNORECASE):
                    # the value itself stays out: it goes to the log, and the field may be
                    # PatientName (patient names never appear in the node's logs)
                    return True, f"{field_name} matches {pattern!r}"
            except re.error as exc:
                raise ValueError(
                    f"phantom_qc.patterns: {pattern!r} is not a regex: {exc}"
                ) from None
    return False, "no phantom rule matched"


def scanner_of(ds: Dataset) -> str:
    """The scanner's identity: DeviceSerialNumber, else StationName, else 'unknown'."""
    for kw in ("DeviceSerialNumber", "StationName"):
        v = _text(ds, kw).strip()
        if v:
            return v
    return "unknown"


def acquired_of(ds: Dataset) -> str:
    """ISO date-time of the acquisition (Acquisition/Series/Study date and time)."""
    for d_kw, t_kw in (
        ("AcquisitionDate", "AcquisitionTime"),
        ("SeriesDate", "SeriesTime"),
        ("StudyDate", "StudyTime"),
    ):
        d = _text(ds, d_kw)
        if len(d) == 8 and d.isdigit():
            t = (_text(ds, t_kw).split(".")[0] + "000000")[:6]
            try:
                return _dt.datetime.strptime(d + t, "%Y%m%d%H%M%S").isoformat()
            except ValueError:
                return _dt.datetime.strptime(d, "%Y%m%d").date().isoformat()
    return ""


def load_phantom_definition(qc_settings: Any) -> Any:
    """The configured :class:`processing.phantoms.PhantomDefinition`."""
    from processing.phantoms import load_definition

    return load_definition(
        qc_settings.phantom,
        qc_settings.version or None,
        certificate=qc_settings.certificate or None,
        extra_dirs=[qc_settings.definitions_dir] if qc_settings.definitions_dir else [],
    )


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def phantom_json(report: dict[str, Any], ds: Dataset, series_uid: str = "") -> dict[str, Any]:
    """phantom_qc.json content: the processing report plus scanner, acquisition time and
    provenance (synthetic-analysis statement, software version)."""
    out = _clean(report)
    out.update(
        scanner=scanner_of(ds),
        acquired=acquired_of(ds),
        series_uid=series_uid or _text(ds, "SeriesInstanceUID"),
        station=_text(ds, "StationName"),
        manufacturer=_text(ds, "Manufacturer"),
        model=_text(ds, "ManufacturerModelName"),
        software=f"synthmr {__version__}",
        note="Quantitative maps fitted by synthmr (synthetic MRI software); phantom QC analysis",
    )
    return out


def write_phantom_json(path: Path, content: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(content, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


@dataclass
class PhantomOutcome:
    """The phantom path's result (``result`` None: not a phantom, ``reason`` says why)."""

    result: Any
    reason: str
    report: dict[str, Any] | None = None


def try_phantom(
    acq: Any,
    datasets: Sequence[Dataset],
    qc_settings: Any,
    call: Callable[..., Any],
    series_uid: str = "",
) -> PhantomOutcome | None:
    """Rule or outline, then content. ``call(fn, *args, **kw)`` runs ``fn`` (in a worker for
    the node, directly for ``synthmr process``). None when neither the header rule nor the
    outline says phantom, or the series is not MDME (phantom QC models the MDME signal)."""
    if not qc_settings.enabled or getattr(acq, "sequence", None) is not None:
        return None
    from processing.phantom_qc import run_phantom, shape_check

    ok, why = matches_rule(datasets, qc_settings)
    definition = load_phantom_definition(qc_settings)
    # the outline test (~0.1 s, here, before any worker round trip): a head fails it; a
    # phantom under a misleading description passes it, so it is never segmented as a brain
    shaped, shape_why = shape_check(acq, definition)
    if not shaped:
        if not ok:
            return None
        log_event(
            log,
            "phantom_candidate_rejected",
            series_uid=series_uid,
            rule=why,
            reason=shape_why,
        )
        return PhantomOutcome(None, shape_why)
    if not ok:
        why = "no header rule matched, but the outline is the phantom's"
    result, reason = call(
        run_phantom,
        acq,
        definition,
        temperature_c=qc_settings.temperature_c,
        erosion_mm=qc_settings.erosion_mm,
        min_voxels=qc_settings.min_voxels,
    )
    if result is None:
        log_event(log, "phantom_candidate_rejected", series_uid=series_uid, rule=why, reason=reason)
        return PhantomOutcome(None, reason)
    report = phantom_json(result.phantom_qc, datasets[0], series_uid)
    result.phantom_qc = report
    return PhantomOutcome(result, reason, report)


def run_phantom_series(
    acq: Any,
    datasets: Sequence[Dataset],
    settings: Any,
    write: Callable[..., Any],
    submit: Callable[..., Any] | None,
    timeout_s: float | None,
    series_uid: str,
    observe: Callable[[str, float], None],
) -> Any:
    """The phantom path inside :func:`dicom_node.series.run_series`: a JobOutcome (EXPORTED:
    T1/T2/PD Parametric Maps + sphere SEG + SR written by ``write``; ``phantom_qc`` holds
    the report), or None when the series is not a phantom (the brain path runs). Errors
    propagate to run_series, which turns them into a FAILED outcome."""
    import functools
    import time

    from dicom_node.registry import State
    from dicom_node.series import JobOutcome

    def call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        if submit is None:
            return fn(*args, **kw)
        return submit(functools.partial(fn, **kw), *args).result(timeout=timeout_s)

    t0 = time.perf_counter()
    outcome = try_phantom(acq, datasets, settings.phantom_qc, call, series_uid)
    if outcome is None or outcome.result is None:
        return None
    observe("process", t0)
    result = outcome.result
    t0 = time.perf_counter()
    from dicom_node.export.phantom_sr import export_phantom

    out_ds = export_phantom(result, datasets, settings.export)
    outputs = write(out_ds, result)
    observe("export", t0)
    lin = {a: f.get("r2") for a, f in (outcome.report.get("linearity") or {}).items()}
    log_event(
        log,
        "phantom_qc",
        series_uid=series_uid,
        scanner=outcome.report.get("scanner"),
        phantom=outcome.report.get("phantom"),
        r2=lin,
    )
    n_mask = int(np.count_nonzero(result.maps.mask))
    return JobOutcome(
        State.EXPORTED,
        reason=f"phantom QC ({outcome.report.get('phantom')}): {len(outputs)} instances exported",
        outputs=outputs,
        fit_failed_fraction=float(np.count_nonzero(result.maps.failed)) / n_mask
        if n_mask
        else None,
        processing_timings_s={k: float(v) for k, v in result.timings_s.items()},
        result=result,
        phantom_qc=outcome.report,
    )


def record_history(spool_path: str | Path, report: dict[str, Any]) -> None:
    """Store one phantom report in the scanner's QC history (the registry database)."""
    from dicom_node.qc_history import QCHistory

    history = QCHistory(Path(spool_path) / "registry.sqlite3")
    try:
        history.record(report)
    finally:
        history.close()
