"""A minimal hand-written Celery app: the floor ``bench.throughput`` holds qbgw's pipeline against.

Configured like qbgw's app (JSON, no result backend, ``acks_late``, prefetch 1, no events), and run by
``bench.throughput`` as ``celery -A bench.minimal_app worker --pool threads -c 32``. Its tasks:

* ``call_and_insert(row_id, text)``: one POST of an OpenAI-format body to the gateway emulator with a
  per-thread ``requests.Session``, then one INSERT of the answer into a scratch table (SQLAlchemy Core);
* ``insert_only(row_id)``: the INSERT without the POST;
* ``noop(key)``: a Redis ``SET`` of ``key``, so a bare Celery round trip can be timed without a database;
* ``call_audited(row_id)``: the minimal task with the commits of an audited design, written by hand: the
  job's row is read and claimed with a hash-chained audit event in one statement before the POST, and the
  answer stored with another after it. With :func:`submit_audited` and :func:`read_audited` on the client's
  side (a row with its event before publishing; the answer read with its event), it is the floor of a job
  that is on the record at each of its four steps, as a qbgw job is, without qbgw.

The worker reads its broker, database, gateway and queue from ``BENCH_MIN_*`` environment variables.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import psycopg
import redis
import requests
from celery import Celery
from sqlalchemy import Engine, create_engine, make_url, text

__all__ = [
    "TABLE_DDL",
    "AUDITED_DDL",
    "CALL",
    "INSERT_ONLY",
    "NOOP",
    "CALL_AUDITED",
    "make_app",
    "app",
    "connect",
    "submit_audited",
    "read_audited",
]

TABLE = "bench_minimal"
TABLE_DDL = f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, answer text, done_at double precision)"
CALL = "bench.minimal.call_and_insert"
INSERT_ONLY = "bench.minimal.insert_only"
NOOP = "bench.minimal.noop"
CALL_AUDITED = "bench.minimal.call_audited"
GATEWAY_PATH = "/ai/ai_extensions/ai_gateway"
_INSERT = text(f"INSERT INTO {TABLE} (id, answer, done_at) VALUES (:id, :answer, :done_at)")

#: The audited task's tables: its jobs, a hash chain of audit events, and the chain's head (one row, locked by
#: each event's statement until its commit, as any hash chain must serialize its appends).
JOBS, AUDIT, HEAD = "bench_minimal_jobs", "bench_minimal_audit", "bench_minimal_chain"
AUDITED_DDL = (
    f"CREATE TABLE IF NOT EXISTS {JOBS} (id text PRIMARY KEY, content text NOT NULL, state text NOT NULL, "
    "answer text, done_at double precision)",
    f"CREATE TABLE IF NOT EXISTS {AUDIT} (seq bigint PRIMARY KEY, hash bytea NOT NULL, event text NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {HEAD} (one boolean PRIMARY KEY CHECK (one), seq bigint NOT NULL, "
    "hash bytea NOT NULL)",
    f"INSERT INTO {HEAD} VALUES (true, 0, decode('00', 'hex')) ON CONFLICT DO NOTHING",
)


def _chain(job: str) -> str:
    """CTEs appending the event ``event`` to the chain, in the same statement (and transaction) as what it records:
    only when the CTE ``job`` found (or made) the job's row, so a duplicate delivery or a missing row records
    nothing."""
    return (
        f"head AS (UPDATE {HEAD} SET seq = seq + 1, hash = sha256(hash || convert_to(%(event)s, 'UTF8')) "
        f"WHERE one AND EXISTS (SELECT 1 FROM {job}) RETURNING seq, hash), "
        f"ev AS (INSERT INTO {AUDIT} (seq, hash, event) SELECT seq, hash, %(event)s FROM head)"
    )


_SUBMIT = (
    f"WITH job AS (INSERT INTO {JOBS} (id, content, state) VALUES (%(id)s, %(content)s, 'queued') RETURNING id), "
    f"{_chain('job')} SELECT 1"
)
_CLAIM = (
    f"WITH job AS (UPDATE {JOBS} SET state = 'running' WHERE id = %(id)s AND state = 'queued' RETURNING content), "
    f"{_chain('job')} SELECT content FROM job"
)
_FINISH = (
    f"WITH job AS (UPDATE {JOBS} SET state = 'done', answer = %(answer)s, done_at = %(done_at)s WHERE id = %(id)s "
    f"RETURNING id), {_chain('job')} SELECT 1"
)
_READ = f"WITH job AS (SELECT answer FROM {JOBS} WHERE id = %(id)s), {_chain('job')} SELECT answer FROM job"

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


def connect(database_url: str) -> psycopg.Connection[Any]:
    """A connection for the audited task's statements: straight psycopg, in autocommit (each statement its own
    transaction, one round trip: the floor; the minimal task's INSERT pays SQLAlchemy, psycopg's BEGIN and a
    COMMIT besides)."""
    url = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    return psycopg.connect(url, autocommit=True)


def _connection() -> psycopg.Connection[Any]:
    connection: psycopg.Connection[Any] | None = getattr(_local, "connection", None)
    if connection is None:
        connection = _local.connection = connect(_env("DATABASE_URL"))
    return connection


def submit_audited(connection: psycopg.Connection[Any], row_id: str, content: str) -> None:
    """The client's first step: the job's row and its ``submitted`` event, committed (then publish
    ``CALL_AUDITED``). ``connection``: from :func:`connect`."""
    connection.execute(_SUBMIT, {"id": row_id, "content": content, "event": f"submitted {row_id}"})


def read_audited(connection: psycopg.Connection[Any], row_id: str) -> str | None:
    """The client's last step: the answer, read with its ``read`` event committed."""
    row = connection.execute(_READ, {"id": row_id, "event": f"read {row_id}"}).fetchone()
    return None if row is None else str(row[0])


def _post(content: str) -> str:
    body = {"smart_chat_assistant_id": _env("ASSISTANT"), "messages": [{"role": "user", "content": content}]}
    reply = _session().post(
        _env("GATEWAY_URL") + GATEWAY_PATH,
        data=json.dumps(body, separators=(",", ":")).encode(),
        headers={"QB-Token": _env("TOKEN"), "Content-Type": "application/json"},
        timeout=(5.0, 120.0),
    )
    reply.raise_for_status()
    answer: str = reply.json()["answer"]
    return answer


def make_app(broker_url: str, queue: str) -> Celery:
    """The app, configured as qbgw configures its own, with the four tasks registered."""
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
        _insert(row_id, _post(content))

    @celery.task(name=CALL_AUDITED)  # type: ignore[untyped-decorator]
    def call_audited(row_id: str) -> None:
        connection = _connection()  # claimed, and the request on the record, before it is sent
        row = connection.execute(_CLAIM, {"id": row_id, "event": f"request {row_id}"}).fetchone()
        if row is None:
            return  # a duplicate delivery
        answer = _post(row[0])
        connection.execute(
            _FINISH, {"id": row_id, "answer": answer, "done_at": time.time(), "event": f"response {row_id}"}
        )

    @celery.task(name=INSERT_ONLY)  # type: ignore[untyped-decorator]
    def insert_only(row_id: str) -> None:
        _insert(row_id, None)

    @celery.task(name=NOOP)  # type: ignore[untyped-decorator]
    def noop(key: str) -> None:
        _redis().set(key, b"1", ex=600)

    return celery


#: The worker's app (``celery -A bench.minimal_app``); the publisher makes its own with make_app.
app = make_app(_env("BROKER_URL", "redis://127.0.0.1:6379/15"), _env("QUEUE", "bench-minimal"))
