"""Two independent numpy/scipy steps on two threads (the worker has two cores).

Only for steps whose loops release the GIL (numpy ufuncs and indexing, scipy.ndimage
filters) and that launch no numba parallel region: numba's workqueue threading layer does
not survive two parallel regions at once. Each step computes exactly what it would alone,
so results are bit-identical to running them one after the other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["CONCURRENT_MAX_VOXELS", "both"]

#: Grids up to this many voxels may run two steps' temporaries at once (inside a stage, and
#: processing.run's myelin + QC beside synthesis + enhancement); larger ones run them one
#: after the other, which bounds the worker's peak memory.
CONCURRENT_MAX_VOXELS = 1 << 22

_A = TypeVar("_A")
_B = TypeVar("_B")


def both(
    first: Callable[[], _A], second: Callable[[], _B], concurrent: bool = True
) -> tuple[_A, _B]:
    """``(first(), second())``; with ``concurrent``, ``first`` runs on a thread of its own
    while ``second`` runs in the caller's. An exception of either is raised here,
    ``first``'s first (the order of the sequential calls)."""
    if not concurrent:
        a = first()
        return a, second()
    box: list[tuple[bool, Any]] = []

    def work() -> None:
        try:
            box.append((True, first()))
        except BaseException as exc:  # raised again in the caller's thread
            box.append((False, exc))

    thread = threading.Thread(target=work, name="processing-side", daemon=True)
    thread.start()
    try:
        b = second()
    except BaseException:
        thread.join()
        if not box[0][0]:
            raise box[0][1] from None
        raise
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value, b
