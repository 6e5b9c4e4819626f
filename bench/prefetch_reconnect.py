"""Celery's prefetch reduction after a RabbitMQ restart, on the threads pool: does a worker wedge?

Plain Celery, configured as qbgw's workers are where it matters (threads pool, concurrency 8, ``acks_late``,
prefetch multiplier 1, persistent messages, publisher confirms). Each trial starts two workers, gives them
``--in-flight`` (6) tasks of ``--long`` (3) seconds, restarts the RabbitMQ application (``rabbitmqctl
stop_app`` then ``start_app``: every connection closes) while those run, publishes ``--after`` (4) short tasks,
and waits ``--wait`` (45) seconds for every task to have run. A task delivered again after the restart is a
no-op once it has run or started elsewhere, as qbgw's claim makes it. Trials alternate between Celery's default
(``worker_enable_prefetch_count_reduction`` on: the prefetch is lowered after the reconnect and raised again
from each ack's callback) and qbgw's setting (off). The figure: trials in which some task had not run by then,
each way (docs/operations.md says what was found).

It restarts the local RabbitMQ application (run it as root, on a machine where nothing else uses RabbitMQ):

    .venv/bin/python -m bench.prefetch_reconnect --trials 12    # 12 each way, about 15 minutes

Each worker's log of a stalled trial is kept in the printed folder.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import redis
from celery import Celery
from kombu import Exchange, Queue

BROKER = os.environ.get("BENCH_PREFETCH_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
#: A database of its own (the tests use 9): trial keys are namespaced and deleted, never the database flushed.
REDIS_URL = os.environ.get("BENCH_PREFETCH_REDIS", "redis://127.0.0.1:6379/13")
QUEUE = os.environ.get("BENCH_PREFETCH_QUEUE", "bench-prefetch")
TAG = os.environ.get("BENCH_PREFETCH_TAG", "")

app = Celery("bench_prefetch", broker=BROKER, set_as_current=False)
app.conf.update(
    task_default_queue=QUEUE,
    task_queues=[Queue(QUEUE, Exchange(QUEUE, durable=True), routing_key=QUEUE, durable=True)],
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_default_delivery_mode="persistent",
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_concurrency=8,
    worker_pool="threads",
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"confirm_publish": True},
    worker_enable_prefetch_count_reduction=os.environ.get("BENCH_PREFETCH_REDUCTION", "on") == "on",
)
_redis = redis.Redis.from_url(REDIS_URL)


@app.task(name="bench.prefetch.job")  # type: ignore[untyped-decorator]
def job(job_id: str, seconds: float) -> str:
    if not _redis.set(f"{TAG}:claim:{job_id}", os.getpid(), nx=True, ex=3600):  # delivered again: a no-op
        return "again"
    _redis.sadd(f"{TAG}:started", job_id)
    time.sleep(seconds)
    _redis.sadd(f"{TAG}:done", job_id)
    return "ran"


def _wait_for_port(host: str = "127.0.0.1", port: int = 5672, within: float = 90.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def restart_rabbitmq() -> None:
    for step in ("stop_app", "start_app"):
        subprocess.run(["rabbitmqctl", "-q", step], check=True, timeout=120, capture_output=True)
    _wait_for_port()


def _until(predicate: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def trial(args: argparse.Namespace, reduction: str, folder: Path) -> tuple[bool, float]:
    """One trial: (every task ran in time, seconds from the restart to the last one)."""
    tag = f"bench-prefetch-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "BENCH_PREFETCH_REDUCTION": reduction,
        "BENCH_PREFETCH_TAG": tag,
        "BENCH_PREFETCH_QUEUE": tag,
    }
    logs = [folder / f"{tag}-{reduction}-w{n}.log" for n in range(2)]
    workers = [_worker(env, n, tag, log) for n, log in enumerate(logs)]
    sender = Celery("bench_prefetch_sender", broker=BROKER, set_as_current=False)
    sender.conf.update(
        task_serializer="json",
        task_default_delivery_mode="persistent",
        task_queues=[Queue(tag, Exchange(tag, durable=True), routing_key=tag, durable=True)],
        broker_transport_options={"confirm_publish": True},
    )
    client = redis.Redis.from_url(REDIS_URL)
    ok, restarted = False, time.monotonic()
    try:
        _until(lambda: all("ready." in log.read_text(errors="replace") for log in logs), 60, "workers not ready")
        before = [f"b{n}" for n in range(args.in_flight)]
        for job_id in before:
            sender.send_task("bench.prefetch.job", (job_id, args.long), queue=tag)
        _until(lambda: client.scard(f"{tag}:started") >= args.in_flight, 30, "the long tasks did not start")
        restart_rabbitmq()
        restarted = time.monotonic()
        after = [f"a{n}" for n in range(args.after)]
        for job_id in after:
            sender.send_task("bench.prefetch.job", (job_id, 0.0), queue=tag)
        wanted = {*before, *after}
        deadline = restarted + args.wait
        while time.monotonic() < deadline:
            if wanted <= {m.decode() for m in client.smembers(f"{tag}:done")}:
                ok = True
                break
            time.sleep(0.2)
        return ok, time.monotonic() - restarted
    finally:
        _stop(workers)
        for key in client.scan_iter(f"{tag}:*"):
            client.delete(key)
        client.close()
        with sender.connection_for_write() as connection:
            connection.default_channel.queue_delete(tag)
            connection.default_channel.exchange_delete(tag)
        for log in logs if ok else ():
            log.unlink()


def _worker(env: dict[str, str], n: int, tag: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.prefetch_reconnect", "worker", "-l", "INFO"]
            + ["--without-gossip", "--without-mingle", "-n", f"w{n}-{tag}@%h"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        worker.terminate()
    for worker in workers:
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12, help="trials each way (default 12)")
    parser.add_argument("--in-flight", type=int, default=6, help="long tasks running at the restart (default 6)")
    parser.add_argument("--long", type=float, default=3.0, help="seconds of each long task (default 3)")
    parser.add_argument("--after", type=int, default=4, help="tasks published after the restart (default 4)")
    parser.add_argument("--wait", type=float, default=45.0, help="seconds for every task to run (default 45)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-prefetch-"))
    print(f"logs of stalled trials: {folder}", flush=True)
    stalled = {"on": 0, "off": 0}
    for n in range(args.trials):
        for reduction in ("on", "off"):
            ok, seconds = trial(args, reduction, folder)
            stalled[reduction] += not ok
            outcome = f"all ran within {seconds:.1f}s of the restart" if ok else f"STALLED ({args.wait:g}s)"
            print(f"trial {n + 1} reduction {reduction:3}: {outcome}", flush=True)
    print()
    for reduction, label in (("on", "Celery's default (reduction on)"), ("off", "qbgw's setting (reduction off)")):
        print(f"{label}: {stalled[reduction]} of {args.trials} trials stalled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
