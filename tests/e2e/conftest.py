"""End-to-end fixtures: the two stacks every pipeline test runs on, and a Redis of a test's own."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.chaos import PrivateRedis
from qbgw.emulator.server import Emulator
from qbgw.settings import Settings
from tests.conftest import PgDatabase, _truncate, base_settings, require_service


@pytest.fixture(params=["embedded", "redis+postgres"])
def stack(request: pytest.FixtureRequest) -> Settings:
    """The embedded default (SQLite + filesystem broker), then PostgreSQL + Redis."""
    name = "embedded_settings" if request.param == "embedded" else "production_settings"
    settings: Settings = request.getfixturevalue(name)
    return settings


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test's own on a free port, keeping nothing on disk: a test may stop it, start it
    again (empty) or demote it, and the shared Redis other tests use is never touched."""
    require_service("the redis-server program", shutil.which("redis-server") is not None)
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def restartable_settings(tmp_path: Path, emu: Emulator, pg: PgDatabase, private_redis: PrivateRedis) -> Settings:
    """PostgreSQL (as the application role, like every e2e test) + the test's own Redis."""
    _truncate(pg.admin)
    return base_settings(tmp_path, emu).with_(database_url=pg.app, broker_url=private_redis.url)
