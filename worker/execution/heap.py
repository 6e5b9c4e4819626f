"""Heap: hand memory that glibc's allocator keeps but no longer uses back to the operating system.

A threads worker's resident memory grew by 140-220 KiB per 1,000 jobs and did not level off, though
Python's live objects did not grow (counted by type). The memory was free heap that malloc kept
(``bench.memory``, 60,000 jobs, one worker, 32 threads): 108.0 -> 125.7 MiB as it was, and
108.9 -> 115.8 MiB with ``malloc_trim(0)`` every 2,000 jobs (+19 KiB per 1,000 jobs over the last half).
So every worker process trims its heap every ``QBGW_HEAP_TRIM_INTERVAL`` seconds from a daemon thread.
On a C library without ``malloc_trim`` (musl, macOS) there is nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

from .periodic import Periodic

__all__ = ["HeapTrimmer", "malloc_trim"]

log = logging.getLogger("qbgw.worker")


def malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: int(trim(0))


class HeapTrimmer(Periodic):
    """Calls ``malloc_trim(0)`` every ``interval`` seconds in a daemon thread until stopped."""

    def __init__(self, interval: float, trim: Callable[[], int]) -> None:
        super().__init__(interval, name="qbgw-heap-trim")
        self._trim = trim
        self.trims = 0

    @classmethod
    def start_if_possible(cls, interval: float) -> HeapTrimmer | None:
        """A started trimmer, or None when ``interval`` is 0 or the C library cannot trim."""
        trim = malloc_trim() if interval > 0 else None
        if trim is None:
            return None
        return cls(interval, trim).start()

    def step(self) -> None:
        self._trim()
        self.trims += 1

    def failed_unexpectedly(self, exc: Exception) -> None:
        log.error("the heap trim failed (%s: %s); trying again in %.0fs", type(exc).__name__, exc, self.interval)
