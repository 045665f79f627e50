"""Node <-> embedded worker hand-off: large arrays through a tmpfs file, not the pool's pipe.

A :class:`~concurrent.futures.ProcessPoolExecutor` pickles a task's arguments into one
bytes object, pushes it through a pipe in chunks and unpickles it in the worker; the
result goes back the same way. For a 30x256x256 MDME acquisition (~126 MB of complex
samples) and its SeriesResult (~200 MB of maps, contrasts and fractions) that is several
copies through the kernel and most of the "node <-> worker transfer" of the job profile.

Here the task is pickled with protocol 5 and every contiguous buffer of at least
:data:`SPILL_MIN_BYTES` (the numpy arrays) goes *out of band*: written once into a file of
its own in ``/dev/shm`` (memory, not disk); the other side maps each file copy-on-write and
the arrays it unpickles sit on the mapped pages (no second copy), and the files are
removed. One file per array, so each array's memory goes back to the system as soon as
that array is dropped (40 x 512 x 512: the node frees each map and contrast once exported,
not the whole ~1 GB result at the end of the job). The pickle itself, with the small
values, still travels the pipe. Only for the embedded pool (a shared machine): the Dask backend keeps pickling. Where
``/dev/shm`` lacks room for twice the arrays (a container's default 64 MB) a task goes
through the pipe as before.

Files are named ``synthmr-handoff-<node pid>-<random>.bin``; the reader removes each, the
node also removes its task files when the task ends (a worker that died before reading
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

#: (pickle bytes, one file path per out-of-band buffer (empty: all in the pickle),
#: byte length of each out-of-band buffer)
Packed = tuple[bytes, list[str], list[int]]


def _directory() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def pack(obj: Any, owner_pid: int) -> Packed:
    """Pickle ``obj``; each of its large contiguous buffers goes to a tmpfs file."""
    spilled: list[pickle.PickleBuffer] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes >= SPILL_MIN_BYTES:
            spilled.append(buf)
            return False  # false: out of band
        return True

    data = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    if not spilled:
        return data, [], []
    directory = _directory()
    total = sum(b.raw().nbytes for b in spilled)
    try:
        st = os.statvfs(directory)
        room = st.f_bavail * st.f_frsize
    except OSError:
        room = 0
    if room < 2 * total:  # a small /dev/shm (a container's 64 MB): through the pipe
        return pickle.dumps(obj, protocol=5), [], []
    paths: list[str] = []
    sizes = []
    try:
        for buf in spilled:
            raw = buf.raw()
            path = directory / f"{_PREFIX}{owner_pid}-{uuid.uuid4().hex}.bin"
            paths.append(str(path))
            with open(path, "wb") as f:
                f.write(raw)
            sizes.append(raw.nbytes)
    except OSError:  # filled up meanwhile: through the pipe
        remove(paths)
        return pickle.dumps(obj, protocol=5), [], []
    except BaseException:
        remove(paths)
        raise
    return data, paths, sizes


def remove(paths: list[str]) -> None:
    """Remove hand-off files (those that exist)."""
    for p in paths:
        Path(p).unlink(missing_ok=True)


def unpack(packed: Packed) -> Any:
    """The object :func:`pack` packed; removes its files."""
    data, paths, sizes = packed
    if not paths:
        return pickle.loads(data)
    buffers = []
    try:
        for path, n in zip(paths, sizes, strict=True):
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size < n:
                    raise EOFError(f"hand-off file {path} is shorter than its pickle says")
                # copy-on-write map of the tmpfs pages: no copy, arrays writable (page
                # aligned); the memory is freed when the array on it goes (the file is
                # removed already)
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            buffers.append(memoryview(mapped)[:n])
    finally:
        remove(paths)
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
        remove(task[1])
        raise
    outer.inner = inner

    def done(f: Future[Any]) -> None:
        remove(task[1])  # a worker that died before reading them
        # outer -> inner -> this callback -> outer is a reference cycle: broken here, so the
        # result's arrays go as soon as the caller drops them, not at the next full gc
        outer.inner = None
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
        inner = self.inner  # None once the task ended
        # the inner future's callback (``done`` above) cancels this one
        return inner is not None and inner.cancel() and self.cancelled()

    def started(self) -> bool:
        """A worker runs or ran it: it can no longer be taken back."""
        inner = self.inner
        return inner is None or inner.running() or inner.done()


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
