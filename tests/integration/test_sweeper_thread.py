"""The sweeper thread outlives a sweep that fails in a way nobody planned for: jobs depend on it to end."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from qbgw.execution import sweeper as sweeper_module
from qbgw.execution.sweeper import Sweeper
from qbgw.settings import Settings


def test_the_sweeper_keeps_sweeping_after_an_unexpected_error(
    embedded_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    swept_again = threading.Event()

    def sweep(rt: Any, **_: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug nobody planned for")
        swept_again.set()

    monkeypatch.setattr(sweeper_module, "sweep", sweep)
    running = Sweeper(embedded_settings, interval=0.05).start()
    try:
        assert swept_again.wait(10), "the sweeper thread died with the first sweep's error"
    finally:
        running.stop()
    assert len(calls) >= 2
