"""Pixel-wise ONNX enhancement of synthetic FLAIR (physics.md section 7).

Synthetic FLAIR evaluates the FLAIR equation on a mono-exponential fit; in voxels that mix
CSF and tissue the fit lands far from the CSF null and the voxel comes out too bright (the
rim). A small MLP trained on simulated mixtures (``models/train_flair.py``) maps a voxel's
raw MDME samples straight to the conventional FLAIR of the mixture. It is strictly
pixel-wise (same input pixel -> same output, no neighbours), so it cannot invent or erase
structures.

Normalization (shared with training, :func:`make_features`): the network sees the 8
magnitudes ``|S_k|`` divided by their L2 norm (times sqrt(8)), plus the acquisition and
FLAIR timing and the voxel's flip-angle ratio B1 from the fit (smoothed in its second
pass: knowing B1 roughly halves the T1 uncertainty of 8 samples, which matters at the CSF
null). Its output is the *signed* FLAIR signal (smooth through the CSF null, where the
magnitude has a sharp notch) divided by the norm; the image is its magnitude times the
norm. The mapping is therefore homogeneous of degree one in the samples: coil gain and PD
scale all compartments alike.

The enhanced image is put on the scale of the plain synthetic FLAIR: the network output is
in signal units (receive field x PD x FLAIR weighting), divided by the receive field
``C = m0 / pd_pu`` and multiplied by the synthetic image's ``scale``.

Any problem (missing or corrupt model, acquisition outside the trained protocol range)
raises :class:`EnhancementError` with a message naming it; the pipeline records it as a
warning and carries on without the enhanced series.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from processing.acquisition import Acquisition
from processing.results import QuantMaps, SyntheticImage

__all__ = [
    "N_DELAYS",
    "N_ECHOES",
    "N_FEATURES",
    "EnhanceInputs",
    "EnhancementError",
    "FlairModel",
    "ProtocolOutOfRange",
    "default_model_path",
    "enhance_flair",
    "enhance_inputs",
    "enhance_samples",
    "load_model",
    "make_features",
    "model_sha256",
    "protocol_problems",
]

#: The network is trained for the product MDME grid only: 4 delays x 2 echoes.
N_DELAYS = 4
N_ECHOES = 2
N_SAMPLES = N_DELAYS * N_ECHOES
#: Feature layout: 8 normalized |samples| (delay-major), TR, 4 delays, 2 echo times, FLAIR TI,
#: B1.
N_FEATURES = N_SAMPLES + 1 + N_DELAYS + N_ECHOES + 1 + 1

# Fixed affine maps of the protocol inputs to O(1) numbers (ms -> centred, scaled).
_TR_CENTRE, _TR_SCALE = 4500.0, 500.0
_TD_CENTRE = np.array([200.0, 600.0, 1900.0, 3800.0])
_TD_SCALE = np.array([100.0, 200.0, 600.0, 600.0])
_TE_CENTRE = np.array([20.0, 100.0])
_TE_SCALE = np.array([10.0, 20.0])
_TI_CENTRE, _TI_SCALE = 2800.0, 400.0
_B1_SCALE = 0.2  # feature (B1 - 1) / 0.2


class EnhancementError(RuntimeError):
    """The FLAIR enhancement cannot run; the message says why (model file, protocol, ...)."""


class ProtocolOutOfRange(EnhancementError):
    """The acquisition or FLAIR timing lies outside what the model was trained on."""


def default_model_path() -> Path:
    """The shipped model, ``models/flair_enhance.onnx``, found as package data (installed
    with synthmr: pyproject's package-data), not by importing code from ``models``."""
    return Path(str(resources.files("models").joinpath("flair_enhance.onnx")))


def model_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a model file (raises :class:`EnhancementError` if unreadable)."""
    p = Path(path)
    try:
        h = hashlib.sha256()
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise EnhancementError(f"FLAIR model file {str(p)!r} cannot be read: {exc}") from exc
    return h.hexdigest()


@dataclass(frozen=True)
class FlairModel:
    """A loaded FLAIR enhancement model.

    session: the onnxruntime InferenceSession. path / sha256: the file it came from.
    ranges: trained protocol ranges from the model's metadata, name -> [low, high] (ms or deg).
    metadata: every metadata entry of the ONNX file (strings).
    """

    session: Any
    path: Path
    sha256: str
    ranges: dict[str, list[float]]
    metadata: dict[str, str]
    input_name: str
    output_name: str


_CACHE: dict[tuple[str, float, int], FlairModel] = {}
_CACHE_LOCK = threading.Lock()


def load_model(model_path: str | os.PathLike[str] | None = None, *, threads: int = 1) -> FlairModel:
    """Open the ONNX model in a CPU onnxruntime session (cached per file, mtime, threads).

    threads: ``intra_op_num_threads`` (>= 1). Raises :class:`EnhancementError` when the file
    is missing, unreadable, not a valid ONNX model, or lacks the expected input/metadata.
    """
    path = Path(model_path) if model_path is not None else default_model_path()
    if int(threads) < 1:
        raise EnhancementError(f"onnx threads must be >= 1, got {threads}")
    if not path.is_file():
        raise EnhancementError(f"FLAIR model file not found: {str(path)!r}")
    key = (str(path.resolve()), path.stat().st_mtime, int(threads))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    sha = model_sha256(path)
    import onnxruntime as ort  # a core dependency; imported on first use (~0.3 s)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise EnhancementError(
            f"FLAIR model file {str(path)!r} is not a valid ONNX model: {exc}"
        ) from exc
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1 or inputs[0].shape[-1] != N_FEATURES or len(outputs) != 1:
        raise EnhancementError(
            f"FLAIR model {str(path)!r}: expected one input of {N_FEATURES} features and one "
            f"output, got inputs {[(i.name, i.shape) for i in inputs]}"
        )
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    try:
        ranges = {k: [float(v[0]), float(v[1])] for k, v in json.loads(meta["ranges"]).items()}
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise EnhancementError(
            f"FLAIR model {str(path)!r} has no valid 'ranges' metadata (trained protocol): {exc}"
        ) from exc
    model = FlairModel(sess, path, sha, ranges, meta, inputs[0].name, outputs[0].name)
    with _CACHE_LOCK:
        _CACHE[key] = model
    return model


def make_features(
    samples: np.ndarray,
    tr_ms: float,
    delays_ms: np.ndarray,
    echo_times_ms: np.ndarray,
    flair_ti_ms: float,
    b1: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Network inputs for voxels' MDME samples.

    samples: ``[n, 8]`` delay-major samples (real or magnitude; the absolute value is used).
    b1: ``[n]`` flip-angle ratios (the fit's, smoothed), or one number for all voxels.
    Returns ``(features [n, N_FEATURES] float32, norm [n] float64)`` where ``norm`` is the
    L2 norm of ``|samples|`` divided by sqrt(8); the network output times ``norm`` is the
    FLAIR signal in the samples' units. Voxels with zero norm get zero features.
    """
    s = np.abs(np.asarray(samples, dtype=np.float32))
    if s.ndim != 2 or s.shape[1] != N_SAMPLES:
        raise EnhancementError(f"samples: expected shape [n, {N_SAMPLES}], got {s.shape}")
    td = np.asarray(delays_ms, dtype=np.float64)
    te = np.asarray(echo_times_ms, dtype=np.float64)
    if td.shape != (N_DELAYS,) or te.shape != (N_ECHOES,):
        raise EnhancementError(
            f"the FLAIR model needs {N_DELAYS} delays x {N_ECHOES} echoes, got "
            f"{td.size} x {te.size}"
        )
    # float32 throughout: this runs on every brain voxel (~1e6 per series).
    norm = np.sqrt(np.einsum("ij,ij->i", s, s) * np.float32(1.0 / N_SAMPLES))
    inv = np.zeros_like(norm)
    np.divide(np.float32(1.0), norm, out=inv, where=norm > 0)
    feats = np.empty((s.shape[0], N_FEATURES), dtype=np.float32)
    np.multiply(s, inv[:, None], out=feats[:, :N_SAMPLES])
    proto = np.concatenate(
        [
            [(float(tr_ms) - _TR_CENTRE) / _TR_SCALE],
            (td - _TD_CENTRE) / _TD_SCALE,
            (te - _TE_CENTRE) / _TE_SCALE,
            [(float(flair_ti_ms) - _TI_CENTRE) / _TI_SCALE],
        ]
    )
    feats[:, N_SAMPLES:-1] = proto[None, :].astype(np.float32)
    b1v = np.broadcast_to(np.asarray(b1, np.float32), (s.shape[0],))
    feats[:, -1] = (b1v - np.float32(1.0)) / np.float32(_B1_SCALE)
    return feats, norm.astype(np.float64)


def protocol_problems(
    ranges: dict[str, list[float]],
    *,
    tr_ms: float,
    delays_ms: np.ndarray,
    echo_times_ms: np.ndarray,
    saturation_deg: float,
    excitation_deg: float,
    flair_tr_ms: float,
    flair_te_ms: float,
    flair_ti_ms: float | None,
) -> list[str]:
    """Every way the protocol leaves the model's trained ``ranges`` (empty list = fine)."""
    td = np.asarray(delays_ms, dtype=np.float64)
    te = np.asarray(echo_times_ms, dtype=np.float64)
    if td.size != N_DELAYS or te.size != N_ECHOES:
        return [f"grid {td.size} delays x {te.size} echoes (trained on {N_DELAYS} x {N_ECHOES})"]
    if flair_ti_ms is None:
        return ["the synthetic FLAIR has no TI"]
    values: dict[str, float] = {
        "tr_ms": float(tr_ms),
        "saturation_deg": float(saturation_deg),
        "excitation_deg": float(excitation_deg),
        "flair_tr_ms": float(flair_tr_ms),
        "flair_te_ms": float(flair_te_ms),
        "flair_ti_ms": float(flair_ti_ms),
    }
    values.update({f"td{i + 1}_ms": float(v) for i, v in enumerate(td)})
    values.update({f"te{i + 1}_ms": float(v) for i, v in enumerate(te)})
    out = []
    for name, value in values.items():
        if name not in ranges:
            continue
        lo, hi = ranges[name]
        if not (lo <= value <= hi) or not math.isfinite(value):
            out.append(f"{name}={value:g} outside the trained range [{lo:g}, {hi:g}]")
    return out


def enhance_samples(
    model: FlairModel,
    samples: np.ndarray,
    *,
    tr_ms: float,
    delays_ms: np.ndarray,
    echo_times_ms: np.ndarray,
    flair_ti_ms: float,
    b1: np.ndarray | float,
    batch_size: int = 65536,
) -> np.ndarray:
    """Conventional-FLAIR estimate for ``[n, 8]`` samples, in the samples' units, ``[n]``.

    b1: the voxels' flip-angle ratios ``[n]`` (or one number). No protocol range check here
    (see :func:`protocol_problems`); the result is the magnitude of the signed output.
    """
    n = int(np.asarray(samples).shape[0])
    b1v = np.broadcast_to(np.asarray(b1, np.float64), (n,))
    out = np.zeros(n, dtype=np.float64)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        feats, norm = make_features(
            samples[start:stop], tr_ms, delays_ms, echo_times_ms, flair_ti_ms, b1v[start:stop]
        )
        try:
            y = model.session.run([model.output_name], {model.input_name: feats})[0]
        except Exception as exc:  # onnxruntime's own exception types
            raise EnhancementError(f"FLAIR model {model.path.name!r} failed to run: {exc}") from exc
        out[start:stop] = np.abs(np.asarray(y, dtype=np.float64).reshape(-1)) * norm
    return out


#: CSF T1 mismatch the FLAIR TI may have when the model's metadata names none (models
#: trained with TI = CSF null +-1 %): measured on the held-out phantom, a TI nulling a T1
#: 5 % off the CSF keeps the issue-13 targets, 10 % off breaks them (benchmarks/flair_quality.py
#: --ti-null-t1).
_DEFAULT_TI_MISMATCH = 0.05


def ti_null_problem(
    model: FlairModel, flair_tr_ms: float, flair_ti_ms: float | None, csf_t1_ms: float | None
) -> str | None:
    """Why ``flair_ti_ms`` is outside what the model learned for a series whose CSF has T1
    ``csf_t1_ms`` (None = fine or unknown). The T1 the TI nulls must lie within the model's
    trained mismatch (``ti_mismatch`` of its training config) of the CSF T1."""
    if csf_t1_ms is None or flair_ti_ms is None or not (csf_t1_ms > 0 and flair_tr_ms > 0):
        return None
    try:
        sim = json.loads(model.metadata.get("train_config", "{}")).get("sim", {})
    except ValueError:
        sim = {}
    tol = float(sim.get("ti_mismatch", 0.0)) if float(sim.get("ti_mismatch_p", 0.0)) > 0 else 0.0
    tol = max(tol, _DEFAULT_TI_MISMATCH)
    # T1 nulled by TI at TR: solve ti_null(T1) = TI by bisection (ti_null grows with T1).
    lo, hi = 1.0, 1e5
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        null = mid * math.log(2.0 / (1.0 + math.exp(-flair_tr_ms / mid)))
        lo, hi = (mid, hi) if null < flair_ti_ms else (lo, mid)
    nulled = 0.5 * (lo + hi)
    if abs(nulled / csf_t1_ms - 1.0) <= tol:
        return None
    return (
        f"FLAIR TI {flair_ti_ms:.0f} ms nulls T1 {nulled:.0f} ms, but the series' CSF T1 is "
        f"{csf_t1_ms:.0f} ms ({100 * (nulled / csf_t1_ms - 1):+.0f} %; the model was trained "
        f"within +-{100 * tol:.0f} %): it would darken CSF that this TI leaves bright"
    )


@dataclass(frozen=True, eq=False)
class EnhanceInputs:
    """What :func:`enhance_flair` reads of an acquisition and its maps, gathered at the
    voxels it enhances (:func:`enhance_inputs`): with it, the caller can let the
    acquisition's samples go before the enhancement runs (the worker's pipeline at
    40 x 512 x 512: 320 MiB of samples vs ~90 MiB of these).

    shape: the grid ``(z, y, x)``; mask: the voxels enhanced ``[z, y, x]``; coil: the
    receive field there ``[n]``; samples: their raw samples ``[n, delay*echo]``; b1: the
    fit's B1 there ``[n]`` (float64, NaN kept); the rest: the acquisition's timing."""

    shape: tuple[int, int, int]
    mask: np.ndarray
    coil: np.ndarray
    samples: np.ndarray
    b1: np.ndarray
    tr_ms: float
    delays_ms: np.ndarray
    echo_times_ms: np.ndarray
    saturation_deg: float
    excitation_deg: float


def enhance_inputs(
    acq: Acquisition, maps: QuantMaps, mask: np.ndarray | None = None
) -> EnhanceInputs:
    """The :class:`EnhanceInputs` of ``acq`` and ``maps`` (``mask``: see
    :func:`enhance_flair`). Raises :class:`EnhancementError` for a mask of another shape."""
    shape = acq.shape
    m = np.array(maps.mask if mask is None else mask, dtype=bool)  # a copy: narrowed below
    if m.shape != shape:
        raise EnhancementError(f"mask shape {m.shape} does not match the image {shape}")
    # Receive field C = m0 / PD (signal units per pu), from the very PD the plain FLAIR used,
    # so both images share one scale; processing.pd's field fills voxels with PD = 0.
    # Only the mask's voxels (flat C order): whole-volume float64 copies were ~250 MB of
    # the worker's peak at 40 x 512 x 512.
    with np.errstate(divide="ignore", invalid="ignore"):
        coil = np.asarray(maps.m0)[m].astype(np.float64) / np.asarray(maps.pd_pu)[m].astype(
            np.float64
        )
    if maps.receive_field is not None:
        ok = np.isfinite(coil) & (coil > 0)
        coil = np.where(ok, coil, np.asarray(maps.receive_field)[m].astype(np.float64))
    good = np.isfinite(coil) & (coil > 0)
    m[m] = good  # narrowed to the voxels with a usable coil; coil[good] are its values
    return EnhanceInputs(
        shape=shape,
        mask=m,
        coil=coil[good],
        samples=acq.masked_samples(m),  # [n, 8] for the masked voxels only
        b1=np.asarray(maps.b1)[m].astype(np.float64),
        tr_ms=acq.tr_ms,
        delays_ms=acq.delays_ms,
        echo_times_ms=acq.echo_times_ms,
        saturation_deg=acq.saturation_deg,
        excitation_deg=acq.excitation_deg,
    )


def enhance_flair(
    acq: Acquisition | EnhanceInputs,
    maps: QuantMaps,
    flair: SyntheticImage,
    *,
    model_path: str | os.PathLike[str] | None = None,
    threads: int = 1,
    mask: np.ndarray | None = None,
    csf_t1_ms: float | None = None,
) -> SyntheticImage:
    """AI-enhanced FLAIR ``"FLAIR_AI"`` on the scale of the plain synthetic ``flair``.

    acq: the MDME acquisition (signal ``[z, delay, echo, y, x]``), or its
    :func:`enhance_inputs` (``mask`` is then ignored). maps: its fit (for the mask and the
    receive field ``C = m0 / pd_pu``). flair: the plain synthetic FLAIR (for
    TR/TE/TI and ``scale``). mask: voxels to enhance (default ``maps.mask``); others are 0.
    csf_t1_ms: the series' measured CSF T1, if known: a FLAIR TI that does not null it
    (beyond the mismatch the model was trained with) is refused, since the network was
    trained on TIs near the patient's CSF null and darkens CSF that such a TI leaves bright.
    Raises :class:`EnhancementError` (missing/corrupt model) or :class:`ProtocolOutOfRange`.
    """
    model = load_model(model_path, threads=threads)
    problem = ti_null_problem(model, flair.tr_ms, flair.ti_ms, csf_t1_ms)
    if problem:
        raise ProtocolOutOfRange(f"FLAIR enhancement skipped: {problem}")
    problems = protocol_problems(
        model.ranges,
        tr_ms=acq.tr_ms,
        delays_ms=acq.delays_ms,
        echo_times_ms=acq.echo_times_ms,
        saturation_deg=acq.saturation_deg,
        excitation_deg=acq.excitation_deg,
        flair_tr_ms=flair.tr_ms,
        flair_te_ms=flair.te_ms,
        flair_ti_ms=flair.ti_ms,
    )
    if problems:
        raise ProtocolOutOfRange(
            "FLAIR enhancement skipped, acquisition outside the model's trained protocol: "
            + "; ".join(problems)
        )
    shape = acq.shape
    if isinstance(acq, EnhanceInputs):
        inputs = acq
    else:
        inputs = enhance_inputs(acq, maps, mask)
    if flair.image.shape != shape:
        raise EnhancementError(f"FLAIR image shape {flair.image.shape} does not match {shape}")
    m, coil = inputs.mask, inputs.coil
    # The fit's B1 (smoothed in its second pass), held inside the trained range.
    b1_lo, b1_hi = model.ranges.get("b1", [0.7, 1.3])
    b1 = np.clip(np.nan_to_num(inputs.b1, nan=1.0), b1_lo, b1_hi)
    signal = enhance_samples(
        model,
        inputs.samples,
        tr_ms=acq.tr_ms,
        delays_ms=acq.delays_ms,
        echo_times_ms=acq.echo_times_ms,
        flair_ti_ms=float(flair.ti_ms),  # checked non-None above
        b1=b1,
    )
    del inputs, b1  # the [n, 8] samples (when ours) are not needed for the image
    img = np.zeros(shape, dtype=np.float32)
    hi = 32767.0 if flair.signed else 65535.0
    # Rounded like processing.synthesis, so both series share one integer scale. In place
    # on ``signal`` (the same values as clip(rint(signal / coil * scale)), no temporaries).
    np.divide(signal, coil, out=signal)
    signal *= flair.scale
    np.clip(np.rint(signal, out=signal), 0.0, hi, out=signal)
    img[m] = signal

    ti = round(float(flair.ti_ms))
    params = dict(flair.parameters)
    params.update(
        {
            "model_sha256": model.sha256,
            "model_file": model.path.name,
            "model_version": model.metadata.get("version", ""),
            "onnx_threads": int(threads),
            "source_contrast": flair.name,
        }
    )
    return replace(
        flair,
        name="FLAIR_AI",
        image=img,
        ai_enhanced=True,
        equation="pixel-wise MLP (ONNX) on the raw MDME samples, trained on simulated "
        "tissue mixtures; target: conventional FLAIR of the mixture",
        description=(
            f"SYNTHETIC FLAIR AI-ENHANCED TR{round(flair.tr_ms)} TE{round(flair.te_ms)} TI{ti}"
        ),
        parameters=params,
    )


def try_enhance_flair(
    acq: Acquisition | EnhanceInputs,
    maps: QuantMaps,
    flair: SyntheticImage,
    *,
    model_path: str | os.PathLike[str] | None = None,
    threads: int = 1,
    csf_t1_ms: float | None = None,
) -> tuple[SyntheticImage | None, str | None]:
    """:func:`enhance_flair` for the pipeline: ``(image, None)`` or ``(None, warning)``.

    Any :class:`EnhancementError` (missing/corrupt model, protocol outside the trained
    range) becomes a one-line warning so the rest of the series still runs; so does any
    unexpected error (an optional stage never loses the series).
    """
    try:
        image = enhance_flair(
            acq, maps, flair, model_path=model_path, threads=threads, csf_t1_ms=csf_t1_ms
        )
        return image, None
    except EnhancementError as exc:
        return None, f"FLAIR enhancement skipped: {exc}"
    except Exception as exc:
        return None, f"FLAIR enhancement failed ({type(exc).__name__}): {exc}"
