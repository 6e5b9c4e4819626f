"""Integration fixtures: an emulator with its default configuration (the shipped contract),
reset and restored around each test that uses it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from qbgw.emulator.server import Emulator, EmulatorConfig

#: Every field of the default configuration, to restore after a test reconfigured it.
DEFAULTS = {f.name: getattr(EmulatorConfig(), f.name) for f in dataclasses.fields(EmulatorConfig)}


@pytest.fixture(scope="module")
def running() -> Iterator[Emulator]:
    with Emulator() as em:
        yield em


@pytest.fixture
def em(running: Emulator) -> Iterator[Emulator]:
    running.reset()
    yield running
    running.reconfigure(**DEFAULTS)
