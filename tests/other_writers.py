"""A corpus of "other writers": emulator series post-edited into header conventions the
emulator does not write (issue 13), and the WM/GM T1 bias each gives through the node.

Every variant starts from :func:`dicom_node.emulator.make_datasets` (a known phantom, known
stored integers) and rewrites the stored values and their RescaleSlope/Intercept, the pixel
representation, or the tag holding the saturation delay, the way other scanners and
converters do (``../shared/docs/dicom.md`` and the real headers in
``shared/testdata/vendor``: Philips phase 0..4095 x 1.53 - 3142 (milliradians), Philips
magnitude 12-bit with a per-frame slope, GE signed pixels and InversionTime, Siemens 12-bit
phase 0..4095 x 2 - 4096). The truth of each rewrite is the emulator's own quantization:
magnitude ``SV * q`` and phase ``(SV - 3142) / 1000`` rad in every layout, so the rewrites
do not depend on the code under test.

Used by ``tests/test_other_writers.py`` (assertions) and ``benchmarks/other_writers.py``
(the table).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import format_number_as_ds

from dicom_node import emulator
from processing.acquisition import Acquisition

#: layouts of the table (columns)
LAYOUTS = ("ge", "siemens", "philips", "siemens_xa_enhanced", "philips_enhanced")
#: phantom of the table: shape, seed, SNR (noise SD per channel = 100 / SNR)
PHANTOM = {"shape": (3, 48, 48), "seed": 11, "snr": 60.0}
#: the second phantom of a few rows: oblique slices (20 deg about x, 10 about y) and tissue
#: values away from the defaults (WM 600/70/68, GM 1100/90/82 ms/ms/pu)
OTHER_TISSUES = {"WM": (780.0, 78.0, 71.0), "GM": (1350.0, 105.0, 84.0)}


# ----------------------------------------------------------------------------- encodings
@dataclass(frozen=True)
class Encoding:
    """Stored integers and rescale for float values: ``value = SV * slope + intercept``."""

    stored: np.ndarray  # int64, same shape as the values
    slope: float
    intercept: float
    signed: bool


def _ds(v: float) -> float:
    """The value a DS attribute can hold (16 characters), so truth and header agree."""
    return float(format_number_as_ds(float(v)))


def _enc(sv: np.ndarray, slope: float, icpt: float, signed: bool) -> Encoding:
    return Encoding(np.asarray(np.rint(sv), dtype=np.int64), _ds(slope), _ds(icpt), signed)


#: phase conventions: radians in [-pi, pi] -> Encoding. The expected outcome is in
#: PHASE_EXPECT ("fit" or the NormalizationError kind of a quarantine).
PHASE: dict[str, Callable[[np.ndarray, int], Encoding]] = {
    "as written by the emulator": lambda phi, k: None,  # type: ignore[dict-item,return-value]
    "milliradians 0..6284 - 3142": lambda phi, k: _enc(phi * 1000 + 3142, 1.0, -3142.0, False),
    "radians, GE slope 0.001, signed": lambda phi, k: _enc(phi * 1000, 0.001, 0.0, True),
    "radians, slope 0.001, intercept -3.142": lambda phi, k: _enc(
        phi * 1000 + 3142, 0.001, -3.142, False
    ),
    "degrees, slope 0.1, intercept -180": lambda phi, k: _enc(
        np.degrees(phi) * 10 + 1800, 0.1, -180.0, False
    ),
    "degrees, integers, signed": lambda phi, k: _enc(np.degrees(phi), 1.0, 0.0, True),
    "Siemens 12-bit 0..4095 x 2 - 4096": lambda phi, k: _enc(
        np.clip(np.rint(phi * 2048 / math.pi + 2048), 0, 4095), 2.0, -4096.0, False
    ),
    "raw +-4096, signed": lambda phi, k: _enc(
        np.clip(np.rint(phi * 4096 / math.pi), -4096, 4095), 1.0, 0.0, True
    ),
    "0..4095 (one turn), intercept -2048": lambda phi, k: _enc(
        np.clip(np.rint(phi * 2048 / math.pi) + 2048, 0, 4095), 1.0, -2048.0, False
    ),
    "0..4095 (one turn), wrapped, no intercept": lambda phi, k: _enc(
        np.mod(np.rint(phi * 2048 / math.pi), 4096), 1.0, 0.0, False
    ),
    # inconsistent: must be quarantined, never fitted
    "radians as integers (1 rad steps)": lambda phi, k: _enc(phi, 1.0, 0.0, True),
    "mixed: radians and milliradians frames": lambda phi, k: (
        _enc(phi * 1000, 0.001, 0.0, True) if k % 2 else _enc(phi * 1000, 1.0, 0.0, True)
    ),
    "quarter scale (writer bug): span 1571": lambda phi, k: _enc(phi * 250, 1.0, 0.0, True),
}
PHASE_EXPECT = {name: "fit" for name in PHASE} | {
    "radians as integers (1 rad steps)": "phase_units",
    "mixed: radians and milliradians frames": "phase_units",
    "quarter scale (writer bug): span 1571": "phase_units",
}


def _magnitude_12bit(mag: np.ndarray, k: int) -> Encoding:
    """12-bit, a slope per frame (Philips style) and a negative intercept."""
    off = 5.0 + k % 3
    slope = _ds((float(mag.max()) + off) / 4000.0)
    return _enc(np.clip(np.rint((mag + off) / slope), 0, 4095), slope, -off, False)


# ----------------------------------------------------------------------------- frames
@dataclass
class _FrameRef:
    ds: Dataset  # the instance
    frame: int  # frame index inside it
    part: str  # "M" or "P"
    rescale: Dataset  # where RescaleSlope/Intercept live
    scale_item: Dataset | None  # Philips private item holding (2005,100E), if any


def _philips_ss_item(ds: Dataset) -> Dataset | None:
    try:
        ds.private_block(0x2005, "Philips MR Imaging DD 001")
    except KeyError:
        return None
    return ds


def _frames(ds: Dataset, layout: str) -> list[_FrameRef]:
    if "PerFrameFunctionalGroupsSequence" in ds:
        out = []
        for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
            comp = fg.MRImageFrameTypeSequence[0].ComplexImageComponent
            priv = fg[0x2005, 0x140F].value[0] if (0x2005, 0x140F) in fg else None
            out.append(
                _FrameRef(
                    ds,
                    i,
                    "M" if comp == "MAGNITUDE" else "P",
                    fg.PixelValueTransformationSequence[0],
                    None if priv is None else _philips_ss_item(priv),
                )
            )
        return out
    if layout == "ge":
        part = "M" if ds.private_block(0x0043, "GEMS_PARM_01")[0x2F].value == 0 else "P"
    elif layout == "siemens":
        part = str(ds.ImageType[2])
    else:
        part = str(ds.ImageType[3])
    return [_FrameRef(ds, 0, part, ds, _philips_ss_item(ds) if layout == "philips" else None)]


def _stored(ds: Dataset) -> np.ndarray:
    nf = int(ds.get("NumberOfFrames", 1) or 1)
    return np.frombuffer(ds.PixelData, "<u2").reshape(nf, int(ds.Rows), int(ds.Columns))


def rewrite(
    datasets: Sequence[Dataset],
    layout: str,
    acq: Acquisition,
    *,
    phase: str | None = None,
    magnitude: Callable[[np.ndarray, int], Encoding] | None = None,
    seed: int = 0,
) -> list[Dataset]:
    """Copies of ``datasets`` with phase frames re-encoded by ``PHASE[phase]`` and
    magnitude frames by ``magnitude`` (None: as written). An instance holding any signed
    encoding becomes PixelRepresentation 1; its other frames are then re-encoded to fit
    int16 (magnitude ``SV * 2q``)."""
    q = emulator._quantize(acq, False, seed)[2]  # the emulator's magnitude step
    enc_phase = PHASE[phase] if phase else None
    out = []
    k = 0  # frame counter (magnitude), phase-frame counter (phase): passed to encodings
    kp = 0
    for src in datasets:
        ds = copy.deepcopy(src)
        refs = _frames(ds, layout)
        sv = _stored(ds)
        encs: list[Encoding | None] = []
        for ref in refs:
            raw = sv[ref.frame].astype(np.float64)
            e = None
            if ref.part == "P" and enc_phase is not None:
                e = enc_phase((raw - emulator.PHASE_OFFSET) / 1000.0, kp)
                kp += 1
            elif ref.part == "M" and magnitude is not None:
                e = magnitude(raw * q, k)
            encs.append(e)
            k += 1
        if all(e is None for e in encs):
            out.append(ds)
            continue
        signed = any(e is not None and e.signed for e in encs)
        new = np.empty(sv.shape, np.int64)
        for ref, e in zip(refs, encs, strict=True):
            raw = sv[ref.frame].astype(np.float64)
            if e is None and signed:  # keep the values, fit them into int16
                if ref.part == "M":
                    e = _enc(raw / 2, 2 * q, 0.0, True)
                else:  # the emulator's phase, rescaled as written: SV - 3142, shifted intercept
                    slope = float(ref.rescale.RescaleSlope)
                    icpt = emulator.PHASE_OFFSET * slope + float(ref.rescale.RescaleIntercept)
                    e = _enc(raw - emulator.PHASE_OFFSET, slope, icpt, True)
            if e is None:
                new[ref.frame] = sv[ref.frame]
                continue
            new[ref.frame] = e.stored
            ref.rescale.RescaleSlope = format_number_as_ds(e.slope)
            ref.rescale.RescaleIntercept = format_number_as_ds(e.intercept)
            if ref.scale_item is not None and ref.part == "M":
                # Philips FP = (SV*RS + RI) / (RS*SS): SS = 1/RS makes FP the display value
                blk = ref.scale_item.private_block(0x2005, "Philips MR Imaging DD 001")
                ref.scale_item[blk.get_tag(0x0E)].value = 1.0 / e.slope
        dtype = "<i2" if signed else "<u2"
        info = np.iinfo(np.int16 if signed else np.uint16)
        if new.min() < info.min or new.max() > info.max:
            raise ValueError(f"rewrite: stored values {new.min()}..{new.max()} overflow {dtype}")
        ds.PixelRepresentation = 1 if signed else 0
        if not signed and new.max() <= 4095:
            ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = np.ascontiguousarray(new, dtype=dtype).tobytes()
        out.append(ds)
    return out


# ----------------------------------------------------------------------------- delays
def move_delay(datasets: Sequence[Dataset], layout: str, acq: Acquisition, tag: str) -> None:
    """Put the saturation delay of every image in ``tag`` only ("InversionTime",
    "TriggerTime" or "InversionTimes": the Enhanced MR per-frame MR Modifier), removing
    the emulator's own delay tags (InversionTime, TriggerTime, Philips (2001,101B))."""
    for ds in datasets:
        if "PerFrameFunctionalGroupsSequence" in ds:
            if tag != "InversionTimes":
                raise ValueError(f"{layout}: enhanced layouts carry the delay per frame only")
            ds.SharedFunctionalGroupsSequence[0].pop("MRModifierSequence", None)
            for fg in ds.PerFrameFunctionalGroupsSequence:
                delay = _frame_delay(fg, acq)
                if (0x2005, 0x140F) in fg:
                    fg[0x2005, 0x140F].value[0].pop(0x2001101B, None)
                fg.MRModifierSequence = [emulator._modifier(delay)]
            continue
        delay = _classic_delay(ds, layout, acq)
        for kw in ("InversionTime", "TriggerTime"):
            ds.pop(kw, None)
        ds.pop(0x2001101B, None)  # Philips prepulse delay
        setattr(ds, tag, format_number_as_ds(delay))


def _classic_delay(ds: Dataset, layout: str, acq: Acquisition) -> float:
    if layout == "ge":
        return float(ds.InversionTime)
    if layout == "siemens":
        return float(ds.TriggerTime)
    return float(ds.private_block(0x2001, "Philips Imaging DD 001")[0x1B].value)


def _frame_delay(fg: Dataset, acq: Acquisition) -> float:
    d = int(fg.FrameContentSequence[0].DimensionIndexValues[1]) - 1
    return float(acq.delays_ms[d])


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Row:
    """One writer convention: how to build the series from the emulator's."""

    name: str
    with_phase: bool = True
    phase: str | None = None
    magnitude: Callable[[np.ndarray, int], Encoding] | None = None
    delay_tag: str | None = None
    layouts: tuple[str, ...] = LAYOUTS
    #: "axial" (PHANTOM) or "oblique" (PHANTOM, oblique, OTHER_TISSUES)
    phantom: str = "axial"

    def build(self, acq: Acquisition, layout: str, seed: int) -> list[Dataset]:
        dss = emulator.make_datasets(acq, layout, with_phase=self.with_phase, seed=seed)
        if self.phase not in (None, "as written by the emulator") or self.magnitude:
            phase = None if self.phase == "as written by the emulator" else self.phase
            dss = rewrite(dss, layout, acq, phase=phase, magnitude=self.magnitude, seed=seed)
        if self.delay_tag:
            move_delay(dss, layout, acq, self.delay_tag)
        return dss

    def expect(self, layout: str) -> str:
        """ "fit" or the NormalizationError kind the series must be quarantined with."""
        if self.phase is not None:
            return PHASE_EXPECT[self.phase]
        if self.delay_tag == "TriggerTime" and layout == "ge":
            return "delay"  # GE writes slice timing in TriggerTime: never trusted
        return "fit"


_CLASSIC = ("ge", "siemens", "philips")
ROWS: tuple[Row, ...] = (
    *(Row(f"phase: {name}", phase=name) for name in PHASE),
    Row("magnitude only, as written", with_phase=False),
    Row("magnitude only, 12-bit, slope per frame, intercept", False, None, _magnitude_12bit),
    Row(
        "magnitude 12-bit slope/intercept + phase degrees",
        phase="degrees, slope 0.1, intercept -180",
        magnitude=_magnitude_12bit,
    ),
    Row("delay in InversionTime (0018,0082)", delay_tag="InversionTime", layouts=_CLASSIC),
    Row("delay in TriggerTime (0018,1060)", delay_tag="TriggerTime", layouts=_CLASSIC),
    Row(
        "delay in per-frame InversionTimes (0018,9079)",
        delay_tag="InversionTimes",
        layouts=("siemens_xa_enhanced", "philips_enhanced"),
    ),
    Row(
        "oblique, other tissues: as written by the emulator",
        phase="as written by the emulator",
        phantom="oblique",
    ),
    Row(
        "oblique, other tissues: radians, GE slope 0.001",
        phase="radians, GE slope 0.001, signed",
        phantom="oblique",
    ),
    Row(
        "oblique, other tissues: Siemens 12-bit x 2 - 4096",
        phase="Siemens 12-bit 0..4095 x 2 - 4096",
        phantom="oblique",
    ),
    Row(
        "oblique, other tissues: 12-bit magnitude + degrees",
        phase="degrees, slope 0.1, intercept -180",
        magnitude=_magnitude_12bit,
        phantom="oblique",
    ),
)


@dataclass(frozen=True)
class Cell:
    row: str
    layout: str
    expected: str  # "fit" or a quarantine kind
    outcome: str  # "fit" or the kind it was quarantined with
    wm_t1_bias: float | None  # median signed relative error over pure WM
    gm_t1_bias: float | None
    reason: str
    phase_unit: str


def make_table_phantom(kind: str = "axial"):
    from processing.phantom import TissueParams, make_phantom

    other = kind == "oblique"
    return make_phantom(
        PHANTOM["shape"],
        seed=PHANTOM["seed"],
        snr=PHANTOM["snr"],
        anatomy="ellipsoid",
        lesions=False,
        oblique=other,
        tissues={k: TissueParams(*v) for k, v in OTHER_TISSUES.items()} if other else None,
    )


def lean_settings():
    """Only the fit (what the T1 bias measures): no synthesis, segmentation, myelin, AI."""
    from processing.run import ProcessingSettings

    return ProcessingSettings(
        contrasts=(), segmentation=False, myelin=False, enhance=False, mixture_contrasts=()
    )


def t1_bias(t1_ms: np.ndarray, truth, tissue: str) -> float:
    pure = truth.pure_mask(tissue) & np.isfinite(t1_ms) & (t1_ms > 0)
    return float(np.median((t1_ms[pure] - truth.t1_ms[pure]) / truth.t1_ms[pure]))


def fit_cell(ph, row: Row, layout: str, t1_ms: np.ndarray, phase_unit: str = "") -> Cell:
    """The cell of a variant that was fitted: its WM and GM T1 bias against the truth."""
    return Cell(
        row.name,
        layout,
        row.expect(layout),
        "fit",
        t1_bias(t1_ms, ph.truth, "WM"),
        t1_bias(t1_ms, ph.truth, "GM"),
        "",
        phase_unit,
    )


def run_cell(ph, row: Row, layout: str, workdir, seed: int) -> Cell:
    """Write the variant to ``workdir`` and take it the way ``synthmr process`` does:
    ingest.read_paths -> series.classify -> processing.run."""
    from pathlib import Path

    from dicom_node import ingest, series
    from processing.run import run

    paths = write_cell(ph, row, layout, Path(workdir) / f"{layout}-{seed}", seed)
    (group,) = ingest.read_paths(paths)
    outcome = series.classify(group.datasets)
    if outcome.acquisition is None:
        kind = outcome.error.kind if outcome.error is not None else outcome.state.value
        return Cell(row.name, layout, row.expect(layout), kind, None, None, outcome.reason, "")
    acq = outcome.acquisition
    t1 = run(acq, lean_settings()).maps.t1_ms
    return fit_cell(ph, row, layout, t1, str(acq.metadata.get("phase_unit", "")))


def reference_row(row: Row) -> Row:
    """The emulator's own series of the same phantom (what a rewrite must reproduce)."""
    return next(
        r for r in ROWS if r.phase == "as written by the emulator" and r.phantom == row.phantom
    )


def write_cell(ph, row: Row, layout: str, folder, seed: int) -> list:
    """The variant's files in ``folder`` (created); returns their paths."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(row.build(ph.acq, layout, seed)):
        paths.append(folder / f"IM_{i:05d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def t1_map_from_output(out) -> np.ndarray:
    """T1 (ms) [z, y, x] from the Parametric Map in a ``synthmr process`` output folder,
    frames ordered along the slice normal."""
    from pathlib import Path

    import pydicom

    for p in sorted(Path(out).rglob("*.dcm")):
        ds = pydicom.dcmread(p)
        if ds.SOPClassUID.name != "Parametric Map Storage" or "T1 map" not in str(
            ds.SeriesDescription
        ):
            continue
        shared = ds.SharedFunctionalGroupsSequence[0]
        iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        pos = [
            float(np.dot(np.array(fg.PlanePositionSequence[0].ImagePositionPatient, float), normal))
            for fg in ds.PerFrameFunctionalGroupsSequence
        ]
        mapping = shared.RealWorldValueMappingSequence[0]
        arr = ds.pixel_array.reshape(len(pos), ds.Rows, ds.Columns).astype(np.float64)
        arr = arr * float(mapping.RealWorldValueSlope) + float(mapping.RealWorldValueIntercept)
        return arr[np.argsort(pos)]
    raise FileNotFoundError(f"no T1 parametric map under {out}")


#: ``synthmr process`` config of :func:`run_table_cli`: the fit and the maps only
LEAN_TOML = """[processing]
contrasts = []
segmentation = false
myelin = false
enhance = false
mixture_contrasts = []
"""


def run_table_cli(
    workdir, rows: Sequence[Row] = ROWS, layouts: Sequence[str] = LAYOUTS
) -> list[Cell]:
    """The table through the real command: every variant written under one folder, one
    ``python -m dicom_node.cli process`` over it (:data:`LEAN_TOML`), then each series'
    printed line (quarantine reason) or its exported T1 Parametric Map (bias)."""
    import subprocess
    import sys
    from pathlib import Path

    work = Path(workdir)
    specs = []
    for ph, row, layout, seed in _table_cells(rows, layouts):
        paths = write_cell(ph, row, layout, work / "in" / f"{layout}-{seed}", seed)
        specs.append((row, layout, str(emulator_series_uid(paths[0])), ph))
    cfg = work / "lean.toml"
    cfg.write_text(LEAN_TOML)
    out = work / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "process", str(work / "in"), "--out", str(out)]
        + ["-c", str(cfg), "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = {ln.split(":", 1)[0]: ln for ln in proc.stdout.splitlines() if ln[:1] not in " "}
    cells = []
    for row, layout, uid, ph in specs:
        line = lines.get(uid, f"{uid}: no line printed (exit {proc.returncode}): {proc.stderr}")
        if "ERROR" in line:
            reason = line.split(": ", 3)[-1]
            kind = _kind_of(reason)
            cells.append(Cell(row.name, layout, row.expect(layout), kind, None, None, reason, ""))
            continue
        cells.append(fit_cell(ph, row, layout, t1_map_from_output(out / uid)))
    return cells


def emulator_series_uid(path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _kind_of(reason: str) -> str:
    """The NormalizationError kind a printed quarantine reason comes from."""
    if "phase unit" in reason:
        return "phase_units"
    if "no usable delay source" in reason:
        return "delay"
    return "error"


def run_table(workdir, rows: Sequence[Row] = ROWS, layouts: Sequence[str] = LAYOUTS) -> list[Cell]:
    return [
        run_cell(ph, row, layout, workdir, seed)
        for ph, row, layout, seed in _table_cells(rows, layouts)
    ]


def _table_cells(
    rows: Sequence[Row], layouts: Sequence[str]
) -> Iterator[tuple[Any, Row, str, int]]:
    """(phantom, row, layout, seed) of every cell of the table, seeds 101, 102, ... in order."""
    phantoms = {kind: make_table_phantom(kind) for kind in dict.fromkeys(r.phantom for r in rows)}
    seed = 100
    for row in rows:
        for layout in layouts:
            if layout in row.layouts:
                seed += 1
                yield phantoms[row.phantom], row, layout, seed


def format_table(cells: Sequence[Cell]) -> str:
    """Convention x vendor -> "WM +0.12 % / GM -0.30 %" or "QUARANTINED <kind>"."""
    rows = list(dict.fromkeys(c.row for c in cells))
    layouts = list(dict.fromkeys(c.layout for c in cells))
    by = {(c.row, c.layout): c for c in cells}
    width = max(len(r) for r in rows) + 2
    head = f"{'convention':<{width}}" + "".join(f"{lay:>24}" for lay in layouts)
    lines = [head, "-" * len(head)]
    for r in rows:
        text = f"{r:<{width}}"
        for lay in layouts:
            c = by.get((r, lay))
            if c is None:
                cell = "n/a"
            elif c.outcome == "fit":
                cell = f"{100 * c.wm_t1_bias:+.2f}/{100 * c.gm_t1_bias:+.2f} %"
            else:
                cell = f"QUARANTINED {c.outcome}"
            if c is not None and c.outcome != c.expected:
                cell = "!" + cell
            text += f"{cell:>24}"
        lines.append(text)
    reasons = [c for c in cells if c.outcome != "fit"]
    if reasons:
        lines.append("")
        lines.append("quarantine reasons:")
        for c in reasons:
            lines.append(f"  {c.row} / {c.layout}: {c.reason}")
    return "\n".join(lines)
