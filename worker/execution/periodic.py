"""Periodic: the background thread of a worker's sweeper and sealer, which runs a step every few seconds until
stopped and survives any step's failure. Touches nothing itself: a subclass's step does.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Self

__all__ = ["Periodic"]


class Periodic(ABC):
    """Runs :meth:`step` every ``interval`` seconds in a daemon thread named ``name`` until :meth:`stop` (with
    ``last_run``, once more when stopped). A step handles the failures it expects (the database away); anything
    else it lets out goes to :meth:`failed_unexpectedly` and the next step runs as planned: the fleet depends on
    the thread, so one bug in one run must not end it."""

    def __init__(self, interval: float, *, name: str, last_run: bool = False) -> None:
        self.interval = interval
        self._last_run = last_run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop (after a last step, with ``last_run``), waiting for the thread up to 30 s."""
        self._stop.set()
        self._thread.join(timeout=30)

    @abstractmethod
    def step(self) -> None:
        """One run."""

    @abstractmethod
    def failed_unexpectedly(self, exc: Exception) -> None:
        """Report a step's exception that it did not expect (a bug); must not raise."""

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self.interval)
            if stopping and not self._last_run:
                return
            try:
                self.step()
            except Exception as exc:
                self.failed_unexpectedly(exc)
            if stopping:
                return
