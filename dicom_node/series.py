"""One series, one path: classify -> process -> QC gate -> export -> write.

The node's job (:func:`dicom_node.pipeline.run_series_job`), ``synthmr process`` and the
offline demo all call :func:`run_series`; they differ only in where the inputs come from
and where the outputs go (``write``: the spool's outbox, or a folder). Every outcome is a
:class:`~dicom_node.registry.State`:

- ``IGNORED``: not an MDME series (the reason says why);
- ``QUARANTINED``: an MDME series whose grid is incomplete or inconsistent (``missing``
  names the absent cells);
- ``FAILED``: an error in a stage (``stage`` names it);
- ``HELD``: processed and exported, but QC says "fail" and ``[export] qc_fail = "hold"``:
  the outputs are written, not delivered (``synthmr retry --release`` sends them);
- ``EXPORTED``: outputs written, to be delivered (with ``qc_fail = "send_marked"`` a
  QC-failed series is delivered with "QC FAIL" in its descriptions).

Only orchestration lives here: the numerics run in :mod:`processing` (in a worker when a
``submit`` is given), the DICOM packaging in :mod:`dicom_node.export`.
"""

from __future__ import annotations

import functools
import logging
import queue
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from dicom_node import vendors
from dicom_node.config import Settings
from dicom_node.export import ExportSettings, export_groups, settings_for, without_arrays
from dicom_node.export.common import series_number_base
from dicom_node.export.geometry import SliceGeometry, slice_geometry
from dicom_node.export.mr_images import encoded_synthetic_series, mr_geometry
from dicom_node.export.part10 import encode_part10
from dicom_node.export.uids import parameter_fingerprint, source_digest
from dicom_node.handoff import trim_heap
from dicom_node.logging import log_event
from dicom_node.metrics import NodeMetrics
from dicom_node.registry import State
from dicom_node.vendors.b1map import b1_series_info, is_b1_map_series
from processing.acquisition import Acquisition
from processing.b1map import B1Map
from processing.montage import series_montage_png
from processing.results import SeriesResult
from processing.run import CONCURRENT_MAX_VOXELS, ProcessingSettings, run, run_taking

__all__ = [
    "Classified",
    "EncodedInstance",
    "JobOutcome",
    "classify",
    "encode_part10",
    "encode_synthetic_series",
    "folder_writer",
    "mark_qc_fail",
    "missing_cells",
    "run_series",
]

log = logging.getLogger("synthmr.series")

#: submit(fn, *args) -> a future with ``.result(timeout)`` (process pool or Dask)
Submit = Callable[..., Any]


class EncodedInstance(NamedTuple):
    """An output already encoded as a Part-10 file (the worker built it)."""

    sop_uid: str
    sop_class_uid: str
    data: bytes | memoryview
    series_number: int
    modality: str
    study_uid: str = ""
    series_uid: str = ""


#: more outputs: the datasets, or a function that returns them (called after the export)
Extra = list[Dataset] | Callable[[], list[Dataset]]
#: write(outputs, result) -> ``(sop_uid, sop_class_uid, path)`` per output
Writer = Callable[[list[Any], SeriesResult], list[tuple[str, str, str]]]

QC_FAIL_MARK = "QC FAIL"
#: the reason of a B1-map series' IGNORED state starts with this
B1_MAP_REASON = "B1 map"


@dataclass
class Classified:
    """What :func:`classify` made of a series: ``state`` is ``COMPLETE`` (ready: the
    acquisition is set), ``IGNORED``, ``QUARANTINED`` or ``FAILED``."""

    state: State
    vendor: str
    reason: str
    acquisition: Acquisition | None = None
    missing: list[str] = field(default_factory=list)
    error: vendors.NormalizationError | None = None
    expected_instances: int | None = None

    @property
    def grid(self) -> tuple[int, int, int, str] | None:
        """(slices, delays, echoes, parts) of a ready series."""
        if self.acquisition is None:
            return None
        z, d, e, _, _ = self.acquisition.signal.shape
        return z, d, e, str(self.acquisition.metadata.get("parts", ""))

    def summary(self) -> str:
        """The grid and delay source of a ready series, else the state and reason."""
        acq = self.acquisition
        if acq is None:
            return f"{self.state.value}: {self.reason}"
        z, d, e, y, x = acq.signal.shape
        return (
            f"grid {z} slices x {d} delays x {e} echoes x {y}x{x}"
            f" ({'magnitude' if acq.is_magnitude else 'real'}), delays from {acq.delay_source}"
        )


@dataclass
class JobOutcome:
    """What one series ended with; ``outputs`` are ``(sop_uid, sop_class_uid, path)``."""

    state: State
    reason: str = ""
    missing: list[str] = field(default_factory=list)
    outputs: list[tuple[str, str, str]] = field(default_factory=list)
    stage: str = ""  # stage that failed, for synthmr_processing_errors_total
    vendor: str = ""
    summary: str = ""  # grid and delay source of a processed series
    warnings: list[str] = field(default_factory=list)
    fit_failed_fraction: float | None = None
    qc_status: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    #: processing.run sub-stage seconds (SeriesResult.timings_s: fit, synthesis, ...)
    processing_timings_s: dict[str, float] = field(default_factory=dict)
    #: scalar QC figures of the series (processing.qc: residual_to_noise, b1_p1, ...)
    qc_figures: dict[str, float] = field(default_factory=dict)
    result: SeriesResult | None = None
    #: a QC phantom: the phantom_qc.json content (dicom_node.phantom_node)
    phantom_qc: dict[str, Any] | None = None
    #: (study_uid, series_uid) per written path, as the writer knew them (the registry's
    #: record of the outputs; dicom_node.pipeline.output_records)
    output_uids: dict[str, tuple[str, str]] = field(default_factory=dict)


# --------------------------------------------------------------------------- classify
def _missing_text(exc: Exception) -> list[str]:
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


def classify(
    datasets: Sequence[Dataset], rules: Mapping[str, vendors.VendorRules] | None = None
) -> Classified:
    """Detect the vendor and MDME-ness of one series and normalize it. Never raises.

    ``rules``: every vendor's rules (``Settings.vendors``; None = the defaults).
    """
    if not datasets:
        return Classified(State.FAILED, "-", "no instances for this series")
    try:
        if is_b1_map_series(datasets):  # kept for a 3D-QALAS series of its study
            info = b1_series_info(datasets)
            what = "B1-map series" if info.has_map else "companion of a B1-map series"
            return Classified(
                State.IGNORED,
                info.vendor,
                f"{B1_MAP_REASON}: {what} ({info.description or 'no description'}), kept for"
                " the 3D-QALAS fit of a series of the same study; not processed on its own",
            )
        det = vendors.detect(datasets, rules)
    except Exception as exc:  # a header we did not foresee
        return Classified(State.FAILED, "-", f"header parse error: {type(exc).__name__}: {exc}")
    if not det.is_mdme:
        return Classified(State.IGNORED, det.vendor, f"not an MDME series: {det.reason}")
    expected = vendors.expected_count(datasets[0], rules)
    try:
        acq = vendors.normalize(datasets, rules)
    except vendors.NormalizationError as exc:
        if exc.kind == "not_mdme":
            return Classified(State.IGNORED, det.vendor, f"not an MDME series: {exc}", error=exc)
        # phase_units: the phase images' unit is not decidable (never fitted with a guess)
        what = "phase unusable" if exc.kind == "phase_units" else "grid incomplete or inconsistent"
        return Classified(
            State.QUARANTINED,
            det.vendor,
            f"{what}: {exc}",
            missing=_missing_text(exc),
            error=exc,
            expected_instances=expected,
        )
    except Exception as exc:
        return Classified(State.FAILED, det.vendor, f"normalize: {type(exc).__name__}: {exc}")
    return Classified(State.COMPLETE, det.vendor, det.reason, acq, expected_instances=expected)


def missing_cells(
    paths: Sequence[str], rules: Mapping[str, vendors.VendorRules] | None = None
) -> list[str]:
    """The missing grid cells of a partial series, named from the headers alone (the
    grid check runs before any pixel is read, so the pixels are not read at all)."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    try:
        vendors.normalize(headers, rules)
    except vendors.NormalizationError as exc:
        if exc.kind == "missing":
            return _missing_text(exc)
        if "PixelData" in str(exc) or "pixel data" in str(exc).lower():
            return []  # the grid is complete: only the (unread) pixels are absent
        return [str(exc)]
    return []


# --------------------------------------------------------------------------- QC gate
def _qc_reason(qc: dict[str, Any]) -> str:
    why = qc.get("reasons") or ([qc["error"]] if qc.get("error") else [])
    return "QC fail: " + ("; ".join(str(r) for r in why) or "no reason recorded")


def mark_qc_fail(datasets: Sequence[Dataset], reason: str) -> None:
    """Mark outputs delivered despite a failed QC: "QC FAIL" ends every series
    description, and images carry the reason in ImageComments."""
    suffix = f" [{QC_FAIL_MARK}]"
    for ds in datasets:
        desc = str(ds.get("SeriesDescription", "") or "")
        ds.SeriesDescription = desc[: 64 - len(suffix)] + suffix
        if ds.get("Modality") == "MR" and "PixelData" in ds:
            ds.ImageComments = reason[:10240]


# --------------------------------------------------------------------------- one series
def _figures(result: SeriesResult) -> dict[str, Any]:
    maps = result.maps
    n_mask = int(np.count_nonzero(maps.mask))
    qc_all = result.qc if isinstance(result.qc, dict) else {}
    qc = qc_all.get("status")
    return {
        "fit_failed_fraction": (float(np.count_nonzero(maps.failed)) / n_mask if n_mask else None),
        "qc_status": str(qc).lower() if qc else None,
        "qc_figures": {
            k: float(v)
            for k, v in qc_all.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        },
        "processing_timings_s": {k: float(v) for k, v in dict(result.timings_s).items()},
        "warnings": list(result.warnings),
    }


def run_series(
    datasets: Sequence[Dataset],
    settings: Settings,
    write: Writer,
    *,
    series_uid: str = "",
    submit: Submit | None = None,
    metrics: NodeMetrics | None = None,
    timeout_s: float | None = None,
    extra_outputs: Callable[[SeriesResult], Extra] | None = None,
    on_outputs: Callable[[list[tuple[str, str, str]]], None] | None = None,
    b1_map: B1Map | None = None,
    b1_notes: Sequence[str] = (),
    release: bool = False,
) -> JobOutcome:
    """Run one series end to end. Never raises: errors become a FAILED / QUARANTINED /
    IGNORED outcome naming the stage and the reason.

    ``release``: the export frees each of the result's arrays once the outputs that need
    it are built (the node's job; :func:`dicom_node.export.export_groups`); the outcome's
    ``result`` then holds the figures, not the arrays (a ``write`` must not read them),
    and ``extra_outputs`` gets a copy with what the web store reads (:func:`_web_copy`).

    ``b1_map``: the B1 map of a B1-map series of the same study (3D-QALAS; the node's
    :mod:`dicom_node.b1match` finds it); ``b1_notes``: what the matching had to say (no
    map, a map not usable), added to the result's warnings.

    ``submit``: run :func:`processing.run.run` there (None = in this process). When it is
    the node's :meth:`dicom_node.workers.Workers.submit` (the embedded pool), the worker
    hands over the maps and segmentation as soon as they are done and this process builds
    and writes their outputs while the worker goes on (:func:`_process_and_export_early`);
    they are delivered once the QC gate and the final provenance allow it.
    ``extra_outputs(result)``: more output datasets (the node's one-page report), sent
    and QC-gated with the export's; called before the export, it may return a function
    that returns them after it.
    ``on_outputs(rows)``: streamed outputs. Each output series is written as soon as it
    is built and its ``(sop_uid, sop_class_uid, path)`` handed over (the node pushes it
    while the next is built); not for a series the QC gate holds (written at the end,
    as before). When a later group fails, what was handed over stays (series FAILED).
    """
    job = _Job(settings, write, series_uid, submit, metrics, timeout_s, release)
    try:
        cls = job.classify(datasets)
        if cls.acquisition is None:
            return job.outcome_unprocessed(cls)
        phantom = job.phantom(cls, datasets)
        if phantom is not None:  # a QC phantom: maps + sphere SEG + SR, no brain stages
            return phantom
        outcome = job.process_and_export(cls, datasets, extra_outputs, on_outputs, b1_map, b1_notes)
    except Exception as exc:
        return job.failed(exc)
    return job.finish(outcome)


class _Job:
    """:func:`run_series`'s stages (classify, phantom, process, export), each timed into
    ``timings`` (and the node's metrics) under its name; ``stage`` names the one running
    (the FAILED outcome's stage)."""

    def __init__(
        self,
        settings: Settings,
        write: Writer,
        series_uid: str,
        submit: Submit | None,
        metrics: NodeMetrics | None,
        timeout_s: float | None,
        release: bool,
    ) -> None:
        self.settings, self.write, self.series_uid = settings, write, series_uid
        self.submit, self.metrics, self.timeout_s = submit, metrics, timeout_s
        self.release = release  # run_series(release=...)
        self.timings: dict[str, float] = {}
        self.stage = "normalize"
        self.vendor = ""
        self.summary = ""
        self.t0 = time.perf_counter()

    def observe(self, stage: str, t0: float) -> None:
        self.timings[stage] = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.stage.labels(stage).observe(self.timings[stage])

    def classify(self, datasets: Sequence[Dataset]) -> Classified:
        t0 = time.perf_counter()
        cls = classify(datasets, self.settings.vendors)
        self.vendor = cls.vendor
        if cls.acquisition is not None:
            self.observe("normalize", t0)
            self.summary = cls.summary()
        return cls

    def outcome_unprocessed(self, cls: Classified) -> JobOutcome:
        return JobOutcome(
            cls.state,
            cls.reason,
            missing=cls.missing,
            stage="" if cls.state == State.IGNORED else self.stage,
            vendor=cls.vendor,
            timings_s=self.timings,
        )

    def phantom(self, cls: Classified, datasets: Sequence[Dataset]) -> JobOutcome | None:
        """A QC phantom's own path (None: not a phantom)."""
        from dicom_node.phantom_node import run_phantom_series

        self.stage, self.t0 = "process", time.perf_counter()
        s = self.settings
        phantom = run_phantom_series(
            cls.acquisition, datasets, s, self.write, self.submit, self.timeout_s,
            self.series_uid, self.observe,
        )  # fmt: skip
        if phantom is not None:
            phantom.vendor, phantom.summary, phantom.timings_s = (
                self.vendor, self.summary, self.timings,
            )  # fmt: skip
        return phantom

    def process_and_export(
        self,
        cls: Classified,
        datasets: Sequence[Dataset],
        extra_outputs: Callable[[SeriesResult], Extra] | None,
        on_outputs: Callable[[list[tuple[str, str, str]]], None] | None,
        b1_map: B1Map | None,
        b1_notes: Sequence[str],
    ) -> JobOutcome:
        """Hand the acquisition to processing and export the result (the early part
        while the worker still runs, when it can hand parts over)."""
        # the inputs' content enters every output UID (changed inputs, new UIDs)
        digest = source_digest(datasets)
        # From here on the sources give headers only (export, report): their pixel data
        # (the acquisition's size again) goes, the acquisition once the worker has it.
        drop_pixel_data(datasets)
        acq = cls.acquisition
        assert acq is not None
        grid = SeriesResult(acq.shape, acq.voxel_size_mm, np.asarray(acq.affine), None)  # type: ignore[arg-type]
        early: list[Any] = []  # the slice geometry, made while the worker processes

        def meanwhile() -> None:
            try:
                early.append(slice_geometry(grid, datasets, self.settings.export))
            except Exception as exc:  # raised again where the export needs it
                early.append(exc)

        def geometry(result: SeriesResult) -> SliceGeometry | Exception | None:
            return early[0] if early and _same_grid(grid, result) else None

        streamed = _streamed_submit(self.submit, acq, self.settings.processing)
        del acq
        if streamed is not None:
            return _process_and_export_early(
                self, cls, datasets, digest, b1_map, b1_notes, meanwhile, geometry,
                streamed, extra_outputs, on_outputs,
            )  # fmt: skip
        result = _process(
            cls, self.settings.processing, self.submit, self.timeout_s, b1_map, meanwhile
        )
        self.processed(result, digest, b1_notes)
        self.stage, t0 = "export", time.perf_counter()
        outcome = _export_and_write(
            result, datasets, self.settings.export, self.write, extra_outputs, on_outputs,
            self.submit, geometry=geometry(result), release=self.release,
        )  # fmt: skip
        self.observe("export", t0)
        return outcome

    def processed(self, result: SeriesResult, digest: str, b1_notes: Sequence[str]) -> None:
        """The node's additions to a finished result, and the process stage's timings."""
        result.warnings.extend(b1_notes)
        result.provenance["source_sha256"] = digest
        self.observe("process", self.t0)
        # per-stage figures measured by processing.run (fit, pd, synthesis, ...)
        self.timings.update({k: float(v) for k, v in dict(result.timings_s).items()})

    def failed(self, exc: Exception) -> JobOutcome:
        log_event(
            log,
            "job_failed",
            level=logging.ERROR,
            series_uid=self.series_uid,
            stage=self.stage,
            error=f"{type(exc).__name__}: {exc}",
        )
        return JobOutcome(
            State.FAILED,
            f"{self.stage}: {type(exc).__name__}: {exc}",
            stage=self.stage,
            vendor=self.vendor,
            timings_s=self.timings,
        )

    def finish(self, outcome: JobOutcome) -> JobOutcome:
        outcome.vendor = self.vendor
        outcome.summary = self.summary
        outcome.timings_s = self.timings
        return outcome


#: the parts a streamed worker hands over (:func:`process_handing_over`), in order
_PARTS = ("maps", "segmentation", "synthesis")

#: a stand-in for the myelin maps while the worker still computes them: the export's
#: selection (the MYPV map, which enters every output's settings block) looks only at
#: whether the result will have them
_MYELIN_EXPECTED: Any = object()


def process_handing_over(
    acq: Acquisition,
    settings: ProcessingSettings,
    b1_map: B1Map | None,
    *,
    on_ready: Callable[[str, SeriesResult], None],
) -> SeriesResult:
    """In the worker: :func:`processing.run.run`, handing the maps, the segmentation and
    the synthetic contrasts over (``on_ready``) as soon as each is done; neither the parts
    nor the result it returns repeat what was handed over before (the node has it
    already: each array crosses once; the segmentation part comes without the maps)."""
    handed: set[str] = set()

    def hand(stage: str, part: SeriesResult) -> None:
        if stage == "segmentation":
            part = replace(part, maps=None)  # type: ignore[arg-type]
        elif stage == "synthesis":
            handed.update(part.synthetic)
        on_ready(stage, part)

    result = run(acq, settings, b1_map, on_ready=hand)
    rest = {k: v for k, v in result.synthetic.items() if k not in handed}
    return replace(result, maps=None, segmentation=None, synthetic=rest)  # type: ignore[arg-type]


def _streamed_submit(
    submit: Submit | None, acq: Acquisition, settings: ProcessingSettings
) -> Callable[..., Any] | None:
    """The node pool's ``submit_streamed`` (:class:`dicom_node.workers.Workers`) when the
    series can use it, else None. Not above :data:`CONCURRENT_MAX_VOXELS`: there the
    node's early outputs would be built while the worker holds its own peak (40 x 512 x
    512: the node's ~0.5 GB of export temporaries on top of it)."""
    owner = getattr(submit, "__self__", None)
    if not getattr(owner, "streaming", False):
        return None
    if int(np.prod(acq.shape)) > CONCURRENT_MAX_VOXELS:
        return None
    return owner.submit_streamed  # type: ignore[union-attr]


class _EarlyOutputs:
    """The outputs built from the worker's early parts (``export_groups(part="early")``:
    the parametric maps but MYPV, the SEG; then the synthetic contrast series of the
    synthesis part but the enhancement's), written but not delivered: they count only
    if the final result has the provenance and export settings they were built with and
    QC does not mark the series (:meth:`matches`), else they are removed (:meth:`discard`)
    and built again from the final result."""

    def __init__(self, write: Writer, settings: ExportSettings, myelin_expected: bool) -> None:
        self.write, self.settings, self.myelin_expected = write, settings, myelin_expected
        self.rows: list[tuple[str, str, str]] = []
        self.seg: Dataset | None = None
        self.used: ExportSettings | None = None
        self.fingerprint = ""
        self.error: Exception | None = None
        self.seconds = 0.0
        #: contrast name -> series number of the synthetic series built early, and their rows
        self.synthetic: dict[str, int] = {}
        self.synthetic_rows: list[tuple[str, str, str]] = []
        self._part: SeriesResult | None = None  # the segmentation part (what a write gets)

    def build(
        self,
        part: SeriesResult,
        sources: Sequence[Dataset],
        geometry: SliceGeometry | Exception | None,
    ) -> None:
        """Build and write the early outputs of ``part`` (never raises: an error leaves
        them to the final export, which meets it again if it is real)."""
        t0 = time.perf_counter()
        spec = replace(part, myelin=_MYELIN_EXPECTED if self.myelin_expected else None)
        try:
            if isinstance(geometry, Exception):
                raise geometry
            self.used = settings_for(spec, self.settings)
            self.fingerprint = parameter_fingerprint(spec, self.used)
            for group in export_groups(spec, sources, self.settings, geometry=geometry,
                                       part="early"):  # fmt: skip
                if group and group[0].SOPClassUID == SegmentationStorage:
                    self.seg = group[0]
                self.rows.extend(self.write(group, part))
            self._part = part
        except Exception as exc:
            self.error = exc
            log_event(log, "early_export_failed", level=logging.WARNING, error=repr(exc))
        self.seconds += time.perf_counter() - t0

    def plan_synthetic(
        self, part: SeriesResult, geometry: SliceGeometry | Exception | None
    ) -> list[Callable[[], None]]:
        """One step per synthetic contrast series of the synthesis ``part``, in export
        order: each encodes and writes its series (what :func:`encode_synthetic_series`
        gives the final export, with the settings and fingerprint of the early maps) and
        never raises (an error leaves the rest to the final export). No step when the
        early maps failed (their settings and fingerprint are unknown)."""
        if self.used is None or self.error is not None or not isinstance(geometry, SliceGeometry):
            return []
        used, fp = self.used, self.fingerprint
        numbers = _synthetic_numbers(part, geometry, used)
        light = replace(part, maps=None, segmentation=None, myelin=None, phantom_rois=None)
        mr = mr_geometry(geometry)
        failed: list[Exception] = []

        def step(name: str, number: int) -> None:
            if failed:
                return
            t0 = time.perf_counter()
            try:
                group = _encoded(encode_synthetic_series(light, name, mr, used, number, fp))
                rows = self.write(group, self._part or part)  # type: ignore[arg-type]
                self.synthetic[name] = number
                self.synthetic_rows.extend(rows)
                self.rows.extend(rows)
            except Exception as exc:
                failed.append(exc)
                log_event(log, "early_export_failed", level=logging.WARNING, error=repr(exc))
            self.seconds += time.perf_counter() - t0

        return [
            functools.partial(step, name, number)
            for name, number in numbers.items()
            if name in part.synthetic
        ]

    def matches(
        self, result: SeriesResult, settings: ExportSettings, geometry: SliceGeometry
    ) -> bool:
        """Whether the early outputs are what the final ``result`` would give."""
        if self.error is not None or self.used is None:
            return False
        final = settings_for(result, settings)
        if final.as_dict() != self.used.as_dict():
            return False
        if parameter_fingerprint(result, final) != self.fingerprint:
            return False
        if self.synthetic:  # the same series numbers as the final export gives them
            numbers = _synthetic_numbers(result, geometry, final)
            return all(numbers.get(k) == n for k, n in self.synthetic.items())
        return True

    def discard(self) -> None:
        """Remove what was written (never delivered: a speculation that missed)."""
        for _, _, path in self.rows:
            Path(path).unlink(missing_ok=True)
        self.rows, self.seg = [], None
        self.synthetic, self.synthetic_rows = {}, []

    def discard_synthetic(self) -> None:
        """Remove the synthetic series built early (the final export builds every one)."""
        gone = {path for _, _, path in self.synthetic_rows}
        for path in gone:
            Path(path).unlink(missing_ok=True)
        self.rows = [r for r in self.rows if r[2] not in gone]
        self.synthetic, self.synthetic_rows = {}, []


def _synthetic_numbers(
    result: SeriesResult, geometry: SliceGeometry, settings: ExportSettings
) -> dict[str, int]:
    """Series number of each selected synthetic contrast, as :func:`_start_synthetic` and
    :func:`dicom_node.export.iter_synthetic_series` number them (``settings``: as
    :func:`settings_for` gives them)."""
    names = list(result.synthetic) if settings.contrasts is None else list(settings.contrasts)
    base = series_number_base(geometry.refs[0], settings) + 100
    return {name: base + i for i, name in enumerate(names)}


def _process_and_export_early(
    job: _Job,
    cls: Classified,
    datasets: Sequence[Dataset],
    digest: str,
    b1_map: B1Map | None,
    b1_notes: Sequence[str],
    meanwhile: Callable[[], None],
    geometry: Callable[[SeriesResult], SliceGeometry | Exception | None],
    submit_streamed: Callable[..., Any],
    extra_outputs: Callable[[SeriesResult], Extra] | None,
    on_outputs: Callable[[list[tuple[str, str, str]]], None] | None,
) -> JobOutcome:
    """Process in the worker, which hands the maps and segmentation over once done
    (:func:`process_handing_over`): their outputs are built and written here while the
    worker computes the rest, delivered with the others once QC and the final provenance
    allow it (:func:`_export_and_write`)."""
    acq, cls.acquisition = cls.acquisition, None
    assert acq is not None
    myelin_expected = bool(job.settings.processing.myelin) and acq.sequence_kind != "QALAS"
    if acq.sequence_kind != "QALAS":
        b1_map = None  # the MDME fit estimates B1 itself
    task = submit_streamed(process_handing_over, acq, job.settings.processing, b1_map)
    del acq  # the worker has its own (the hand-off file)
    trim_heap()
    early = _EarlyOutputs(job.write, job.settings.export, myelin_expected)
    # the extra outputs' own early work (the node's web store): given each part as it comes
    on_part: Callable[[str, SeriesResult], None] | None = getattr(extra_outputs, "early", None)
    parts: dict[str, SeriesResult] = {}
    try:
        meanwhile()
        deadline = None if job.timeout_s is None else time.monotonic() + job.timeout_s
        done: Future[Any] | None = None
        # the synthetic series still to encode here, one at a time between the events:
        # those left when the worker is done go to the final export (the QC gate is open)
        steps: list[Callable[[], None]] = []
        # the worker hands over "maps", "segmentation", "synthesis" (in that order), then
        # returns; its result may come before the last parts (another channel)
        while done is None or len(parts) < len(_PARTS):
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                stage, obj = (
                    task.events.get(timeout=wait) if not steps else task.events.get_nowait()
                )
            except queue.Empty:
                if steps:
                    steps.pop(0)()
                    continue
                raise TimeoutError(f"processing took more than {job.timeout_s} s") from None
            if stage == "done":
                done = obj
                obj.result()  # the worker's error (a crash: BrokenProcessPool)
                continue
            if isinstance(obj, Exception):
                raise obj  # a part that could not be read
            parts[stage] = obj
            if stage != "maps":
                obj.provenance["source_sha256"] = digest
            if stage == "segmentation":
                obj.maps = parts["maps"].maps  # not sent twice
            if on_part is not None:
                on_part(stage, obj)
            if stage == "segmentation":
                early.build(obj, datasets, geometry(obj))
            elif stage == "synthesis":
                steps = early.plan_synthetic(obj, geometry(obj))
        result = done.result()
    except BaseException:
        early.discard()
        raise
    finally:
        task.close()
    part = parts.pop("segmentation")
    result.maps, result.segmentation = part.maps, part.segmentation
    # the contrasts handed over first, in their order, then the enhancement's
    result.synthetic = {**parts.pop("synthesis").synthetic, **result.synthetic}
    del part, parts
    job.processed(result, digest, b1_notes)
    job.timings["export_early"] = early.seconds
    job.stage, t0 = "export", time.perf_counter()
    outcome = _export_and_write(
        result, datasets, job.settings.export, job.write, extra_outputs, on_outputs,
        job.submit, geometry=geometry(result), early=early, release=job.release,
    )  # fmt: skip
    job.observe("export", t0)
    return outcome


def drop_pixel_data(datasets: Sequence[Dataset]) -> None:
    """Remove the pixel data of source datasets whose samples are in the acquisition
    (40 x 512 x 512 MDME: 336 MB the node would hold through processing and export)."""
    for ds in datasets:
        for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if kw in ds:
                delattr(ds, kw)
        ds.__dict__.pop("_pixel_array", None)


def _same_grid(grid: SeriesResult, result: SeriesResult) -> bool:
    """Whether ``result`` has the shape, voxel size and affine the early geometry used."""
    return (
        tuple(grid.shape) == tuple(result.shape)
        and tuple(grid.voxel_size_mm) == tuple(result.voxel_size_mm)
        and np.array_equal(grid.affine, np.asarray(result.affine))
    )


def _process(
    cls: Classified,
    settings: ProcessingSettings,
    submit: Submit | None,
    timeout_s: float | None,
    b1_map: B1Map | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> SeriesResult:
    """Run the processing (in a worker when ``submit`` is given). The acquisition is
    taken from ``cls``: once handed to the worker the node keeps no copy of it.
    ``meanwhile``: node work that needs no result, done while the worker processes."""
    acq, cls.acquisition = cls.acquisition, None
    assert acq is not None
    if acq.sequence_kind != "QALAS":
        b1_map = None  # the MDME fit estimates B1 itself
    if submit is None:
        if meanwhile is not None:
            meanwhile()
        return run(acq, settings, b1_map) if b1_map is not None else run(acq, settings)
    # in a list the worker's run_taking empties: its copy goes once no stage reads it
    held = [acq]
    del acq  # the worker has its own (the hand-off file or the pickled task)
    future = (
        submit(run_taking, held, settings, b1_map)
        if b1_map is not None
        else submit(run_taking, held, settings)
    )
    del held
    trim_heap()  # the sources' pixel data and the grid went back to the heap, not the system
    if meanwhile is not None:
        meanwhile()
    return future.result(timeout=timeout_s)


def _export_and_write(
    result: SeriesResult,
    sources: Sequence[Dataset],
    settings: ExportSettings,
    write: Writer,
    extra_outputs: Callable[[SeriesResult], Extra] | None = None,
    on_outputs: Callable[[list[tuple[str, str, str]]], None] | None = None,
    submit: Submit | None = None,
    *,
    geometry: SliceGeometry | Exception | None = None,
    early: _EarlyOutputs | None = None,
    release: bool = False,
) -> JobOutcome:
    """Export, apply the QC gate, write; the outcome's state is EXPORTED or HELD.
    ``geometry``: :func:`slice_geometry`'s (or its error), made while the worker ran.
    ``early``: outputs written while the worker ran; delivered first (not built again)
    when they are what this result gives unmarked, else removed. ``release``: see
    :func:`run_series`.

    The gate is decided from the QC figures before anything is built; unless it holds
    the series, every output series is written (and handed to ``on_outputs``) as soon as
    it is built. Streamed with a ``submit``: the synthetic contrast series are built and
    encoded in the worker (one task each) while this process builds the maps, SEG, SR
    and report; each is written as soon as it is back."""
    figures = _figures(result)
    qc_reason = _qc_reason(result.qc) if figures["qc_status"] == "fail" else ""
    hold = bool(qc_reason) and settings.qc_fail != "send_marked"
    stream = on_outputs is not None and not hold
    outputs: list[tuple[str, str, str]] = []
    held: list[Dataset] = []
    marked = bool(qc_reason) and not hold
    if isinstance(geometry, Exception):
        raise geometry
    geometry = geometry or slice_geometry(result, sources, settings)
    if early is not None and (marked or not early.matches(result, settings, geometry)):
        if early.rows or early.error is not None:
            log_event(log, "early_export_missed", level=logging.INFO, outputs=len(early.rows))
        early.discard()
        early = None
    if early is not None:  # the QC gate allows them now: delivered first
        outputs.extend(early.rows)
        if stream and early.rows:
            on_outputs(list(early.rows))  # type: ignore[misc]

    def emit(group: list[Dataset]) -> None:
        if not group:
            return
        if qc_reason and not hold:
            mark_qc_fail(group, qc_reason)
        if not stream:
            held.extend(group)
            return
        rows = write(group, result)
        outputs.extend(rows)
        on_outputs(rows)  # type: ignore[misc]

    def emit_encoded(group: list[EncodedInstance]) -> None:
        rows = write(group, result)
        outputs.extend(rows)
        on_outputs(rows)  # type: ignore[misc]

    # The extra outputs' chain (the node's web store on a thread, then the report page
    # rendered in the worker, after the synthetic series it was given first) is the
    # longest of what is left: it starts first. They may return a function that finishes
    # them after the export.
    # (with ``release`` they get their own references to the arrays: each array goes when
    # both they and the export are done with it)
    extra = (
        extra_outputs(_web_copy(result) if release else result) if extra_outputs is not None else []
    )
    done_early = early.synthetic if early is not None else {}
    send = stream and submit is not None

    def start() -> list[_Away] | None:
        tasks = _start_synthetic(result, geometry, settings, submit, qc_reason, done_early)  # type: ignore[arg-type]
        if release and tasks is not None:  # the tasks have their contrasts; the node needs none
            result.synthetic = {k: without_arrays(v) for k, v in result.synthetic.items()}
        return tasks

    # After an early part what the node builds here is small (the MYPV map, the SR): the
    # synthetic series left (FLAIR_AI) go to the worker after those, so that the report
    # page (the extra outputs submit it meanwhile) is rendered there first; the node then
    # takes back what the worker has not started.
    defer = send and early is not None and _selection(result, geometry, settings) is not None
    away: list[_Away] | None = [] if defer else (start() if send else None)
    if away is None and early is not None and early.synthetic:
        early.discard_synthetic()  # never delivered yet: the export below builds them all
    if release:  # never exported (the web store has what it keeps)
        result.maps = replace(result.maps, m0=None, receive_field=None)
        if result.myelin is not None:
            result.myelin = replace(result.myelin, epw=None)
    for group in export_groups(
        result, sources, settings, synthetic=away is None, geometry=geometry,
        part="all" if early is None else "late", seg=early.seg if early else None,
        release=release,
    ):  # fmt: skip
        emit(group)
        while away and away[0].future.done():  # the worker's series that are ready, in order
            emit_encoded(_encoded(away.pop(0).future.result()))
        if release and away:
            away[:] = [_forget_started(a) for a in away]
    if defer:
        away = start()
    # The node's own groups are done: a series no worker has started yet is taken back from
    # the end of the queue and encoded here (the worker goes on from the front).
    while away:
        if not away[0].future.done() and _take_back(away[-1].future):
            task = away.pop()
            emit_encoded(_encoded(encode_synthetic_series(*task.args)))
        else:
            emit_encoded(_encoded(away.pop(0).future.result()))
    emit(extra() if callable(extra) else extra)
    if not stream:
        outputs.extend(write(held, result))
    n = len(outputs)
    state, reason = State.EXPORTED, f"{n} instances exported"
    if qc_reason and not hold:
        reason = f"{qc_reason}; {n} instances exported marked {QC_FAIL_MARK}"
    elif hold:
        state = State.HELD
        reason = (
            f"{qc_reason}; {n} instances held, not sent"
            " (`synthmr retry --release SERIES_UID` sends them)"
        )
    return JobOutcome(state, reason, outputs=outputs, result=result, **figures)


# --------------------------------------------------------------------------- encoding
#: one encoded series from the worker: all files' bytes end to end (one array: it travels
#: out of band, dicom_node.handoff) and per file (sop_uid, sop_class_uid, length,
#: series_number, modality, study_uid, series_uid)
EncodedSeries = tuple[np.ndarray, list[tuple[str, str, int, int, str, str, str]]]


def encode_synthetic_series(
    result: SeriesResult,
    name: str,
    geometry: SliceGeometry,
    settings: ExportSettings,
    series_number: int,
    fingerprint: str,
    qc_mark: str = "",
) -> EncodedSeries:
    """In the worker: one synthetic contrast as its classic MR series, encoded (what
    :func:`dicom_node.export.iter_synthetic_series` builds for it, byte for byte)."""
    group = encoded_synthetic_series(
        result, result.synthetic[name], geometry, settings, series_number, fingerprint,
        mark=(lambda datasets: mark_qc_fail(datasets, qc_mark)) if qc_mark else None,
    )  # fmt: skip
    index = [
        (
            one.sop_uid,
            str(one.template.SOPClassUID),
            len(one.data),
            int(one.template.SeriesNumber),
            "MR",
            str(one.template.StudyInstanceUID),
            str(one.template.SeriesInstanceUID),
        )
        for one in group
    ]
    return np.frombuffer(b"".join(one.data for one in group), dtype=np.uint8), index


class _Away(NamedTuple):
    """One synthetic series given to the worker: its future and the arguments of
    :func:`encode_synthetic_series` (to encode it here if taken back)."""

    future: Any
    args: tuple[Any, ...]


def _forget_started(task: _Away) -> _Away:
    """``task`` without its arguments once no worker can give it back (it runs or ran; a
    Dask future is never taken back): its contrast's memory can go."""
    f = task.future
    started = getattr(f, "started", None)  # a hand-off future (dicom_node.handoff)
    if not isinstance(f, Future) or (started() if started else f.running() or f.done()):
        return task._replace(args=())
    return task


def _web_copy(result: SeriesResult) -> SeriesResult:
    """A shallow copy of ``result`` for the web store (:func:`dicom_node.seriesstore.
    save_series`) with containers of its own: the original may let go of its arrays while
    the store still reads this copy's. Only what the store reads: the T1/T2/PD/B1 maps,
    mask and failed voxels, fractions, myelin partial volume, and of each contrast its
    middle slice (its thumbnail; the rest of that volume is zeros never written, so it
    takes no memory: 40 x 512 x 512, 10 contrasts, 1 MB instead of 400 MB)."""
    seg = result.segmentation
    maps = replace(result.maps, m0=None, residual=None, receive_field=None)
    myelin = replace(result.myelin, epw=None) if result.myelin is not None else None
    return replace(
        result,
        maps=maps,
        synthetic={
            k: replace(v, image=_middle_slice(v.image)) for k, v in result.synthetic.items()
        },
        segmentation=replace(seg, fractions=dict(seg.fractions)) if seg is not None else None,
        myelin=myelin,
    )


def _middle_slice(volume: np.ndarray) -> np.ndarray:
    """``volume``'s middle slice (``[z // 2]``) in a zero volume of its shape (``np.zeros``:
    pages never touched are never resident)."""
    out = np.zeros(volume.shape, volume.dtype)
    z = volume.shape[0] // 2
    out[z] = volume[z]
    return out


def _take_back(future: Any) -> bool:
    """Cancel a worker task no worker has started (a hand-off or process-pool future);
    False when it runs or ran, or for a future that cannot say (Dask)."""
    return isinstance(future, Future) and future.cancel()


def _selection(
    result: SeriesResult, geometry: SliceGeometry, settings: ExportSettings
) -> tuple[ExportSettings, dict[str, int]] | None:
    """The export settings as :func:`export_groups` gives its builders and the series
    number of each selected synthetic contrast; None when the result lacks one of them
    (a selection it cannot meet, left to the in-process export to report)."""
    settings = settings_for(result, settings)
    numbers = _synthetic_numbers(result, geometry, settings)
    if any(n not in result.synthetic for n in numbers):
        return None
    return settings, numbers


def _start_synthetic(
    result: SeriesResult,
    geometry: SliceGeometry,
    settings: ExportSettings,
    submit: Submit,
    qc_mark: str,
    done: Mapping[str, int] | None = None,
) -> list[_Away] | None:
    """Submit one :func:`encode_synthetic_series` per selected contrast but those ``done``
    (built early, by name: their series number) (None: a selection the result cannot
    meet, left to the in-process export to report)."""
    selection = _selection(result, geometry, settings)
    if selection is None:
        return None
    settings, numbers = selection
    fp = parameter_fingerprint(result, settings)
    geometry = mr_geometry(geometry)  # each task pickles it: only what the builder reads
    tasks = []
    for name, number in numbers.items():
        if done and done.get(name) == number:
            continue
        # only what the MR builder reads: the worker gets one contrast, not every array
        light = replace(
            result,
            maps=None,
            synthetic={name: result.synthetic[name]},
            segmentation=None,
            myelin=None,
            phantom_rois=None,
        )
        args = (light, name, geometry, settings, number, fp, qc_mark)
        tasks.append(_Away(submit(encode_synthetic_series, *args), args))
    return tasks


def _encoded(series: EncodedSeries) -> list[EncodedInstance]:
    data, index = series
    view, out, at = memoryview(data), [], 0
    for sop, cls, n, number, modality, study, series in index:
        out.append(EncodedInstance(sop, cls, view[at : at + n], number, modality, study, series))
        at += n
    return out


# --------------------------------------------------------------------------- writers
def folder_writer(out: Path) -> Writer:
    """Write outputs as ``out/<series number>_<modality>/<SOP UID>.dcm`` + ``montage.png``."""

    def write(datasets: list[Dataset], result: SeriesResult) -> list[tuple[str, str, str]]:
        out.mkdir(parents=True, exist_ok=True)
        written: list[tuple[str, str, str]] = []
        for ds in datasets:
            if isinstance(ds, EncodedInstance):
                folder = out / f"{ds.series_number:05d}_{ds.modality}"
                folder.mkdir(exist_ok=True)
                path = folder / f"{ds.sop_uid}.dcm"
                path.write_bytes(ds.data)
                written.append((ds.sop_uid, ds.sop_class_uid, str(path)))
                continue
            modality = str(getattr(ds, "Modality", "OT"))
            number = int(getattr(ds, "SeriesNumber", 0) or 0)
            folder = out / f"{number:05d}_{modality}"
            folder.mkdir(exist_ok=True)
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append((str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(path)))
        (out / "montage.png").write_bytes(series_montage_png(result))
        return written

    return write
