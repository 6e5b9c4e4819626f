"""A minimal hand-written Celery app: the floor ``bench.throughput`` holds qbgw's pipeline against.

Configured like qbgw's app (JSON, no result backend, ``acks_late``, prefetch 1, no events), and run by
``bench.throughput`` as ``celery -A bench.minimal_app worker --pool threads -c 32``. Its tasks:

* ``call_and_insert(row_id, text)``: one POST of an OpenAI-format body to the gateway emulator with a
  per-thread ``requests.Session``, then one INSERT of the answer into a scratch table (SQLAlchemy Core);
* ``insert_only(row_id)``: the INSERT without the POST;
* ``noop(key)``: a Redis ``SET`` of ``key``, so a bare Celery round trip can be timed without a database.

The worker reads its broker, database, gateway and queue from ``BENCH_MIN_*`` environment variables.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import redis
import requests
from celery import Celery
from sqlalchemy import Engine, create_engine, text

__all__ = ["TABLE_DDL", "CALL", "INSERT_ONLY", "NOOP", "make_app", "app"]

TABLE = "bench_minimal"
TABLE_DDL = f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, answer text, done_at double precision)"
CALL = "bench.minimal.call_and_insert"
INSERT_ONLY = "bench.minimal.insert_only"
NOOP = "bench.minimal.noop"
GATEWAY_PATH = "/ai/ai_extensions/ai_gateway"
_INSERT = text(f"INSERT INTO {TABLE} (id, answer, done_at) VALUES (:id, :answer, :done_at)")

_local = threading.local()
_shared: dict[str, Any] = {}
_guard = threading.Lock()


def _env(name: str, default: str = "") -> str:
    return os.environ.get(f"BENCH_MIN_{name}", default)


def _engine() -> Engine:
    with _guard:
        if "engine" not in _shared:  # 10 + 40 overflow, no pre-ping (qbgw's pool before it was sized)
            _shared["engine"] = create_engine(_env("DATABASE_URL"), pool_size=10, max_overflow=40)
        engine: Engine = _shared["engine"]
        return engine


def _redis() -> redis.Redis:
    with _guard:
        if "redis" not in _shared:
            _shared["redis"] = redis.Redis.from_url(_env("BROKER_URL"))
        client: redis.Redis = _shared["redis"]
        return client


def _session() -> requests.Session:
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


def _insert(row_id: str, answer: str | None) -> None:
    with _engine().begin() as connection:
        connection.execute(_INSERT, {"id": row_id, "answer": answer, "done_at": time.time()})


def make_app(broker_url: str, queue: str) -> Celery:
    """The app, configured as qbgw configures its own, with the three tasks registered."""
    celery = Celery("bench_minimal", broker=broker_url, set_as_current=False)
    celery.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
    )

    @celery.task(name=CALL)  # type: ignore[untyped-decorator]
    def call_and_insert(row_id: str, content: str) -> None:
        body = {"smart_chat_assistant_id": _env("ASSISTANT"), "messages": [{"role": "user", "content": content}]}
        reply = _session().post(
            _env("GATEWAY_URL") + GATEWAY_PATH,
            data=json.dumps(body, separators=(",", ":")).encode(),
            headers={"QB-Token": _env("TOKEN"), "Content-Type": "application/json"},
            timeout=(5.0, 120.0),
        )
        reply.raise_for_status()
        _insert(row_id, reply.json()["answer"])

    @celery.task(name=INSERT_ONLY)  # type: ignore[untyped-decorator]
    def insert_only(row_id: str) -> None:
        _insert(row_id, None)

    @celery.task(name=NOOP)  # type: ignore[untyped-decorator]
    def noop(key: str) -> None:
        _redis().set(key, b"1", ex=600)

    return celery


#: The worker's app (``celery -A bench.minimal_app``); the publisher makes its own with make_app.
app = make_app(_env("BROKER_URL", "redis://127.0.0.1:6379/15"), _env("QUEUE", "bench-minimal"))
