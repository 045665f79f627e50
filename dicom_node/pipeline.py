"""One node job: load the spool files of a series -> :func:`dicom_node.series.run_series`
(processing in a worker) -> outbox files (fsync'd); the caller records the outcome.

Only the node's side lives here (spool in, spool out); the series path itself is
:mod:`dicom_node.series`, shared with ``synthmr process`` and the offline demo.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicom_node.config import Settings
from dicom_node.export.rejection import rejection_note
from dicom_node.handoff import trim_heap
from dicom_node.logging import log_event
from dicom_node.metrics import NodeMetrics
from dicom_node.prefetch import CachedFile, file_key
from dicom_node.registry import Retirement, State
from dicom_node.series import (
    EncodedInstance,
    JobOutcome,
    Submit,
    Writer,
    encode_part10,
    run_series,
)
from dicom_node.seriesstore import PendingSeries, save_series
from dicom_node.spool import Spool
from dicom_node.web.reportdata import (
    early_ratio,
    early_ratio_medians,
    remember_ratio,
    start_series_report,
)
from processing.results import SeriesResult

__all__ = [
    "JobOutcome",
    "encode_part10",
    "load_datasets",
    "output_records",
    "run_series_job",
    "spool_writer",
    "write_rejection_note",
]

log = logging.getLogger("synthmr.pipeline")


def load_datasets(
    paths: Sequence[str], cached: Mapping[str, CachedFile] | None = None
) -> list[Dataset]:
    """Read spool files fully (pixels included). ``cached``: datasets read ahead
    (:mod:`dicom_node.prefetch`), used when the file is still the one that was read."""
    cached = cached or {}
    datasets = []
    for p in paths:
        hit = cached.get(p)
        if hit is not None and hit[0] == file_key(os.stat(p)):
            datasets.append(hit[1])
        else:  # not read ahead, or replaced since (a re-sent instance)
            datasets.append(pydicom.dcmread(p))
    return datasets


def spool_writer(
    spool: Spool, series_uid: str, uids: dict[str, tuple[str, str]] | None = None
) -> Writer:
    """Write outputs as fsync'd Part-10 files in the spool's outbox folder of the series.

    ``uids``: filled with ``path -> (study_uid, series_uid)`` of every output written
    (:func:`output_records` then needs not read the files back)."""

    def write(datasets: list[Any], result: SeriesResult) -> list[tuple[str, str, str]]:
        # an EncodedInstance (built in the worker) is written as it is
        ids = [
            (ds.sop_uid, ds.sop_class_uid)
            if isinstance(ds, EncodedInstance)
            else (str(ds.SOPInstanceUID), str(ds.SOPClassUID))
            for ds in datasets
        ]
        paths = spool.store_outputs(
            series_uid,
            (
                (sop, ds.data if isinstance(ds, EncodedInstance) else encode_part10(ds))
                for (sop, _), ds in zip(ids, datasets, strict=True)
            ),
        )
        if uids is not None:
            for ds, path in zip(datasets, paths, strict=True):
                if isinstance(ds, EncodedInstance):
                    if ds.study_uid and ds.series_uid:
                        uids[str(path)] = (ds.study_uid, ds.series_uid)
                else:
                    uids[str(path)] = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        # a group's temporaries (frames, encoded bytes: mostly under glibc's mmap threshold)
        # went back to the heap: give them to the system before the next group is built
        trim_heap()
        return [(sop, cls, str(path)) for (sop, cls), path in zip(ids, paths, strict=True)]

    return write


class _WebKeeper:
    """The node job's ``extra_outputs`` (:func:`dicom_node.series.run_series`): keep maps,
    figures and thumbnails for the web interface (:mod:`dicom_node.seriesstore`) and make
    the one-page report of a brain series (Encapsulated PDF + Secondary Capture, the
    T1w/T2w ratio map). A failure here is logged; the series is still delivered without
    them.

    With ``submit`` (the node's job) the work runs on a thread of its own while the job
    goes on: the parts the worker hands over early (:meth:`early`) are stored as they
    come (the maps while the worker segments, then the fractions and the T1w/T2w ratio
    the report needs), and once the result is in (:meth:`__call__`) the store is finished
    and the page is rendered in the worker while the job exports; the returned function
    waits for the documents."""

    def __init__(
        self,
        spool: Spool,
        series_uid: str,
        datasets: list[Dataset],
        settings: Settings,
        submit: Submit | None,
    ) -> None:
        self.spool, self.series_uid, self.datasets = spool, series_uid, datasets
        self.settings, self.submit = settings, submit
        self.pending: PendingSeries | None = None  # made with the maps part
        self.thread: ThreadPoolExecutor | None = None
        self.stored: set[str] = set()  # the parts stored early ("maps", "segmentation")
        self.ratio: np.ndarray | None = None
        self.error = ""

    def _later(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        if self.thread is None:
            self.thread = ThreadPoolExecutor(1, thread_name_prefix="report")
        return self.thread.submit(fn, *args)

    def early(self, stage: str, part: SeriesResult) -> None:
        """A part of the result (:func:`processing.run.run`'s ``on_ready``), stored on the
        thread while the worker goes on."""
        if self.submit is not None and stage in ("maps", "segmentation"):
            self._later(self._store_part, stage, part)

    def _store_part(self, stage: str, part: SeriesResult) -> None:
        if self.error or (stage == "segmentation" and "maps" not in self.stored):
            return
        try:
            if stage == "maps":
                self.pending = PendingSeries(self.spool.root, self.series_uid, self.datasets)
                self.pending.add_maps(part)
                if self.settings.processing.segmentation:  # a report will be made
                    self.ratio = early_ratio(part.maps)  # its ratio, while the worker segments
            else:
                assert self.pending is not None
                self.pending.add_segmentation(part)
                if part.segmentation is not None and self.ratio is not None:
                    fractions = part.segmentation.fractions
                    early_ratio_medians(self.ratio, fractions, self.pending.tmp)
            self.stored.add(stage)
        except Exception as exc:  # the final store starts again from the whole result
            self.error = f"{type(exc).__name__}: {exc}"

    def __call__(self, result: SeriesResult) -> list[Dataset] | Callable[[], list[Dataset]]:
        if self.submit is None:
            return self._documents([result])
        held = [result]  # emptied once stored: the report that follows needs none of its arrays
        made = self._later(self._documents, held)
        assert self.thread is not None
        self.thread.shutdown(wait=False)  # the thread ends after this last task

        def documents() -> list[Dataset]:
            out = made.result()
            return out() if callable(out) else out

        return documents

    def abandon(self) -> None:
        """The job ended without a result: remove what was stored early."""
        if self.thread is not None:
            self.thread.shutdown(wait=True)
        if self.pending is not None:
            shutil.rmtree(self.pending.tmp, ignore_errors=True)

    def _store(self, result: SeriesResult) -> None:
        if self.pending is not None and self.stored == {"maps", "segmentation"}:
            path = self.pending.finish(result)
            if self.ratio is not None:  # the report's ratio, computed from these maps
                remember_ratio(path / "maps.npz", self.ratio)
                self.ratio = None
            return
        if self.error:
            log_event(log, "series_store_early_failed", level=logging.INFO, error=self.error)
        save_series(self.spool.root, self.series_uid, result, self.datasets)

    def _documents(self, held: list[SeriesResult]) -> list[Dataset] | Callable[[], list[Dataset]]:
        """The store and the report (never raises); ``held`` (the result) is emptied once
        the series is stored, so its arrays can go while the report is made."""
        series_uid = self.series_uid
        result = held.pop()
        report = bool(getattr(result, "volumes_ml", None)) and (
            getattr(result, "segmentation", None) is not None
        )
        try:
            self._store(result)
            del result
            trim_heap()
        except Exception as exc:
            log_event(
                log,
                "series_store_failed",
                level=logging.WARNING,
                series_uid=series_uid,
                error=f"{type(exc).__name__}: {exc}",
            )
            return []
        if not report:
            return []

        def failed(exc: Exception) -> list[Dataset]:
            log_event(
                log,
                "report_failed",
                level=logging.WARNING,
                series_uid=series_uid,
                error=f"{type(exc).__name__}: {exc}",
            )
            return []

        try:
            finish = start_series_report(
                self.spool.root, series_uid, self.datasets, self.settings, self.submit
            )
        except Exception as exc:
            return failed(exc)

        def documents() -> list[Dataset]:
            try:
                return finish()
            except Exception as exc:
                return failed(exc)

        return documents


def run_series_job(
    series_uid: str,
    paths: Sequence[str],
    settings: Settings,
    spool: Spool,
    submit: Submit,
    metrics: NodeMetrics | None = None,
    timeout_s: float | None = None,
    on_outputs: Callable[[list[tuple[str, str, str]]], None] | None = None,
    b1_map: Any = None,
    b1_notes: Sequence[str] = (),
    cached: Mapping[str, CachedFile] | None = None,
) -> JobOutcome:
    """Run one spooled series end to end up to the outbox files. Never raises.

    ``on_outputs``, ``b1_map``, ``b1_notes``: see :func:`dicom_node.series.run_series`;
    ``cached``: see :func:`load_datasets`."""
    try:
        datasets = load_datasets(paths, cached)
        cached = None  # the job's list holds them now
    except Exception as exc:  # removed or corrupt spool file
        return JobOutcome(
            State.FAILED, f"normalize: {type(exc).__name__}: {exc}", stage="normalize"
        )
    if not datasets:
        return JobOutcome(State.FAILED, "no instances on disk for this series", stage="normalize")
    uids: dict[str, tuple[str, str]] = {}
    web = _WebKeeper(spool, series_uid, datasets, settings, submit)
    outcome = run_series(
        datasets,
        settings,
        spool_writer(spool, series_uid, uids),
        extra_outputs=web,
        series_uid=series_uid,
        submit=submit,
        metrics=metrics,
        timeout_s=timeout_s,
        on_outputs=on_outputs,
        b1_map=b1_map,
        b1_notes=b1_notes,
        release=True,  # the node frees each array once exported (the outcome's figures stay)
    )
    outcome.output_uids = uids
    if outcome.state not in (State.EXPORTED, State.HELD):
        web.abandon()
    if outcome.phantom_qc is not None:  # a QC phantom: into the scanner's QC history
        from dicom_node.phantom_node import record_history

        record_history(settings.spool.path, outcome.phantom_qc)
    return outcome


def output_records(
    outputs: Sequence[tuple[str, str, str]],
    known: Mapping[str, tuple[str, str]] | None = None,
) -> list[tuple[str, str, str, str, str]]:
    """``(sop_uid, sop_class_uid, path)`` -> ``(sop_uid, sop_class_uid, study_uid,
    series_uid, path)`` (the registry's record of a version, which a later rejection note
    references): from ``known`` (``path -> (study_uid, series_uid)``, what the writer
    wrote, :func:`spool_writer`), else read from the written file's header."""
    known = known or {}
    records = []
    for sop, cls, path in outputs:
        if path in known:
            study, series = known[path]
        else:
            ds = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["StudyInstanceUID", "SeriesInstanceUID"],
            )
            study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        records.append((sop, cls, study, series, path))
    return records


def write_rejection_note(
    spool: Spool, source_paths: Sequence[str], retirement: Retirement, settings: Settings
) -> tuple[str, str, str]:
    """Build the IOCM rejection note of ``retirement`` and store it in the series' outbox
    folder; return its ``(sop_uid, sop_class_uid, path)``. Patient and study attributes
    come from the first source instance still spooled."""
    source = Dataset()
    if source_paths:
        source = pydicom.dcmread(source_paths[0], stop_before_pixels=True)
    note = rejection_note(retirement.instances, source, settings.export)
    [path] = spool.store_outputs(
        retirement.series_uid, [(str(note.SOPInstanceUID), encode_part10(note))]
    )
    return str(note.SOPInstanceUID), str(note.SOPClassUID), str(path)
