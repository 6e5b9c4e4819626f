"""End-to-end fixtures: the stacks the pipeline tests run on, and a Redis of a test's own."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.chaos import PrivateRedis
from qbgw.emulator.server import Emulator
from qbgw.settings import Settings
from tests.conftest import PgDatabase, _truncate, base_settings, require_service

#: Every stack's fixture of settings, by the ``stack`` parameter's name.
_STACKS = {
    "embedded": "embedded_settings",
    "redis+postgres": "production_settings",
    "rabbitmq+postgres": "rabbitmq_settings",
}

#: The third stack, for the pipeline, reliability and rate-limit tests: ``@all_stacks`` on a test that takes
#: ``stack`` runs it on PostgreSQL + RabbitMQ (the broker) + Redis (QBGW_REDIS_URL, the shared state) too.
ALL_STACKS = list(_STACKS)
all_stacks = pytest.mark.parametrize("stack", ALL_STACKS, indirect=True)


@pytest.fixture(params=["embedded", "redis+postgres"])
def stack(request: pytest.FixtureRequest) -> Settings:
    """The embedded default (SQLite + filesystem broker), then PostgreSQL + Redis (and, for a test marked
    ``@all_stacks``, PostgreSQL + RabbitMQ + Redis)."""
    settings: Settings = request.getfixturevalue(_STACKS[request.param])
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
    return base_settings(tmp_path, emu).with_(**pg.for_app(), broker_url=private_redis.url)


@pytest.fixture
def node() -> str:
    """The node program (the Node.js client tests): skipped without it, failed under CI."""
    found = shutil.which("node")
    require_service("the node program", found is not None)
    assert found is not None
    return found
