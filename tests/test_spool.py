"""spool: durable atomic writes, sanitized names, watermark, unreadable data not kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicom_node.spool import Spool, SpoolFullError, UnreadableDatasetError, read_header, safe_name
from tests.conftest import make_mr_file


def test_store_received_roundtrip(tmp_path: Path) -> None:
    f = make_mr_file(tmp_path / "in.dcm", series_uid="1.2.3", sop_uid="1.2.3.4")
    sp = Spool(tmp_path / "spool")
    header, path = sp.store_received(f.read_bytes())
    assert header.series_instance_uid == "1.2.3" and header.sop_instance_uid == "1.2.3.4"
    assert path == (tmp_path / "spool" / "incoming" / "1.2.3" / "1.2.3.4.dcm").resolve()
    assert path.read_bytes() == f.read_bytes()
    assert list(sp.tmp.iterdir()) == []  # temp file renamed away


def test_garbage_is_rejected_and_not_kept(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    with pytest.raises(UnreadableDatasetError, match=r"cannot parse dataset|dataset has no"):
        sp.store_received(b"\x00" * 128 + b"DICM" + b"\xff" * 300)
    assert list(sp.incoming.rglob("*.dcm")) == [] and list(sp.tmp.iterdir()) == []


def test_missing_series_uid_is_named(tmp_path: Path) -> None:
    f = make_mr_file(tmp_path / "in.dcm")
    import pydicom

    ds = pydicom.dcmread(f)
    del ds.SeriesInstanceUID
    ds.save_as(f, enforce_file_format=True)
    with pytest.raises(UnreadableDatasetError, match="SeriesInstanceUID"):
        read_header(f.read_bytes())


def test_watermark_refuses(tmp_path: Path) -> None:
    f = make_mr_file(tmp_path / "in.dcm")
    sp = Spool(tmp_path / "spool", min_free_bytes=1 << 62)
    assert not sp.above_watermark()
    with pytest.raises(SpoolFullError, match="watermark"):
        sp.store_received(f.read_bytes())
    assert list(sp.incoming.rglob("*")) == []


def test_store_outputs_writes_every_instance_durably_in_place(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    items = [(f"1.2.3.{i}", bytes([i]) * (100 + i)) for i in range(5)]
    paths = sp.store_outputs("1.2.9", iter(items))
    assert [p.name for p in paths] == [f"1.2.3.{i}.dcm" for i in range(5)]
    assert all(p.parent == (tmp_path / "spool" / "outbox" / "1.2.9").resolve() for p in paths)
    assert [p.read_bytes() for p in paths] == [d for _, d in items]
    assert list(sp.tmp.iterdir()) == []
    assert sp.store_outputs("1.2.9", []) == []


def test_store_outputs_are_durable_before_it_returns(tmp_path: Path, monkeypatch) -> None:
    """One syncfs of the spool's file system once every file is in place (or, where
    syncfs does not exist, an fsync per file), then the directory's fsync."""
    import os

    from dicom_node import journal as journal_module

    sp = Spool(tmp_path / "spool")
    items = [(f"1.2.3.{i}", bytes([i]) * 100) for i in range(5)]
    out_dir = sp.outbox / "1.2.9"
    calls: list[tuple[str, int]] = []

    def syncfs(fd: int) -> int:  # the real one, recording what was on disk by then
        calls.append(("syncfs", len(list(out_dir.glob("*.dcm")))))
        return real_syncfs(fd) if real_syncfs is not None else 0

    real_syncfs = journal_module._SYNCFS
    real_fsync = os.fsync
    monkeypatch.setattr(journal_module, "_SYNCFS", syncfs)
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", fd)) or real_fsync(fd))
    sp.store_outputs("1.2.9", iter(items))
    assert calls[0] == ("syncfs", 5)  # after every file is in place, before any fsync
    assert [c for c, _ in calls[1:]] == ["fsync", "fsync"]  # the series dir, the outbox
    calls.clear()
    monkeypatch.setattr(journal_module, "_SYNCFS", None)  # no syncfs: each file, then the dir
    sp.store_outputs("1.2.10", iter(items))
    assert [c for c, _ in calls] == ["fsync"] * (5 + 2)


def test_store_outputs_refuses_below_the_watermark(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool", min_free_bytes=1 << 62)
    with pytest.raises(SpoolFullError, match="watermark"):
        sp.store_outputs("1.2.9", [("1.2.3.1", b"x" * 10)])
    assert list(sp.outbox.rglob("*.dcm")) == [] and list(sp.tmp.iterdir()) == []


def test_clean_tmp_removes_half_written(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    (sp.tmp / "abc.part").write_bytes(b"half")
    assert sp.clean_tmp() == 1
    assert list(sp.tmp.iterdir()) == []


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=80))
def test_safe_name_never_escapes(uid: str) -> None:
    name = safe_name(uid)
    assert name and "/" not in name and "\x00" not in name and name not in (".", "..")
    assert len(name) <= 64


def test_hostile_uid_stays_inside(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    p = sp.instance_path("incoming", "../../etc", "../../../passwd")
    assert sp.root in p.parents
    assert safe_name("1.2.840.10008") == "1.2.840.10008"


def test_journal_group_commit_covers_every_answer_with_fewer_syncs(
    tmp_path: Path, monkeypatch
) -> None:
    """8 threads x 20 instances: every store_received returns only after an fdatasync of
    the ingest journal that began with its record in the log (checked by reading, per
    sync, which records the log held when it started), and the syncs are shared (< 160)."""
    import os
    import threading
    import time

    from dicom_node import journal as journal_mod

    sp = Spool(tmp_path / "spool")
    sp.journal.idle_checkpoint_s = 1e9  # no checkpoint: the log keeps every record
    data = [
        make_mr_file(
            tmp_path / "src" / f"{t}_{i}.dcm", series_uid="1.2.3", instance_number=i
        ).read_bytes()
        for t in range(8)
        for i in range(20)
    ]
    synced: set[str] = set()
    lock = threading.Lock()
    real = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        logs = [p for _, p in sp.journal._logs()]
        logged = {Path(name).name for p in logs for _, name, _ in sp.journal.records(p)}
        time.sleep(0.002)  # a slow disk: writers pile up behind the running sync
        real(fd)
        with lock:
            synced.update(logged)

    monkeypatch.setattr(journal_mod.os, "fdatasync", recording_fdatasync)
    errors: list[str] = []

    def writer(chunk: list[bytes]) -> None:
        for d in chunk:
            _, path = sp.store_received(d)
            with lock:
                if path.name not in synced:
                    errors.append(path.name)

    threads = [
        threading.Thread(target=writer, args=(data[t * 20 : (t + 1) * 20],)) for t in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list(sp.incoming.rglob("*.dcm"))) == 160
    assert sp.journal.syncs < 160, sp.journal.syncs


def _assert_only_an_empty_spare(sp: Spool) -> None:
    """Every log was replayed and dropped; what is left is the next log, created ahead of
    need and empty."""
    assert [(p.name, p.stat().st_size) for p in sp.journal.dir.iterdir()] == [
        (sp.journal._path(sp.journal._seq).name, 0)
    ]


def test_first_append_of_a_burst_goes_into_a_log_prepared_ahead(tmp_path: Path) -> None:
    """The log an append goes into is created (and its directory entry synced) ahead of
    need: at opening and after each checkpoint, not while the first instance of a burst
    and every concurrent answer behind it wait. A spare whose number is no longer the
    highest handed out is not used: its records would replay before older ones."""
    sp = Spool(tmp_path / "spool")
    sp.journal.idle_checkpoint_s = 1e9
    (spare,) = list(sp.journal.dir.iterdir())
    assert spare.stat().st_size == 0
    created: list[int] = []
    real_create = sp.journal._create

    def counting_create(seq: int) -> int:
        created.append(seq)
        return real_create(seq)

    sp.journal._create = counting_create  # type: ignore[method-assign]
    f = [
        make_mr_file(tmp_path / "src" / f"{i}.dcm", series_uid="1.2.3", instance_number=i)
        for i in range(3)
    ]
    sp.store_received(f[0].read_bytes())
    assert created == []  # the burst's first append took the spare
    assert spare.stat().st_size > f[0].stat().st_size
    sp.journal.checkpoint()
    assert not spare.exists()
    assert created == [sp.journal._seq]  # the next one, made by the checkpoint
    (next_spare,) = list(sp.journal.dir.iterdir())
    assert next_spare.stat().st_size == 0
    sp.journal._seq += 1  # a later number handed out meanwhile (e.g. a race)
    sp.store_received(f[1].read_bytes())
    assert not next_spare.exists()  # dropped, not appended to out of order
    (current,) = list(sp.journal.dir.iterdir())
    assert sp.journal._path(sp.journal._seq) == current
    sp.close()
    assert list(sp.journal.dir.iterdir()) == []  # a clean stop leaves no log, not even empty


def test_a_checkpoint_meanwhile_does_not_delete_the_log_being_prepared(tmp_path: Path) -> None:
    """A checkpoint in another thread while the next log is being created ahead of need
    (after the file exists, before it is recorded as the spare): the checkpoint must not
    take it for an old log and delete it, or the next appends would go into a deleted
    file that no replay reads."""
    import threading

    sp = Spool(tmp_path / "spool")
    sp.journal.idle_checkpoint_s = 1e9
    sp.store_received(make_mr_file(tmp_path / "a.dcm").read_bytes())  # the spare is in use
    real_create = sp.journal._create
    checkpointer: list[threading.Thread] = []

    def create_then_race(seq: int) -> int:
        fd = real_create(seq)
        t = threading.Thread(target=sp.journal.checkpoint, kwargs={"prepare": False})
        t.start()
        checkpointer.append(t)
        t.join(0.3)  # with the fix it waits for this creation to be recorded
        return fd

    sp.journal._create = create_then_race  # type: ignore[method-assign]
    sp.journal._drop_spare()
    sp.journal.prepare_log()
    checkpointer[0].join(10)
    assert sp.journal._spare is not None
    assert sp.journal._path(sp.journal._spare[0]).exists()
    sp.journal._create = real_create  # type: ignore[method-assign]
    _, path = sp.store_received(make_mr_file(tmp_path / "b.dcm", instance_number=2).read_bytes())
    logged = [name for _, p in sp.journal._logs() for _, name, _ in sp.journal.records(p)]
    assert str(path.relative_to(sp.root)) in logged


def test_journal_replay_restores_acknowledged_files_lost_with_the_page_cache(
    tmp_path: Path,
) -> None:
    """A power loss before the checkpoint: stored files missing or cut short, a torn record
    at the log's end (the append that was never answered). Opening the spool rewrites every
    answered instance bit for bit, leaves out the torn and the discarded one, and drops the
    log once the files are durable."""
    root = tmp_path / "spool"
    sp = Spool(root)
    sp.journal.idle_checkpoint_s = 1e9
    files = [
        make_mr_file(tmp_path / "src" / f"{i}.dcm", series_uid="1.2.3", instance_number=i)
        for i in range(6)
    ]
    stored = [sp.store_received(f.read_bytes())[1] for f in files]
    sp.discard_received(stored[5])  # e.g. its SOP Instance UID belonged to another series
    (log_path,) = [p for _, p in sp.journal._logs()]
    for p in stored[:3]:
        p.unlink()  # the page cache never reached the disk
    stored[3].write_bytes(stored[3].read_bytes()[:100])
    with open(log_path, "ab") as f:  # the last append, torn by the crash
        torn = make_mr_file(tmp_path / "src" / "torn.dcm", series_uid="1.2.3", instance_number=9)
        f.write(b"SMRJW" + torn.read_bytes()[:300])
    reopened = Spool(root)
    assert reopened.replayed == 4
    for f, p in zip(files[:5], stored[:5], strict=True):
        assert p.read_bytes() == f.read_bytes()
    assert not stored[5].exists()
    assert len(list(reopened.incoming.rglob("*.dcm"))) == 5
    _assert_only_an_empty_spare(reopened)


def test_journals_of_acceptor_processes_are_their_own_and_all_replayed(tmp_path: Path) -> None:
    """Two processes storing into one spool (dicom_node.acceptors): a checkpoint of one
    leaves the other's log alone; the node's replay at start-up restores from both."""
    root = tmp_path / "spool"
    node = Spool(root)
    helper = Spool(root, journal_owner="p1.", replay=False)
    for sp in (node, helper):
        sp.journal.idle_checkpoint_s = 1e9
    files = [
        make_mr_file(tmp_path / "src" / f"{i}.dcm", series_uid="1.2.3", instance_number=i)
        for i in range(4)
    ]
    stored = [
        sp.store_received(f.read_bytes())[1]
        for sp, f in zip([node, helper] * 2, files, strict=True)
    ]
    (helper_log,) = [p for _, p in helper.journal._logs()]
    assert helper_log.name == "ingest-p1.00000001.log"
    assert [p for _, p in node.journal._logs()] != [helper_log]
    node.journal.checkpoint()
    assert helper_log.exists()  # still the helper's: its appends go on
    helper.store_received(files[3].read_bytes())  # a re-send, after the node's checkpoint
    for p in stored:
        p.unlink()  # a power loss: no file reached the disk
    reopened = Spool(root)
    assert reopened.replayed == 2  # the helper's two; the node's were checkpointed
    assert sorted(p.name for p in reopened.incoming.rglob("*.dcm")) == sorted(
        p.name for p in stored[1::2]
    )
    _assert_only_an_empty_spare(reopened)


def test_logs_of_the_first_layout_are_still_replayed(tmp_path: Path) -> None:
    """A log written before records carried a time (magic SMRJ) is replayed in log order."""
    import struct
    import zlib

    root = tmp_path / "spool"
    Spool(root).close()
    files = [
        make_mr_file(tmp_path / n, series_uid="1.2.3", sop_uid="1.2.3.4", description=n)
        for n in ("old", "new")
    ]
    name = b"incoming/x/1.dcm"
    with open(root / "journal" / "ingest-00000007.log", "wb") as log:
        for f in files:
            data = f.read_bytes()
            crc = zlib.crc32(data, zlib.crc32(name))
            log.write(struct.pack("<4scHQI", b"SMRJ", b"W", len(name), len(data), crc))
            log.write(name + data)
    reopened = Spool(root)
    assert reopened.replayed == 1
    assert (root / name.decode()).read_bytes() == files[1].read_bytes()


@pytest.mark.parametrize("file_lost", [False, True], ids=["kill-9", "power-loss"])
def test_replay_keeps_the_newer_version_another_process_wrote(
    tmp_path: Path, file_lost: bool
) -> None:
    """A corrected instance (same UIDs, other content) re-sent moments after the first
    version, each version received by another process (dicom_node.acceptors): the logs
    are replayed process by process, not in time order, so the helper's older version
    comes after the node's newer one. After a kill -9 the spool file holds the newer
    version (renamed last): the replay leaves it so (the answer of either was a success).
    After a power loss that took the file, the records' times make the newer version win."""
    root = tmp_path / "spool"
    node = Spool(root)
    helper = Spool(root, journal_owner="p1.", replay=False)
    for sp in (node, helper):
        sp.journal.idle_checkpoint_s = 1e9
    first, corrected = (
        make_mr_file(tmp_path / name, series_uid="1.2.3", sop_uid="1.2.3.4", description=name)
        for name in ("first", "corrected")
    )
    _, path = helper.store_received(first.read_bytes())  # the first version: a helper
    assert node.store_received(corrected.read_bytes())[1] == path  # then the node
    if file_lost:
        path.unlink()  # the rename never reached the disk
    reopened = Spool(root)  # both processes gone: the node starts again
    assert path.read_bytes() == corrected.read_bytes()
    assert reopened.replayed == int(file_lost)


def test_journal_checkpoints_when_idle(tmp_path: Path) -> None:
    """After a burst the log is checkpointed (files synced, log deleted) by itself."""
    import time

    sp = Spool(tmp_path / "spool")
    sp.journal.idle_checkpoint_s = 0.2
    f = make_mr_file(tmp_path / "in.dcm")
    sp.store_received(f.read_bytes())
    (first_log,) = sp.journal.dir.glob("*.log")
    assert first_log.stat().st_size > 0
    deadline = time.time() + 10
    while first_log.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert not first_log.exists()
    assert sp.journal.checkpoints >= 1
    # what is left is the next log, prepared ahead of the next burst, empty
    assert [p.stat().st_size for p in sp.journal.dir.glob("*.log")] == [0]
    sp.journal.idle_checkpoint_s = 3600.0  # so a slow machine cannot checkpoint it first
    sp.store_received(f.read_bytes())  # a new burst opens a new log
    assert len(list(sp.journal.dir.glob("*.log"))) == 1
    sp.close()
    assert list(sp.journal.dir.glob("*.log")) == []


def test_reserve_is_allocated_with_room_and_freed_on_demand(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert not spool.reserve.exists()
    assert spool.ensure_reserve() is True
    assert spool.reserve.stat().st_blocks * 512 >= Spool.RESERVE_BYTES  # really allocated
    assert spool.ensure_reserve() is True  # idempotent
    assert spool.release_reserve() == Spool.RESERVE_BYTES
    assert not spool.reserve.exists()
    assert spool.release_reserve() == 0


# -- write-behind: received files written after the burst, durable in the journal meanwhile
def _held_spool(root: Path, cap: int = 1 << 30) -> Spool:
    sp = Spool(root, write_behind_bytes=cap)
    sp.write_behind_idle_s = 3600.0  # only readers, checkpoints and close write them here
    sp.journal.idle_checkpoint_s = 1e9
    return sp


def _series_files(tmp_path: Path, n: int, series: str = "1.2.3") -> list[Path]:
    return [
        make_mr_file(tmp_path / "src" / series / f"{i}.dcm", series_uid=series, instance_number=i)
        for i in range(n)
    ]


def test_write_behind_files_appear_when_their_series_is_read(tmp_path: Path) -> None:
    """Answered instances are not in their files yet; reading the series (what
    Registry.instance_paths does first) writes its files, bit for bit, and only its own."""
    sp = _held_spool(tmp_path / "spool")
    a, b = _series_files(tmp_path, 3, "1.2.3"), _series_files(tmp_path, 2, "1.2.4")
    paths_a = [sp.store_received(f.read_bytes())[1] for f in a]
    paths_b = [sp.store_received(f.read_bytes())[1] for f in b]
    assert not any(p.exists() for p in paths_a + paths_b)
    assert sp.held_bytes == sum(f.stat().st_size for f in a + b)
    assert sp.write_pending("1.2.3") == 3
    assert [p.read_bytes() for p in paths_a] == [f.read_bytes() for f in a]
    assert not any(p.exists() for p in paths_b)
    sp.close()  # a clean stop writes the rest
    assert [p.read_bytes() for p in paths_b] == [f.read_bytes() for f in b]
    assert list(sp.tmp.iterdir()) == []


def test_write_behind_registry_paths_are_files(tmp_path: Path) -> None:
    from dicom_node.registry import Registry

    sp = _held_spool(tmp_path / "spool")
    reg = Registry(tmp_path / "spool" / "registry.sqlite3")
    reg.files_of = sp.write_pending
    (f,) = _series_files(tmp_path, 1)
    header, path = sp.store_received(f.read_bytes())
    reg.add_instance(
        sop_uid=header.sop_instance_uid,
        series_uid="1.2.3",
        study_uid="9",
        sop_class_uid="1.2",
        path=str(path),
        size=f.stat().st_size,
    )
    assert not path.exists()
    (listed,) = reg.instance_paths("1.2.3")
    assert Path(listed).read_bytes() == f.read_bytes()
    reg.close()
    sp.close()


def test_write_behind_files_are_written_before_a_checkpoint_drops_their_log(
    tmp_path: Path,
) -> None:
    sp = _held_spool(tmp_path / "spool")
    files = _series_files(tmp_path, 4)
    paths = [sp.store_received(f.read_bytes())[1] for f in files]
    (log,) = [p for _, p in sp.journal._logs()]
    sp.journal.checkpoint()
    assert not log.exists() and sp.held_bytes == 0
    assert [p.read_bytes() for p in paths] == [f.read_bytes() for f in files]
    sp.close()


def test_write_behind_lost_with_the_process_is_replayed(tmp_path: Path) -> None:
    """A crash (nothing written out, nothing closed): the next start rewrites every
    answered instance from the journal."""
    root = tmp_path / "spool"
    sp = _held_spool(root)
    files = _series_files(tmp_path, 3)
    paths = [sp.store_received(f.read_bytes())[1] for f in files]
    assert not any(p.exists() for p in paths)
    reopened = Spool(root)  # the first process is gone without a word
    assert reopened.replayed == 3
    assert [p.read_bytes() for p in paths] == [f.read_bytes() for f in files]


def test_write_behind_keeps_the_newest_version_of_a_re_sent_instance(tmp_path: Path) -> None:
    """A corrected re-send while the first version is held, and another after the cap is
    reached: the file ends as the last version received, also after a replay."""
    import pydicom

    src = tmp_path / "v.dcm"
    make_mr_file(src, series_uid="1.2.3", sop_uid="1.2.3.7")
    versions = []
    for desc in ("first", "second", "third"):
        ds = pydicom.dcmread(src)
        ds.SeriesDescription = desc
        ds.save_as(tmp_path / f"{desc}.dcm", enforce_file_format=True)
        versions.append((tmp_path / f"{desc}.dcm").read_bytes())
    (filler,) = (f.read_bytes() for f in _series_files(tmp_path, 1, "1.2.8"))
    root = tmp_path / "spool"
    sp = _held_spool(root, cap=len(versions[0]) + len(filler))
    path = sp.store_received(versions[0])[1]
    sp.store_received(filler)  # the cap is now reached
    sp.store_received(versions[1])  # replaces the held first version (held: no room needed)
    assert sp.held_bytes == len(versions[1]) + len(filler)
    assert sp.write_pending("1.2.3") == 1 and path.read_bytes() == versions[1]
    sp.write_behind_bytes = len(filler)  # the held filler fills it
    sp.store_received(versions[2])
    assert path.read_bytes() == versions[2]  # no room: written at once
    assert Spool(root).replayed >= 0 and path.read_bytes() == versions[2]


def test_write_behind_beyond_its_cap_writes_at_once(tmp_path: Path) -> None:
    files = _series_files(tmp_path, 3)
    size = files[0].stat().st_size
    sp = _held_spool(tmp_path / "spool", cap=2 * size + size // 2)
    paths = [sp.store_received(f.read_bytes())[1] for f in files]
    assert [p.exists() for p in paths] == [False, False, True]
    sp.close()
    assert all(p.exists() for p in paths)


def test_write_behind_writes_once_receiving_pauses(tmp_path: Path) -> None:
    import time

    sp = Spool(tmp_path / "spool", write_behind_bytes=1 << 30)
    sp.write_behind_idle_s = 0.1
    files = _series_files(tmp_path, 3)
    paths = [sp.store_received(f.read_bytes())[1] for f in files]
    deadline = time.monotonic() + 10
    while not all(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [p.read_bytes() for p in paths] == [f.read_bytes() for f in files]
    assert sp.held_bytes == 0
    sp.close()


@pytest.mark.parametrize("how", ["discarded", "series removed"])
def test_write_behind_never_brings_back_what_was_removed(tmp_path: Path, how: str) -> None:
    sp = _held_spool(tmp_path / "spool")
    files = _series_files(tmp_path, 2)
    paths = [sp.store_received(f.read_bytes())[1] for f in files]
    if how == "discarded":
        sp.discard_received(paths[1])
        sp.close()
        assert paths[0].exists() and not paths[1].exists()
    else:
        sp.remove_series("1.2.3")
        sp.close()
        assert not paths[0].parent.exists()


def test_write_behind_counts_held_files_against_the_watermark(tmp_path: Path) -> None:
    """Held files take their room when written: the watermark counts them already."""
    files = [  # 128 KiB of pixels each: a margin no other writer on the disk upsets
        make_mr_file(tmp_path / f"{i}.dcm", series_uid="1.2.3", instance_number=i, shape=(256, 256))
        for i in range(2)
    ]
    sp = _held_spool(tmp_path / "spool")
    sp.store_received(files[0].read_bytes())
    held = sp.held_bytes
    assert held > 128 * 1024
    # a watermark that leaves room for the next instance and half the held one, not more
    sp.min_free_bytes = sp.free_bytes() - files[1].stat().st_size - held // 2
    with pytest.raises(SpoolFullError, match="promised to held files"):
        sp.store_received(files[1].read_bytes())
    sp.write_pending()
    sp.close()


@pytest.mark.parametrize("behind", [0, 1 << 30])
def test_only_a_re_sent_instance_is_hashed_with_the_file_it_replaces(
    tmp_path: Path, behind: int
) -> None:
    import pydicom

    from dicom_node.spool import content_digest

    src = make_mr_file(tmp_path / "a.dcm", series_uid="1.2.3", sop_uid="1.2.3.7")
    ds = pydicom.dcmread(src)
    ds.SeriesDescription = "corrected"
    ds.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    first, corrected = src.read_bytes(), (tmp_path / "b.dcm").read_bytes()
    sp = Spool(tmp_path / "spool", write_behind_bytes=behind)
    sp.write_behind_idle_s = 3600.0
    header, _ = sp.receive(first)
    assert header.content_sha256 == "" and header.replaced_sha256 is None  # new: not hashed
    header, _ = sp.receive(first)  # an identical re-send (held or in its file)
    assert header.content_sha256 == header.replaced_sha256 == content_digest(first)
    header, path = sp.receive(corrected)
    assert header.content_sha256 == content_digest(corrected)
    assert header.replaced_sha256 == content_digest(first)
    sp.close()
    assert Path(path).read_bytes() == corrected
