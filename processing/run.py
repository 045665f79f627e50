"""``run(acq, settings) -> SeriesResult``: every processing stage, in order.

fit -> pd -> segmentation -> myelin -> synthesis (incl. per-patient DIR) -> enhance -> qc.
Each stage is timed; a failure of an optional stage (segmentation, myelin, enhancement)
becomes a warning in the result, never a lost series.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import ndimage

from processing import enhance, mixture, myelin, segmentation, synthesis
from processing import fit as fit_mod
from processing import pd as pd_mod
from processing import qc as qc_mod
from processing._threads import CONCURRENT_MAX_VOXELS
from processing._version import __version__
from processing.acquisition import Acquisition
from processing.b1map import B1Map, resample_b1_map
from processing.mprage import synthesize_mprage
from processing.phantom import make_phantom
from processing.qalas_fit import fit_qalas
from processing.results import QuantMaps, SeriesResult
from processing.settings import ContrastOverride, ProcessingSettings
from processing.signal import IDEAL_PROFILE, gaussian_slice_profile

__all__ = [
    "CONCURRENT_MAX_VOXELS",
    "ContrastOverride",
    "OnReady",
    "ProcessingSettings",
    "run",
    "run_taking",
]

#: on_ready(stage, part): a part of the result is final (see :func:`run`)
OnReady = Callable[[str, SeriesResult], None]


def _timed(timings: dict[str, float], name: str, t0: float) -> None:
    timings[name] = round(time.perf_counter() - t0, 4)


def _profile(settings: ProcessingSettings):
    if settings.slice_profile == "ideal":
        return IDEAL_PROFILE
    if settings.slice_profile == "gaussian":
        return gaussian_slice_profile()
    raise ValueError(
        f"slice_profile: expected 'ideal' or 'gaussian', got {settings.slice_profile!r}"
    )


def run(
    acq: Acquisition,
    settings: ProcessingSettings | None = None,
    b1_map: B1Map | None = None,
    *,
    on_ready: OnReady | None = None,
) -> SeriesResult:
    """Process one MDME or 3D-QALAS acquisition into a :class:`SeriesResult`.

    b1_map: a measured B1 map of the same study (:class:`processing.b1map.B1Map`, any
    grid); a 3D-QALAS fit fixes B1 to it, resampled onto the acquisition's grid (voxels it
    does not cover keep the nominal B1 = 1, a warning says how many). Ignored for MDME,
    whose fit estimates B1 itself.

    Stages: fit (numba) -> PD in percent units -> segmentation + volumes -> myelin ->
    per-patient DIR -> synthesis -> ONNX FLAIR enhancement -> QC. Optional stages that
    fail add a warning; the fit, PD and synthesis are mandatory and raise.

    on_ready(stage, part): parts of the result handed over as soon as they are final, so
    the caller (the node) can work on them while the later stages run. Nothing the later
    stages do changes a part's arrays. In order:

    - ``"maps"``, after PD: a result with the maps only (no provenance yet);
    - ``"segmentation"``, after the segmentation and the per-patient DIR timing: the maps,
      the segmentation, volumes, tissue statistics and DIR parameters as they will be
      returned, and the provenance as it will be *if* the FLAIR enhancement runs (a model
      that loads is assumed to run; :func:`expected_model_sha256`): the caller exports
      what depends only on these and compares the final provenance before it delivers;
    - ``"synthesis"``, after the synthesis (before the enhancement): the synthetic
      contrasts as they will be returned (the enhancement only adds its own), with the
      same expected provenance; no maps or segmentation.
    """
    return _run([acq], settings, b1_map, on_ready, release=False)


def run_taking(
    held: list[Acquisition],
    settings: ProcessingSettings | None = None,
    b1_map: B1Map | None = None,
    *,
    on_ready: OnReady | None = None,
) -> SeriesResult:
    """:func:`run` on the one acquisition in ``held``, which it takes out of the list, so
    that when the caller keeps no other reference (the node's worker task) its samples go
    once no later stage reads them: on a grid above :data:`CONCURRENT_MAX_VOXELS`, after
    myelin and QC, the enhancement's voxels gathered (:func:`processing.enhance.
    enhance_inputs`). 40 x 512 x 512: 320 MiB of samples off the worker's synthesis and
    enhancement (its peak). The same result as :func:`run`."""
    return _run(held, settings, b1_map, on_ready, release=True)


@dataclass(frozen=True, eq=False)
class _Released:
    """An acquisition after its samples were let go (:func:`run_taking`): what the later
    stages and the provenance read of it, and the enhancement's inputs (None: not run)."""

    sequence_kind: str
    delay_source: str
    delays_ms: np.ndarray
    echo_times_ms: np.ndarray
    tr_ms: float
    saturation_deg: float
    excitation_deg: float
    is_magnitude: bool
    enhance: enhance.EnhanceInputs | None

    @classmethod
    def of(
        cls, acq: Acquisition, result: SeriesResult, settings: ProcessingSettings
    ) -> Acquisition | _Released:
        """``acq`` described without its samples, or ``acq`` itself when the enhancement
        may run and its inputs cannot be gathered (it then says why, as before)."""
        inputs = None
        if settings.enhance and acq.sequence_kind != "QALAS":
            try:
                inputs = enhance.enhance_inputs(acq, result.maps)
            except Exception:
                return acq
        return cls(
            sequence_kind=acq.sequence_kind,
            delay_source=acq.delay_source,
            delays_ms=acq.delays_ms,
            echo_times_ms=acq.echo_times_ms,
            tr_ms=acq.tr_ms,
            saturation_deg=acq.saturation_deg,
            excitation_deg=acq.excitation_deg,
            is_magnitude=acq.is_magnitude,
            enhance=inputs,
        )


def _run(
    held: list[Acquisition],
    settings: ProcessingSettings | None,
    b1_map: B1Map | None,
    on_ready: OnReady | None,
    *,
    release: bool,
) -> SeriesResult:
    """:func:`run` / :func:`run_taking` (``release``: let the samples go when done)."""
    acq: Any = held.pop()
    settings = settings or ProcessingSettings()
    if settings.dir_null.upper() not in ("WM", "GM"):
        raise ValueError(f"dir_null: expected 'WM' or 'GM', got {settings.dir_null!r}")
    timings: dict[str, float] = {}
    warnings: list[str] = []
    profile = _profile(settings)
    b1_used: dict[str, Any] = {}
    maps = _fit_stage(acq, settings, profile, timings, warnings, b1_map, b1_used)
    result = SeriesResult(
        shape=acq.shape,
        voxel_size_mm=acq.voxel_size_mm,
        affine=np.asarray(acq.affine),
        maps=maps,
        timings_s=timings,
        warnings=warnings,
    )
    if on_ready is not None:
        on_ready("maps", replace(result, timings_s={}, warnings=[], provenance={}))
    centres: dict[str, dict[str, float]] = {}
    if settings.segmentation:
        centres = _segmentation_stage(acq, result, profile)
    t = time.perf_counter()
    dir_warnings: list[str] = []  # reported with the synthesis's, as before the split
    dir_timing = _dir_stage(result, settings, centres, dir_warnings)
    dir_seconds = time.perf_counter() - t
    ready = None
    if on_ready is not None:
        ready = _ready_part(acq, result, settings, centres, b1_used)
        on_ready("segmentation", ready)
    # After the segmentation, myelin + QC (a thread) and synthesis + enhancement (here)
    # need nothing of each other: they overlap on the second core. Each side keeps its own
    # warnings and timings, merged afterwards in the sequential order (myelin, synthesis,
    # enhance, qc), so the result is the same as one after the other.
    # On a large grid the two sides' temporaries together would set the worker's peak
    # memory (40 x 512 x 512: ~0.4 GB over the sequential order), so there myelin + QC run
    # first, in this thread, while the result holds no synthetic contrasts yet.
    side = _MyelinAndQC(acq, result, settings.myelin)
    concurrent = int(np.prod(acq.shape)) <= CONCURRENT_MAX_VOXELS
    if concurrent:
        side.start()
    else:
        side.run()
        if release:  # the enhancement's voxels gathered, the samples go (see run_taking)
            acq = _Released.of(acq, result, settings)
    n_before = len(warnings)
    try:
        csf_t1 = _synthesis_stage(
            acq, result, settings, centres, dir_timing, dir_seconds, dir_warnings
        )
        if on_ready is not None and ready is not None:
            # the contrasts so far, with the provenance the segmentation part expected
            on_ready(
                "synthesis",
                replace(
                    ready,
                    maps=None,  # type: ignore[arg-type]
                    segmentation=None,
                    synthetic=dict(result.synthetic),
                    provenance=dict(ready.provenance),
                ),
            )
            ready = None
        model_sha = _enhance_stage(acq, result, settings, csf_t1) if settings.enhance else None
        if isinstance(acq, _Released):
            acq = replace(acq, enhance=None)  # its samples: not needed any more
    finally:
        if concurrent:
            side.join()
    side.merge_into(result, n_before)
    result.provenance = _provenance(acq, result, settings, model_sha, centres, b1_used)
    return result


def expected_model_sha256(acq: Acquisition, settings: ProcessingSettings) -> str | None:
    """The model sha256 the provenance will record if the FLAIR enhancement runs: that of
    the configured model when it is enabled for this acquisition and loads (a protocol
    outside its trained range still skips it: the caller compares the final provenance)."""
    if not settings.enhance or acq.sequence_kind == "QALAS":
        return None
    if "FLAIR" not in (c.upper() for c in settings.contrasts):
        return None
    try:
        return enhance.load_model(settings.model_path, threads=settings.onnx_threads).sha256
    except Exception:  # the stage itself will say why (a warning)
        return None


def _ready_part(
    acq: Acquisition,
    result: SeriesResult,
    settings: ProcessingSettings,
    centres: dict[str, dict[str, float]],
    b1_used: dict[str, Any],
) -> SeriesResult:
    """What :func:`run` hands to ``on_ready`` after the segmentation: the result so far
    (its dicts copied: the later stages add to them) with the expected provenance."""
    model_sha = expected_model_sha256(acq, settings)
    return replace(
        result,
        synthetic={},
        volumes_ml=dict(result.volumes_ml),
        tissue_stats=dict(result.tissue_stats),
        dir_parameters=dict(result.dir_parameters),
        provenance=_provenance(acq, result, settings, model_sha, centres, b1_used),
        timings_s=dict(result.timings_s),
        warnings=list(result.warnings),
    )


def _fit_stage(
    acq: Acquisition,
    settings: ProcessingSettings,
    profile: Any,
    timings: dict[str, float],
    warnings: list[str],
    b1_map: B1Map | None = None,
    b1_used: dict[str, Any] | None = None,
) -> QuantMaps:
    """Fit (MDME or QALAS), then PD in percent units. ``b1_used`` receives what the
    QALAS fit did about B1 (provenance)."""
    qalas = acq.sequence_kind == "QALAS"
    t = time.perf_counter()
    if qalas:
        maps = _fit_qalas_b1(acq, b1_map, warnings, {} if b1_used is None else b1_used)
    else:
        maps = fit_mod.fit_mdme(
            acq,
            b1_smoothing=settings.b1_smoothing,
            b1_smoothing_fwhm_mm=settings.b1_smoothing_fwhm_mm,
            profile=profile,
        )
    _timed(timings, "fit", t)

    t = time.perf_counter()
    # The pooled-CSF PD reference needs a CSF M0 the sequence determines: 3D-QALAS couples
    # CSF's M0 and T1 (4.5 s cycle; a pooled 95 %-CSF fit is 5 % low), so it is not used.
    maps = pd_mod.correct_pd(maps, voxel_size_mm=acq.voxel_size_mm, acq=None if qalas else acq)
    _timed(timings, "pd", t)
    return maps


def _fit_qalas_b1(
    acq: Acquisition, b1_map: B1Map | None, warnings: list[str], b1_used: dict[str, Any]
) -> QuantMaps:
    """The 3D-QALAS fit with B1 fixed to the measured map (resampled onto the acquisition
    grid) or, without one, to the nominal B1 = 1 (processing/QALAS.md: the five samples do
    not determine B1)."""
    if b1_map is None:  # provenance unchanged (output UIDs of this path stay as they were)
        warnings.append("QALAS: no B1 map given; the nominal flip angle was assumed")
        return fit_qalas(acq)
    grid = resample_b1_map(b1_map, acq.shape, np.asarray(acq.affine))
    maps = fit_qalas(acq, b1_map=grid)
    fitted = maps.mask
    n_mask = int(np.count_nonzero(fitted))
    uncovered = int(np.count_nonzero(fitted & ~np.isfinite(grid)))
    share = uncovered / n_mask if n_mask else 0.0
    b1_used.update({str(k): v for k, v in b1_map.source.items()})
    b1_used["uncovered_fraction"] = round(share, 4)
    uid = b1_map.source.get("series_uid", "?")
    what = b1_map.source.get("description", "")
    warnings.append(
        f"QALAS: B1 fixed to the B1 map series {uid}"
        + (f" ({what})" if what else "")
        + f", resampled onto this grid; {100 * share:.1f} % of the fitted voxels lie"
        " outside its coverage and used the nominal B1 = 1"
    )
    return maps


def _segmentation_stage(
    acq: Acquisition, result: SeriesResult, profile: Any
) -> dict[str, dict[str, float]]:
    """Segmentation, volumes and tissue statistics; returns the tissue centres (with each
    class's T1) for synthesis, or {} when the optional stage failed (a warning)."""
    maps = result.maps
    centres: dict[str, dict[str, float]] = {}
    t = time.perf_counter()
    try:
        fractions = segmentation.segment(acq, maps, profile=profile)
        result.segmentation = fractions
        result.volumes_ml = segmentation.volumes(fractions, acq.voxel_volume_ml)
        centres = {k: dict(v) for k, v in fractions.centres.items()}
        for tissue, t1 in class_t1_ms(maps, fractions).items():
            centres.setdefault(tissue, {})["class_t1_ms"] = t1
        result.tissue_stats = _tissue_stats(maps, fractions)
    except Exception as exc:  # optional stage: report, keep the series
        result.warnings.append(f"segmentation failed: {exc}")
    _timed(result.timings_s, "segmentation", t)
    return centres


class _MyelinAndQC(threading.Thread):
    """The myelin stage (when enabled), then the QC, on a thread of their own; their
    warnings and timings wait in ``warnings`` / ``timings`` for :meth:`merge_into`."""

    def __init__(self, acq: Acquisition, result: SeriesResult, with_myelin: bool) -> None:
        super().__init__(name="myelin-qc", daemon=True)
        self.acq, self.result, self.with_myelin = acq, result, with_myelin
        self.myelin_warnings: list[str] = []
        self.qc_warnings: list[str] = []
        self.timings: dict[str, float] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        acq, result = self.acq, self.result
        self.acq = None  # not kept once done (run_taking lets the acquisition go)
        try:
            if self.with_myelin:
                _myelin_stage(acq, result, self.myelin_warnings, self.timings)
            t = time.perf_counter()
            try:
                result.qc = qc_mod.fit_qc(acq, result.maps, result.segmentation)
            except Exception as exc:
                self.qc_warnings.append(f"QC failed: {exc}")
                result.qc = {"status": "fail", "error": str(exc)}
            _timed(self.timings, "qc", t)
        except BaseException as exc:  # raised again in the caller's thread
            self.error = exc

    def merge_into(self, result: SeriesResult, n_before: int) -> None:
        """Warnings and timings as if the stages had run one after the other: myelin's
        before synthesis's (which came after ``n_before``), QC's last."""
        if self.error is not None:
            raise self.error
        result.warnings[n_before:n_before] = self.myelin_warnings
        result.warnings.extend(self.qc_warnings)
        timings = result.timings_s
        later = {k: timings.pop(k) for k in list(timings) if k in ("synthesis", "enhance")}
        if "myelin" in self.timings:
            timings["myelin"] = self.timings["myelin"]
        timings.update(later)
        timings["qc"] = self.timings["qc"]


def _myelin_stage(
    acq: Acquisition,
    result: SeriesResult,
    warnings: list[str] | None = None,
    timings: dict[str, float] | None = None,
) -> None:
    """Myelin maps and volumes (MDME only; optional: a failure is a warning).
    ``warnings`` / ``timings``: where its warnings and seconds go (default the result's)."""
    warnings = result.warnings if warnings is None else warnings
    timings = result.timings_s if timings is None else timings
    if acq.sequence_kind == "QALAS":
        warnings.append("myelin model: calibrated through the MDME acquisition; not run on QALAS")
        return
    maps = result.maps
    t = time.perf_counter()
    try:
        if result.segmentation is not None:
            icmask = result.segmentation.icmask
        else:
            icmask = segmentation.intracranial_mask(maps, acq)
        result.myelin = myelin.myelin_maps(
            maps, icmask, acq.voxel_volume_ml, acq=acq, fractions=result.segmentation
        )
        warnings.extend(f"myelin model: {w}" for w in result.myelin.calibration_warnings)
        result.volumes_ml["MYELIN"] = float(result.myelin.myelin_volume_ml)
        result.volumes_ml["EPW"] = float(result.myelin.epw_volume_ml)
    except Exception as exc:
        warnings.append(f"myelin model failed: {exc}")
    _timed(timings, "myelin", t)


def _dir_stage(
    result: SeriesResult,
    settings: ProcessingSettings,
    centres: dict[str, dict[str, float]],
    warnings: list[str],
) -> synthesis.DirTiming | None:
    """The per-patient DIR timing (when DIR is a configured contrast; None: not asked or
    failed, a warning in ``warnings``); its parameters go into the result (and so the
    provenance)."""
    if "DIR" not in (c.upper() for c in settings.contrasts):
        return None
    wm, gm, csf = (_tissue_t1(centres, t) for t in ("WM", "GM", "CSF"))
    try:
        dir_timing = synthesis.per_patient_dir(
            result.maps, wm, csf, null=settings.dir_null.upper(), gm_t1_ms=gm
        )
    except Exception as exc:
        warnings.append(f"per-patient DIR failed, using the preset DIR: {exc}")
        return None
    result.dir_parameters = dir_timing.as_dict()
    return dir_timing


def _synthesis_stage(
    acq: Acquisition | _Released,
    result: SeriesResult,
    settings: ProcessingSettings,
    centres: dict[str, dict[str, float]],
    dir_timing: synthesis.DirTiming | None,
    dir_seconds: float,
    dir_warnings: list[str],
) -> float | None:
    """The synthetic contrasts (plain, MPRAGE for QALAS, tissue mixture) with the
    per-patient DIR timing of :func:`_dir_stage` (its seconds and warnings count as the
    synthesis's); returns the CSF T1 (ms) that FLAIR nulls, for the enhancement."""
    maps, warnings = result.maps, result.warnings
    t = time.perf_counter() - dir_seconds
    warnings.extend(dir_warnings)
    csf_t1 = dir_timing.csf_t1_ms if dir_timing is not None else _tissue_t1(centres, "CSF")
    result.synthetic = synthesis.synthesize_all(
        maps,
        settings.contrasts,
        settings.overrides,
        dir_timing=dir_timing,
        csf_t1_ms=csf_t1 if settings.per_patient_flair else None,
    )
    if acq.sequence_kind == "QALAS":
        # 3D T1W for FreeSurfer/FastSurfer/SynthSeg users (processing.mprage defaults).
        try:
            result.synthetic["MPRAGE"] = synthesize_mprage(maps)
        except Exception as exc:  # optional output
            warnings.append(f"synthetic MPRAGE failed: {exc}")
    if settings.mixture_contrasts and result.segmentation is not None:
        try:
            classes = mixture.class_parameters(centres)
            for name in settings.mixture_contrasts:
                plain = result.synthetic.get(name.upper())
                if plain is not None:
                    image = mixture.synthesize_mixture(maps, result.segmentation, plain, classes)
                    result.synthetic[image.name] = image
        except Exception as exc:  # optional: the plain contrasts are already there
            warnings.append(f"tissue-mixture synthesis failed: {exc}")
    _timed(result.timings_s, "synthesis", t)
    return csf_t1


def _enhance_stage(
    acq: Acquisition | _Released,
    result: SeriesResult,
    settings: ProcessingSettings,
    csf_t1: float | None,
) -> str | None:
    """ONNX FLAIR enhancement (MDME only); returns the model's sha256 when it ran."""
    if acq.sequence_kind == "QALAS":
        result.warnings.append("FLAIR enhancement: the model was trained on MDME samples; not run")
        return None
    if "FLAIR" not in result.synthetic:
        return None
    t = time.perf_counter()
    image, warning = enhance.try_enhance_flair(
        acq.enhance if isinstance(acq, _Released) else acq,
        result.maps,
        result.synthetic["FLAIR"],
        model_path=settings.model_path,
        threads=settings.onnx_threads,
        csf_t1_ms=csf_t1,
    )
    model_sha = None
    if image is not None:
        result.synthetic[image.name] = image
        model_sha = image.parameters.get("model_sha256")
    if warning:
        result.warnings.append(warning)
    _timed(result.timings_s, "enhance", t)
    return model_sha


def _provenance(
    acq: Acquisition | _Released,
    result: SeriesResult,
    settings: ProcessingSettings,
    model_sha: str | None,
    centres: dict[str, dict[str, float]],
    b1_used: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that made the result: software, settings, model, acquisition, timings."""
    provenance = {
        "software": "synthmr",
        "software_version": __version__,
        "settings": settings.as_dict(),
        "model_sha256": model_sha,
        "delay_source": acq.delay_source,
        "acquisition": {
            "sequence": acq.sequence_kind,
            "delays_ms": [float(v) for v in acq.delays_ms],
            "echo_times_ms": [float(v) for v in acq.echo_times_ms],
            "tr_ms": acq.tr_ms,
            "saturation_deg": acq.saturation_deg,
            "excitation_deg": acq.excitation_deg,
            "is_magnitude": acq.is_magnitude,
        },
        "dir": dict(result.dir_parameters),
        "tissue_centres": centres,
    }
    if b1_used:
        provenance["b1_map"] = b1_used
    return provenance


def _tissue_stats(maps, fractions) -> dict[str, dict[str, float]]:
    """Mean T1/T2/PD over voxels that are >= 95 % one tissue (fit succeeded)."""
    stats: dict[str, dict[str, float]] = {}
    ok = maps.mask & ~maps.failed
    for tissue, frac in fractions.fractions.items():
        pure = ok & (frac >= 0.95)
        n = int(pure.sum())
        if n == 0:
            continue
        stats[tissue] = {
            "t1_ms": float(maps.t1_ms[pure].mean()),
            "t2_ms": float(maps.t2_ms[pure].mean()),
            "pd_pu": float(maps.pd_pu[pure].mean()),
            "n_voxels": float(n),
        }
    return stats


# In-plane 3 x 3 mean CSF fraction that makes a voxel "interior CSF" for the CSF T1 null.
_CSF_INTERIOR_MEAN = 0.97


def class_t1_ms(maps, fractions, *, min_fraction: float = 0.95) -> dict[str, float]:
    """Median fitted T1 (ms) of the voxels the segmentation calls >= 95 % one tissue.

    This is what a per-patient inversion must null: the *fitted* T1 of the series' own
    tissue as it will be synthesized, whatever its bias (a CSF T1 a few % long from B1,
    say). CSF is the sensitive one (an FLAIR/DIR null moves ~1 % of GM signal per 20 ms of
    CSF T1) and needs a selection that depends little on each voxel's own noise: "own
    fraction >= 95 %" mixes two biases, the noise that makes a voxel look purer also
    lengthens its T1, while voxels with 1-5 % tissue (fitted ~250 ms short) pass as pure.
    CSF therefore uses interior voxels: the in-plane 3 x 3 mean of the CSF fraction >= 97 %
    (the voxel's own noise weighs 1/9), falling back to the own fraction where fewer than
    30 such voxels exist. Measured on ten SNR-50 phantoms (real and magnitude, 128-224
    matrix; benchmarks/csf_null.py runs seven): 26 ms RMS (max 44) from the median fitted
    T1 of the truly pure (>= 99 %) CSF, against 31 ms RMS (mean -28 ms) for the own
    fraction. About 25 ms is the floor: the median fitted CSF T1 itself differs by that
    much between regions of one brain at SNR 50.
    """
    # Failed fits are kept: in CSF most "failures" are T2 on its upper bound, i.e. the
    # purest voxels; dropping them would bias the estimate towards partial volume.
    ok = maps.mask & np.isfinite(maps.t1_ms) & (maps.t1_ms > 0)
    out: dict[str, float] = {}
    for tissue in ("WM", "GM", "CSF"):
        frac = fractions.fractions.get(tissue)
        if frac is None:
            continue
        sel = ok & (frac >= min_fraction)
        if tissue == "CSF":
            local = ndimage.uniform_filter(
                np.asarray(frac, np.float32), size=(1, 3, 3), mode="constant"
            )
            interior = ok & (local >= _CSF_INTERIOR_MEAN)
            if int(interior.sum()) >= 30:
                sel = interior
        if int(sel.sum()) >= 20:
            out[tissue] = float(np.median(maps.t1_ms[sel]))
    return out


def _tissue_t1(centres: dict[str, dict[str, float]], tissue: str) -> float | None:
    c = centres.get(tissue, {})
    return c.get("class_t1_ms", c.get("t1_ms"))


def warmup(settings: ProcessingSettings | None = None) -> float:
    """Compile every numba kernel and load the ONNX model by running the whole pipeline once
    on a tiny simulated brain (MDME 2 x 24 x 24, real and magnitude), then the 3D-QALAS
    kernels on a few voxels.

    Called at start-up (worker initializer) so the first real series is as fast as the
    tenth (numba caches compiled code on disk with ``cache=True``; this also fills the
    in-process caches: the myelin lookup grid for the product timing, the ONNX session).
    """
    t0 = time.perf_counter()
    fit_mod.warmup()
    from processing import phantom_qc

    phantom_qc.warmup()  # the phantom QC pose search (fit kernels are the ones above)
    for magnitude in (False, True):
        ph = make_phantom((2, 24, 24), seed=1, snr=50.0, anatomy="ellipsoid", magnitude=magnitude)
        run(ph.acq, settings)
    # and the 3D-QALAS kernels (fit; the forward model of segmentation and QC): a whole
    # QALAS run here doubled the start-up time of a loaded node
    from processing import qalas_fit, sequence_model

    qalas_fit.warmup()
    sequence_model.warmup()
    return time.perf_counter() - t0
