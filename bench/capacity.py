"""What a fleet consumes, per job and at its peak, to check the capacity model of docs/performance.md.

Runs real ``qbgw worker`` processes (``--processes``, ``--threads`` each) on a scratch PostgreSQL database and
a private ``redis-server``, against the gateway emulator answering in ``--latency`` seconds, drains ``--jobs``
jobs submitted up front, and reports, beside what the model predicts for the same numbers:

* jobs/s from the first claim to the last finish (the model: processes x threads / (latency + overhead),
  capped by the machine's CPU);
* Redis commands per job (``INFO commandstats`` before and after: publishes, deliveries, acks, the shared
  rate limiter's scripts, the broker's own polling) and Redis's peak memory;
* the most PostgreSQL server connections the fleet held at once (``pg_stat_activity``, sampled every 0.1 s),
  directly or (``--pgbouncer HOST:PORT``) through PgBouncer in transaction pooling mode.

    .venv/bin/python -m bench.capacity --processes 1,2,4 --latency 0.2,2
    .venv/bin/python -m bench.capacity --processes 8 --threads 64 --latency 2 --pgbouncer 127.0.0.1:6432
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, text

from bench.chaos import PG_ADMIN, PrivateRedis, scratch_database
from qbgw import producer
from qbgw.emulator.server import Emulator, EmulatorConfig
from qbgw.runtime.locator import reset as reset_runtimes
from qbgw.settings import Secret, Settings

ASSISTANT = "65d5f3473d5d68095462165d"
TOKEN = "tok-capacity-7c2d"
KEYS = Secret("kcap:" + "D" * 43 + "=")
#: Thread-seconds a job holds a worker thread beyond the upstream's answer (claim, record, broker), measured by
#: the 1-process run at 0.2 s in docs/performance.md (32 threads / 145 jobs/s - 0.2 s).
OVERHEAD_S = 0.02


def commandstats(client: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")
    return {name: int(value["calls"]) for name, value in stats.items()}


def peak_connections(url: str, database: str, stop: threading.Event, peak: list[int]) -> None:
    engine = create_engine(url)
    query = text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d AND backend_type = 'client backend'")
    try:
        with engine.connect() as connection:
            while not stop.is_set():
                peak[0] = max(peak[0], int(connection.execute(query, {"d": database}).scalar_one()) - 1)
                connection.rollback()
                stop.wait(0.1)
    finally:
        engine.dispose()


def run(
    processes: int, threads: int, latency: float, jobs: int, folder: Path, rate_limit: float, pgbouncer: str
) -> dict[str, Any]:
    private = PrivateRedis(folder)
    private.start()
    config = EmulatorConfig(tokens=frozenset({TOKEN}), assistants=frozenset({ASSISTANT}), latency=latency)
    try:
        with Emulator(config) as emulator, scratch_database("qbgw_capacity") as url:
            through = url
            if pgbouncer:  # the workers' connections through PgBouncer (transaction mode); LISTEN stays direct
                through = url.replace("127.0.0.1:5432", pgbouncer)
            settings = Settings(
                data_dir=folder / "data",
                database_url=through,
                listen_database_url=url if pgbouncer else "",
                db_transaction_pooling=bool(pgbouncer),
                broker_url=private.url,
                encryption_keys=KEYS,
                base_url=emulator.url,
                token=Secret(TOKEN),
                concurrency=threads,
                rate_limit=rate_limit,
                queue=f"cap-{uuid.uuid4().hex[:6]}",
            )
            ids = [
                producer.submit(ASSISTANT, [{"role": "user", "content": f"capacity {n}"}], settings=settings)
                for n in range(jobs)
            ]
            client = redis.Redis.from_url(private.url)
            before = commandstats(client)
            database = url.rsplit("/", 1)[1]
            stop, peak = threading.Event(), [0]
            sampler = threading.Thread(target=peak_connections, args=(PG_ADMIN, database, stop, peak), daemon=True)
            sampler.start()
            env = {**os.environ, **settings.to_env()}
            workers = [
                subprocess.Popen(
                    [sys.executable, "-m", "qbgw", "worker"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=open(folder / f"worker-{n}.log", "wb"),
                )
                for n in range(processes)
            ]
            engine = create_engine(url)
            try:
                deadline = time.monotonic() + 60 + 3 * jobs * (latency + 0.05) / max(1, processes * threads)
                with engine.connect() as connection:
                    while time.monotonic() < deadline:
                        left = connection.execute(
                            text("SELECT count(*) FROM jobs WHERE status NOT IN ('succeeded', 'failed', 'cancelled')")
                        ).scalar_one()
                        connection.rollback()
                        if left == 0:
                            break
                        time.sleep(0.2)
                    first, last = connection.execute(text("SELECT min(started_at), max(finished_at) FROM jobs")).one()
            finally:
                stop.set()
                for worker in workers:
                    worker.send_signal(signal.SIGTERM)
                for worker in workers:
                    try:
                        worker.wait(30)
                    except subprocess.TimeoutExpired:
                        worker.kill()
                engine.dispose()
            after = commandstats(client)
            memory = int(client.info("memory")["used_memory_peak"])
            client.close()
            calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            seconds = (last - first).total_seconds() if first and last else float("nan")
            reset_runtimes()
            return {
                "jobs_s": len(ids) / seconds,
                "redis_per_job": sum(calls.values()) / len(ids),
                "redis_mem_mib": memory / 2**20,
                "pg_peak": float(peak[0]),
                "top": ", ".join(
                    f"{k.removeprefix('cmdstat_')} {v / len(ids):.1f}"
                    for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:6]
                ),
            }
    finally:
        private.kill()


def model(processes: int, threads: int, latency: float) -> float:
    return processes * threads / (latency + OVERHEAD_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--latency", default="0.2,2", help="the emulator's answer time(s), s")
    parser.add_argument("--jobs", type=int, default=0, help="jobs per run (default: 10 s of the model's rate, 200+)")
    parser.add_argument("--pgbouncer", default="", help="HOST:PORT of a PgBouncer in transaction mode to go through")
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=1000.0,
        help="QBGW_RATE_LIMIT, calls/s: the fleet's shared limiter runs (its Redis commands count) without binding",
    )
    args = parser.parse_args()
    print(
        "processes x threads | upstream s | jobs/s measured | model (no CPU cap) | Redis cmds/job | Redis peak MiB |"
        " PG connections peak (model: P x (T + 4))"
    )
    for processes, latency in itertools.product(
        [int(p) for p in args.processes.split(",")], [float(x) for x in args.latency.split(",")]
    ):
        predicted = model(processes, args.threads, latency)
        jobs = args.jobs or max(200, int(predicted * 10))
        with tempfile.TemporaryDirectory(prefix="qbgw-capacity-") as folder:
            figures = run(processes, args.threads, latency, jobs, Path(folder), args.rate_limit, args.pgbouncer)
        print(
            f"{processes} x {args.threads:<15} | {latency:>10g} | {figures['jobs_s']:>15.1f} | {predicted:>18.1f} | "
            f"{figures['redis_per_job']:>14.1f} | {figures['redis_mem_mib']:>14.1f} | {figures['pg_peak']:.0f} "
            f"({processes * (args.threads + 4)})"
        )
        print(f"{'':>20}   Redis commands per job, most frequent: {figures['top']}")


if __name__ == "__main__":
    main()
