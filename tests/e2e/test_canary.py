"""The canary: distinctive PHI and a distinctive token go through a real worker on Redis and
PostgreSQL, logging JSON and serving metrics; then every sink is searched for them (the broker, the
database, the worker's log, its metrics, the exporter's, ``qbgw health``). Zero hits allowed."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import requests
from click.testing import CliRunner
from prometheus_client import generate_latest
from sqlalchemy import create_engine, inspect, text

from qbgw import access_report, producer
from qbgw.cli.main import cli
from qbgw.errors import IdempotencyConflict, InvalidMessages, JobNotFound, QbgwError
from qbgw.lifecycle import JobStatus
from qbgw.ops import metrics
from qbgw.ops.exporter import FleetCollector
from qbgw.queries import failed_jobs, get_job, job_events, wait_for_job
from qbgw.runtime import locator as runtime_module
from qbgw.runtime.locator import runtime
from qbgw.settings import Secret, Settings
from tests.conftest import ASSISTANT, TOKEN
from tests.e2e.test_operations import free_port

CANARIES = ("Wilhelmina-Zbrovsky", "DOB-1907-03-31", "MRN-88812077")
PHI = f"Patient {CANARIES[0]}, {CANARIES[1]}, record {CANARIES[2]}, complains of dizziness"


class Monitor(threading.Thread):
    """Everything Redis is told while the test runs (MONITOR), as text."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = redis_lib.Redis.from_url(url)
        self.seen: list[str] = []
        self.ready = threading.Event()

    def run(self) -> None:
        with self.client.monitor() as monitor:
            self.ready.set()
            try:
                for command in monitor.listen():
                    self.seen.append(str(command.get("command", "")))
            except (redis_lib.ConnectionError, ValueError):
                return

    def stop(self) -> None:
        self.client.close()


def hits(haystack: str) -> list[str]:
    return [c for c in (*CANARIES, TOKEN) if c in haystack]


def test_no_phi_or_token_reaches_any_sink(
    production_settings: Settings,
    worker_process: Callable[..., Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    redis_url: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    monitor = Monitor(redis_url)
    monitor.start()
    monitor.ready.wait(5)
    port = free_port()
    # The record number is also the first job's subject: encrypted, blind-indexed, never in clear anywhere.
    settings = production_settings.with_(log_format="json", metrics_port=port, subject_key=Secret("c" * 40))
    worker_process(settings)
    ok = producer.submit(
        ASSISTANT, [{"role": "user", "content": PHI}], actor="clinic", subject=CANARIES[2], settings=settings
    )
    retried = producer.submit(
        ASSISTANT, [{"role": "user", "content": f"{PHI} [[emulator:fail=503x1]]"}], settings=settings
    )
    failed = producer.submit(
        ASSISTANT,
        [{"role": "user", "content": f"{PHI} [[emulator:fail=422]]"}],
        idempotency_key="visit-1",
        settings=settings,
    )
    for job_id in (ok, retried, failed):
        wait_for_job(job_id, timeout=60, settings=settings)
    view = get_job(ok, settings=settings)
    # The answer does carry the PHI (the emulator quotes it): decrypted for its reader, and only here.
    assert view.status is JobStatus.SUCCEEDED
    assert CANARIES[0] in (view.answer or "")
    failed_jobs(settings=settings)
    job_events(ok, settings=settings)
    assert [j.job_id for j in access_report(CANARIES[2], actor="privacy", settings=settings).jobs] == [ok]

    texts = []
    for attempt in (
        lambda: producer.submit(
            ASSISTANT, [{"role": "user", "content": "other"}], idempotency_key="visit-1", settings=settings
        ),
        lambda: producer.submit(
            ASSISTANT, [{"role": "user", "content": [{"type": "text", "text": PHI, "x": 1}]}], settings=settings
        ),
        lambda: get_job("no-such-job", settings=settings),
    ):
        with pytest.raises((IdempotencyConflict, InvalidMessages, JobNotFound)) as caught:
            attempt()
        assert isinstance(caught.value, QbgwError)
        texts.append(str(caught.value) + repr(caught.value))

    monitor.stop()
    runtime_module.reset()
    health = CliRunner().invoke(cli, ["health", "--json"], env=settings.to_env(), catch_exceptions=False)
    worker_log = (tmp_path / "worker-0.log").read_text()
    assert all(json.loads(line) for line in worker_log.splitlines() if line.strip())  # JSON Lines, every line
    sinks = {
        "redis commands": "\n".join(monitor.seen),
        "redis keyspace": _redis_dump(redis_url),
        "worker log": worker_log,
        "worker metrics": requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text,
        "exporter metrics": generate_latest(
            metrics.registry_for(fleet=FleetCollector(runtime(settings)), workers=False)
        ).decode(),
        "qbgw health": health.output,
        "producer log": caplog.text,
        "database plaintext": _database_dump(settings.database_url),
        "exception texts": "\n".join(texts),
    }
    assert len(sinks["redis commands"]) > 0
    assert ok in sinks["redis commands"]
    assert ok in sinks["worker log"]
    assert ok in sinks["database plaintext"]
    assert 'qbgw_attempts_total{http_status="200",outcome="succeeded"}' in sinks["worker metrics"]
    assert 'qbgw_jobs{status="succeeded"}' in sinks["exporter metrics"]
    assert '"name": "upstream"' in health.output
    found = {name: hits(text) for name, text in sinks.items() if hits(text)}
    assert found == {}


def _redis_dump(url: str) -> str:
    client = redis_lib.Redis.from_url(url)
    parts = []
    try:
        for key in client.scan_iter(count=1000):
            parts.append(f"{key!r} {_value(client, key)!r}")
    finally:
        client.close()
    return "\n".join(parts)


def _value(client: redis_lib.Redis, key: bytes) -> Any:
    kind = client.type(key).decode()
    if kind == "string":
        return client.get(key)
    if kind == "list":
        return client.lrange(key, 0, -1)
    if kind == "hash":
        return client.hgetall(key)
    if kind == "set":
        return client.smembers(key)
    return client.zrange(key, 0, -1) if kind == "zset" else b""


def _database_dump(url: str) -> str:
    engine = create_engine(url)
    parts = []
    try:
        with engine.connect() as connection:
            for table in inspect(connection).get_table_names():
                for row in connection.execute(text(f'SELECT * FROM "{table}"')):
                    parts.append(f"{table}: {tuple(row)!r}")
    finally:
        engine.dispose()
    return "\n".join(parts)
