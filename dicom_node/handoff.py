"""Node <-> embedded worker hand-off: large arrays through a tmpfs file, not the pool's pipe.

A :class:`~concurrent.futures.ProcessPoolExecutor` pickles a task's arguments into one
bytes object, pushes it through a pipe in chunks and unpickles it in the worker; the
result goes back the same way. For a 30x256x256 MDME acquisition (~126 MB of complex
samples) and its SeriesResult (~200 MB of maps, contrasts and fractions) that is several
copies through the kernel and most of the "node <-> worker transfer" of the job profile.

Here the task is pickled with protocol 5 and every contiguous buffer of at least
:data:`SPILL_MIN_BYTES` (the numpy arrays) goes *out of band*: written once into one file
in ``/dev/shm`` (memory, not disk); the other side maps that file copy-on-write and the
arrays it unpickles sit on the mapped pages (no second copy), and the file is removed. The pickle itself, with the small values, still travels the
pipe. Only for the embedded pool (a shared machine): the Dask backend keeps pickling. Where
``/dev/shm`` lacks room for twice the arrays (a container's default 64 MB) a task goes
through the pipe as before.

Files are named ``synthmr-handoff-<node pid>-<random>.bin``; the reader removes each, the
node also removes its task file when the task ends (a worker that died before reading
it) and, at start, the files of node processes that are gone (:func:`remove_stale`).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

__all__ = ["SPILL_MIN_BYTES", "remove_stale", "submit_via_tmpfs"]

#: buffers from this size go through the file (smaller ones stay in the pickle)
SPILL_MIN_BYTES = 1 << 20
_PREFIX = "synthmr-handoff-"
_ALIGN = 64  # each array starts on a cache line (numba and SIMD like aligned data)

#: (pickle bytes, file path or None, byte length of each out-of-band buffer)
Packed = tuple[bytes, str | None, list[int]]


def _directory() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def pack(obj: Any, owner_pid: int) -> Packed:
    """Pickle ``obj``; its large contiguous buffers go to one tmpfs file."""
    spilled: list[pickle.PickleBuffer] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes >= SPILL_MIN_BYTES:
            spilled.append(buf)
            return False  # false: out of band
        return True

    data = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    if not spilled:
        return data, None, []
    directory = _directory()
    total = sum(b.raw().nbytes + _ALIGN for b in spilled)
    try:
        st = os.statvfs(directory)
        room = st.f_bavail * st.f_frsize
    except OSError:
        room = 0
    if room < 2 * total:  # a small /dev/shm (a container's 64 MB): through the pipe
        return pickle.dumps(obj, protocol=5), None, []
    path = directory / f"{_PREFIX}{owner_pid}-{uuid.uuid4().hex}.bin"
    sizes = []
    try:
        with open(path, "wb") as f:
            for buf in spilled:
                raw = buf.raw()
                sizes.append(raw.nbytes)
                f.write(raw)
                f.write(bytes(-raw.nbytes % _ALIGN))  # the next array starts aligned
    except OSError:  # filled up meanwhile: through the pipe
        path.unlink(missing_ok=True)
        return pickle.dumps(obj, protocol=5), None, []
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return data, str(path), sizes


def unpack(packed: Packed) -> Any:
    """The object :func:`pack` packed; removes its file."""
    data, path, sizes = packed
    if path is None:
        return pickle.loads(data)
    try:
        with open(path, "rb") as f:
            # copy-on-write map of the tmpfs pages: no copy, arrays writable; the memory
            # is freed when the last array on it goes (the file is removed already)
            view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))
    finally:
        Path(path).unlink(missing_ok=True)
    buffers, at = [], 0
    for n in sizes:
        if at + n > len(view):
            raise EOFError(f"hand-off file {path} is shorter than its pickle says")
        buffers.append(view[at : at + n])
        at += n + (-n % _ALIGN)
    return pickle.loads(data, buffers=buffers)


def call_packed(task: Packed, owner_pid: int) -> Packed:
    """In the worker: unpack ``(fn, args)``, run it, pack the result the same way."""
    fn, args = unpack(task)
    result = fn(*args)
    del fn, args  # the inputs' memory goes before the result is written out
    packed = pack(result, owner_pid)
    del result
    trim_heap()  # an idle worker holds its start-up size, not the last job's peak
    return packed


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``): arrays
    under glibc's mmap threshold (up to 32 MB) are freed into the heap and would keep the
    process's resident size at its peak. No-op elsewhere."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def submit_via_tmpfs(
    submit: Callable[..., Future[Any]], fn: Callable[..., Any], *args: Any
) -> Future[Any]:
    """``submit(fn, *args)`` of a process pool with the arrays handed over in tmpfs files;
    the returned future holds ``fn``'s result (or its exception)."""
    owner = os.getpid()
    task = pack((fn, args), owner)
    outer = _Linked()
    try:
        inner = submit(call_packed, task, owner)
    except BaseException:
        if task[1]:
            Path(task[1]).unlink(missing_ok=True)
        raise
    outer.inner = inner

    def done(f: Future[Any]) -> None:
        if task[1]:
            Path(task[1]).unlink(missing_ok=True)  # a worker that died before reading it
        if f.cancelled():  # taken back before a worker started it (_Linked.cancel)
            Future.cancel(outer)
            return
        try:
            outer.set_result(unpack(f.result()))
        except BaseException as exc:
            outer.set_exception(exc)

    inner.add_done_callback(done)
    return outer


class _Linked(Future):  # type: ignore[type-arg]
    """The caller's side of a hand-off task: :meth:`cancel` takes the task back from the
    pool while no worker has started it (the node then does it itself)."""

    inner: Future[Any] | None = None

    def cancel(self) -> bool:
        inner = self.inner
        # the inner future's callback (``done`` above) cancels this one
        return inner is not None and inner.cancel() and self.cancelled()


def remove_stale() -> int:
    """Remove hand-off files of node processes that no longer run; return how many."""
    n = 0
    if not Path("/proc").is_dir():
        return 0  # no way to tell a live node's files
    for p in _directory().glob(f"{_PREFIX}*.bin"):
        try:
            pid = int(p.name[len(_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        p.unlink(missing_ok=True)
        n += 1
    return n
