"""The heap trimmer: glibc's malloc_trim, called from a daemon thread (bench.memory measures its effect)."""

from __future__ import annotations

import time

import pytest

from qbgw.errors import ConfigError
from qbgw.execution.heap import HeapTrimmer, malloc_trim
from qbgw.settings import Settings


def test_this_c_library_can_trim_and_says_whether_it_released_memory() -> None:
    trim = malloc_trim()
    assert trim is not None  # glibc, as on every machine this project runs its tests on
    assert trim() in (0, 1)


def test_the_trimmer_trims_every_interval_until_stopped() -> None:
    trimmer = HeapTrimmer.start_if_possible(0.02)
    assert trimmer is not None
    deadline = time.monotonic() + 5
    while trimmer.trims < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    trimmer.stop()
    stopped_at = trimmer.trims
    assert stopped_at >= 3
    time.sleep(0.1)
    assert trimmer.trims == stopped_at


def test_an_interval_of_zero_starts_nothing_and_a_negative_one_is_refused() -> None:
    assert HeapTrimmer.start_if_possible(0) is None
    assert Settings.from_env({}).heap_trim_interval == 30.0
    with pytest.raises(ConfigError, match="HEAP_TRIM_INTERVAL must be 0 or more"):
        Settings.from_env({"QBGW_HEAP_TRIM_INTERVAL": "-1"})
