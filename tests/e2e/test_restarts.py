"""Real worker processes whose dependencies go away and come back: Redis restarted empty under jobs in
flight, Redis demoted to a replica (an error Celery cannot recover from), PostgreSQL not there yet at start."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis as redis_lib
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bench.chaos import PrivateRedis
from qbgw import producer
from qbgw.cli.kit import EXIT
from qbgw.emulator import Emulator
from qbgw.lifecycle import JobStatus
from qbgw.queries import get_job, wait_for_job
from qbgw.settings import Settings
from tests.conftest import ASSISTANT, PG_ADMIN_URL, wait_until
from tests.e2e.test_operations import free_port
from tests.proxy import Proxy

#: Redis restarts in one run. Without worker/broker_guard.py the first one already stopped a worker in 4 runs
#: of 4; it takes the connection loss being noticed on the remote-control socket before the pending BRPOP,
#: a race, so a pass needs several restarts to mean something.
ROUNDS = 6
#: Jobs per round over 2 workers of 8 threads: each worker holds unacknowledged messages and still has free
#: threads (so a BRPOP is pending), the two conditions of that crash.
JOBS_PER_ROUND = 6


def submit(settings: Settings, text_: str) -> str:
    return producer.submit(ASSISTANT, [{"role": "user", "content": text_}], settings=settings)


def log_of(tmp_path: Path, n: int) -> str:
    return (tmp_path / f"worker-{n}.log").read_text(errors="replace")


def until(
    predicate: Callable[[], bool], workers: Sequence[subprocess.Popen[bytes]], tmp_path: Path, timeout: float = 30
) -> None:
    """wait_until, failing at once (with the dead worker's log) if a worker exits meanwhile."""

    def check() -> bool:
        for n, worker in enumerate(workers):
            if worker.poll() is not None:
                raise AssertionError(f"worker {n} exited with {worker.returncode}:\n{log_of(tmp_path, n)[-6000:]}")
        return predicate()

    wait_until(check, timeout=timeout, interval=0.1)


def test_workers_ride_out_redis_restarts_with_jobs_in_flight(
    restartable_settings: Settings,
    private_redis: PrivateRedis,
    worker_process: Callable[..., Any],
    tmp_path: Path,
    emu: Emulator,
) -> None:
    settings = restartable_settings.with_(sweep_grace=1.0)
    workers = [worker_process(settings, concurrency=8) for _ in range(2)]

    def connections(n: int) -> int:
        return log_of(tmp_path, n).count("Connected to redis://")

    until(lambda: all(connections(n) == 1 for n in range(2)), workers, tmp_path)
    jobs: list[str] = []
    for round_ in range(1, ROUNDS + 1):
        calls = len(emu.arrivals())
        batch = [submit(settings, f"round {round_} job {n} [[emulator:sleep=3]]") for n in range(JOBS_PER_ROUND)]
        jobs += batch
        until(
            lambda batch=batch: all(get_job(j, settings=settings).status is JobStatus.RUNNING for j in batch),
            workers,
            tmp_path,
        )
        until(lambda calls=calls: len(emu.arrivals()) >= calls + JOBS_PER_ROUND, workers, tmp_path)  # calls under way
        private_redis.shutdown()  # SHUTDOWN NOSAVE: every connection closed, every message gone
        time.sleep(0.5)
        private_redis.start()
        until(lambda round_=round_: all(connections(n) == 1 + round_ for n in range(2)), workers, tmp_path)
    for job_id in jobs:  # the sweeper publishes again whatever Redis lost
        assert wait_for_job(job_id, timeout=60, settings=settings).status is JobStatus.SUCCEEDED
    assert [w.poll() for w in workers] == [None, None]
    for n in range(2):
        assert "Unrecoverable error" not in log_of(tmp_path, n)


def test_a_worker_that_dies_of_an_unrecoverable_error_exits_non_zero(
    embedded_settings: Settings, private_redis: PrivateRedis, worker_process: Callable[..., Any], tmp_path: Path
) -> None:
    worker = worker_process(embedded_settings.with_(broker_url=private_redis.url))
    until(lambda: "ready." in log_of(tmp_path, 0), [worker], tmp_path)
    # A failover demotes Redis to a replica: the worker's pending BRPOP is answered "UNBLOCKED ... (master ->
    # replica?)", a broker error Celery does not retry ("Unrecoverable error").
    client = redis_lib.Redis.from_url(private_redis.url)
    client.replicaof("127.0.0.1", free_port())
    client.close()
    assert worker.wait(timeout=30) == EXIT["worker_failed"]
    assert "Unrecoverable error" in log_of(tmp_path, 0)


def test_a_worker_stopped_by_sigterm_exits_0(
    embedded_settings: Settings, worker_process: Callable[..., Any], tmp_path: Path
) -> None:
    worker = worker_process(embedded_settings)
    until(lambda: "ready." in log_of(tmp_path, 0), [worker], tmp_path)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0


def through_proxy(settings: Settings) -> tuple[Settings, Proxy]:
    url = make_url(settings.database_url)
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    return settings.with_(database_url=url.set(port=proxy.port).render_as_string(False)), proxy


def test_a_worker_started_while_its_database_is_away_waits_for_it(
    production_settings: Settings, worker_process: Callable[..., Any], tmp_path: Path
) -> None:
    settings, proxy = through_proxy(production_settings)
    proxy.cut()
    try:
        worker = worker_process(settings)
        until(lambda: "retrying in 2s" in log_of(tmp_path, 0), [worker], tmp_path)  # 1 s, then 2 s: backing off
        job_id = submit(production_settings, "the database is back")  # the producer reaches it directly
        assert get_job(job_id, settings=production_settings).status is JobStatus.QUEUED
        proxy.restore()
        view = wait_for_job(job_id, timeout=60, settings=production_settings)
        assert view.status is JobStatus.SUCCEEDED
        assert worker.poll() is None
        assert "database unreachable (" in log_of(tmp_path, 0)
        assert "retrying in 1s" in log_of(tmp_path, 0)
    finally:
        proxy.close()


def test_a_worker_waiting_for_its_database_stops_at_once_on_sigterm(
    production_settings: Settings, worker_process: Callable[..., Any], tmp_path: Path
) -> None:
    settings, proxy = through_proxy(production_settings)
    proxy.cut()
    try:
        worker = worker_process(settings)
        until(lambda: "database unreachable" in log_of(tmp_path, 0), [worker], tmp_path)
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=10) == 0
        assert time.monotonic() - started < 3
    finally:
        proxy.close()


def test_a_worker_on_an_unmigrated_database_exits_7_at_once(
    production_settings: Settings, worker_process: Callable[..., Any]
) -> None:
    name = f"qbgw_empty_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        empty = make_url(production_settings.database_url).set(database=name).render_as_string(False)
        worker = worker_process(production_settings.with_(database_url=empty))
        assert worker.wait(timeout=30) == EXIT["config"]
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_a_broker_lost_while_a_batch_is_published_leaves_its_jobs_to_the_sweeper(
    restartable_settings: Settings, private_redis: PrivateRedis, monkeypatch: Any
) -> None:
    # Redis dies after the first chunk of 500 is published (the second chunk is stored, then its pipeline
    # fails): the failed chunk and every later one are stored unannounced, nothing is lost, and a sweep once
    # Redis is back publishes each of them.
    from qbgw.admin import sweep
    from qbgw.store import batches as batch_store
    from qbgw.store.models import Job

    settings = restartable_settings
    real, chunks = batch_store.insert_jobs, []

    def insert_then_lose_the_broker(**kwargs: Any) -> None:
        chunks.append(len(kwargs["jobs"]))
        if len(chunks) == 2:
            private_redis.kill()
        real(**kwargs)

    monkeypatch.setattr(batch_store, "insert_jobs", insert_then_lose_the_broker)
    lines = [f'{{"custom_id": "c{i}", "messages": [{{"role": "user", "content": "note {i}"}}]}}' for i in range(1_200)]
    view = producer.submit_batch(lines, assistant_id=ASSISTANT, settings=settings)
    assert chunks == [500, 500, 200]
    assert view.total == 1_200
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text(f"SELECT id, announced_at IS NULL FROM {Job.__tablename__}")).all()
    finally:
        engine.dispose()
    unannounced = {job_id for job_id, waiting in rows if waiting}
    assert len(rows) == 1_200
    assert len(unannounced) == 700
    private_redis.start()
    dispatched: set[str] = set()
    for _ in range(10):  # a sweep publishes a bounded number of jobs
        dispatched |= set(sweep(settings=settings, grace=0).dispatched)
        if unannounced <= dispatched:
            break
    assert unannounced <= dispatched
