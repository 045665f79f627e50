"""The command line end to end: simulate -> process -> DICOM outputs; demo; the import arrow."""

from __future__ import annotations

import ast
import json
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


def _simulate(out: Path, vendor: str, shape: str, *extra: str) -> list[Path]:
    """``synthmr simulate`` of an ellipsoid phantom into ``out``; its files, sorted."""
    rc = cli.main(
        ["simulate", "--vendor", vendor, "--out", str(out), "--shape", shape]
        + ["--anatomy", "ellipsoid", *extra]
    )
    assert rc == 0
    return sorted(out.glob("*.dcm"))


def test_simulate_then_process_writes_dicom_outputs(tmp_path: Path, capsys) -> None:
    src = tmp_path / "in"
    # An MDME series (Philips classic, magnitude only, oblique) and a non-MDME file beside it.
    files = _simulate(
        src / "mdme", "philips", "2,40,40", "--magnitude-only", "--oblique", "--seed", "5"
    )
    assert len(files) == 2 * 8  # 2 slices x 4 delays x 2 echoes, magnitude only
    other = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    other.save_as(src / "other.dcm")
    (src / "notes.txt").write_text("not DICOM")

    out = tmp_path / "out"
    capsys.readouterr()
    # The QC verdict of this small magnitude-only phantom is not what this test is about:
    # a QC "fail" is delivered marked, not held (held is tested in test_series.py).
    config = tmp_path / "node.toml"
    config.write_text('[export]\nqc_fail = "send_marked"\n')
    rc = cli.main(["process", str(src), "--out", str(out), "--no-progress", "-c", str(config)])
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
    files = _simulate(src, "ge", "2,24,24")
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


def test_demo_offline_prints_summary(tmp_path: Path, capsys) -> None:
    rc = cli.main(
        ["demo", "--offline", "--out", str(tmp_path / "demo"), "--shape", "2,64,64", "--seed", "2"]
    )
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


# --------------------------------------------------------------------------- status / retry
def _node_registry(tmp_path: Path):
    """A config whose spool holds a registry with series in several states, and that
    registry kept open (as a running node holds it) while the CLI reads and writes it."""
    from dicom_node.registry import Registry, State
    from tests.conftest import make_mr_file, write_config

    cfg = write_config(tmp_path)
    spool = tmp_path / "spool"
    reg = Registry(spool / "registry.sqlite3")
    uids = {}
    for name in ("delivered", "failed", "quarantined", "processing", "dead"):
        series = f"1.2.826.0.1.3680043.10.1.{len(uids) + 1}"
        uids[name] = series
        for i in range(2):
            f = make_mr_file(
                spool / "incoming" / series / f"{i}.dcm",
                series_uid=series,
                description=f"MDME {name}",
                instance_number=i + 1,
            )
            reg.add_instance(
                sop_uid=f"{series}.{i}",
                series_uid=series,
                study_uid="1.2.3",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                path=str(f),
                size=f.stat().st_size,
                calling_ae="MR_SCANNER",
                expected_count=2 if name != "quarantined" else 3,
            )
        if name == "quarantined":
            reg.transition(
                series,
                State.QUARANTINED,
                "incomplete after the 600 s ceiling",
                missing=[f"slice=1 delay={d} echo=0 part=M" for d in range(5)],
            )
            continue
        reg.transition(series, State.COMPLETE, "grid full")
        reg.enqueue(series)
        job = reg.claim_job()
        assert job is not None and job[1] == series
        if name == "processing":
            continue
        if name == "failed":
            reg.finish_job(job[0], series, State.FAILED, "process: ValueError: boom")
            continue
        out = [("pacs", f"{series}.out{i}", "1.2.840.10008.5.1.4.1.1.4", "/x") for i in range(3)]
        reg.finish_job(job[0], series, State.EXPORTED, "3 instances exported", outbox=out)
        ids = [it.id for it in reg.due_outbox() if it.series_uid == series]
        if name == "delivered":
            assert reg.outbox_sent(ids) == [series]
        else:
            assert reg.outbox_failed(ids, "PACS down", 0.0, max_attempts=1) == ids
    return cfg, reg, uids


def test_status_table_and_json(tmp_path: Path, capsys) -> None:
    cfg, reg, uids = _node_registry(tmp_path)
    try:
        capsys.readouterr()
        assert cli.main(["status", "-c", str(cfg)]) == 0
        text = capsys.readouterr().out
        lines = {ln.split()[0]: ln for ln in text.splitlines()[1:]}
        assert set(lines) == set(uids.values()), text
        assert "DELIVERED" in lines[uids["delivered"]] and "MDME delivered" in text
        assert "MR_SCANNER" in lines[uids["delivered"]]
        fields = lines[uids["delivered"]].split()
        assert fields[2] == "2/2"
        assert "boom" in lines[uids["failed"]]
        q = lines[uids["quarantined"]]
        assert "QUARANTINED" in q and "slice=1 delay=0" in q and "(+2 more)" in q
        assert "3 dead letters" in lines[uids["dead"]]

        assert cli.main(["status", "-c", str(cfg), "--json", "--limit", "2"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert len(rows) == 2
        assert cli.main(["status", "-c", str(cfg), "--json"]) == 0
        by_uid = {r["series_uid"]: r for r in json.loads(capsys.readouterr().out)}
        d = by_uid[uids["delivered"]]
        # timings are offsets from the first instance, in the order of the series' life
        assert 0 <= d["complete_s"] <= d["processed_s"] <= d["delivered_s"] < 60
        assert "delivered_s" not in by_uid[uids["failed"]]
        assert "processed_s" in by_uid[uids["failed"]]
    finally:
        reg.close()


def test_status_without_registry_names_the_path(tmp_path: Path, capsys) -> None:
    from tests.conftest import write_config

    cfg = write_config(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(["status", "-c", str(cfg)])
    assert exc.value.code == 1
    assert str(tmp_path / "spool" / "registry.sqlite3") in capsys.readouterr().err


def test_retry_series_and_dead_letters(tmp_path: Path, capsys) -> None:
    from dicom_node.registry import State

    cfg, reg, uids = _node_registry(tmp_path)
    try:
        capsys.readouterr()
        assert cli.main(["retry", "1.2.3.999", "-c", str(cfg)]) == 1
        assert "unknown series UID '1.2.3.999'" in capsys.readouterr().err
        # a series still in progress cannot be re-run
        assert cli.main(["retry", uids["processing"], "-c", str(cfg)]) == 1
        assert "PROCESSING" in capsys.readouterr().err
        assert reg.series(uids["processing"]).state == State.PROCESSING
        for name in ("failed", "quarantined", "delivered"):
            assert cli.main(["retry", uids[name], "-c", str(cfg)]) == 0, name
            assert "re-queued as job" in capsys.readouterr().out
            # the "node's" own connection sees the new state and can claim the job
            assert reg.series(uids[name]).state == State.QUEUED
            job = reg.claim_job()
            assert job is not None and job[1] == uids[name]

        assert reg.dead_outbox_count(uids["dead"]) == 3
        assert cli.main(["retry", "--dead-letter", "1.2.3.999", "-c", str(cfg)]) == 1
        assert cli.main(["retry", "--dead-letter", uids["delivered"], "-c", str(cfg)]) == 0
        assert "no dead-letter outbox items" in capsys.readouterr().out
        assert cli.main(["retry", "--dead-letter", "-c", str(cfg)]) == 0
        assert "3 dead-letter outbox item(s) re-queued" in capsys.readouterr().out
        assert reg.dead_outbox_count() == 0
        assert len([i for i in reg.due_outbox() if i.series_uid == uids["dead"]]) == 3
        assert cli.main(["retry", "-c", str(cfg)]) == 2
    finally:
        reg.close()
