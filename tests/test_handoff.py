"""handoff: arrays between the node and an embedded worker through tmpfs files."""

from __future__ import annotations

import gc
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from dicom_node import handoff


def _files() -> set[Path]:
    return set(handoff._directory().glob(f"{handoff._PREFIX}{os.getpid()}-*.bin"))


def _mapped(*names: str) -> int:
    """Mappings of hand-off files named by one of ``names`` (by default any of this
    process's) still in /proc/self/maps (0 where /proc is missing)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return 0
    names = names or (f"{handoff._PREFIX}{os.getpid()}-",)
    return sum(any(n in line for n in names) for line in maps.read_text().splitlines())


def _double(arrays: dict[str, np.ndarray], note: str) -> dict[str, object]:
    """Worker side: the arrays it got are writable; return larger ones."""
    for a in arrays.values():
        a += 1  # in place: the worker owns its copy
    return {"note": note, **{k: np.repeat(v, 2, axis=0) for k, v in arrays.items()}}


def _fail(_: object) -> None:
    raise ValueError("bad input named here")


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "signal": (rng.standard_normal((3, 2, 64, 96)) + 1j).astype(np.complex64),  # 295 KB
        "big": rng.standard_normal((5, 256, 256)).astype(np.float32),  # 1.3 MB: spilled
        "odd": rng.integers(0, 9, size=(1_100_003,), dtype=np.uint8),  # spilled, odd size
    }


def test_round_trip_through_a_spawned_pool_leaves_no_file() -> None:
    arrays = _arrays()
    before = {k: v.copy() for k, v in arrays.items()}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        out = handoff.submit_via_tmpfs(pool.submit, _double, arrays, "n").result(timeout=120)
        with pytest.raises(ValueError, match="bad input named here"):
            handoff.submit_via_tmpfs(pool.submit, _fail, arrays).result(timeout=120)
        # a result's arrays go when the caller drops them, not at the next full gc (no
        # reference cycle through the futures keeps them mapped)
        gc.disable()
        try:
            n_out = _mapped()  # out's arrays
            again = handoff.submit_via_tmpfs(pool.submit, _double, arrays, "m").result(120)
            assert _mapped() > n_out or n_out == 0
            del again
            assert _mapped() == n_out
        finally:
            gc.enable()
    assert out["note"] == "n"
    for k, v in before.items():
        np.testing.assert_array_equal(arrays[k], v)  # the node's arrays are untouched
        np.testing.assert_array_equal(out[k], np.repeat(v + 1, 2, axis=0))
        assert out[k].dtype == v.dtype and out[k].flags.writeable
        out[k][(0,) * out[k].ndim] = 0  # writable (copy-on-write pages)
    assert not _files()


def test_big_buffers_go_through_files_small_ones_stay_in_the_pickle() -> None:
    arrays = _arrays()
    data, paths, sizes = handoff.pack(arrays, os.getpid())
    assert len(paths) == 2 and all(Path(p).is_file() for p in paths)  # one file per array
    assert sorted(sizes) == sorted([arrays["big"].nbytes, arrays["odd"].nbytes])
    assert len(data) < 400_000  # the signal (295 KB) travels in band, the rest does not
    back = handoff.unpack((data, paths, sizes))
    assert not any(Path(p).exists() for p in paths)
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].ctypes.data % 4096 == 0 or k == "signal"  # spilled ones page aligned


def test_each_array_unmaps_when_dropped() -> None:
    """The node frees each exported array's memory: its own mapping goes with it."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc")
    arrays = _arrays()
    data, paths, sizes = handoff.pack(arrays, os.getpid())
    names = [Path(p).name for p in paths]
    back = handoff.unpack((data, paths, sizes))
    assert _mapped(*names) == 2
    del back["big"]
    assert _mapped(*names) == 1
    np.testing.assert_array_equal(back["odd"], arrays["odd"])


def test_a_small_shm_falls_back_to_the_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tiny:
        f_bavail, f_frsize = 16, 4096  # 64 KB free

    monkeypatch.setattr(handoff.os, "statvfs", lambda _: Tiny())
    data, paths, sizes = handoff.pack(_arrays(), os.getpid())
    assert paths == [] and sizes == []
    np.testing.assert_array_equal(handoff.unpack((data, paths, sizes))["odd"], _arrays()["odd"])


def test_files_of_a_gone_node_are_removed_at_start() -> None:
    d = handoff._directory()
    gone = d / f"{handoff._PREFIX}999999999-x.bin"  # above pid_max: no such process
    mine = d / f"{handoff._PREFIX}{os.getpid()}-x.bin"
    for p in (gone, mine):
        p.write_bytes(b"x")
    try:
        assert handoff.remove_stale() >= 1
        assert not gone.exists() and mine.exists()
    finally:
        gone.unlink(missing_ok=True)
        mine.unlink(missing_ok=True)
