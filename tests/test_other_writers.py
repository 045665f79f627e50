"""Right on data we did not write (issue 13): phase units decided from the data, and a
corpus of other writers' header conventions through the node's path.

Phantom (tests/other_writers.PHANTOM): ellipsoid brain 3 x 48 x 48, seed 11, no lesions,
SNR 60 (noise SD per channel 100/60 of the fully relaxed PD-100 signal), TR 4000 ms, delays
150/580/1900/3850 ms, TE 20/100 ms, default tissues (WM T1 600, GM 1100 ms); the "oblique"
rows: the same, oblique (20 deg / 10 deg) with WM T1 780, GM T1 1350 ms
(tests/other_writers.OTHER_TISSUES). ``pytest -s`` prints the table (convention x vendor).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.vendors import NormalizationError, load_rules, normalize
from dicom_node.vendors.phase_units import (
    PhaseRange,
    PhaseUnitError,
    decide_phase_unit,
)
from tests import other_writers as ow

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the rule
def _ranges(lo: float, hi: float, step: float, n: int = 4) -> list[PhaseRange]:
    return [PhaseRange(lo, hi, step, f"frame {i}") for i in range(n)]


@pytest.mark.parametrize(
    ("lo", "hi", "step", "to_rad"),
    [
        (-math.pi, math.pi, 0.001, 1.0),  # GE: mrad integers x 0.001 = radians
        (0.0, 2 * math.pi, 0.001, 1.0),  # any offset: the background phase absorbs it
        (-180.0, 179.9, 0.1, math.pi / 180),
        (-3142.0, 3142.0, 1.0, 1e-3),
        (-4096.0, 4094.0, 2.0, math.pi / 4096),
        (0.0, 4095.0, 1.0, math.pi / 2048),
        (-2048.0, 2047.0, 1.0, math.pi / 2048),
        (-32768.0, 32767.0, 1.0, math.pi / 32768),
    ],
)
def test_each_unit_is_told_by_the_span(lo, hi, step, to_rad):
    got = decide_phase_unit(_ranges(lo, hi, step))
    assert got.to_rad == pytest.approx(to_rad, rel=1e-12)
    assert got.coverage > 0.99


def test_ge_radians_with_the_old_constant_is_refused():
    """The issue's bug: GE phase already in radians, multiplied by 1e-3 again. Decided
    from the data it is radians; a site forcing 1e-3 gets a quarantine, not a fit."""
    ranges = _ranges(-3.1416, 3.1416, 0.001)
    assert decide_phase_unit(ranges).to_rad == 1.0
    with pytest.raises(PhaseUnitError, match=r"ambiguous.*0 % of a turn.*configured"):
        decide_phase_unit(ranges, configured_to_rad=1e-3)
    # a configured unit accepts masked phase (half a turn), still refuses a factor 57
    half = _ranges(-90.0, 90.0, 0.1)
    assert decide_phase_unit(half, configured_to_rad=math.pi / 180).coverage == 0.5
    with pytest.raises(PhaseUnitError, match=r"inconsistent.*more than one turn"):
        decide_phase_unit(half, configured_to_rad=1.0)  # degrees read as radians
    with pytest.raises(PhaseUnitError, match=r"ambiguous.*1 % of a turn"):
        decide_phase_unit(half, configured_to_rad=math.pi / 180 / 57)
    with pytest.raises(PhaseUnitError, match=r"ambiguous"):
        decide_phase_unit(half)  # not configured: radians? degrees? never guessed


def test_ambiguous_coarse_mixed_and_unknown_are_named():
    # masked phase over a quarter turn: radians or degrees or...? never guessed
    with pytest.raises(PhaseUnitError, match=r"ambiguous.*40 % of a turn in degrees"):
        decide_phase_unit(_ranges(-72.0, 72.0, 0.1))
    with pytest.raises(PhaseUnitError, match=r"too coarse"):
        decide_phase_unit(_ranges(-3.0, 3.0, 1.0))
    mixed = _ranges(-3142.0, 3141.0, 1.0) + [PhaseRange(-3.14, 3.14, 0.001, "IM_7")]
    with pytest.raises(PhaseUnitError, match=r"1 frame\(s\) span less than 5 %.*IM_7"):
        decide_phase_unit(mixed)
    with pytest.raises(PhaseUnitError, match=r"unknown.*more than one turn"):
        decide_phase_unit(_ranges(0.0, 70000.0, 1.0))
    # a constant frame (all-zero background slice) is no evidence of another unit
    const = _ranges(-3142.0, 3141.0, 1.0) + [PhaseRange(0.0, 0.0, 1.0, "IM_8")]
    assert decide_phase_unit(const).to_rad == 1e-3


def test_phase_to_rad_rule_is_validated():
    assert load_rules(None)["ge"].phase_to_rad is None  # decided from the data
    assert load_rules({"ge": {"phase_to_rad": 0.5}})["ge"].phase_to_rad == 0.5
    with pytest.raises(ValueError, match=r"vendors\.ge\.phase_to_rad: must be > 0"):
        load_rules({"ge": {"phase_to_rad": 0}})


def test_quarantine_kind_and_details_through_normalize():
    ph = ow.make_table_phantom()
    row = next(r for r in ow.ROWS if r.phase == "quarter scale (writer bug): span 1571")
    with pytest.raises(NormalizationError) as info:
        normalize(row.build(ph.acq, "ge", seed=3))
    assert info.value.kind == "phase_units"
    assert "ge: phase unit ambiguous" in str(info.value)
    assert info.value.details["phase_max"] - info.value.details["phase_min"] < 1600


# ----------------------------------------------------------------------------- the corpus
@pytest.fixture(scope="module")
def table(tmp_path_factory) -> list[ow.Cell]:
    return ow.run_table(tmp_path_factory.mktemp("other_writers"))


@pytest.mark.slow
def test_every_convention_fits_within_1_percent_or_is_quarantined(table):
    print("\n" + ow.format_table(table))
    assert len(table) == sum(len(r.layouts) for r in ow.ROWS)
    by = {(c.row, c.layout): c for c in table}
    rows = {r.name: r for r in ow.ROWS}
    for c in table:
        where = f"{c.row} / {c.layout}"
        assert c.outcome == c.expected, f"{where}: {c.outcome} ({c.reason})"
        if c.outcome != "fit":
            assert c.reason, where  # a quarantine names its reason
            continue
        if c.row.startswith("magnitude only"):
            continue  # the magnitude fit's own bias: next test
        assert abs(c.wm_t1_bias) <= 0.01, f"{where}: WM T1 bias {c.wm_t1_bias:+.4f}"
        assert abs(c.gm_t1_bias) <= 0.01, f"{where}: GM T1 bias {c.gm_t1_bias:+.4f}"
        # the adapter adds nothing: the emulator's own series of that layout fits the same
        ref = by[ow.reference_row(rows[c.row]).name, c.layout]
        assert c.wm_t1_bias == pytest.approx(ref.wm_t1_bias, abs=1e-3), where
        assert c.gm_t1_bias == pytest.approx(ref.gm_t1_bias, abs=1e-3), where


@pytest.mark.slow
def test_magnitude_writers_match_the_emulators_magnitude(table):
    """Magnitude-only series: the rescale variants give the bias of the emulator's own
    magnitude series (the adapter adds none; the magnitude fit's bias is issue 13 item 3)."""
    ref = {c.layout: c for c in table if c.row == "magnitude only, as written"}
    for c in table:
        if c.row.startswith("magnitude only") and c.outcome == "fit":
            assert c.wm_t1_bias == pytest.approx(ref[c.layout].wm_t1_bias, abs=2e-3), c
            assert c.gm_t1_bias == pytest.approx(ref[c.layout].gm_t1_bias, abs=2e-3), c


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_synthmr_process_fits_ge_radians_and_refuses_ambiguous_phase(tmp_path):
    """`synthmr process` on a folder holding the issue's GE series (phase already radians
    after RescaleSlope 0.001) and a Siemens series with quarter-scale phase: the first is
    exported with WM/GM T1 within 1 % of the truth, the second named and not exported,
    exit status 1."""
    ph = ow.make_table_phantom()
    ge = next(r for r in ow.ROWS if r.phase == "radians, GE slope 0.001, signed")
    bad = next(r for r in ow.ROWS if r.phase == "quarter scale (writer bug): span 1571")
    src = tmp_path / "in"
    uids = {}
    for name, row, layout, seed in (("ge", ge, "ge", 21), ("bad", bad, "siemens", 22)):
        (src / name).mkdir(parents=True)
        dss = row.build(ph.acq, layout, seed)
        uids[name] = str(dss[0].SeriesInstanceUID)
        for i, ds in enumerate(dss):
            ds.save_as(src / name / f"IM_{i:05d}.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "process", str(src), "--out", str(out)]
        + ["--no-progress"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    bad_line = next(ln for ln in text.splitlines() if ln.startswith(uids["bad"]))
    assert "ERROR (QUARANTINED): phase unusable: siemens: phase unit ambiguous" in bad_line
    assert not (out / uids["bad"]).exists()
    t1 = ow.t1_map_from_output(out / uids["ge"])
    for tissue in ("WM", "GM"):
        bias = ow.t1_bias(t1, ph.truth, tissue)
        assert abs(bias) <= 0.01, f"{tissue} T1 bias {bias:+.4f}"


def test_node_job_quarantines_an_undecidable_phase(tmp_path):
    """`synthmr serve` path: the node's series job turns the phase-unit error into
    QUARANTINED with the reason (the worker and the outbox are never reached)."""
    from dicom_node.config import load_settings
    from dicom_node.pipeline import run_series_job
    from dicom_node.registry import State

    ph = ow.make_table_phantom()
    row = next(r for r in ow.ROWS if r.phase == "mixed: radians and milliradians frames")
    paths = []
    for i, ds in enumerate(row.build(ph.acq, "philips", seed=31)):
        paths.append(str(tmp_path / f"IM_{i:05d}.dcm"))
        ds.save_as(paths[-1], enforce_file_format=True)

    def no_worker(*args, **kwargs):
        raise AssertionError("a quarantined series must not be fitted")

    outcome = run_series_job(
        "2.25.1", paths, load_settings(None, env={}), spool=None, submit=no_worker
    )
    assert outcome.state == State.QUARANTINED, outcome
    assert outcome.reason.startswith("phase unusable: philips: phase unit inconsistent")
    assert "frames written in different units" in outcome.reason
