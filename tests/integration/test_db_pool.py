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
        # Terminating is asynchronous: wait until the backend is gone (its socket closed), not a fixed 0.3 s.
        deadline = time.monotonic() + 10
        alive = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
        while holder.execute(alive, {"pid": pid}).scalar() and time.monotonic() < deadline:
            holder.rollback()  # a new snapshot of pg_stat_activity each time
            time.sleep(0.05)
        holder.rollback()
        with engine.connect() as fresh:  # no StoreUnavailable: the dead one is dropped at checkout
            assert fresh.execute(text("SELECT pg_backend_pid()")).scalar() not in (pid, None)
        holder.close()
    finally:
        engine.dispose()
