"""Issue 14: a long-lived process (node, worker) loads numba kernels from the on-disk cache
and never compiles them itself; what the cache lacks (empty, or stale after a code update)
is compiled by a throwaway process (:func:`dicom_node.warm_cache.warm_without_compiling`).

A one-line kernel in a module written here stands in for the pipeline's (compiling those
takes minutes; ``test_warmup.py``'s cold-start node checks the real worker's log). Each
"long-lived process" is a fresh interpreter on its own NUMBA_CACHE_DIR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: ``warmup`` swallows Exception as the pipeline's stages do: the refusal must get through
KERNEL = """
import numba

@numba.njit(cache={cache})
def scaled(x):
    return x * {factor}

def warmup():
    try:
        assert scaled(2.0) == 2.0 * {factor}
    except Exception:
        pass
"""


def _write_kernel(folder: Path, factor: float, cache: bool = True) -> None:
    path = folder / "tiny_kernel.py"
    path.write_text(KERNEL.format(factor=factor, cache=cache))
    t = path.stat().st_mtime + 10  # numba's staleness check: the source's mtime and size
    os.utime(path, (t, t))


def _warm(folder: Path, cache: Path) -> dict:
    """``warm_without_compiling("tiny_kernel:warmup")`` in a new process: its report."""
    env = dict(
        os.environ, NUMBA_CACHE_DIR=str(cache), PYTHONPATH=os.pathsep.join([str(folder), str(ROOT)])
    )
    code = (
        "import json; from dicom_node.warm_cache import warm_without_compiling as w; "
        "print(json.dumps(w('tiny_kernel:warmup')))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_kernels_missing_from_the_cache_are_compiled_by_a_throwaway_process(tmp_path) -> None:
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    _write_kernel(tmp_path, 3.0)

    cold = _warm(tmp_path, cache)  # empty cache
    assert cold["cache_missed"] == "scaled", cold
    assert cold["child"]["returncode"] == 0 and cold["child"]["compiled"] == 1, cold
    assert cold["compiled_here"] == 0, cold
    assert list(cache.rglob("*.nbi")), "the throwaway process wrote no cache index"

    warm = _warm(tmp_path, cache)  # what the child wrote is loaded, nothing compiled
    assert warm == {"cache_missed": None, "child": None, "compiled_here": 0}

    _write_kernel(tmp_path, 4.0)  # a code update: the cached kernel is stale
    stale = _warm(tmp_path, cache)
    assert stale["cache_missed"] == "scaled", stale
    assert stale["child"]["compiled"] == 1 and stale["compiled_here"] == 0, stale


def test_a_kernel_that_cannot_be_cached_is_compiled_here_and_counted(tmp_path) -> None:
    """The control: without ``cache=True`` the child's compile cannot be loaded, so this
    process compiles after all, and says so (the count above can tell)."""
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    _write_kernel(tmp_path, 3.0, cache=False)
    r = _warm(tmp_path, cache)
    assert r["cache_missed"] == "scaled" and r["child"]["compiled"] == 1, r
    assert r["compiled_here"] == 1, r


#: the throwaway process compiles, then hangs (the long compile of a loaded machine)
HANGING_KERNEL = """
import os, time
import numba

@numba.njit(cache=True)
def scaled(x):
    return x * 3.0

def warmup():
    scaled(2.0)  # refused in the warming process: only its throwaway child gets past
    with open(os.environ["CHILD_PID_FILE"], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (not yet reaped) is gone too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_the_throwaway_process_ends_with_the_process_it_warms(tmp_path) -> None:
    """Workers.stop terminates a worker still warming: the compile it started must not
    outlive it (a minute and ~0.5 GiB). The warming process is killed (-9) here while its
    throwaway child is busy; the child is gone within seconds."""
    (tmp_path / "tiny_kernel.py").write_text(HANGING_KERNEL)
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    pid_file = tmp_path / "child.pid"
    env = dict(
        os.environ,
        NUMBA_CACHE_DIR=str(cache),
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
        CHILD_PID_FILE=str(pid_file),
    )
    code = "from dicom_node.warm_cache import warm_without_compiling as w; w('tiny_kernel:warmup')"
    warming = subprocess.Popen([sys.executable, "-c", code], env=env)
    child = 0
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert warming.poll() is None, "the warming process ended on its own"
            assert time.monotonic() < deadline, "no throwaway process got to its warm-up"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        assert child != warming.pid and _alive(child)
        warming.kill()
        warming.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the throwaway compile outlived the process it warmed"
    finally:
        if warming.poll() is None:
            warming.kill()
        if child and _alive(child):
            os.kill(child, 9)
