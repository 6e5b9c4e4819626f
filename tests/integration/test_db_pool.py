"""The worker's connection pool: one connection per thread, and no round trip to test a pooled one."""

from __future__ import annotations

import time

from sqlalchemy import text

from qbgw.settings import Settings
from qbgw.store.db import make_engine


def test_the_pool_holds_a_connection_per_task_that_can_run_at_once() -> None:
    assert Settings(concurrency=32).effective_db_pool_size == 32
    assert Settings(concurrency=8, pool="prefork").effective_db_pool_size == 1  # a child runs one task at a time
    assert Settings(concurrency=32, db_pool_size=12).effective_db_pool_size == 12


def test_a_connection_the_server_closed_while_pooled_is_replaced_not_used(pg_database: str) -> None:
    engine = make_engine(pg_database, pool_size=2)
    try:
        holder = engine.connect()  # keeps the victim's slot from being the terminator's
        victim = engine.connect()
        pid = victim.execute(text("SELECT pg_backend_pid()")).scalar()
        victim.rollback()
        victim.close()  # back in the pool, idle
        holder.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        holder.commit()
        time.sleep(0.3)
        with engine.connect() as fresh:  # no StoreUnavailable: the dead one is dropped at checkout
            assert fresh.execute(text("SELECT pg_backend_pid()")).scalar() not in (pid, None)
        holder.close()
    finally:
        engine.dispose()
