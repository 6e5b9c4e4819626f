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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, make_url, text
from sqlalchemy.exc import DBAPIError

from qbgw.emulator.server import Emulator, EmulatorConfig
from qbgw.runtime import locator as runtime_module
from qbgw.settings import Secret, Settings
from qbgw.store.models import GENESIS

PG_ADMIN_URL = os.environ.get("QBGW_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("QBGW_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
#: "host:port" of a PgBouncer in transaction pooling mode in front of that PostgreSQL (``.ci/run`` starts one on
#: 127.0.0.1:6432): when set, the application role (workers, producers, readers) connects through it, as a
#: fleet does in production; the owner and the superuser still connect directly (migrations, DDL, tampering).
PGBOUNCER = os.environ.get("QBGW_TEST_PGBOUNCER", "")
#: A RabbitMQ only the tests use: queues of a test's own in its default vhost, deleted after the test.
RABBITMQ_URL = os.environ.get("QBGW_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
TOKEN = "tok-canary-5f1c9e27d3"
#: A fixed PHI key for tests (the embedded default would generate one; PostgreSQL needs one given).
TEST_KEYS = "ktest:" + "A" * 43 + "="
ASSISTANT = "65d5f3473d5d68095462165d"
ROOT = Path(__file__).resolve().parent.parent


#: Fixtures (and parameters) that mean a test needs a server; the markers are given from them, so they are true.
_POSTGRES = {"pg", "pg_database", "production_settings", "restartable_settings", "owner_settings"}
_REDIS = {"redis_url", "production_settings", "private_redis", "rabbitmq_settings"}
_RABBITMQ = {"rabbitmq_url", "rabbitmq_settings"}
#: The stacks of tests/e2e (the ``stack`` fixture's parameters) that run on PostgreSQL, on Redis, on RabbitMQ.
_ON_POSTGRES = {"redis+postgres", "rabbitmq+postgres"}
_ON_REDIS = _ON_POSTGRES  # RabbitMQ's stack keeps the fleet's shared state in Redis (QBGW_REDIS_URL)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test by what it runs on: ``e2e`` (real processes), ``postgres``, ``redis``, ``rabbitmq``."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "tests/e2e/" in item.nodeid:
            item.add_marker(pytest.mark.e2e)
        stack = params.get("stack")
        if fixtures & _POSTGRES or str(params.get("backend", "")).startswith("postgres") or stack in _ON_POSTGRES:
            item.add_marker(pytest.mark.postgres)
        if fixtures & _REDIS or stack in _ON_REDIS:
            item.add_marker(pytest.mark.redis)
        if fixtures & _RABBITMQ or stack == "rabbitmq+postgres":
            item.add_marker(pytest.mark.rabbitmq)


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


#: Cluster-wide roles the PostgreSQL tests use: an owner that is not a superuser, and the application role
#: workers and producers connect as. Other test sessions on this machine may create them at the same moment;
#: nothing drops them.
OWNER_ROLE, APP_ROLE = "qbgw_test_owner", "qbgw_test_app"


@dataclass(frozen=True)
class PgDatabase:
    """One test session's PostgreSQL database, by who connects to it."""

    #: A superuser: creates and drops the database, empties its tables between tests.
    admin: str
    #: Owns the database and migrated it (not a superuser): `qbgw audit drop`, tampering, migrations.
    owner: str
    #: The application role, granted by `qbgw db roles`: what workers, producers and readers use (through
    #: PgBouncer when QBGW_TEST_PGBOUNCER is set).
    app: str
    #: The application role connecting directly, for LISTEN, when ``app`` goes through PgBouncer ("": ``app``).
    listen: str = ""
    #: ``app`` goes through PgBouncer in transaction mode.
    pooled: bool = False

    def for_app(self) -> dict[str, Any]:
        """The settings that make a process connect as the application role (through PgBouncer, if set)."""
        return {"database_url": self.app, "listen_database_url": self.listen, "db_transaction_pooling": self.pooled}


def _create_role(admin: Engine, name: str) -> None:
    """CREATE ROLE, unless it exists; two sessions creating it at once is no failure."""
    with admin.connect() as connection:
        if connection.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": name}).first():
            return
        try:
            connection.execute(text(f'CREATE ROLE "{name}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE'))
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) not in ("42710", "23505"):  # duplicate_object, unique_violation
                raise


@pytest.fixture(scope="session")
def pg() -> Iterator[PgDatabase]:
    """A fresh PostgreSQL database for this test session, owned by a role that is not a superuser, migrated
    by it, with `qbgw db roles` applied for the application role."""
    require_service("PostgreSQL on 127.0.0.1:5432", _port_open("127.0.0.1", 5432))
    name = f"qbgw_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    for role in (OWNER_ROLE, APP_ROLE):
        _create_role(admin, role)
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}" OWNER "{OWNER_ROLE}"'))
    on_database = make_url(PG_ADMIN_URL).set(database=name)
    urls = PgDatabase(
        *(
            on_database.set(username=user).render_as_string(hide_password=False)
            for user in (on_database.username, OWNER_ROLE, APP_ROLE)
        )
    )
    from qbgw.store import roles, schema

    schema.upgrade(urls.owner)
    roles.apply(urls.owner, APP_ROLE)
    if PGBOUNCER:
        host, _, port = PGBOUNCER.rpartition(":")
        require_service(f"PgBouncer on {PGBOUNCER} (QBGW_TEST_PGBOUNCER)", _port_open(host, int(port)))
        through = on_database.set(username=APP_ROLE, host=host, port=int(port))
        urls = PgDatabase(urls.admin, urls.owner, through.render_as_string(hide_password=False), urls.app, True)
    yield urls
    runtime_module.reset()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_database(pg: PgDatabase) -> str:
    """The session's PostgreSQL database, as its owner (see :class:`PgDatabase` for the other roles)."""
    return pg.owner


@pytest.fixture(scope="session")
def redis_url() -> str:
    require_service("Redis on 127.0.0.1:6379", _port_open("127.0.0.1", 6379))
    return REDIS_URL


def _truncate(url: str) -> None:
    """Empty the tables between tests, as a superuser (``url``): the append-only triggers refuse it to
    anyone else, so they are bypassed for this one transaction."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("SET LOCAL session_replication_role = replica"))
            connection.execute(
                text(
                    "TRUNCATE jobs, batches, audit_events, audit_pending, api_keys, webhook_secrets, "
                    "webhook_deliveries, console_users, console_sessions, files, openai_batches"
                )
            )
            connection.execute(
                text(
                    f"UPDATE audit_chain_head SET seq = 0, row_hash = '{GENESIS}', v2_from = 1, "
                    "v3_from = 1, last_at = NULL"
                )
            )
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
    if backend.startswith("postgres"):
        pg: PgDatabase = request.getfixturevalue("pg")
        _truncate(pg.admin)
        # "postgres-block": audit events staged at commit and chained by the block sealer (QBGW_AUDIT_SEAL).
        return base.with_(**pg.for_app(), audit_seal="block" if backend == "postgres-block" else "commit")
    return base


@pytest.fixture
def owner_url(settings: Settings, backend: str, request: pytest.FixtureRequest) -> str:
    """The database of ``settings`` as its owner: the same SQLite file, or PostgreSQL's owner role (who may
    lift the append-only triggers, as an attacker with the owner's password could)."""
    if backend.startswith("postgres"):
        return str(request.getfixturevalue("pg").owner)
    return settings.effective_database_url


@pytest.fixture
def owner_settings(settings: Settings, owner_url: str) -> Settings:
    """``settings`` connecting as the database's owner (on SQLite, the same)."""
    return settings.with_(database_url=owner_url) if settings.database_url else settings


@contextmanager
def as_owner(url: str) -> Iterator[Connection]:
    """One transaction as the database's owner with the append-only triggers off (put back at its end): what
    the owner, or anyone holding its password, can do, and only the signed anchors notice."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
                yield connection
                connection.execute(text("ALTER TABLE audit_events ENABLE TRIGGER USER"))
            else:
                triggers = connection.execute(
                    text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_events'")
                ).all()
                for name, _ in triggers:
                    connection.execute(text(f"DROP TRIGGER {name}"))
                yield connection
                for _, sql in triggers:
                    connection.execute(text(sql))
    finally:
        engine.dispose()


@pytest.fixture
def embedded_settings(tmp_path: Path, emu: Emulator) -> Settings:
    return base_settings(tmp_path, emu)


@pytest.fixture
def production_settings(tmp_path: Path, emu: Emulator, pg: PgDatabase, redis_url: str) -> Iterator[Settings]:
    """PostgreSQL, as the application role, + Redis, with a queue of this test's own."""
    _truncate(pg.admin)
    settings = base_settings(tmp_path, emu).with_(**pg.for_app(), broker_url=redis_url)
    yield settings
    import redis

    client = redis.Redis.from_url(redis_url)
    client.delete(settings.queue)
    client.close()


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    require_service("RabbitMQ on 127.0.0.1:5672", _port_open("127.0.0.1", 5672))
    return RABBITMQ_URL


def delete_amqp_queues(url: str, names: tuple[str, ...]) -> None:
    """Delete a test's queues and their exchanges from RabbitMQ (durable: they would outlive the test)."""
    from kombu import Connection

    with Connection(url, connect_timeout=5) as connection:
        channel = connection.channel()
        for name in names:
            channel.queue_delete(name)
            channel.exchange_delete(name)


@pytest.fixture
def rabbitmq_settings(
    tmp_path: Path, emu: Emulator, pg: PgDatabase, redis_url: str, rabbitmq_url: str
) -> Iterator[Settings]:
    """PostgreSQL (as the application role) + RabbitMQ as the broker + Redis for the fleet's shared state
    (QBGW_REDIS_URL: rate limit, cooldown, session), with queues of this test's own."""
    _truncate(pg.admin)
    settings = base_settings(tmp_path, emu).with_(**pg.for_app(), broker_url=rabbitmq_url, redis_url=redis_url)
    yield settings
    delete_amqp_queues(rabbitmq_url, settings.queues)


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
                [sys.executable, "-m", "qbgw", "worker", "--loglevel", "INFO"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        started.append(proc)
        return proc

    yield start
    # A worker that ended by itself with an error while nobody waited for it (a test that expects an exit waits
    # for it, and so sees its code first) is a failure, even when the test passed without it: a flaky e2e test
    # once hid two workers dead of the same crash (kombu's filesystem transport, qbgw.runtime.filebroker).
    died = [(n, code) for n, proc in enumerate(started) if proc.returncode is None and (code := proc.poll() or 0) > 0]
    for proc in started:
        proc.terminate()
    for proc in started:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if died:
        logs = "\n".join(
            f"--- worker {n} exited with {code}:\n" + (tmp_path / f"worker-{n}.log").read_text(errors="replace")[-3000:]
            for n, code in died
        )
        pytest.fail(f"{len(died)} worker(s) ended by themselves during the test\n{logs}")


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
