"""One series, one path (dicom_node.series): ``synthmr process`` and the node read the same
typed configuration and decide the same way; the QC gate holds (or marks) a failed series.

Phantoms: ``synthmr simulate`` ellipsoid anatomy, 2 slices, seeds and SNR stated per test.
A "corrupted delay image" is made by scaling every stored pixel of the second delay's
images by 0.6 (a bad image the forward model cannot explain); processing.qc fails such
a series with a delay-outlier or residual reason.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node import cli
from dicom_node.config import load_settings
from dicom_node.registry import Registry, State
from tests.conftest import free_port, registry_rows, storescu, wait_for, write_config

FAST = "segmentation = false\nmyelin = false\nenhance = false\nb1_smoothing = false\n"


def simulate(out: Path, vendor: str, *, seed: int = 3, shape: str = "2,40,40") -> list[Path]:
    rc = cli.main(
        ["simulate", "--vendor", vendor, "--out", str(out), "--shape", shape, "--seed", str(seed)]
        + ["--anatomy", "ellipsoid", "--snr", "80"]
    )
    assert rc == 0
    return sorted(out.glob("*.dcm"))


def corrupt_second_delay(files: list[Path]) -> int:
    """Scale the stored pixels of every image of the second delay (GE: InversionTime) by
    0.6; return how many images were changed."""
    delays = sorted(
        {float(pydicom.dcmread(f, stop_before_pixels=True).InversionTime) for f in files}
    )
    n = 0
    for f in files:
        ds = pydicom.dcmread(f)
        if float(ds.InversionTime) != delays[1]:
            continue
        arr = ds.pixel_array
        ds.PixelData = (arr.astype(np.float64) * 0.6).round().astype(arr.dtype).tobytes()
        ds.save_as(f)
        n += 1
    return n


#: what the node writes with the wall-clock time (differs between two exports of one result)
CLOCK = ("InstanceCreationDate", "InstanceCreationTime", "SeriesDate", "SeriesTime",
         "ContentDate", "ContentTime")  # fmt: skip


def mr_files(
    root: Path, modalities: tuple[str, ...] | None = ("MR",)
) -> dict[str, pydicom.Dataset]:
    """Every MR image (or instance of ``modalities``; None: every instance) below ``root`` by
    SOP Instance UID, without the CLOCK attributes."""
    out = {}
    for p in root.rglob("*.dcm"):
        ds = pydicom.dcmread(p)
        if modalities is None or ds.Modality in modalities:
            for kw in CLOCK:
                ds.pop(kw, None)
            for item in ds.get("ContributingEquipmentSequence", []):
                item.pop("ContributionDateTime", None)
            out[str(ds.SOPInstanceUID)] = ds
    return out


@pytest.fixture(scope="module")
def ge_seed4(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """``simulate --vendor ge`` 2 x 40 x 40, seed 4, SNR 80 (read only by the tests)."""
    return simulate(tmp_path_factory.mktemp("ge_seed4"), "ge", seed=4)


def _settings(*contrasts: str):  # type: ignore[no-untyped-def]
    """The defaults with these contrasts, no segmentation, myelin or enhancement."""
    import dataclasses

    from processing.run import ProcessingSettings

    return dataclasses.replace(
        load_settings(None),
        processing=ProcessingSettings(
            contrasts=contrasts, segmentation=False, myelin=False, enhance=False
        ),
    )


@pytest.fixture(scope="module")
def spawned_worker():  # type: ignore[no-untyped-def]
    """One spawned worker process (as the node's), shared by the worker tests: spawning
    and importing the pipeline costs seconds each time."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    pool.submit(time.sleep, 0).result()  # the process is up
    try:
        yield pool
    finally:
        pool.shutdown()


def test_process_config_sets_processing_and_export_keys(
    tmp_path: Path, capsys, ge_seed4: list[Path]
) -> None:
    """Failed on 08ca190 (``settings.export_settings()`` did not exist): every series was
    reported "ERROR during processing"."""
    source = ge_seed4[0].parent
    config = tmp_path / "site.toml"
    config.write_text(
        '[processing]\ncontrasts = ["T1W", "FLAIR"]\nmixture_contrasts = []\n'
        + FAST
        + "[processing.overrides.T1W]\ntr_ms = 650.0\nte_ms = 12.0\n"
        + '[export]\nseries_number_offset = 3000\nmaps = ["T1", "T2"]\n'
        + 'institution_name = "SITE X"\nqc_fail = "send_marked"\n'
    )
    out = tmp_path / "out"
    capsys.readouterr()
    rc = cli.main(["process", str(source), "-o", str(out), "--no-progress", "-c", str(config)])
    text = capsys.readouterr().out
    assert rc == 0, text
    written = [pydicom.dcmread(p, stop_before_pixels=True) for p in out.rglob("*.dcm")]
    assert written, text
    src_number = int(pydicom.dcmread(ge_seed4[0]).SeriesNumber)
    assert min(int(ds.SeriesNumber) for ds in written) >= src_number + 3000
    assert {str(ds.get("InstitutionName", "")) for ds in written} == {"SITE X"}
    maps = {str(ds.SeriesDescription) for ds in written if ds.Modality == "OT"}
    assert len(maps) == 2 and all(("T1" in d) or ("T2" in d) for d in maps), maps
    syn = [ds for ds in written if ds.Modality == "MR"]
    assert len({ds.SeriesInstanceUID for ds in syn}) == 2  # T1W and FLAIR only
    t1w = next(ds for ds in syn if "T1W" in str(ds.SeriesDescription))
    assert any("FLAIR" in str(ds.SeriesDescription) for ds in syn)
    assert float(t1w.RepetitionTime) == 650.0 and float(t1w.EchoTime) == 12.0
    assert not [ds for ds in written if ds.Modality in ("SEG", "SR")]  # segmentation off


def test_qc_fail_is_held_by_process_and_marked_when_configured(tmp_path: Path, capsys) -> None:
    files = simulate(tmp_path / "in", "ge", seed=6)
    assert corrupt_second_delay(files) == len(files) // 4  # 4 delays
    capsys.readouterr()
    rc = cli.main(["process", str(tmp_path / "in"), "-o", str(tmp_path / "held"), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 1, text
    assert "HELD: QC fail: " in text and "not for delivery" in text, text

    config = tmp_path / "marked.toml"
    config.write_text('[export]\nqc_fail = "send_marked"\n')
    rc = cli.main(
        ["process", str(tmp_path / "in"), "-o", str(tmp_path / "marked"), "--no-progress"]
        + ["-c", str(config)]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "QC fail: " in text
    written = [
        pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "marked").rglob("*.dcm")
    ]
    assert written and all(str(ds.SeriesDescription).endswith("[QC FAIL]") for ds in written)
    images = [ds for ds in written if ds.Modality == "MR"]
    assert images and all(str(ds.ImageComments).startswith("QC fail: ") for ds in images)
    # marking changes the descriptions, not the identity: same UIDs as the held outputs
    held = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        for p in (tmp_path / "held").rglob("*.dcm")
    }
    assert held == {ds.SOPInstanceUID for ds in written}


def test_registry_holds_then_releases_outbox_rows(tmp_path: Path, capsys) -> None:
    reg = Registry(tmp_path / "spool" / "registry.sqlite3")
    reg.add_instance(
        sop_uid="1.2.3.4",
        series_uid="1.2.3",
        study_uid="1.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        path="/x/a.dcm",
        size=10,
    )
    reg.transition("1.2.3", State.COMPLETE, expect={State.RECEIVING})
    job = reg.enqueue("1.2.3")
    claimed = reg.claim_job()
    assert claimed is not None and claimed[0] == job
    rows = [("pacs", "9.9.1", "1.2.840.10008.5.1.4.1.1.4", "/x/out1.dcm")]
    reg.finish_job(job, "1.2.3", State.HELD, "QC fail: delay 1", [], rows)
    assert reg.series("1.2.3").state == State.HELD
    assert reg.due_outbox(now=time.time() + 1e6) == []  # held rows are never sent
    assert reg.outbox_counts()["HELD"] == 1
    reg.close()
    config = write_config(tmp_path)
    rc = cli.main(["retry", "--release", "1.2.3", "-c", str(config)])
    assert rc == 0
    assert "1 held outbox item(s)" in capsys.readouterr().out
    reg = Registry(tmp_path / "spool" / "registry.sqlite3")
    try:
        assert reg.series("1.2.3").state == State.EXPORTED
        assert [i.sop_uid for i in reg.due_outbox(now=time.time() + 1)] == ["9.9.1"]
    finally:
        reg.close()
    rc = cli.main(["retry", "--release", "1.2.3", "-c", str(config)])
    assert rc == 1 and "not HELD" in capsys.readouterr().err


def _states(spool: Path) -> dict[str, tuple[str, str]]:
    rows = registry_rows(spool, "SELECT series_uid, state, reason FROM series")
    return {r[0]: (r[1], r[2]) for r in rows}


@pytest.mark.integration
def test_vendor_overrides_and_qc_gate_same_in_node_and_process(tmp_path: Path, capsys) -> None:
    """``[vendors.<name>]`` count_tags and reject_markers decide completion and detection in
    the node as in ``process`` (on 08ca190 the node ignored them and processed both series),
    and a QC-failed series is HELD by the node: its outbox rows are never due.

    - GE: ``count_tags = [["Columns"]]`` announces 40 instances for a 32-instance series:
      ``process`` quarantines it ("announces 40"), the node waits for the grid and
      quarantines it at the ceiling ("32 of 40").
    - Siemens: ``reject_markers = [["Manufacturer", "siemens"]]``: IGNORED by both.
    - Philips (corrupted second delay): processed, QC "fail": HELD by both.
    """
    from dicom_node.service import Node

    ge = simulate(tmp_path / "in" / "ge", "ge", seed=7)
    siemens = simulate(tmp_path / "in" / "siemens", "siemens", seed=8)
    bad = simulate(tmp_path / "in" / "bad", "ge", seed=9, shape="2,32,32")
    corrupt_second_delay(bad)
    assert len(ge) == 32  # 2 slices x 4 delays x 2 echoes x (M, P)
    sites = (
        "[processing]\n" + FAST + 'contrasts = ["T1W"]\nmixture_contrasts = []\n'
        '[vendors.ge]\ncount_tags = [["Columns"]]\n'
        '[vendors.siemens]\nreject_markers = [["Manufacturer", "siemens"]]\n'
    )
    config = write_config(
        tmp_path,
        sites
        + "[completion]\nquiet_period_s = 1.0\nceiling_s = 8.0\npoll_interval_s = 0.2\n"
        + f'[[destinations]]\nname = "pacs"\nae_title = "NOBODY"\nhost = "127.0.0.1"\nport = {free_port()}\n',
    )
    uid = {
        k: str(pydicom.dcmread(v[0], stop_before_pixels=True).SeriesInstanceUID)
        for k, v in (("ge", ge), ("siemens", siemens), ("bad", bad))
    }
    settings = load_settings(config, env={})
    node = Node(settings).start()
    try:
        for files in (ge, siemens, bad):
            done = storescu(files, node.port)
            assert done.returncode == 0, done.stderr
        spool = Path(settings.spool.path)
        wait_for(
            lambda: all(
                _states(spool).get(u, ("",))[0]
                in ("QUARANTINED", "IGNORED", "HELD", "EXPORTED", "DELIVERED", "FAILED")
                for u in uid.values()
            ),
            timeout=240,
        )
        states = _states(spool)
        assert states[uid["ge"]][0] == "QUARANTINED", states
        assert "32 of 40 instances" in states[uid["ge"]][1]
        assert states[uid["siemens"]][0] == "IGNORED" and "rejects it" in states[uid["siemens"]][1]
        assert states[uid["bad"]][0] == "HELD" and states[uid["bad"]][1].startswith("QC fail: ")
        counts = node.registry.outbox_counts()
        assert counts["HELD"] > 0 and counts["PENDING"] == 0 and counts["SENT"] == 0
        held = node.metrics.registry.get_sample_value("synthmr_jobs_total", {"result": "held"})
        assert held == 1.0
    finally:
        node.stop()
    # the same configuration through `synthmr process`
    capsys.readouterr()
    rc = cli.main(
        [
            "process",
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "out"),
            "--no-progress",
            "-c",
            str(config),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 1, text
    lines = {u: next(ln for ln in text.splitlines() if ln.startswith(u)) for u in uid.values()}
    assert "QUARANTINED" in lines[uid["ge"]] and "announces 40 instances" in lines[uid["ge"]]
    assert "IGNORED" in lines[uid["siemens"]] and "rejects it" in lines[uid["siemens"]]
    assert "HELD: QC fail" in lines[uid["bad"]], text


def test_synthetic_series_encoded_in_a_worker_equal_the_in_process_ones(
    tmp_path: Path, ge_seed4: list[Path], spawned_worker
) -> None:
    """Streamed with a worker, the synthetic MR series are built and encoded there (a real
    spawned process; arrays through dicom_node.handoff): every file equals the in-process
    export's of the same result (not streamed) but for the wall-clock dates and times, and
    each series arrives as one written group."""
    import copy
    from concurrent.futures import Future

    from dicom_node.handoff import submit_via_tmpfs
    from dicom_node.pipeline import run_series_job
    from dicom_node.series import folder_writer, run_series
    from dicom_node.seriesstore import save_series, series_dir
    from dicom_node.spool import Spool
    from processing.run import run_taking

    files = ge_seed4
    settings = _settings("T1W", "T2W", "FLAIR")
    pool = spawned_worker
    processed: list = []

    def submit(fn, *args) -> Future:  # processing here, once (the same result both times)
        if fn is run_taking:
            processed[:] = processed or [fn(*args)]
            done: Future = Future()
            done.set_result(processed[0])
            return done
        return submit_via_tmpfs(pool.submit, fn, *args)

    groups: list[list[tuple[str, str, str]]] = []
    # fresh sources each time: the source digest (in every UID) reads them as received
    here = run_series(
        [pydicom.dcmread(p) for p in files], settings, folder_writer(tmp_path / "here"),
        submit=submit,
    )  # fmt: skip
    kept = copy.deepcopy(processed[0])  # the node's job releases the result's arrays
    # the node's job: the spool's writer, the web store beside the export, and each array
    # released once exported (run_series(release=True))
    away = run_series_job(
        "1.2.3", [str(p) for p in files], settings, Spool(tmp_path / "spool"), submit,
        on_outputs=groups.append,
    )  # fmt: skip
    assert here.state == away.state == State.EXPORTED, (here.reason, away.reason)
    assert away.result is not None and away.result.maps.t1_ms is None  # released
    a = mr_files(tmp_path / "here", ("MR", "OT"))  # synthetic series, Parametric Maps
    b = mr_files(tmp_path / "spool" / "outbox", ("MR", "OT"))
    assert len(a) > 3 * 2 and a.keys() == b.keys()  # 3 contrasts x 2 slices, the maps
    for uid, ds in a.items():
        assert ds == b[uid], uid
    mr_groups = [g for g in groups if all(b[uid].Modality == "MR" for uid, _, _ in g)]
    # the web store of the node's job (made from its copy of the arrays) is the one the
    # whole result gives
    ref = save_series(tmp_path / "ref", "1.2.3", kept, [pydicom.dcmread(p) for p in files])
    stored = series_dir(tmp_path / "spool", "1.2.3")
    for name in sorted(p.name for p in (ref / "thumbs").iterdir()):
        assert (stored / "thumbs" / name).read_bytes() == (ref / "thumbs" / name).read_bytes()
    with np.load(ref / "maps.npz") as want, np.load(stored / "maps.npz") as got:
        assert sorted(want.files) == sorted(got.files)
        for k in want.files:
            np.testing.assert_array_equal(got[k], want[k])
    assert sorted(len(g) for g in mr_groups) == [2, 2, 2]  # one written group per series


def test_slice_geometry_is_made_once_while_the_worker_processes(
    tmp_path: Path, monkeypatch, ge_seed4: list[Path]
) -> None:
    """The node makes the outputs' slice geometry (reference headers, positions) after
    handing the acquisition to the worker and before it waits for the result, and the
    export uses that one (not made a second time); the outputs are the same."""
    from concurrent.futures import Future

    from dicom_node import series

    files = ge_seed4
    settings = _settings("T1W")
    events: list[str] = []
    made = series.slice_geometry

    def geometry(*args):
        events.append("geometry")
        return made(*args)

    class Pending(Future):
        def result(self, timeout=None):
            events.append("wait for the worker")
            return super().result(timeout)

    def submit(fn, *args) -> Future:
        f = Pending()
        f.set_result(fn(*args))
        return f

    monkeypatch.setattr(series, "slice_geometry", geometry)
    out = series.run_series(
        [pydicom.dcmread(p) for p in files], settings, series.folder_writer(tmp_path / "out"),
        submit=submit,
    )  # fmt: skip
    assert out.state == State.EXPORTED, out.reason
    assert events == ["geometry", "wait for the worker"]
    # T1W (2 slices) and the quantitative maps: same as without a worker
    monkeypatch.setattr(series, "slice_geometry", made)
    here = series.run_series(
        [pydicom.dcmread(p) for p in files], settings, series.folder_writer(tmp_path / "here")
    )
    assert sorted(u for u, _, _ in here.outputs) == sorted(u for u, _, _ in out.outputs)


def test_synthetic_series_no_worker_started_are_encoded_by_the_node(
    tmp_path: Path, ge_seed4: list[Path], spawned_worker
) -> None:
    """With the only worker busy (a 4 s task in front), the node, done with its own
    groups, takes back the synthetic series no worker has started and encodes them itself:
    those futures end cancelled, and every file equals the in-process export's but for
    the wall-clock dates and times."""
    from concurrent.futures import Future

    from dicom_node.handoff import submit_via_tmpfs
    from dicom_node.series import encode_synthetic_series, folder_writer, run_series
    from processing.run import run_taking

    files = ge_seed4
    settings = _settings("T1W", "T2W", "FLAIR")
    pool = spawned_worker
    pool.submit(time.sleep, 0).result()  # the worker is idle (no task of another test left)
    processed: list = []
    encodings: list[Future] = []

    def submit(fn, *args) -> Future:
        if fn is run_taking:
            processed[:] = processed or [fn(*args)]
            done: Future = Future()
            done.set_result(processed[0])
            pool.submit(time.sleep, 4.0)  # the worker is busy when the export starts
            return done
        f = submit_via_tmpfs(pool.submit, fn, *args)
        if fn is encode_synthetic_series:
            encodings.append(f)
        return f

    here = run_series(
        [pydicom.dcmread(p) for p in files], settings, folder_writer(tmp_path / "here"),
        submit=lambda fn, *a: submit(fn, *a) if fn is run_taking else None,
    )  # fmt: skip
    away = run_series(
        [pydicom.dcmread(p) for p in files], settings, folder_writer(tmp_path / "away"),
        submit=submit, on_outputs=lambda rows: None,
    )  # fmt: skip
    pool.submit(time.sleep, 0).result()  # the busy task and every encoding are over
    assert here.state == away.state == State.EXPORTED, (here.reason, away.reason)
    assert len(encodings) == 3 and sum(f.cancelled() for f in encodings) >= 2
    a, b = mr_files(tmp_path / "here"), mr_files(tmp_path / "away")
    assert len(a) == 3 * 2 and a.keys() == b.keys()
    for uid, ds in a.items():
        assert ds == b[uid], uid


class _HandingOver:
    """A stand-in for the node's pool (:class:`dicom_node.workers.Workers`) that can hand
    parts over: ``submit_streamed`` runs the task on a thread here; ``crash`` makes the
    task end as a killed worker's does (BrokenProcessPool) after its part was handed over;
    ``provenance`` is merged into the handed-over part (what a late stage would change);
    ``done_after``: the task's end is reported only once it is set (a worker still busy)."""

    streaming = True

    def __init__(
        self, crash: bool = False, provenance: dict | None = None, done_after=None
    ) -> None:
        self.crash, self.provenance, self.done_after = crash, provenance or {}, done_after

    def submit(self, fn, *args):
        from concurrent.futures import Future

        f: Future = Future()
        f.set_result(fn(*args))
        return f

    def submit_streamed(self, fn, *args):
        import queue
        import threading
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        from dicom_node.workers import StreamedTask

        events: queue.Queue = queue.Queue()
        future: Future = Future()

        def on_ready(stage, part) -> None:
            part.provenance.update(self.provenance)
            events.put((stage, part))

        def task() -> None:
            try:
                result = fn(*args, on_ready=on_ready)
                if self.crash:
                    raise BrokenProcessPool("a worker was killed")
                future.set_result(result)
            except BaseException as exc:
                future.set_exception(exc)
            if self.done_after is not None:
                self.done_after.wait(60)
            events.put(("done", future))

        threading.Thread(target=task, daemon=True).start()
        return StreamedTask(future, events, lambda: None)


@pytest.mark.parametrize("case", ["hit", "miss", "crash"])
def test_outputs_built_while_the_worker_runs(tmp_path: Path, case: str) -> None:
    """The worker hands the maps and segmentation over before its later stages; the node
    builds their outputs meanwhile. hit: every file equals the in-process run's but for the
    clock, the early ones delivered first, in one group, after the worker finished; miss (a
    later stage changed the provenance the early outputs were built with): none of them is
    kept or delivered, the outputs are the in-process run's; crash (the worker dies after
    handing over): FAILED naming the broken pool (the node restarts it and the series is
    retried), nothing delivered, nothing left in the output folder."""
    import dataclasses

    from dicom_node.series import folder_writer, run_series
    from processing.run import ProcessingSettings

    files = simulate(tmp_path / "in", "ge", seed=4, shape="2,48,48")
    settings = dataclasses.replace(
        load_settings(None),
        processing=ProcessingSettings(contrasts=("T1W", "FLAIR"), myelin=False, enhance=False),
    )
    # hit: the worker ends only once the node has written the synthetic series it handed
    # over (4 MR files), so that all are built early
    written_mr = threading.Event() if case == "hit" else None
    pool = _HandingOver(
        crash=case == "crash",
        provenance={"dir": {"x": 1}} if case == "miss" else None,
        done_after=written_mr,
    )
    write = folder_writer(tmp_path / "away")

    def counting(group, result):
        rows = write(group, result)
        if written_mr is not None and len(mr_files(tmp_path / "away")) == 4:
            written_mr.set()
        return rows

    groups: list = []
    away = run_series(
        [pydicom.dcmread(p) for p in files], settings, counting,
        submit=pool.submit, on_outputs=groups.append,
    )  # fmt: skip
    if case == "crash":
        assert away.state == State.FAILED and "BrokenProcessPool" in away.reason, away.reason
        assert away.stage == "process" and groups == []
        assert not list((tmp_path / "away").rglob("*.dcm"))
        return
    assert away.state == State.EXPORTED, away.reason
    here = run_series(
        [pydicom.dcmread(p) for p in files], settings, folder_writer(tmp_path / "here")
    )
    assert here.state == State.EXPORTED and len(here.outputs) == len(away.outputs)

    a, b = mr_files(tmp_path / "here", None), mr_files(tmp_path / "away", None)
    assert a.keys() == b.keys() and len(a) > 10
    for uid, ds in a.items():
        assert ds == b[uid], uid
    kinds = [pydicom.dcmread(p, stop_before_pixels=True).Modality for _, _, p in groups[0]]
    if case == "hit":  # 7 parametric maps (no MYPV without myelin), the SEG and the
        # synthetic series (T1W, FLAIR: 2 slices each), at once
        assert away.timings_s["export_early"] > 0
        assert kinds == ["OT"] * 7 + ["SEG"] + ["MR"] * 4, kinds
    else:  # built again from the final result: one map per group, as without a worker
        assert kinds == ["OT"], kinds


def test_node_job_stores_the_parts_for_the_web_and_report(tmp_path: Path, monkeypatch) -> None:
    """The node's job with a pool that hands parts over (maps, segmentation, synthesis):
    the web store it writes from the parts while the worker goes on (maps, fractions, the
    report's T1w/T2w ratio and medians; not save_series of the whole result at the end)
    is save_series's of the whole result, and its report's T1w/T2w ratio map equals the
    one made from that store afterwards."""
    import dataclasses

    from dicom_node import pipeline
    from dicom_node.pipeline import run_series_job

    def whole(*args, **kw):
        raise AssertionError("stored at the end, not from the parts")

    monkeypatch.setattr(pipeline, "save_series", whole)
    from dicom_node.seriesstore import load_series, save_series
    from dicom_node.spool import Spool
    from dicom_node.web.reportdata import _ratio, series_report_documents
    from processing.run import ProcessingSettings

    files = simulate(tmp_path / "in", "ge", seed=4, shape="2,48,48")
    settings = dataclasses.replace(
        load_settings(None),
        processing=ProcessingSettings(contrasts=("T1W", "FLAIR"), enhance=False),
    )
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    pool = _HandingOver()
    spool = Spool(tmp_path / "spool")
    away = run_series_job(uid, [str(p) for p in files], settings, spool, pool.submit)
    assert away.state == State.EXPORTED, away.reason
    # the same result in one piece (the worker's numerics are deterministic)
    ds = [pydicom.dcmread(p) for p in files]
    from dicom_node.series import classify
    from processing.run import run

    result = run(classify(ds).acquisition, settings.processing)
    result.provenance["source_sha256"] = away.result.provenance["source_sha256"]
    save_series(tmp_path / "ref", uid, result, ds)
    want, got = load_series(tmp_path / "ref", uid), load_series(spool.root, uid)
    a, b = want.arrays(), got.arrays()
    assert list(a) == list(b) and "frac_GM" in a and "mypv" in a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for name in sorted(p.name for p in (want.path / "thumbs").iterdir()):
        assert (want.path / "thumbs" / name).read_bytes() == (
            got.path / "thumbs" / name
        ).read_bytes(), name
    assert (got.path / "t1w_t2w.json").is_file() and _ratio(got) == _ratio(want)
    ratio_maps = [
        pydicom.dcmread(p)
        for _, _, p in away.outputs
        if "T1WT2W" in str(pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription)
    ]
    [ref_map] = [
        d for d in series_report_documents(tmp_path / "ref", uid, ds, settings)
        if "T1WT2W" in str(d.SeriesDescription)
    ]  # fmt: skip
    assert len(ratio_maps) == 1
    kw = next(k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ref_map)
    assert ratio_maps[0][kw].value == ref_map[kw].value
