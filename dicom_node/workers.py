"""Where :func:`processing.run.run` executes.

``backend="embedded"``: a :class:`concurrent.futures.ProcessPoolExecutor` (spawned
processes: the node has threads, so no fork), numba warmed in each worker's initializer.
``backend="dask"``: a :class:`distributed.Client` on ``scheduler_address``; its ``submit``
has the same shape. Arrays travel to the worker by pickling: no shared filesystem.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from dicom_node.config import WorkerSettings
from dicom_node.logging import log_event
from processing.run import ProcessingSettings, warmup

__all__ = ["BrokenProcessPool", "Workers", "init_embedded_worker", "warm_worker"]

log = logging.getLogger("synthmr.workers")


def warm_worker(settings: ProcessingSettings | None = None) -> None:
    """Compile / load every numba kernel and the ONNX model in this process (worker
    initializer): the whole pipeline runs once on a tiny phantom, with the node's
    processing settings (its model, its stages)."""
    warmup(settings)


def _exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """End this worker when the node that spawned it is gone (kill -9, OOM killer): an
    orphaned worker would otherwise keep its memory (~300 MB) until the host reboots."""
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent_pid:
            os._exit(0)


def init_embedded_worker(parent_pid: int, settings: ProcessingSettings | None = None) -> None:
    """Initializer of the embedded pool: the orphan watchdog, then :func:`warm_worker`."""
    threading.Thread(
        target=_exit_with_parent, args=(parent_pid,), name="exit-with-parent", daemon=True
    ).start()
    warm_worker(settings)


def _ping() -> bool:
    return True


class Workers:
    """A pool with ``submit(fn, *args) -> Future``."""

    def __init__(self, cfg: WorkerSettings, processing: ProcessingSettings | None = None) -> None:
        self.cfg = cfg
        self.processing = processing  # workers warm with the node's processing settings
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._client: Any = None

    def start(self, wait_warm: bool = False) -> None:
        if self.cfg.backend == "dask":
            from distributed import Client

            self._client = Client(self.cfg.scheduler_address, timeout="30s")
            try:
                self._client.run(warm_worker, self.processing)
            except Exception as exc:  # warming is an optimisation only
                log_event(log, "dask_warmup_failed", level=logging.WARNING, error=repr(exc))
            log_event(log, "workers_started", backend="dask", scheduler=self.cfg.scheduler_address)
            return
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
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_embedded_worker,
            initargs=(os.getpid(), self.processing),
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        if self._client is not None:
            return self._client.submit(fn, *args, pure=False)
        with self._lock:
            if self._pool is None:
                raise RuntimeError("workers not started")
            try:
                return self._pool.submit(fn, *args)
            except BrokenProcessPool:
                self._restart_locked()
                return self._pool.submit(fn, *args)

    def restart(self) -> None:
        """Replace a broken process pool (a worker died)."""
        with self._lock:
            self._restart_locked()

    def _restart_locked(self) -> None:
        log_event(log, "worker_pool_restart", level=logging.WARNING)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._new_pool()

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
