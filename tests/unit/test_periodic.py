"""The periodic thread under the sweeper and the sealer: it outlives a step's unexpected error, and stops with or
without a last step."""

from __future__ import annotations

import threading

import pytest

from qbgw.execution.periodic import Periodic


class Counting(Periodic):
    """Counts its steps; the first raises (a bug nobody planned for)."""

    def __init__(self, interval: float, *, last_run: bool = False) -> None:
        super().__init__(interval, name="test-periodic", last_run=last_run)
        self.steps = 0
        self.failures: list[Exception] = []
        self.stepped_again = threading.Event()

    def step(self) -> None:
        self.steps += 1
        if self.steps == 1:
            raise RuntimeError("a bug nobody planned for")
        self.stepped_again.set()

    def failed_unexpectedly(self, exc: Exception) -> None:
        self.failures.append(exc)


def test_a_step_that_raises_is_reported_and_the_next_step_runs() -> None:
    running = Counting(0.01).start()
    try:
        assert running.stepped_again.wait(10), "the thread died with the first step's error"
    finally:
        running.stop()
    assert [str(e) for e in running.failures] == ["a bug nobody planned for"]
    assert not running._thread.is_alive()


@pytest.mark.parametrize(("last_run", "steps"), [(False, 0), (True, 1)])
def test_stop_runs_one_last_step_only_when_asked(last_run: bool, steps: int) -> None:
    waiting = Counting(3600, last_run=last_run).start()  # never due: only a stop can end the wait
    waiting.stop()
    assert waiting.steps == steps
    assert not waiting._thread.is_alive()
