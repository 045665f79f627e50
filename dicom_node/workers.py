"""Where :func:`processing.run.run` executes.

``backend="embedded"``: a :class:`concurrent.futures.ProcessPoolExecutor` (spawned
processes: the node has threads, so no fork), numba warmed in each worker's initializer
(loaded from the on-disk cache; what the cache lacks is compiled first by a throwaway
process, :mod:`dicom_node.warm_cache`, so a worker never keeps the compiler's memory);
each worker reports its process id on a queue once warm, so :attr:`Workers.warm` (and the
node's ``/readyz``) can say "warming" until every worker has loaded its kernels.
``backend="dask"``: a :class:`distributed.Client` on ``scheduler_address``; its ``submit``
has the same shape. Arrays travel to a Dask worker by pickling (no shared filesystem);
to an embedded worker through tmpfs files (:mod:`dicom_node.handoff`).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NamedTuple

from dicom_node.config import WorkerSettings
from dicom_node.handoff import pack, remove, remove_stale, submit_via_tmpfs, unpack
from dicom_node.logging import log_event
from dicom_node.warm_cache import freeze_start_up_objects, warm_without_compiling
from processing.run import ProcessingSettings

__all__ = [
    "BrokenProcessPool",
    "StreamedTask",
    "Workers",
    "hand_over",
    "init_embedded_worker",
    "numba_kernels",
    "warm_worker",
    "warmup_report",
    "worker_numba_counts",
]

log = logging.getLogger("synthmr.workers")


def warm_worker(settings: ProcessingSettings | None = None) -> dict[str, Any]:
    """Load every numba kernel and the ONNX model in this process (worker initializer):
    the whole pipeline runs once on a tiny phantom, with the node's processing settings
    (its model, its stages). Kernels missing from the numba cache (empty, or stale after a
    code update) are compiled by a throwaway process first, so this long-lived one does not
    keep the compiler's ~480 MiB (:mod:`dicom_node.warm_cache`). Returns what happened.

    Then the objects alive (libraries, kernels, model) are frozen out of the garbage
    collector's reach: a full collection during a job walks only the job's objects (~75 ms
    each otherwise, in a warm worker)."""
    report = warm_without_compiling("processing.run:warmup", settings)
    freeze_start_up_objects()
    return report


def numba_kernels() -> dict[str, Any]:
    """Every numba dispatcher of ``processing`` by ``module.name``."""
    import importlib
    import pkgutil

    import processing

    out: dict[str, Any] = {}
    for info in pkgutil.iter_modules(processing.__path__):
        mod = importlib.import_module(f"processing.{info.name}")
        for name, obj in vars(mod).items():
            if hasattr(obj, "signatures") and hasattr(obj, "py_func") and hasattr(obj, "stats"):
                out[f"{info.name}.{name}"] = obj
    return out


def warmup_report() -> dict[str, Any]:
    """``synthmr warmup``: compile every numba kernel (node-side normalization kernels and
    the whole pipeline a worker runs) into the on-disk cache and say what it did.

    Run at install (deploy/bootstrap.sh) and at image build (deploy/Dockerfile), so that
    neither the first start nor the first series pays for the compile. Returns the seconds,
    the number of specializations compiled now vs loaded from the cache, and the cache
    directories (NUMBA_CACHE_DIR, else ``__pycache__`` next to each module).
    """
    from processing import phase
    from processing.run import warmup

    t0 = time.perf_counter()
    phase.warmup()  # the node process's normalization kernels (Node.start)
    warmup()  # what every worker runs in its initializer
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, **worker_numba_counts()}


def worker_numba_counts() -> dict[str, Any]:
    """In this process: how many numba kernels ``processing`` has, how many specializations
    were compiled here vs loaded from the on-disk cache, and the cache directories
    (NUMBA_CACHE_DIR, else ``__pycache__`` next to each module)."""
    kernels = numba_kernels()
    compiled = loaded = 0
    dirs: set[str] = set()
    for disp in kernels.values():
        st = disp.stats
        compiled += sum(st.cache_misses.values())
        loaded += sum(st.cache_hits.values())
        if st.cache_path:
            dirs.add(str(st.cache_path))
    return {
        "kernels": len(kernels),
        "compiled": compiled,
        "loaded_from_cache": loaded,
        "cache_dirs": sorted(dirs),
    }


def _exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """End this worker when the node that spawned it is gone (kill -9, OOM killer): an
    orphaned worker would otherwise keep its memory (~300 MB) until the host reboots."""
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent_pid:
            os._exit(0)


#: in a worker: (the node's partial-results queue, the node's pid), set by the initializer
_CHANNEL: tuple[Any, int] | None = None


def hand_over(token: str, stage: str, part: Any) -> None:
    """In a worker: send ``part`` of the streamed task ``token`` to the node now, before
    the task returns (its arrays in a tmpfs file of their own, :mod:`dicom_node.handoff`;
    the node maps it and can drop it independently of the task's result)."""
    if _CHANNEL is None:
        raise RuntimeError("hand_over: not in an embedded worker with a partial channel")
    channel, node_pid = _CHANNEL
    channel.put((token, stage, pack(part, node_pid)))  # SimpleQueue: in the pipe on return


def _run_streamed(token: str, fn: Callable[..., Any], *args: Any) -> Any:
    """In a worker: ``fn(*args, on_ready=...)``, whose ``on_ready(stage, part)`` hands
    parts over to the node (:func:`hand_over`) before ``fn`` returns."""
    return fn(*args, on_ready=functools.partial(hand_over, token))


def init_embedded_worker(
    parent_pid: int,
    warm_queue: Any = None,
    settings: ProcessingSettings | None = None,
    partial_queue: Any = None,
    warm: Callable[[ProcessingSettings | None], Any] = warm_worker,
) -> None:
    """Initializer of the embedded pool: the orphan watchdog, then ``warm`` (default
    :func:`warm_worker`) with the node's processing settings, then this process's id and
    what ``warm`` returned on ``warm_queue`` (the node counts warm workers and logs how
    they warmed). ``partial_queue``: where :func:`hand_over` sends parts."""
    global _CHANNEL
    if partial_queue is not None:
        _CHANNEL = (partial_queue, parent_pid)
    threading.Thread(
        target=_exit_with_parent, args=(parent_pid,), name="exit-with-parent", daemon=True
    ).start()
    report = warm(settings)
    if warm_queue is not None:
        warm_queue.put((os.getpid(), report if isinstance(report, dict) else {}))


def _ping() -> bool:
    return True


class StreamedTask(NamedTuple):
    """A task submitted with :meth:`Workers.submit_streamed`.

    ``events`` receives ``(stage, part)`` for each part the task hands over (unpacked; an
    exception instead when one could not be read), then ``("done", future)`` when the
    task ends. ``close()``: no more parts wanted (later ones are discarded)."""

    future: Future[Any]
    events: queue.Queue[tuple[str, Any]]
    close: Callable[[], None]


class Workers:
    """A pool with ``submit(fn, *args) -> Future``. ``warm``: what each embedded worker runs
    in its initializer (a module-level function of the settings; tests slow it down)."""

    #: seconds :meth:`stop` lets a warm worker finish before it is terminated
    STOP_GRACE_S = 5.0

    def __init__(
        self,
        cfg: WorkerSettings,
        processing: ProcessingSettings | None = None,
        warm: Callable[[ProcessingSettings | None], Any] = warm_worker,
    ) -> None:
        self.cfg = cfg
        self.processing = processing  # workers warm with the node's processing settings
        self._warm_fn = warm
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._client: Any = None
        self._ctx = multiprocessing.get_context("spawn")
        self._warm_queue: Any = None
        self._warm_pids: set[int] = set()
        #: per worker process id: how it warmed (:func:`warm_worker`'s report)
        self.warm_reports: dict[int, dict[str, Any]] = {}
        self._warm_thread: threading.Thread | None = None
        self._dask_warm = False
        self._partial_queue: Any = None
        self._partial_thread: threading.Thread | None = None
        self._streams: dict[str, queue.Queue[tuple[str, Any]]] = {}

    @property
    def warm(self) -> bool:
        """True once every worker process has compiled / loaded its kernels (readiness)."""
        if self._client is not None:
            return self._dask_warm
        with self._lock:
            return len(self._warm_pids) >= self.cfg.processes

    def _collect_warm(self) -> None:
        """Thread: record the process ids the workers report when warm, and log how each
        warmed: from the cache, or after a throwaway compile (None ends it)."""
        while True:
            item = self._warm_queue.get()
            if item is None:
                return
            pid, report = item
            with self._lock:
                self._warm_pids.add(int(pid))
                self.warm_reports[int(pid)] = report
            child = report.get("child") or {}
            log_event(
                log,
                "worker_warm",
                pid=int(pid),
                warm=len(self._warm_pids),
                cache_missed=report.get("cache_missed"),
                compiled_in_throwaway=child.get("compiled"),
                throwaway_s=round(child["seconds"], 1) if child else None,
                compiled_in_worker=report.get("compiled_here"),
            )

    @property
    def streaming(self) -> bool:
        """Whether :meth:`submit_streamed` is available (the embedded pool; a Dask worker
        only returns its result)."""
        return self._partial_queue is not None

    def _open_partial_channel(self) -> None:
        """A new queue for the parts workers hand over, and its reader thread. A new pool
        gets a new one: a worker killed while it wrote to the old queue may hold its lock
        for good (that queue's reader is left blocked, a daemon thread)."""
        self._partial_queue = self._ctx.SimpleQueue()
        self._partial_thread = threading.Thread(
            target=self._collect_partials,
            args=(self._partial_queue,),
            name="workers-partials",
            daemon=True,
        )
        self._partial_thread.start()

    def _collect_partials(self, channel: Any) -> None:
        """Thread: route each part a worker hands over to its task's events (None ends)."""
        while True:
            item = channel.get()
            if item is None:
                return
            token, stage, packed = item
            with self._lock:
                events = self._streams.get(token)
            if events is None:  # the task was given up: only its files to remove
                remove(packed[1])
                continue
            try:
                events.put((stage, unpack(packed)))
            except Exception as exc:  # a removed or short file: the job says why
                events.put((stage, exc))

    def submit_streamed(self, fn: Callable[..., Any], *args: Any) -> StreamedTask:
        """Submit ``fn(*args, on_ready=...)``: in the worker, each ``on_ready(stage, part)``
        call hands ``part`` to this process at once, before ``fn`` returns (for the node
        to start on it); see :class:`StreamedTask`."""
        if not self.streaming:
            raise RuntimeError("submit_streamed: only with the embedded pool")
        token = uuid.uuid4().hex
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        with self._lock:
            self._streams[token] = events
        try:
            future = self.submit(_run_streamed, token, fn, *args)
        except BaseException:
            with self._lock:
                self._streams.pop(token, None)
            raise
        future.add_done_callback(lambda f: events.put(("done", f)))

        def close() -> None:
            with self._lock:
                self._streams.pop(token, None)

        return StreamedTask(future, events, close)

    def start(self, wait_warm: bool = False) -> None:
        if self.cfg.backend == "dask":
            from distributed import Client

            self._client = Client(self.cfg.scheduler_address, timeout="30s")
            try:
                self._client.run(warm_worker, self.processing)
            except Exception as exc:  # warming is an optimisation only
                log_event(log, "dask_warmup_failed", level=logging.WARNING, error=repr(exc))
            self._dask_warm = True
            log_event(log, "workers_started", backend="dask", scheduler=self.cfg.scheduler_address)
            return
        remove_stale()  # hand-off files a killed node left in /dev/shm
        self._warm_queue = self._ctx.SimpleQueue()
        self._warm_thread = threading.Thread(
            target=self._collect_warm, name="workers-warm", daemon=True
        )
        self._warm_thread.start()
        self._open_partial_channel()
        self._new_pool()
        # Start every process now so the first series does not pay for spawn + warm-up.
        futures = [self._pool.submit(_ping) for _ in range(self.cfg.processes)]  # type: ignore[union-attr]
        if wait_warm:
            for f in futures:
                f.result()
        log_event(log, "workers_started", backend="embedded", processes=self.cfg.processes)

    def _new_pool(self) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=self.cfg.processes,
            mp_context=self._ctx,
            initializer=init_embedded_worker,
            initargs=(
                os.getpid(),
                self._warm_queue,
                self.processing,
                self._partial_queue,
                self._warm_fn,
            ),
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        if self._client is not None:
            return self._client.submit(fn, *args, pure=False)
        with self._lock:
            if self._pool is None:
                raise RuntimeError("workers not started")
            try:
                return submit_via_tmpfs(self._pool.submit, fn, *args)
            except BrokenProcessPool:
                self._restart_locked()
                return submit_via_tmpfs(self._pool.submit, fn, *args)

    def restart(self) -> None:
        """Replace a broken process pool (a worker died)."""
        with self._lock:
            self._restart_locked()

    def _restart_locked(self) -> None:
        log_event(log, "worker_pool_restart", level=logging.WARNING)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._warm_pids.clear()  # the new processes warm up again
        if self._partial_queue is not None:
            self._open_partial_channel()
        self._new_pool()

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        terminated = False
        if self._pool is not None:
            terminated = self._stop_pool(self._pool)
            self._pool = None
        # A terminated worker may have died holding a queue's write lock: a sentinel put
        # could then block for good, so the readers (daemon threads) are left blocked.
        if self._warm_thread is not None:
            if not terminated:
                self._warm_queue.put(None)
                self._warm_thread.join(timeout=5.0)
            self._warm_thread = None
        if self._partial_thread is not None:
            if not terminated:
                self._partial_queue.put(None)
                self._partial_thread.join(timeout=5.0)
            self._partial_thread = None
            self._partial_queue = None

    def _stop_pool(self, pool: ProcessPoolExecutor) -> bool:
        """Shut ``pool`` down in bounded time; True when a process had to be terminated.

        A worker still in its initializer (compiling numba: a minute on a cold cache and a
        loaded machine) is terminated at once, and a warm one still busy after
        :attr:`STOP_GRACE_S` too: ``shutdown(wait=True)`` would wait for either. Nothing
        is lost: the futures end (cancelled, or BrokenProcessPool), and a series whose job
        was running stays PROCESSING and is re-run at the next start (Node.stop)."""
        processes = dict(pool._processes or {})  # type: ignore[attr-defined]
        manager = pool._executor_manager_thread  # type: ignore[attr-defined]
        with self._lock:
            cold = [p for pid, p in processes.items() if pid not in self._warm_pids]
        for proc in cold:
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + self.STOP_GRACE_S
        busy = []
        for proc in processes.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                busy.append(proc)
                proc.terminate()
        for proc in busy:
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if manager is not None:
            manager.join(timeout=5.0)  # it sets the futures' outcome, then ends
        if cold or busy:
            log_event(
                log, "workers_terminated", level=logging.WARNING, warming=len(cold), busy=len(busy)
            )
        return bool(cold or busy)
