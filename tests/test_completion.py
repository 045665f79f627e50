"""completion: full grid at once, quiet period after release, ceiling quarantine."""

from __future__ import annotations

import time
from pathlib import Path

from dicom_node.completion import Completion
from dicom_node.config import CompletionSettings
from dicom_node.metrics import NodeMetrics
from dicom_node.registry import Registry, State

CFG = CompletionSettings(quiet_period_s=5.0, ceiling_s=60.0, poll_interval_s=0.1)


def _setup(tmp_path: Path) -> tuple[Registry, Completion, list[str]]:
    reg = Registry(tmp_path / "r.db")
    done: list[str] = []
    comp = Completion(
        CFG, reg, NodeMetrics(), done.append, missing_cells=lambda s: [f"{s}: slice 1 delay 2"]
    )
    return reg, comp, done


def _add(reg: Registry, series: str, sop: str, expected: int | None) -> tuple[int, int | None]:
    return reg.add_instance(
        sop_uid=sop,
        series_uid=series,
        study_uid="",
        sop_class_uid="1",
        path="/p",
        size=1,
        expected_count=expected,
    )


def test_full_grid_completes_immediately(tmp_path: Path) -> None:
    reg, comp, done = _setup(tmp_path)
    for i in range(3):
        n, exp = _add(reg, "1.1", f"1.1.{i}", 4)
        comp.instance_stored("1.1", n, exp)
    assert done == [] and reg.series("1.1").state == State.RECEIVING
    n, exp = _add(reg, "1.1", "1.1.3", 4)
    comp.instance_stored("1.1", n, exp)
    assert done == ["1.1"] and reg.series("1.1").state == State.COMPLETE


def test_quiet_period_only_after_release(tmp_path: Path) -> None:
    reg, comp, done = _setup(tmp_path)
    _add(reg, "1.2", "1.2.1", None)
    now = time.time()
    comp.check(now + 30)  # long quiet but association never released
    assert done == []
    reg.mark_released(["1.2"])
    comp.check(time.time() + 1)  # released, quiet period not over
    assert done == []
    comp.check(time.time() + 5.5)
    assert done == ["1.2"]


def test_partial_known_grid_waits_then_quarantines(tmp_path: Path) -> None:
    reg, comp, done = _setup(tmp_path)
    _add(reg, "1.3", "1.3.1", 16)
    reg.mark_released(["1.3"])
    comp.check(time.time() + 30)  # quiet but grid known and partial: keep waiting
    assert reg.series("1.3").state == State.RECEIVING
    comp.check(time.time() + 61)
    row = reg.series("1.3")
    assert done == [] and row.state == State.QUARANTINED
    assert "1 of 16 instances" in row.reason and row.missing == ["1.3: slice 1 delay 2"]


def test_ceiling_with_unknown_count_hands_to_processing(tmp_path: Path) -> None:
    reg, comp, done = _setup(tmp_path)
    _add(reg, "1.4", "1.4.1", None)
    comp.check(time.time() + 61)
    assert done == ["1.4"] and "ceiling" in reg.series("1.4").reason
