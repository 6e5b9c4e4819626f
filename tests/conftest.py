"""Shared fixtures: real services (skip on a laptop without them, fail under CI), settings for
each backend, the emulator on port 0, and a real worker process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from worker import runtime as runtime_module
from worker.emulator import Emulator, EmulatorConfig
from worker.models import GENESIS
from worker.settings import Secret, Settings

PG_ADMIN_URL = os.environ.get("QBGW_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("QBGW_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
TOKEN = "tok-canary-5f1c9e27d3"
#: A fixed PHI key for tests (the embedded default would generate one; PostgreSQL needs one given).
TEST_KEYS = "ktest:" + "A" * 43 + "="
ASSISTANT = "65d5f3473d5d68095462165d"
ROOT = Path(__file__).resolve().parent.parent


def require_service(name: str, reachable: bool) -> None:
    """Skip when a service is absent on a developer's machine; fail when CI is set."""
    if reachable:
        return
    message = f"{name} is not reachable"
    if os.environ.get("CI"):
        pytest.fail(f"{message}, and CI is set: the tests that need it must run")
    pytest.skip(message)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # requests honours proxy variables; the emulator is on loopback. And a developer's own
    # QBGW_* settings must not leak into tests.
    for key in list(os.environ):
        if key.upper() in {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"} or key.startswith("QBGW_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("NO_PROXY", "*")
    yield
    runtime_module.reset()


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    config = EmulatorConfig(tokens=frozenset({TOKEN}), assistants=frozenset({ASSISTANT}))
    with Emulator(config) as emu:
        yield emu


@pytest.fixture
def emu(emulator: Emulator) -> Emulator:
    """The session's emulator, reset and with the default configuration."""
    emulator.reset()
    emulator.reconfigure(feature_enabled=True, latency=0.0, rate_limit=0, rate_limit_retry_after=0)
    return emulator


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session; its URL."""
    require_service("PostgreSQL on 127.0.0.1:5432", _port_open("127.0.0.1", 5432))
    name = f"qbgw_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    from worker import schema

    schema.upgrade(url)
    yield url
    runtime_module.reset()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    require_service("Redis on 127.0.0.1:6379", _port_open("127.0.0.1", 6379))
    return REDIS_URL


def _truncate(url: str) -> None:
    """Empty the tables between tests, as the database owner: the append-only triggers refuse
    it to anyone else, so they are bypassed for this one transaction."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("SET LOCAL session_replication_role = replica"))
            connection.execute(text("TRUNCATE jobs, batches, audit_events"))
            connection.execute(text(f"UPDATE audit_chain_head SET seq = 0, row_hash = '{GENESIS}', v2_from = 1, "
                                    "v3_from = 1, last_at = NULL"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def base_settings(tmp_path: Path, emu: Emulator) -> Settings:
    """Embedded-default settings in ``tmp_path``, pointing at the emulator, with short waits."""
    return Settings(
        data_dir=tmp_path / "data",
        base_url=emu.url,
        token=Secret(TOKEN),
        connect_timeout=2.0,
        read_timeout=5.0,
        backoff_base=0.05,
        backoff_max=0.2,
        max_attempts=4,
        queue=f"qbgw-test-{uuid.uuid4().hex[:8]}",
        sweep_grace=1.0,
        sweep_interval=0.5,
        lease_margin=2.0,  # lease = 2 + 5 + 2 = 9 s
        visibility_timeout=20.0,  # countdowns up to 5 s; longer waits are kept in the database
        encryption_keys=Secret(TEST_KEYS),
    )


@pytest.fixture
def settings(backend: str, tmp_path: Path, emu: Emulator, request: pytest.FixtureRequest) -> Settings:
    """Settings on the given database backend (the broker is the embedded one)."""
    base = base_settings(tmp_path, emu)
    if backend == "postgres":
        url = request.getfixturevalue("pg_database")
        _truncate(url)
        return base.with_(database_url=url)
    return base


@pytest.fixture
def embedded_settings(tmp_path: Path, emu: Emulator) -> Settings:
    return base_settings(tmp_path, emu)


@pytest.fixture
def production_settings(tmp_path: Path, emu: Emulator, pg_database: str, redis_url: str) -> Iterator[Settings]:
    """PostgreSQL + Redis, with a queue of this test's own."""
    _truncate(pg_database)
    settings = base_settings(tmp_path, emu).with_(database_url=pg_database, broker_url=redis_url)
    yield settings
    import redis

    client = redis.Redis.from_url(redis_url)
    client.delete(settings.queue)
    client.close()


@pytest.fixture
def worker_process(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start real ``qbgw worker`` processes for given settings; all are stopped afterwards.

    Each one's output goes to ``tmp_path/worker-N.log``.
    """
    started: list[subprocess.Popen[bytes]] = []

    def start(settings: Settings, *, concurrency: int = 8) -> subprocess.Popen[bytes]:
        env = {**os.environ, **settings.with_(concurrency=concurrency).to_env()}
        with open(tmp_path / f"worker-{len(started)}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker", "worker", "--loglevel", "INFO"],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.terminate()
    for proc in started:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
