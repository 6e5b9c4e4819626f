"""RabbitMQ as the broker, Redis for the fleet's shared state (QBGW_REDIS_URL): refused without that Redis
when a fleet-wide limit is set, and what the broker holds survives its restart (durable queues, persistent
messages, acks late). The restart is this machine's RabbitMQ node's application (``rabbitmqctl stop_app`` and
``start_app``): every connection closes, the node and what it stored on disk stay (docs/operations.md)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qbgw import producer
from qbgw.cli.kit import EXIT
from qbgw.emulator import Emulator
from qbgw.lifecycle import JobStatus
from qbgw.queries import get_job, job_events, wait_for_job
from qbgw.runtime.app import backlog
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from tests.conftest import ASSISTANT, RABBITMQ_URL, ROOT, require_service, wait_until
from tests.e2e.test_restarts import log_of, until


def submit(settings: Settings, text: str) -> str:
    return producer.submit(ASSISTANT, [{"role": "user", "content": text}], settings=settings)


def restart_rabbitmq() -> None:
    """Stop RabbitMQ's application on this machine's node and start it again; back when 5672 answers."""
    require_service("rabbitmqctl, as root", shutil.which("rabbitmqctl") is not None and os.geteuid() == 0)
    try:
        subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=120, capture_output=True)
    finally:  # whatever happened, the node's application is started again for the tests after this one
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120, capture_output=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_fleet_limit_on_rabbitmq_without_redis_url_is_refused_at_start(embedded_settings: Settings) -> None:
    env = {**os.environ, **embedded_settings.to_env(), "QBGW_BROKER_URL": RABBITMQ_URL, "QBGW_RATE_LIMIT": "20"}
    for command in (["worker"], ["health", "--skip", "upstream"], ["submit", "--text", "hello"]):
        done = subprocess.run(
            [sys.executable, "-m", "qbgw", *command], env=env, cwd=ROOT, capture_output=True, timeout=60
        )
        said = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode == EXIT["config"], (command, said)
        assert "QBGW_RATE_LIMIT must hold for the whole fleet" in said, said
        assert "neither Redis nor the filesystem" in said
        assert "Set QBGW_REDIS_URL" in said
        assert "guest:guest" not in said  # the broker's password is not shown
    # With QBGW_REDIS_URL the same fleet starts (and stops on SIGTERM with 0).
    env["QBGW_REDIS_URL"] = "redis://127.0.0.1:6379/0"
    checked = subprocess.run(
        [sys.executable, "-c", "from qbgw.settings import Settings; print(Settings.from_env().coordination_url)"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.decode().strip() == "redis://127.0.0.1:6379/0"


def test_messages_waiting_in_rabbitmq_survive_its_restart(
    rabbitmq_settings: Settings, worker_process: Callable[..., Any], emu: Emulator
) -> None:
    # No sweeper: nothing would publish a lost message again, so only the broker can have kept them.
    settings = rabbitmq_settings.with_(sweep_interval=0)
    jobs = [submit(settings, f"wait for the restart {n}") for n in range(5)]
    app = runtime(settings).celery
    assert backlog(app, settings.queue) == 5
    restart_rabbitmq()
    wait_until(lambda: backlog(app, settings.queue) == 5, timeout=30)  # durable queue, persistent messages
    worker_process(settings)
    for job_id in jobs:
        view = wait_for_job(job_id, timeout=60, settings=settings)
        assert view.status is JobStatus.SUCCEEDED
        assert view.attempts == 1
    assert emu.stats()["requests"] == 5


def test_workers_ride_out_a_rabbitmq_restart_with_jobs_in_flight(
    rabbitmq_settings: Settings, worker_process: Callable[..., Any], emu: Emulator, tmp_path: Path
) -> None:
    settings = rabbitmq_settings.with_(sweep_grace=1.0)
    workers = [worker_process(settings, concurrency=8) for _ in range(2)]
    until(lambda: all("ready." in log_of(tmp_path, n) for n in range(2)), workers, tmp_path)
    running = [submit(settings, f"in flight {n} [[emulator:sleep=3]]") for n in range(6)]
    until(lambda: all(get_job(j, settings=settings).status is JobStatus.RUNNING for j in running), workers, tmp_path)
    until(lambda: len(emu.arrivals()) >= 6, workers, tmp_path)  # the calls are under way
    restart_rabbitmq()
    after = [submit(settings, f"after the restart {n}") for n in range(4)]
    for job_id in running + after:
        assert wait_for_job(job_id, timeout=90, settings=settings).status is JobStatus.SUCCEEDED
        succeeded = [e for e in job_events(job_id, settings=settings) if e.action == "job.succeeded"]
        assert len(succeeded) == 1  # a message delivered again after the restart found the job done
    assert [w.poll() for w in workers] == [None, None]
    for n in range(2):
        assert "Unrecoverable error" not in log_of(tmp_path, n)
        # The prefetch is not lowered and raised again from the pool's threads (worker/runtime/app.py): a
        # worker with calls in flight at the reconnect would log this if it were.
        assert "Temporarily reducing the prefetch count" not in log_of(tmp_path, n)
