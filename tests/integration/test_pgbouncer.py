"""Through PgBouncer in transaction pooling mode (``.ci/run`` starts one on 127.0.0.1:6432): what does not survive
it, and the settings that make qbgw work behind it. The other PostgreSQL tests run through it too when
QBGW_TEST_PGBOUNCER is set (``.ci/run`` runs them so a second time)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from qbgw import producer
from qbgw.queries import get_job
from qbgw.runtime.locator import runtime
from qbgw.runtime.waiter import CHANNEL, JobWaiter
from qbgw.settings import Secret, Settings
from tests.conftest import (
    APP_ROLE,
    ASSISTANT,
    PGBOUNCER,
    TEST_KEYS,
    PgDatabase,
    _port_open,
    _truncate,
    require_service,
)

ADDRESS = PGBOUNCER or "127.0.0.1:6432"


@pytest.fixture
def pooled(pg: PgDatabase) -> Iterator[tuple[str, str]]:
    """(the application role through PgBouncer, the same role connecting directly), as libpq URLs."""
    host, _, port = ADDRESS.rpartition(":")
    require_service(f"PgBouncer on {ADDRESS}", _port_open(host, int(port)))
    _truncate(pg.admin)
    direct = make_url(pg.listen or pg.app).set(drivername="postgresql", username=APP_ROLE)
    through = direct.set(host=host, port=int(port))
    return through.render_as_string(hide_password=False), direct.render_as_string(hide_password=False)


def _heard(listen_url: str, notify_url: str) -> int:
    """How many NOTIFYs on the jobs' channel a connection that LISTENs at ``listen_url`` hears in 2 s."""
    heard: list[object] = []
    with psycopg.connect(listen_url, autocommit=True) as listener, psycopg.connect(notify_url, autocommit=True) as n:
        listener.execute(f"LISTEN {CHANNEL}")
        thread = threading.Thread(target=lambda: heard.extend(listener.notifies(timeout=2.0)))
        thread.start()
        time.sleep(0.3)
        n.execute(f"NOTIFY {CHANNEL}, 'probe'")
        thread.join()
    return len(heard)


def test_listen_hears_nothing_through_transaction_pooling_so_it_has_a_direct_url(pooled: tuple[str, str]) -> None:
    through, direct = pooled
    # PgBouncer hands the LISTEN's server connection back to its pool when the statement ends: the NOTIFY reaches
    # that server connection, never this client. Hence QBGW_LISTEN_DATABASE_URL.
    assert _heard(through, direct) == 0
    assert _heard(direct, direct) == 1
    settings = Settings(database_url="postgresql+psycopg://" + through.partition("://")[2], listen_database_url=direct)
    assert JobWaiter(settings.effective_listen_url).notifies
    assert settings.effective_listen_url == direct
    assert Settings(database_url="postgresql+psycopg://a@db/x").effective_listen_url == "postgresql+psycopg://a@db/x"


def test_the_runtime_prepares_no_statement_through_transaction_pooling(pooled: tuple[str, str], tmp_path: Path) -> None:
    through, direct = pooled
    settings = Settings(
        data_dir=tmp_path,
        database_url="postgresql+psycopg://" + through.partition("://")[2],
        listen_database_url=direct,
        db_transaction_pooling=True,
        encryption_keys=Secret(TEST_KEYS),
    )
    engine = runtime(settings).session_factory.kw["bind"]
    with engine.connect() as connection:
        assert connection.connection.dbapi_connection.prepare_threshold is None
    assert Settings().db_transaction_pooling is False  # by default psycopg prepares (threshold 5)
    # The same statements many times over from several threads: psycopg would prepare each after 5 runs, and
    # the next transaction's server connection would lack it (or already have it: DuplicatePreparedStatement).
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": "through pgbouncer"}], settings=settings)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(50):
                assert get_job(job_id, settings=settings).id == job_id
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
