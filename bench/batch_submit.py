"""How fast a batch is accepted, beside single ``worker.submit`` calls of the same jobs.

On PostgreSQL (a scratch database, dropped afterwards) + a private ``redis-server``, and on the
embedded default (SQLite + filesystem broker) in a temporary folder. No worker runs: this times
acceptance (validate, encrypt, INSERT with audit events, publish), not execution.

1. ``worker.submit_batch`` of ``--jobs`` (10,000) JSON Lines text jobs, ``--reps`` (3) times: median.
2. ``worker.submit`` of ``--singles`` (1,000) of the same jobs one by one, 3 times: median rate.
3. publishing alone (no database), ``--publish`` (5,000) job ids on each broker: ``publish()`` per
   message (a connection from the pool each time), ``send_task(..., producer=p)`` through one
   producer, and ``publish_many`` (``app.amqp`` building and sending, one producer) — what batches use.

    .venv/bin/python -m bench.batch_submit
    .venv/bin/python -m bench.batch_submit --jobs 2000 --singles 200 --reps 1     # a quick run
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.chaos import PrivateRedis, scratch_database
from qbgw import producer
from qbgw.producer import submit_batch
from qbgw.runtime.app import TASK_NAME, publish, publish_many
from qbgw.runtime.locator import reset as reset_runtimes
from qbgw.runtime.locator import runtime
from qbgw.settings import Secret, Settings

ASSISTANT = "65d5f3473d5d68095462165d"
KEYS = Secret("kb:" + "B" * 43 + "=")


def job_lines(n: int, tag: str) -> list[str]:
    """``n`` JSON Lines jobs, like a clinic's nightly batch: a system prompt and one question each."""
    return [
        json.dumps(
            {
                "custom_id": f"{tag}-{i:05d}",
                "messages": [
                    {"role": "developer", "content": "You are a concise clinical assistant."},
                    {
                        "role": "user",
                        "content": f"Summarise visit note {i}: patient reports mild headache for {i % 9} days.",
                    },
                ],
            }
        )
        for i in range(n)
    ]


def time_batch(settings: Settings, jobs: int) -> float:
    lines = job_lines(jobs, uuid.uuid4().hex[:6])
    started = time.perf_counter()
    view = submit_batch(lines, assistant_id=ASSISTANT, settings=settings)
    elapsed = time.perf_counter() - started
    assert view.total == jobs, view.summary
    assert view.pending == jobs, view.summary
    return elapsed


def time_singles(settings: Settings, jobs: int) -> float:
    requests = [json.loads(line) for line in job_lines(jobs, uuid.uuid4().hex[:6])]
    started = time.perf_counter()
    for request in requests:
        producer.submit(ASSISTANT, request["messages"], custom_id=request["custom_id"], settings=settings)
    return time.perf_counter() - started


def publish_rates(settings: Settings, count: int) -> dict[str, float]:
    """Messages per second of each way to publish ``count`` job ids."""
    app = runtime(settings).celery
    ids = [str(uuid.uuid4()) for _ in range(count)]

    def one_by_one() -> None:
        for job_id in ids:
            publish(app, job_id)

    def send_task_shared() -> None:
        with app.producer_or_acquire() as shared:
            for job_id in ids:
                app.send_task(TASK_NAME, args=[job_id], task_id=job_id, producer=shared)

    def amqp_shared() -> None:
        with app.producer_or_acquire() as shared:
            publish_many(app, ids, shared)

    ways: dict[str, Callable[[], None]] = {
        "publish() per message": one_by_one,
        "send_task(producer=one)": send_task_shared,
        "publish_many (batches)": amqp_shared,
    }
    rates = {}
    for name, way in ways.items():
        started = time.perf_counter()
        way()
        rates[name] = count / (time.perf_counter() - started)
    return rates


@contextmanager
def stack(name: str, folder: Path) -> Iterator[Settings]:
    base = Settings(data_dir=folder / name, queue=f"bench-batch-{uuid.uuid4().hex[:6]}", max_attempts=3)
    if name == "embedded":
        yield base
        return
    redis = PrivateRedis(folder)
    redis.start()
    try:
        with scratch_database() as url:
            yield base.with_(database_url=url, broker_url=redis.url, encryption_keys=KEYS)
    finally:
        redis.kill()


def run_stack(name: str, args: argparse.Namespace, folder: Path) -> None:
    with stack(name, folder) as settings:
        assert runtime(settings).session_factory is not None  # migrate and connect outside the timings
        batch = [time_batch(settings, args.jobs) for _ in range(args.reps)]
        single = [time_singles(settings, args.singles) for _ in range(args.reps)]
        publishing = publish_rates(settings, args.publish)
        reset_runtimes()
    b, s = statistics.median(batch), statistics.median(single)
    batch_rate, single_rate = args.jobs / b, args.singles / s
    print(f"\n{name}")
    print(
        f"  batch of {args.jobs:,} jobs           {b:6.2f} s = {batch_rate:7,.0f} jobs/s   "
        f"(runs: {', '.join(f'{x:.2f}' for x in batch)} s)"
    )
    print(
        f"  {args.singles:,} single submits          {s:6.2f} s = {single_rate:7,.0f} jobs/s   "
        f"(runs: {', '.join(f'{x:.2f}' for x in single)} s)"
    )
    print(f"  batch / single                           {batch_rate / single_rate:5.1f} x")
    for way, rate in publishing.items():
        print(f"  publish only, {way:<26} {rate:7,.0f} msgs/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--singles", type=int, default=1_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--publish", type=int, default=5_000)
    parser.add_argument("--stacks", default="postgres+redis,embedded")
    args = parser.parse_args()
    print(f"batch acceptance: {args.jobs:,} jobs per batch, {args.singles:,} single submits, medians of {args.reps}")
    with tempfile.TemporaryDirectory(prefix="qbgw-batch-bench-") as folder:
        for name in args.stacks.split(","):
            run_stack(name, args, Path(folder))


if __name__ == "__main__":
    main()
