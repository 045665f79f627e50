"""The registrar records received instances' registry rows behind the C-STORE answers:
batched, in order, retried on failure, flushed before a release is answered."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, build_context

from dicom_node.registrar import Registrar, RowResult
from dicom_node.registry import InstanceMovedError, Registry
from tests.conftest import make_mr_file, store_scp


def _row(i: int, series: str = "1.2.3") -> dict[str, Any]:
    return {
        "sop_uid": f"{series}.{i}",
        "series_uid": series,
        "study_uid": "1.2",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
        "path": f"/spool/{i}.dcm",
        "size": 100,
        "sha256": f"{i:064x}",
    }


def test_rows_queued_meanwhile_share_one_transaction_in_order(tmp_path: Path) -> None:
    """While one batch records, rows queue up; the next transaction takes all of them.
    Every row is recorded once, in submission order, and its hook runs after its commit."""
    registry = Registry(tmp_path / "r.sqlite3")
    gate = threading.Event()
    batches: list[int] = []

    def record(rows: list[dict[str, Any]]) -> list[RowResult]:
        batches.append(len(rows))
        gate.wait(10)
        return registry.add_instances(rows)

    seen: list[tuple[str, int]] = []
    registrar = Registrar(record, lambda row, result: seen.append((row["sop_uid"], result[0])))  # type: ignore[index]
    registrar.submit(_row(0))
    deadline = time.monotonic() + 10
    while not batches and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(1, 20):
        registrar.submit(_row(i))
    assert registrar.pending_series("1.2.3.7") == "1.2.3"  # queued: the handler's check sees it
    assert registrar.flush(timeout=0.05) is False  # the first batch is still held
    gate.set()
    assert registrar.flush(timeout=10) is True
    assert batches == [1, 19]
    assert seen == [(f"1.2.3.{i}", i + 1) for i in range(20)]  # the series' count after each
    assert registrar.pending_series("1.2.3.7") is None
    row = registry.series("1.2.3")
    assert row is not None and row.n_instances == 20
    registrar.stop()


def test_a_failing_batch_is_retried_and_a_moved_row_is_reported(tmp_path: Path) -> None:
    """The database fails once: the batch is retried, not dropped. A row whose SOP Instance
    UID is in another series is not recorded; the rows beside it are."""
    registry = Registry(tmp_path / "r.sqlite3")
    registry.add_instance(**_row(5, series="9.9"))  # 9.9.5 belongs to series 9.9
    failures = [RuntimeError("database is locked")]

    def record(rows: list[dict[str, Any]]) -> list[RowResult]:
        if failures:
            raise failures.pop()
        return registry.add_instances(rows)

    results: dict[str, RowResult] = {}
    registrar = Registrar(record, lambda row, result: results.__setitem__(row["sop_uid"], result))
    registrar.retry_s = 0.01
    moved = dict(_row(1), sop_uid="9.9.5")
    for row in (_row(0), moved, _row(2)):
        registrar.submit(row)
    assert registrar.stop(timeout=10) is True
    assert failures == []
    assert isinstance(results["9.9.5"], InstanceMovedError)
    assert results["1.2.3.0"] == (1, None) and results["1.2.3.2"] == (2, None)
    assert registry.instance_paths("9.9") == ["/spool/5.dcm"]  # the old one stays
    assert sorted(registry.instance_paths("1.2.3")) == ["/spool/0.dcm", "/spool/2.dcm"]


def test_scp_refuses_a_uid_queued_for_another_series_and_registers_before_release(
    tmp_path: Path,
) -> None:
    """Over a real association: an instance whose SOP Instance UID is still queued for
    another series (its row not yet recorded) is refused like one already registered; when
    the release is answered, every acknowledged row is in the registry."""
    with store_scp(tmp_path) as rig:
        gate = threading.Event()
        real = rig.scp.registrar._record

        def held(rows: list[dict[str, Any]]) -> list[RowResult]:
            gate.wait(10)
            return real(rows)

        rig.scp.registrar._record = held
        first = make_mr_file(tmp_path / "a.dcm", series_uid="1.2.3.1", instance_number=1)
        uid = str(pydicom.dcmread(first, stop_before_pixels=True).SOPInstanceUID)
        other = make_mr_file(tmp_path / "b.dcm", series_uid="1.2.3.2", sop_uid=uid)
        ae = AE(ae_title="SCANNER")
        ae.requested_contexts = [build_context("1.2.840.10008.5.1.4.1.1.4")]
        assoc = ae.associate("127.0.0.1", rig.port, ae_title="SYNTHMR")
        assert assoc.is_established
        assert assoc.send_c_store(pydicom.dcmread(first)).Status == 0x0000
        assert rig.registry.series("1.2.3.1") is None  # held: not recorded yet
        assert assoc.send_c_store(pydicom.dcmread(other)).Status != 0x0000
        threading.Timer(0.3, gate.set).start()
        assoc.release()  # answered only after the held row is recorded
        row = rig.registry.series("1.2.3.1")
        assert row is not None and row.n_instances == 1
        assert rig.registry.series("1.2.3.2") is None
