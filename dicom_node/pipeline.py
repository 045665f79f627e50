"""One series job: load spool files -> vendors.normalize -> processing.run (in a worker)
-> export_all -> outbox files (fsync'd) + registry rows.

Only orchestration lives here: the numerics run in :mod:`processing` inside a worker
process (arrays travel to it), the DICOM packaging in :mod:`dicom_node.export`.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from dicom_node.config import Settings
from dicom_node.logging import log_event
from dicom_node.metrics import NodeMetrics
from dicom_node.registry import State
from dicom_node.spool import Spool

__all__ = [
    "JobOutcome",
    "encode_part10",
    "export_settings",
    "load_datasets",
    "missing_cells",
    "run_series_job",
]

log = logging.getLogger("synthmr.pipeline")

Submit = Callable[..., Any]  # submit(fn, *args) -> future with .result(timeout)


@dataclass
class JobOutcome:
    """What a job ended with; ``outputs`` are ``(sop_uid, sop_class_uid, path)``."""

    state: State
    reason: str = ""
    missing: list[str] = field(default_factory=list)
    outputs: list[tuple[str, str, str]] = field(default_factory=list)
    stage: str = ""  # stage that failed, for synthmr_processing_errors_total
    fit_failed_fraction: float | None = None
    qc_status: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    #: processing.run sub-stage seconds (SeriesResult.timings_s: fit, synthesis, ...)
    processing_timings_s: dict[str, float] = field(default_factory=dict)
    #: scalar QC figures of the series (processing.qc: residual_to_noise, b1_p1, ...)
    qc_figures: dict[str, float] = field(default_factory=dict)


def load_datasets(paths: Sequence[str]) -> list[Dataset]:
    """Read spool files fully (pixels included)."""
    return [pydicom.dcmread(p) for p in paths]


def export_settings(options: dict[str, Any]) -> Any:
    """``[export]`` TOML table -> :class:`dicom_node.export.ExportSettings`."""
    from dicom_node.export import ExportSettings

    return ExportSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


def encode_part10(ds: Dataset) -> bytes:
    """Encode a dataset as a DICOM Part-10 file (adds file meta when missing)."""
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _missing_from_error(exc: Exception) -> list[str]:
    """Missing cells as text: ``(slice, delay, echo, part)`` tuples -> ``slice=1 delay=2 ...``."""
    missing = getattr(exc, "missing", None)
    if not missing:
        return [str(exc)]
    out = []
    for m in missing:
        if isinstance(m, tuple) and len(m) == 4:
            out.append("slice={} delay={} echo={} part={}".format(*m))
        else:
            out.append(str(m))
    return out


def missing_cells(paths: Sequence[str], vendor_overrides: dict[str, Any]) -> list[str]:
    """The missing grid cells of a partial series, as the vendor adapter names them."""
    from dicom_node import vendors

    datasets = load_datasets(paths)
    try:
        vendors.normalize(datasets, rules=vendors.load_rules(vendor_overrides))
    except vendors.NormalizationError as exc:
        return _missing_from_error(exc)
    return []


def _keep_for_web(spool: Spool, series_uid: str, result: Any, datasets: list[Dataset]) -> None:
    """Keep maps, figures and thumbnails for the web interface (dicom_node.seriesstore);
    a failure here is logged, the series is still delivered."""
    try:
        from dicom_node.seriesstore import save_series

        save_series(spool.root, series_uid, result, datasets)
    except Exception as exc:
        log_event(
            log,
            "series_store_failed",
            level=logging.WARNING,
            series_uid=series_uid,
            error=f"{type(exc).__name__}: {exc}",
        )


def run_series_job(
    series_uid: str,
    paths: Sequence[str],
    settings: Settings,
    spool: Spool,
    submit: Submit,
    metrics: NodeMetrics | None = None,
    timeout_s: float | None = None,
    on_outputs: Callable[[list[tuple[str, str, str]]], None] | None = None,
) -> JobOutcome:
    """Run one series end to end up to the outbox files. Never raises: errors become a
    FAILED/QUARANTINED/IGNORED outcome naming the stage and the reason.

    ``on_outputs(rows)`` gets each output series' ``(sop_uid, sop_class_uid, path)`` as
    soon as its files are durable, before the next one is built (streamed push); when an
    export fails later, what was handed over stays handed over (the series is FAILED)."""
    from dicom_node import vendors

    timings: dict[str, float] = {}

    def observe(stage: str, t0: float) -> None:
        timings[stage] = time.perf_counter() - t0
        if metrics is not None:
            metrics.stage.labels(stage).observe(timings[stage])

    stage = "normalize"
    try:
        t0 = time.perf_counter()
        datasets = load_datasets(paths)
        if not datasets:
            return JobOutcome(State.FAILED, "no instances on disk for this series", stage=stage)
        det = vendors.detect(datasets)
        if not det.is_mdme:
            return JobOutcome(State.IGNORED, f"not an MDME series: {det.reason}", timings_s=timings)
        try:
            acq = vendors.normalize(datasets, rules=vendors.load_rules(settings.vendors))
        except vendors.NormalizationError as exc:
            return JobOutcome(
                State.QUARANTINED,
                f"grid incomplete or inconsistent: {exc}",
                missing=_missing_from_error(exc),
                stage=stage,
                timings_s=timings,
            )
        observe("normalize", t0)

        stage = "process"
        t0 = time.perf_counter()
        from processing.run import run

        psettings = settings.processing.to_processing_settings()
        result = submit(run, acq, psettings).result(timeout=timeout_s)
        observe("process", t0)
        # per-stage figures measured inside the worker (fit, pd, synthesis, segmentation,
        # myelin, enhance, qc) go into the job_finished log line
        for name, seconds in (getattr(result, "timings_s", None) or {}).items():
            timings[name] = float(seconds)

        stage = "export"
        t0 = time.perf_counter()
        from dicom_node.export import export_groups

        outputs: list[tuple[str, str, str]] = []
        # a group (an output series) at a time: stored durably, then handed to on_outputs
        # (the node queues it for the push) while the next group is built and encoded
        for group in export_groups(result, datasets, export_settings(settings.export)):
            paths = spool.store_outputs(
                series_uid, ((str(ds.SOPInstanceUID), encode_part10(ds)) for ds in group)
            )
            rows = [
                (str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(path))
                for ds, path in zip(group, paths, strict=True)
            ]
            outputs += rows
            if on_outputs is not None:
                on_outputs(rows)
        observe("export", t0)
        _keep_for_web(spool, series_uid, result, datasets)
    except Exception as exc:
        log_event(
            log,
            "job_failed",
            level=logging.ERROR,
            series_uid=series_uid,
            stage=stage,
            error=f"{type(exc).__name__}: {exc}",
        )
        return JobOutcome(
            State.FAILED, f"{stage}: {type(exc).__name__}: {exc}", stage=stage, timings_s=timings
        )

    maps = result.maps
    n_mask = int(np.count_nonzero(maps.mask))
    failed_fraction = float(np.count_nonzero(maps.failed)) / n_mask if n_mask else None
    qc_all = result.qc if isinstance(result.qc, dict) else {}
    qc = qc_all.get("status")
    qc_figures = {
        k: float(v)
        for k, v in qc_all.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return JobOutcome(
        State.EXPORTED,
        reason=f"{len(outputs)} instances exported",
        outputs=outputs,
        fit_failed_fraction=failed_fraction,
        qc_status=str(qc).lower() if qc else None,
        timings_s=timings,
        processing_timings_s={k: float(v) for k, v in dict(result.timings_s).items()},
        qc_figures=qc_figures,
    )
