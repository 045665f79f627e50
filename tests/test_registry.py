"""registry: series life, one transaction per change, recovery, outbox, WAL durability."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from dicom_node.registry import IllegalTransition, Registry, State


def _add(
    reg: Registry, series: str, sop: str, expected: int | None = None, **more: Any
) -> tuple[int, int | None]:
    return reg.add_instance(
        sop_uid=sop,
        series_uid=series,
        study_uid="9",
        sop_class_uid="1.2",
        path=f"/x/{sop}",
        size=10,
        expected_count=expected,
        **more,
    )


def test_pragmas_and_schema(tmp_path: Path) -> None:
    Registry(tmp_path / "r.db").close()
    db = sqlite3.connect(tmp_path / "r.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"instances", "series", "jobs", "outbox"} <= tables


def test_full_life_and_hook(tmp_path: Path) -> None:
    seen: list[tuple[str | None, str]] = []
    reg = Registry(tmp_path / "r.db", on_transition=lambda s, o, n, dt: seen.append((o, n)))
    assert _add(reg, "1.1", "1.1.1", expected=2) == (1, 2)
    assert _add(reg, "1.1", "1.1.1") == (1, 2)  # re-sent instance replaces, not counted twice
    assert _add(reg, "1.1", "1.1.2") == (2, 2)
    reg.transition("1.1", State.COMPLETE, expect={State.RECEIVING})
    job = reg.enqueue("1.1")
    assert reg.claim_job()[:2] == (job, "1.1")
    assert reg.claim_job() is None
    reg.finish_job(
        job,
        "1.1",
        State.EXPORTED,
        outbox=[("pacs", "2.1", "1.2", "/o/2.1"), ("pacs", "2.2", "1.2", "/o/2.2")],
    )
    due = reg.due_outbox()
    assert [d.sop_uid for d in due] == ["2.1", "2.2"]
    assert reg.outbox_sent([due[0].id]) == []  # one left
    assert reg.outbox_sent([due[1].id]) == ["1.1"]
    assert reg.series("1.1").state == State.DELIVERED
    assert [n for _, n in seen] == [
        "RECEIVING",
        "COMPLETE",
        "QUEUED",
        "PROCESSING",
        "EXPORTED",
        "DELIVERED",
    ]
    assert reg.transitions_of("1.1")[-1] == ("EXPORTED", "DELIVERED")


def test_illegal_transition_changes_nothing(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    _add(reg, "1.1", "1.1.1")
    with pytest.raises(IllegalTransition, match="RECEIVING -> DELIVERED"):
        reg.transition("1.1", State.DELIVERED)
    assert reg.series("1.1").state == State.RECEIVING
    assert len(reg.transitions_of("1.1")) == 1


def test_recovery_requeues_processing_and_keeps_outbox(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    for s in ("1.1", "1.2"):
        _add(reg, s, s + ".1")
        reg.transition(s, State.COMPLETE)
        reg.enqueue(s)
    j1, _, _ = reg.claim_job()
    reg.finish_job(j1, "1.1", State.EXPORTED, outbox=[("pacs", "9.9", "1.2", "/o/9.9")])
    reg.claim_job()  # 1.2 PROCESSING when the "crash" happens
    _add(reg, "1.3", "1.3.1")
    reg.transition("1.3", State.COMPLETE)  # completed, never queued
    reg.close()
    reg2 = Registry(tmp_path / "r.db")  # restart
    info = reg2.recover()
    assert info == {"jobs_requeued": 1, "complete_enqueued": 1, "outbox_pending": 1}
    assert reg2.series("1.2").state == State.QUEUED
    assert reg2.series("1.3").state == State.QUEUED
    claimed = {reg2.claim_job()[1], reg2.claim_job()[1]}
    assert claimed == {"1.2", "1.3"}


def test_outbox_backoff_and_dead_letter(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    _add(reg, "1.1", "1.1.1")
    reg.transition("1.1", State.COMPLETE)
    j = reg.enqueue("1.1")
    reg.claim_job()
    reg.finish_job(j, "1.1", State.EXPORTED, outbox=[("pacs", "2.1", "1.2", "/o")])
    (item,) = reg.due_outbox()
    assert reg.outbox_failed([item.id], "down", next_attempt_at=1e18, max_attempts=2) == []
    assert reg.due_outbox() == []  # not due before its backoff
    assert reg.outbox_failed([item.id], "down", next_attempt_at=0, max_attempts=2) == [item.id]
    assert reg.outbox_counts()["DEAD"] == 1
    assert reg.requeue_dead_outbox("1.1") == 1
    assert [d.id for d in reg.due_outbox()] == [item.id]


def test_retry_failed_and_late_instance_reopens(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    _add(reg, "1.1", "1.1.1")
    reg.transition("1.1", State.COMPLETE)
    j = reg.enqueue("1.1")
    reg.claim_job()
    reg.finish_job(j, "1.1", State.FAILED, reason="process: boom")
    row = reg.series("1.1")
    assert row.state == State.FAILED and row.reason == "process: boom"
    reg.retry("1.1")
    assert reg.series("1.1").state == State.QUEUED
    with pytest.raises(IllegalTransition):
        reg.retry("1.1")
    _add(reg, "1.2", "1.2.1")
    reg.transition("1.2", State.QUARANTINED, missing=["slice 2 delay 3"])
    assert reg.series("1.2").missing == ["slice 2 delay 3"]
    _add(reg, "1.2", "1.2.2")  # the missing image arrives late
    assert reg.series("1.2").state == State.RECEIVING


def test_retry_series_entry_point(tmp_path: Path) -> None:
    from dicom_node.config import load_settings
    from dicom_node.service import retry_series
    from tests.conftest import write_config

    settings = load_settings(write_config(tmp_path), env={})
    reg = Registry(Path(settings.spool.path) / "registry.sqlite3")
    _add(reg, "1.5", "1.5.1")
    reg.transition("1.5", State.COMPLETE)
    j = reg.enqueue("1.5")
    reg.claim_job()
    reg.finish_job(j, "1.5", State.FAILED, reason="export: boom")
    job = retry_series(settings, "1.5")  # a second process, as the CLI would be
    assert job > j
    assert reg.series("1.5").state == State.QUEUED
    assert reg.claim_job()[:2] == (job, "1.5")


def _sop(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_spooled_file_without_a_row_is_registered_at_start(tmp_path: Path) -> None:
    """Instance rows commit without their own fsync (the file is the durable record): a row
    lost with the machine is re-created from the spooled file when the node starts."""
    from dicom_node.scp import register_spooled
    from dicom_node.spool import Spool
    from tests.conftest import make_mr_file

    sp = Spool(tmp_path / "spool")
    reg = Registry(tmp_path / "spool" / "registry.sqlite3")
    paths = []
    for i in range(3):
        f = make_mr_file(tmp_path / f"{i}.dcm", series_uid="1.2.3", instance_number=i)
        paths.append(sp.store_received(f.read_bytes())[1])
    # the first file's row was committed and survived; the power loss took the others
    reg.add_instance(
        sop_uid=_sop(paths[0]),
        series_uid="1.2.3",
        study_uid="9",
        sop_class_uid="1.2",
        path=str(paths[0]),
        size=paths[0].stat().st_size,
    )
    assert register_spooled(sp, reg) == 2
    assert register_spooled(sp, reg) == 0  # idempotent
    assert sorted(reg.instance_paths("1.2.3")) == sorted(str(p) for p in paths)
    assert reg.series("1.2.3").state == State.RECEIVING
    reg.close()


@pytest.mark.parametrize("sent_before_finish", [2, 1])
def test_streamed_outputs_deliver_whichever_ends_last(
    tmp_path: Path, sent_before_finish: int
) -> None:
    """Outputs queued while the job runs (add_outbox) may be pushed before the job ends:
    the series stays PROCESSING meanwhile and is DELIVERED when both the job has ended and
    every row is sent, in either order."""
    reg = Registry(tmp_path / "r.db")
    _add(reg, "1.1", "1.1.1")
    reg.transition("1.1", State.COMPLETE)
    j = reg.enqueue("1.1")
    reg.claim_job()
    reg.add_outbox("1.1", [("pacs", "2.1", "1.2", "/o/1"), ("pacs", "2.2", "1.2", "/o/2")])
    ids = [i.id for i in reg.due_outbox()]
    assert len(ids) == 2
    assert reg.outbox_sent(ids[:sent_before_finish]) == []
    assert reg.series("1.1").state == State.PROCESSING
    reg.finish_job(j, "1.1", State.EXPORTED, "2 instances exported")
    if sent_before_finish == 2:
        assert reg.series("1.1").state == State.DELIVERED
    else:
        assert reg.series("1.1").state == State.EXPORTED
        assert reg.outbox_sent(ids[1:]) == ["1.1"]
        assert reg.series("1.1").state == State.DELIVERED
    states = [t[1] for t in reg.transitions_of("1.1")]
    assert states[-2:] == ["EXPORTED", "DELIVERED"]
    reg.close()


def test_a_re_send_is_compared_with_the_digest_of_the_file_it_replaced(tmp_path: Path) -> None:
    """The receive path hashes re-sent instances only: a new instance's row keeps an
    empty digest; an identical re-send (its replaced file hashing the same) changes
    nothing, a changed one re-opens the series and its digest is kept from then on."""
    reg = Registry(tmp_path / "r.sqlite3")

    def add(sha: str, replaced: str | None) -> None:
        _add(reg, "1.2.3", "1.2.3.4", sha256=sha, replaced_sha256=replaced)

    def stored() -> str:
        return (
            sqlite3.connect(tmp_path / "r.sqlite3")
            .execute("SELECT sha256 FROM instances")
            .fetchone()[0]
        )

    add("", None)  # new: not hashed
    assert stored() == ""
    reg.transition("1.2.3", State.COMPLETE)
    add("sha-v1", "sha-v1")  # identical re-send
    assert reg.series("1.2.3").state == State.COMPLETE and reg.series("1.2.3").revision == 0
    add("sha-v2", "sha-v1")  # a corrected one
    assert reg.series("1.2.3").state == State.RECEIVING and reg.series("1.2.3").revision == 1
    assert stored() == "sha-v2"
    reg.transition("1.2.3", State.COMPLETE)
    add("sha-v2", "something else")  # the row's digest counts first
    assert reg.series("1.2.3").state == State.COMPLETE
    reg.close()


def test_digests_left_empty_by_the_answers_are_filled_after_the_job(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.sqlite3")
    for sop, sha in (("1.1", ""), ("1.2", "kept"), ("1.3", "")):
        _add(reg, "1.2.3", sop, sha256=sha)

    def digest_of(path: str) -> str:
        if path == "/x/1.3":
            raise FileNotFoundError(path)  # removed meanwhile: skipped
        return f"sha of {path}"

    assert reg.fill_digests("1.2.3", digest_of) == 1
    rows = sqlite3.connect(tmp_path / "r.sqlite3").execute(
        "SELECT sop_uid, sha256 FROM instances ORDER BY sop_uid"
    )
    assert list(rows) == [("1.1", "sha of /x/1.1"), ("1.2", "kept"), ("1.3", "")]
    reg.close()


def _rows_on_disk(path: Path) -> list[tuple[str, str]]:
    """(SOP Instance UID, series) of the instance rows committed, read by another
    connection (what a restarted node or `synthmr status` sees)."""
    db = sqlite3.connect(path)
    try:
        return sorted(db.execute("SELECT sop_uid, series_uid FROM instances").fetchall())
    finally:
        db.close()


def test_answered_rows_are_written_in_batches_and_seen_by_every_reader(tmp_path: Path) -> None:
    """After a series' first instance, the next instances of a RECEIVING series are
    answered without a transaction each: the counts and the expected count are what one
    transaction per instance gave, and every reader of the registry (paths, series row)
    and the database itself (shortly after, or at close) has every answered row."""
    reg = Registry(tmp_path / "r.db")
    reg.FAST_ROWS_DELAY_S = 0.2
    answers = [_add(reg, "1.1", f"1.1.{i}", expected=5 if i == 2 else None) for i in range(1, 5)]
    # the first instance had no expected count; the second brought it (kept, as COALESCE)
    assert answers == [(1, None), (2, 5), (3, 5), (4, 5)]
    assert len(reg._pending_rows) == 3  # the fast path answered them
    assert _rows_on_disk(tmp_path / "r.db") == [("1.1.1", "1.1")]
    assert len(reg.instance_paths("1.1")) == 4  # a reader writes them first
    assert len(_rows_on_disk(tmp_path / "r.db")) == 4 and not reg._pending_rows
    row = reg.series("1.1")
    assert row is not None and row.expected_count == 5
    # a reader took the lock: the series is learnt again by one full transaction
    assert _add(reg, "1.1", "1.1.5") == (5, 5)
    assert len(_rows_on_disk(tmp_path / "r.db")) == 5
    # then the background writer, with nobody reading
    assert _add(reg, "1.1", "1.1.6") == (6, 5)
    assert len(_rows_on_disk(tmp_path / "r.db")) == 5
    deadline = time.monotonic() + 10
    while len(_rows_on_disk(tmp_path / "r.db")) < 6:
        assert time.monotonic() < deadline, "the pending row was never written"
        time.sleep(0.02)
    assert _add(reg, "1.1", "1.1.7") == (7, 5)
    assert len(reg._pending_rows) == 1
    reg.flush()
    assert len(_rows_on_disk(tmp_path / "r.db")) == 7 and not reg._pending_rows
    assert _add(reg, "1.1", "1.1.8") == (8, 5)  # still answered fast: flush forgets nothing
    assert len(reg._pending_rows) == 1
    reg.close()  # writes what is pending
    assert len(_rows_on_disk(tmp_path / "r.db")) == 8


def test_a_pending_instance_keeps_its_series_and_a_re_send_changes_nothing(
    tmp_path: Path,
) -> None:
    """A SOP Instance UID answered on the fast path and not yet written is still refused in
    another series (nothing recorded), and its re-send with the same content is no new
    instance: the same answers as with one transaction per instance."""
    from dicom_node.registry import InstanceMovedError

    reg = Registry(tmp_path / "r.db")
    reg.FAST_ROWS_DELAY_S = 60.0
    _add(reg, "1.1", "1.1.1", sha256="a")
    assert _add(reg, "1.1", "1.1.2", sha256="b") == (2, None)
    assert reg._pending_sops == {"1.1.2": "1.1"}
    with pytest.raises(InstanceMovedError, match=r"1\.1\.2"):
        _add(reg, "2.2", "1.1.2", sha256="b")
    assert reg.series("2.2") is None
    assert _add(reg, "1.1", "1.1.2", sha256="b") == (2, None)  # same content again
    assert _add(reg, "1.1", "1.1.3", sha256="c") == (3, None)
    reg.close()
    assert _rows_on_disk(tmp_path / "r.db") == [
        ("1.1.1", "1.1"),
        ("1.1.2", "1.1"),
        ("1.1.3", "1.1"),
    ]


def test_a_state_change_writes_pending_rows_and_the_next_instance_reopens(tmp_path: Path) -> None:
    """The completion takes the lock like any other writer: the rows answered before it
    are in the series it completes, and an instance after it re-opens the series (the
    full path) instead of counting on as if it were still receiving."""
    seen: list[tuple[str | None, str]] = []
    reg = Registry(tmp_path / "r.db", on_transition=lambda s, o, n, dt: seen.append((o, n)))
    reg.FAST_ROWS_DELAY_S = 60.0
    for i in range(1, 4):
        _add(reg, "1.1", f"1.1.{i}")
    assert reg._pending_rows
    reg.transition("1.1", State.COMPLETE)
    assert not reg._pending_rows and len(reg.instance_paths("1.1")) == 3
    assert _add(reg, "1.1", "1.1.4") == (4, None)  # re-opened: a revision, no immediate count
    row = reg.series("1.1")
    assert row is not None and row.state == State.RECEIVING and row.revision == 1
    assert seen[-1] == (State.COMPLETE, State.RECEIVING)
    reg.close()


def test_a_series_changed_by_another_process_is_learnt_again(tmp_path: Path) -> None:
    """What the fast path knows of a series is at most FAST_SERIES_TTL_S old: a series
    completed by another process (the command line) is re-opened by the node's next
    instance, as with one transaction per instance."""
    node = Registry(tmp_path / "r.db")
    node.FAST_SERIES_TTL_S = 0.1
    assert _add(node, "1.1", "1.1.1") == (1, None)
    other = Registry(tmp_path / "r.db")
    other.transition("1.1", State.COMPLETE)
    other.close()
    time.sleep(0.2)
    assert _add(node, "1.1", "1.1.2") == (2, None)
    row = node.series("1.1")
    assert row is not None and row.state == State.RECEIVING and row.revision == 1
    node.close()


def test_parallel_senders_and_readers_count_every_instance_once(tmp_path: Path) -> None:
    """4 threads store into their own series and one shared series while another thread
    reads (paths, series rows) and the background writer runs: every answer's count is
    distinct and they are 1..n per series, and the database holds exactly the rows
    answered."""
    import threading

    reg = Registry(tmp_path / "r.db")
    reg.FAST_ROWS_DELAY_S = 0.005
    fast = [0]
    answer_fast = reg._answer_fast

    def counted(*args: Any) -> tuple[int, int | None] | None:
        answer = answer_fast(*args)
        fast[0] += answer is not None
        return answer

    reg._answer_fast = counted  # type: ignore[method-assign]
    answers: dict[str, list[int]] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def sender(k: int) -> None:
        for i in range(150):
            for series in (f"1.{k}", "9.9"):
                n, _ = _add(reg, series, f"{series}.{k}.{i}")
                with lock:
                    answers.setdefault(series, []).append(n)

    def reader() -> None:
        while not stop.is_set():
            for series in ("1.0", "9.9"):
                reg.instance_paths(series)
                reg.series(series)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(4)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    reg.close()
    assert sorted(answers["9.9"]) == list(range(1, 601))
    for k in range(4):
        assert sorted(answers[f"1.{k}"]) == list(range(1, 151))
    on_disk = _rows_on_disk(tmp_path / "r.db")
    assert len(on_disk) == 1200 and len({sop for sop, _ in on_disk}) == 1200
    assert fast[0] > 100, fast  # the fast path answered many, between the readers
