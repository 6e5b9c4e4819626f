"""Benchmark the two embedded (serverless) Celery brokers the project could default to.

Candidates:

* ``filesystem``: kombu's ``filesystem://`` transport, one folder used as both ``data_folder_in`` and
  ``data_folder_out`` (``store_processed=False``), polling interval set through
  ``broker_transport_options={'polling_interval': 0.1}``.
* ``sqla``: kombu's SQLAlchemy transport on ``sqla+sqlite:///FILE``.  Its transport options are passed
  straight to ``sqlalchemy.create_engine()``, so ``polling_interval`` cannot go there (TypeError); it is set
  as the class attribute ``kombu.transport.sqlalchemy.Transport.polling_interval`` in this module instead.

The Celery configuration is the project's: ``task_ignore_result=True``, threads pool ``-c 8``,
``worker_prefetch_multiplier=1``, ``task_acks_late=True``, polling interval 0.1 s.  The task mimics the real
one in miniature: it opens a sqlite3 connection to a results db (WAL, busy_timeout 5000) and inserts
``(task_id, time.time())``.  A "round trip" is publish -> row visible in that table (producer polls every
5 ms).

Per broker a real worker subprocess is started (this module is the app module, the broker URL comes from
an environment variable; the worker runs with ``PYTHONWARNINGS=default`` so deprecation warnings show up
on its stderr) and the script measures:

1. 30 sequential round trips, median and p90 in ms, twice: back-to-back (the next task is published as
   soon as the previous row shows up; this phase-locks to the worker's poll loop, which sleeps a full
   polling interval right after each delivery, so it reads ~= polling interval) and with a random idle gap
   of 0..polling interval before each publish (random phase, what an isolated request sees);
2. three bursts of 1000 tasks published as fast as possible: time until all 1000 rows are visible
   (tasks/s, median of 3), plus the publish rate (send_task calls per second, median of 3);

then stops the worker (SIGTERM, SIGKILL after a grace period) and reports what the broker leaves behind
(rows in kombu's message table for sqla, files under the broker folder for filesystem) and any warnings,
errors or tracebacks the worker printed.  Everything lives in a ``tempfile.mkdtemp()`` directory that is
removed afterwards.

Run from the project root (takes about a minute)::

    .venv/bin/python -m bench.embedded_broker
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kombu.transport.filesystem
import kombu.transport.sqlalchemy
from celery import Celery
from celery.signals import worker_ready
from kombu import Connection

POLLING_INTERVAL = 0.1
CONCURRENCY = 8
ROUND_TRIPS = 30
BURST_SIZE = 1000
BURSTS = 3
ROW_POLL = 0.005  # producer polls the results table every 5 ms
READY_TIMEOUT = 60.0
ROUND_TRIP_TIMEOUT = 30.0
BURST_TIMEOUT = 90.0
STOP_GRACE = 15.0
TASK_NAME = "bench.embedded_broker.record"

ENV_BROKER_URL = "BENCH_BROKER_URL"
ENV_BROKER_DIR = "BENCH_BROKER_DIR"
ENV_RESULTS_DB = "BENCH_RESULTS_DB"
ENV_READY_FILE = "BENCH_READY_FILE"

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Trap: kombu's SQLAlchemy transport hands every transport option to create_engine(), so
# broker_transport_options={'polling_interval': ...} raises TypeError.  Class attribute instead.
kombu.transport.sqlalchemy.Transport.polling_interval = POLLING_INTERVAL


# --------------------------------------------------------------------------- app module (worker side)


def transport_options(broker_url: str, broker_dir: str | None) -> dict[str, Any]:
    """Broker transport options for ``broker_url`` (``broker_dir`` is the filesystem broker's folder)."""
    if not broker_url.startswith("filesystem://"):
        return {}  # sqla: anything here would be passed to create_engine()
    assert broker_dir, f"{ENV_BROKER_DIR} must be set for the filesystem broker"
    queue_dir = os.path.join(broker_dir, "queue")
    return {
        "data_folder_in": queue_dir,
        "data_folder_out": queue_dir,
        "processed_folder": os.path.join(broker_dir, "processed"),
        "store_processed": False,
        # Trap: the default control folder is the *relative* path "control" (exchange tables for
        # fanout exchanges such as celery.pidbox), i.e. it lands in the worker's working directory.
        "control_folder": os.path.join(broker_dir, "control"),
        "polling_interval": POLLING_INTERVAL,
    }


def record(task_id: str) -> None:
    """The task: what the real one does, in miniature (own SQLite db, one INSERT)."""
    conn = sqlite3.connect(os.environ[ENV_RESULTS_DB], timeout=5.0)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=5000")
        with conn:
            conn.execute("INSERT INTO results (task_id, finished_at) VALUES (?, ?)", (task_id, time.time()))
    finally:
        conn.close()


def make_app(broker_url: str, broker_dir: str | None) -> Celery:
    """A Celery app configured like the project's worker, on ``broker_url``."""
    celery_app = Celery("bench_embedded_broker", broker=broker_url, set_as_current=False)
    celery_app.conf.update(
        broker_transport_options=transport_options(broker_url, broker_dir),
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        worker_concurrency=CONCURRENCY,
    )
    celery_app.task(name=TASK_NAME)(record)
    return celery_app


app = make_app(os.environ.get(ENV_BROKER_URL, "memory://"), os.environ.get(ENV_BROKER_DIR))


@worker_ready.connect
def _report_polling_interval(sender: Any = None, **_: Any) -> None:
    """Write the polling interval the worker's transport really uses, so the producer can check it."""
    ready_file = os.environ.get(ENV_READY_FILE)
    if ready_file and sender is not None:
        Path(ready_file).write_text(repr(sender.connection.transport.polling_interval))


# --------------------------------------------------------------------------- producer / harness


@dataclass
class Broker:
    name: str
    url: str
    broker_dir: str | None = None


@dataclass
class Result:
    broker: str
    effective_polling: str = "?"
    rt_back_to_back_ms: list[float] = field(default_factory=list)
    rt_random_gap_ms: list[float] = field(default_factory=list)
    done_at_publish_end: list[int] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)
    publish_rate: list[float] = field(default_factory=list)
    leftovers: str = "?"
    leftover_detail: str = ""
    warning_lines: list[str] = field(default_factory=list)
    worker_stop: str = "?"
    error: str | None = None


def make_fs_dirs(broker_dir: Path) -> None:
    """The filesystem transport does not create its folders itself."""
    for sub in ("queue", "processed", "control"):
        (broker_dir / sub).mkdir(parents=True)


def check_polling_option(workdir: Path) -> list[str]:
    """Does ``transport_options={'polling_interval': 0.1}`` work for each transport?"""
    fs_dir = workdir / "probe_fs"
    make_fs_dirs(fs_dir)
    default = kombu.transport.filesystem.Transport.polling_interval
    with Connection("filesystem://", transport_options=transport_options("filesystem://", str(fs_dir))) as conn:
        conn.default_channel._size("probe")
        notes = [f"filesystem: class default {default}, with transport option -> {conn.transport.polling_interval}"]
    sqla_url = f"sqla+sqlite:///{workdir / 'probe_sqla.db'}"
    with Connection(sqla_url, transport_options={"polling_interval": POLLING_INTERVAL}) as conn:
        try:
            conn.default_channel._size("probe")  # first use of the session creates the engine
            notes.append(f"sqla: transport option accepted -> {conn.transport.polling_interval}")
        except TypeError as exc:
            notes.append(f"sqla: transport option -> TypeError: {str(exc)[:75]}...")
    return notes


def init_results_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("CREATE TABLE results (task_id TEXT PRIMARY KEY, finished_at REAL NOT NULL)")
    return conn


def wait_for(predicate: Callable[[], bool], timeout: float, worker: subprocess.Popen[bytes]) -> bool:
    """Poll ``predicate`` every ROW_POLL seconds; False on timeout, RuntimeError if the worker died."""
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            return False
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with code {worker.returncode}")
        time.sleep(ROW_POLL)
    return True


def row_count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])


def round_trip(producer: Celery, db: sqlite3.Connection, worker: subprocess.Popen[bytes], timeout: float) -> float:
    """Publish one task and return the seconds until its row is visible."""
    task_id = uuid.uuid4().hex
    query = "SELECT 1 FROM results WHERE task_id = ?"
    start = time.perf_counter()
    producer.send_task(TASK_NAME, args=(task_id,), task_id=task_id)
    if not wait_for(lambda: db.execute(query, (task_id,)).fetchone() is not None, timeout, worker):
        raise TimeoutError(f"round trip not done after {timeout:.0f} s")
    return time.perf_counter() - start


def burst(producer: Celery, db: sqlite3.Connection, worker: subprocess.Popen[bytes]) -> tuple[float, float, int]:
    """Publish BURST_SIZE tasks back to back.

    Returns (tasks/s until all rows visible, publish/s, rows already visible when publishing ended).
    """
    target = row_count(db) + BURST_SIZE
    start = time.perf_counter()
    for _ in range(BURST_SIZE):
        task_id = uuid.uuid4().hex
        producer.send_task(TASK_NAME, args=(task_id,), task_id=task_id)
    published = time.perf_counter()
    done_early = row_count(db) - (target - BURST_SIZE)
    if not wait_for(lambda: row_count(db) >= target, BURST_TIMEOUT, worker):
        raise TimeoutError(f"burst incomplete after {BURST_TIMEOUT:.0f} s ({target - row_count(db)} missing)")
    done = time.perf_counter()
    return BURST_SIZE / (done - start), BURST_SIZE / (published - start), done_early


def start_worker(broker: Broker, workdir: Path, env_extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(env_extra)
    env[ENV_BROKER_URL] = broker.url
    env["PYTHONWARNINGS"] = "default"  # DeprecationWarnings are hidden otherwise
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    if broker.broker_dir:
        env[ENV_BROKER_DIR] = broker.broker_dir
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.embedded_broker",
        "worker",
        "--pool",
        "threads",
        "-c",
        str(CONCURRENCY),
        "-l",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    out_path, err_path = (workdir / f"{broker.name}.worker.{s}" for s in ("stdout", "stderr"))
    with out_path.open("wb") as stdout, err_path.open("wb") as stderr:
        # cwd = the temp dir, so any stray relative-path file a transport creates is cleaned up too
        return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=stdout, stderr=stderr)


def stop_worker(worker: subprocess.Popen[bytes]) -> str:
    if worker.poll() is not None:
        return f"already exited ({worker.returncode})"
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(STOP_GRACE)
        return f"SIGTERM ok ({worker.returncode})"
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
        return "SIGKILL needed"


_INTERESTING = re.compile(r"Warning\b|WARNING/|ERROR/|CRITICAL/|Traceback|Error:")
_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*")


def scan_stderr(path: Path) -> list[str]:
    """Distinct warning / error lines the worker printed (timestamps stripped)."""
    seen: dict[str, None] = {}
    for line in path.read_text(errors="replace").splitlines():
        if _INTERESTING.search(line):
            seen.setdefault(_LOG_PREFIX.sub("", line).strip())
    return list(seen)


def leftovers(broker: Broker) -> tuple[str, str]:
    """(short summary, detail) of what the broker keeps after the run."""
    if broker.broker_dir:
        root = Path(broker.broker_dir)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        msgs = sum(1 for name in files if name.endswith(".msg"))
        return f"{len(files)} files ({msgs} .msg)", ", ".join(files) or "-"
    db_path = broker.url.removeprefix("sqla+sqlite:///")
    with closing(sqlite3.connect(db_path)) as conn:
        total, visible = conn.execute("SELECT COUNT(*), COALESCE(SUM(visible), 0) FROM kombu_message").fetchone()
    size_kib = os.path.getsize(db_path) / 1024
    return f"{total} msg rows ({visible} visible)", f"kombu_message rows kept; broker db {size_kib:.0f} KiB"


def measure(
    producer: Celery,
    db: sqlite3.Connection,
    worker: subprocess.Popen[bytes],
    ready_file: Path,
    result: Result,
) -> None:
    round_trip(producer, db, worker, READY_TIMEOUT)  # readiness: first round trip succeeds
    wait_for(ready_file.exists, 5.0, worker)
    result.effective_polling = ready_file.read_text() if ready_file.exists() else "?"
    for _ in range(ROUND_TRIPS):
        result.rt_back_to_back_ms.append(1000 * round_trip(producer, db, worker, ROUND_TRIP_TIMEOUT))
    jitter = random.Random(42)
    for _ in range(ROUND_TRIPS):
        time.sleep(jitter.uniform(0, POLLING_INTERVAL))  # random phase against the worker's poll loop
        result.rt_random_gap_ms.append(1000 * round_trip(producer, db, worker, ROUND_TRIP_TIMEOUT))
    for _ in range(BURSTS):
        tput, pub, done_early = burst(producer, db, worker)
        result.throughput.append(tput)
        result.publish_rate.append(pub)
        result.done_at_publish_end.append(done_early)


def run_broker(broker: Broker, workdir: Path) -> Result:
    result = Result(broker.name)
    if broker.broker_dir:
        make_fs_dirs(Path(broker.broker_dir))
    results_db = workdir / f"{broker.name}.results.db"
    db = init_results_db(results_db)
    ready_file = workdir / f"{broker.name}.ready"
    env_extra = {ENV_RESULTS_DB: str(results_db), ENV_READY_FILE: str(ready_file)}
    producer = make_app(broker.url, broker.broker_dir)
    worker = start_worker(broker, workdir, env_extra)
    try:
        measure(producer, db, worker, ready_file, result)
    except (TimeoutError, RuntimeError) as exc:
        result.error = str(exc)
    finally:
        if producer.pool is not None:
            producer.pool.force_close_all()
        producer.close()
        result.worker_stop = stop_worker(worker)
        db.close()
    result.leftovers, result.leftover_detail = leftovers(broker)
    result.warning_lines = scan_stderr(workdir / f"{broker.name}.worker.stderr")
    return result


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def warning_summary(lines: list[str]) -> str:
    kinds: dict[str, int] = {}
    for line in lines:
        match = re.search(r"\b(\w*Warning|\w*Error|Traceback)\b", line)
        key = match.group(1) if match else f"log '{line[:24]}...'"
        kinds[key] = kinds.get(key, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in kinds.items()) or "none"


def fmt(values: list[float], func: Callable[[list[float]], float], spec: str) -> str:
    return format(func(values), spec) if values else "-"


def med_p90(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} / {p90(values):.1f}" if values else "-"


def print_table(results: list[Result]) -> None:
    headers = (
        "broker",
        "rt med/p90 ms (back-to-back)",
        "rt med/p90 ms (random gap)",
        "tasks/s (med of 3)",
        "publish/s",
        "leftovers",
        "warnings seen",
    )
    rows = [
        (
            r.broker,
            med_p90(r.rt_back_to_back_ms),
            med_p90(r.rt_random_gap_ms),
            fmt(r.throughput, statistics.median, ".0f"),
            fmt(r.publish_rate, statistics.median, ".0f"),
            r.leftovers,
            warning_summary(r.warning_lines),
        )
        for r in results
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    for i, row in enumerate((headers, *rows)):
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def print_details(results: list[Result]) -> None:
    for r in results:
        print(f"\n[{r.broker}] effective worker polling_interval: {r.effective_polling}")
        print(
            f"  bursts tasks/s: {', '.join(f'{v:.0f}' for v in r.throughput) or '-'}; "
            f"publish/s: {', '.join(f'{v:.0f}' for v in r.publish_rate) or '-'}; "
            f"rows done when publishing ended: {', '.join(map(str, r.done_at_publish_end)) or '-'}"
        )
        print(f"  leftovers: {r.leftover_detail}; worker stop: {r.worker_stop}")
        if r.error:
            print(f"  ERROR: {r.error}")
        for line in r.warning_lines:
            print(f"  worker stderr: {line[:400]}")


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench_embedded_broker_"))
    try:
        for note in check_polling_option(workdir):
            print(f"polling option check: {note}")
        brokers = [
            Broker("filesystem", "filesystem://", str(workdir / "fs_broker")),
            Broker("sqla", f"sqla+sqlite:///{workdir / 'sqla_broker.db'}"),
        ]
        results = []
        for broker in brokers:
            started = time.perf_counter()
            results.append(run_broker(broker, workdir))
            print(f"{broker.name}: done in {time.perf_counter() - started:.1f} s", flush=True)
        stray = sorted(p.name for p in workdir.iterdir() if p.name in ("control", "data_in", "data_out", "processed"))
        print()
        print_table(results)
        print_details(results)
        if stray:
            print(f"\nstray relative-path folders created in the worker's cwd: {stray}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
