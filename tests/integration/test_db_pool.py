"""The worker's connection pool: one connection per thread."""

from __future__ import annotations

from worker.settings import Settings


def test_the_pool_holds_a_connection_per_task_that_can_run_at_once() -> None:
    assert Settings(concurrency=32).effective_db_pool_size == 32
    assert Settings(concurrency=50, pool="gevent").effective_db_pool_size == 50
    assert Settings(concurrency=8, pool="prefork").effective_db_pool_size == 1  # a child runs one task at a time
    assert Settings(concurrency=32, db_pool_size=12).effective_db_pool_size == 12

