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
import threading
from collections.abc import Callable

__all__ = ["HeapTrimmer", "malloc_trim"]


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


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` every ``interval`` seconds in a daemon thread until stopped."""

    def __init__(self, interval: float, trim: Callable[[], int]) -> None:
        self.interval, self._trim = interval, trim
        self.trims = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qbgw-heap-trim", daemon=True)

    @classmethod
    def start_if_possible(cls, interval: float) -> HeapTrimmer | None:
        """A started trimmer, or None when ``interval`` is 0 or the C library cannot trim."""
        trim = malloc_trim() if interval > 0 else None
        if trim is None:
            return None
        trimmer = cls(interval, trim)
        trimmer._thread.start()
        return trimmer

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._trim()
            self.trims += 1
