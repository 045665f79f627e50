"""The command line end to end: simulate -> process -> DICOM outputs; demo; the import arrow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node import cli

ROOT = Path(__file__).resolve().parents[1]


def test_processing_imports_no_dicom_library() -> None:
    """House rule: processing/ never imports pydicom, pynetdicom or highdicom (static + runtime)."""
    forbidden = {"pydicom", "pynetdicom", "highdicom", "dicom_node"}
    offenders = []
    for path in sorted((ROOT / "processing").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert offenders == []
    # Runtime: importing every processing module in a fresh interpreter loads none of them.
    code = (
        "import importlib, pkgutil, sys, processing\n"
        "for m in pkgutil.iter_modules(processing.__path__):\n"
        "    importlib.import_module('processing.' + m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('pydicom', 'pynetdicom', 'highdicom', 'dicom_node')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_simulate_then_process_writes_dicom_outputs(tmp_path: Path, capsys) -> None:
    src = tmp_path / "in"
    # An MDME series (Philips classic, magnitude only, oblique) and a non-MDME file beside it.
    rc = cli.main(
        [
            "simulate",
            "--vendor",
            "philips",
            "--out",
            str(src / "mdme"),
            "--shape",
            "2,40,40",
            "--anatomy",
            "ellipsoid",
            "--magnitude-only",
            "--oblique",
            "--seed",
            "5",
        ]
    )
    assert rc == 0
    files = sorted((src / "mdme").glob("*.dcm"))
    assert len(files) == 2 * 8  # 2 slices x 4 delays x 2 echoes, magnitude only
    other = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    other.save_as(src / "other.dcm")
    (src / "notes.txt").write_text("not DICOM")

    out = tmp_path / "out"
    capsys.readouterr()
    rc = cli.main(["process", str(src), "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("    ")]
    assert len(lines) == 2, text
    assert any("not MDME" in ln for ln in lines), text
    ok = next(ln for ln in lines if "grid" in ln)
    assert "2 slices x 4 delays x 2 echoes" in ok and "magnitude" in ok

    series_dirs = [p for p in out.iterdir() if p.is_dir()]
    assert len(series_dirs) == 1
    written = list(series_dirs[0].rglob("*.dcm"))
    kinds = {pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID.name for p in written}
    assert {"Parametric Map Storage", "Segmentation Storage", "MR Image Storage"} <= kinds
    assert any("SR" in k for k in kinds), kinds
    # Every output says it is synthetic and which software made it.
    for p in written:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        assert (
            "synthmr" in str(ds.get("SoftwareVersions", "")).lower()
            or "synthmr" in str(ds.get("ContentCreatorName", "")).lower()
            or ds.get("SeriesDescription", "").upper().startswith("SYNTHETIC")
        ), p
    assert (series_dirs[0] / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_process_reports_missing_cell_and_keeps_going(tmp_path: Path, capsys) -> None:
    src = tmp_path / "in"
    rc = cli.main(
        [
            "simulate",
            "--vendor",
            "ge",
            "--out",
            str(src),
            "--shape",
            "2,24,24",
            "--anatomy",
            "ellipsoid",
        ]
    )
    assert rc == 0
    files = sorted(src.glob("*.dcm"))
    victim = files[5]
    ds = pydicom.dcmread(victim, stop_before_pixels=True)
    victim.unlink()
    capsys.readouterr()
    rc = cli.main(["process", str(src), "--out", str(tmp_path / "out"), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "ERROR" in text and "missing" in text.lower(), text
    # The error names the cell: a (slice, delay, echo, part) tuple.
    assert "slice" in text.lower() or "(" in text, text
    assert ds.SeriesInstanceUID in text


def test_demo_prints_summary(tmp_path: Path, capsys) -> None:
    rc = cli.main(["demo", "--out", str(tmp_path / "demo"), "--shape", "2,64,64", "--seed", "2"])
    text = capsys.readouterr().out
    assert rc == 0, text
    for word in ("fit", "WM", "GM", "CSF", "ICV", "QC"):
        assert word in text, text
    row = next(ln for ln in text.splitlines() if ln.startswith("WM "))
    t1_fit, t1_true = (float(v) for v in row.split()[1:3])
    assert abs(t1_fit - t1_true) / t1_true < 0.05
    assert (tmp_path / "demo" / "montage.png").exists()
    outs = list((tmp_path / "demo" / "outputs").rglob("*.dcm"))
    assert outs
    assert np.isfinite(t1_fit)


@pytest.mark.parametrize("bad", [["process"], ["simulate", "--shape", "0,1,1", "--out", "x"]])
def test_bad_arguments_exit_2(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(bad)
    assert exc.value.code == 2
