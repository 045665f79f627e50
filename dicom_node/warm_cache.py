"""Warm numba kernels in a long-lived process without compiling there.

A process that compiles numba keeps the compiler's memory for good (~480 MiB for the
worker's pipeline: LLVM modules, typing caches); one that only loads compiled kernels from
the on-disk cache (``cache=True``) does not. :func:`warm_without_compiling` therefore runs
a warm-up function first with compiling refused: when every kernel it calls is in the cache
(fresh, for the current source files: numba's index checks each file's stamp) that was
all. At the first kernel that would compile (cache empty, or stale after a code update),
the warm-up is abandoned and run again in a short-lived child process, which compiles and
writes the cache and exits (its memory with it); then the warm-up runs here once more and
loads. The cache is keyed by source file, signature and CPU, not by process, so what the
child wrote is what this process loads (same interpreter, same environment: the child
inherits ``NUMBA_CACHE_DIR``).

Only numba's own compile event is watched (``numba:compile``, raised after a cache miss,
never for a load). This module imports nothing heavy: the child starts fast.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import importlib
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from numba.core import event as numba_event

__all__ = ["CompileRefused", "warm_without_compiling"]

log = logging.getLogger("synthmr.warm_cache")

#: the folder that holds the ``dicom_node`` package: the child imports this very code
_SOURCE_ROOT = str(Path(__file__).resolve().parents[1])


class CompileRefused(BaseException):
    """Raised inside numba when a kernel would be compiled while compiling is refused.

    A BaseException: the pipeline's stages catch ``Exception`` to turn a failed stage into
    a warning, which must not swallow this (the listener records the miss anyway)."""


class _CompileWatch(numba_event.Listener):
    """Counts numba compiles (nested ones too); while ``refuse``, stops the first one."""

    def __init__(self) -> None:
        self.refuse = False
        self.refused: str | None = None  # the kernel whose compile was refused
        self.compiled = 0

    def on_start(self, event: numba_event.Event) -> None:
        if self.refuse:
            disp = (event.data or {}).get("dispatcher")
            name = getattr(getattr(disp, "py_func", None), "__qualname__", repr(disp))
            self.refused = self.refused or name
            raise CompileRefused(name)
        self.compiled += 1  # counted at the start: numba 0.68's Event.is_failed is inverted

    def on_end(self, event: numba_event.Event) -> None:
        pass


def _resolve(target: str) -> Any:
    """``"package.module:function"`` -> the function."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _lock_path() -> Path:
    """One compile at a time per cache (two cold workers would compile the same kernels
    twice, each with its own ~0.5 GiB of compiler memory)."""
    cache = os.environ.get("NUMBA_CACHE_DIR", "") or _SOURCE_ROOT
    tag = hashlib.sha1(cache.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"synthmr-numba-compile-{os.getuid()}-{tag}.lock"


def _compile_in_child(target: str, args: tuple[Any, ...]) -> dict[str, Any]:
    """Run ``target(*args)`` in a new Python process (compiling into the on-disk cache)
    and wait for it; returns what it reported (``compiled``, ``seconds``) and its exit
    status. The child ends itself within a second of this process's death (a node's
    Workers.stop terminates a worker that is still warming: the compile must not outlive
    it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_SOURCE_ROOT, env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", "from dicom_node.warm_cache import _child_main; _child_main()"],
        input=pickle.dumps((target, args, os.getpid())),
        stdout=subprocess.PIPE,
        env=env,
        check=False,
    )
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else {}
    except ValueError:
        report = {}
    return {
        "returncode": proc.returncode,
        "seconds": time.perf_counter() - t0,
        "compiled": int(report.get("compiled", -1)),
    }


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(3)


def _child_main() -> None:
    """The short-lived compiler process: ``target(*args)`` (pickled on stdin), then one
    JSON line on stdout: how many numba compiles it ran."""
    target, args, parent_pid = pickle.loads(sys.stdin.buffer.read())
    threading.Thread(
        target=_exit_with_parent, args=(parent_pid,), name="exit-with-parent", daemon=True
    ).start()
    watch = _CompileWatch()
    with numba_event.install_listener("numba:compile", watch):
        _resolve(target)(*args)
    sys.stdout.write("\n" + json.dumps({"compiled": watch.compiled}) + "\n")
    sys.stdout.flush()


def _join_strays(threads_before: set[threading.Thread], timeout_s: float = 120.0) -> None:
    """Wait (bounded) for the threads the abandoned warm-up started: a stage on a thread of
    its own (processing.run's myelin + QC) may still run, and must neither compile here
    once compiling is allowed again nor overlap the next run's numba parallel regions.
    Compiling is still refused meanwhile, so such a thread ends at its next kernel."""
    deadline = time.monotonic() + timeout_s
    for thread in set(threading.enumerate()) - threads_before:
        if thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def warm_without_compiling(target: str, *args: Any) -> dict[str, Any]:
    """Run the warm-up ``target`` (``"package.module:function"``, called with ``args``,
    which must pickle) in this process such that numba compiles nothing here: kernels
    missing from the on-disk cache are compiled by a throwaway child process first.

    Returns what happened: ``cache_missed`` (the first kernel the cache lacked, None when
    it had everything), ``child`` (the child's exit status, seconds and numba compiles;
    None when no child ran) and ``compiled_here`` (numba compiles in this process anyway:
    0 unless a kernel cannot be cached or the child failed). Compiles are counted as
    numba's ``numba:compile`` events: nested kernels and numba's own jitted overloads
    count too (the 88 specializations of ``processing`` take ~200 of them).
    """
    fn = _resolve(target)
    watch = _CompileWatch()
    child: dict[str, Any] | None = None
    with numba_event.install_listener("numba:compile", watch):
        watch.refuse = True
        threads_before = set(threading.enumerate())
        try:
            fn(*args)
        except BaseException:
            # a stage that caught CompileRefused as a failure may fail later on its own
            if watch.refused is None:
                raise
        finally:
            if watch.refused is not None:
                _join_strays(threads_before)
            watch.refuse = False
        if watch.refused is not None:
            with open(_lock_path(), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                child = _compile_in_child(target, args)
            if child["returncode"] != 0:
                log.warning("numba compile in a throwaway process failed: compiling here")
            fn(*args)  # loads what the child compiled
    return {"cache_missed": watch.refused, "child": child, "compiled_here": watch.compiled}


def freeze_start_up_objects() -> None:
    """Move every object alive now (the imported libraries, the warm-up's) out of the
    garbage collector's reach: a full collection later walks only what was made since.
    In the node one took ~90 ms, about once per 800 instances received, with every
    association waiting for the GIL behind it (~3 ms frozen); in a warm worker ~75 ms."""
    gc.collect()
    gc.freeze()
