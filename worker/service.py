"""Service: start a Celery worker process for qbgw (``qbgw worker``) and say how it ended.

It keeps kombu's Redis transport from crashing on a broker restart (``worker.broker_guard``), and returns
the exit code of Celery's worker, which Celery itself drops.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals

from worker import logs, metrics
from worker.broker_guard import guard_redis_channels
from worker.heap import HeapTrimmer
from worker.runtime import Runtime, runtime
from worker.settings import Settings
from worker.sweeper import Sweeper

__all__ = ["run_worker", "worker_argv"]


log = logging.getLogger("qbgw.worker")


def worker_argv(settings: Settings, *, loglevel: str = "INFO", quiet: bool = False) -> list[str]:
    """The ``celery worker`` arguments for ``settings`` (``quiet``: without Celery's banner, which is not JSON)."""
    return [
        *(["--quiet"] if quiet else []),
        "worker",
        f"--loglevel={loglevel}",
        f"--pool={settings.pool}",
        f"--concurrency={settings.concurrency}",
        # Listed in order of precedence: interactive jobs before batch jobs.
        f"--queues={','.join(settings.queues)}",
        f"--hostname=qbgw-{os.getpid()}@%h",
        # Gossip, mingle and heartbeats are cluster chatter qbgw does not use; the database
        # is where workers coordinate.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def run_worker(settings: Settings, *, loglevel: str = "INFO") -> int:
    """Run a worker in this process until it is stopped; returns Celery's exit code: 0 after a warm shutdown
    (SIGTERM), non-zero when Celery stopped on an error it cannot recover from (logged as "Unrecoverable
    error") or by SIGINT/SIGQUIT.

    Raises:
        StoreUnavailable: the database cannot be reached at start.
        ConfigError: the database is not migrated (and is not the embedded default), or the metrics port
            cannot be bound.
    """
    log_format = logs.configure(settings, loglevel)
    logging.captureWarnings(True)  # Celery's warnings become log lines too (JSON, filtered)
    # A receiver of setup_logging tells Celery to leave logging alone: its records go through our handler
    # (and its redacting filter), in our format, in this process and in prefork children.
    signals.setup_logging.connect(_logging_is_configured, weak=False)
    guard_redis_channels()  # or a Redis restart can stop the worker (see worker/broker_guard.py)
    rt = runtime(settings)
    rt.session_factory  # noqa: B018 - fail now, not at the first job, if the database is not usable
    return _run(rt, settings, loglevel=loglevel, quiet=log_format == "json")


def _run(rt: Runtime, settings: Settings, *, loglevel: str, quiet: bool) -> int:
    server = None
    if settings.metrics_port:
        server = metrics.serve(metrics.registry_for(), settings.metrics_host, settings.metrics_port)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    sweeper = Sweeper(settings, settings.sweep_interval).start() if settings.sweep_interval else None
    trimmer = HeapTrimmer.start_if_possible(settings.heap_trim_interval)
    controllers: list[Any] = []

    def remember(sender: Any, **_: Any) -> None:
        controllers.append(sender)

    # Celery's worker_main() (and app.start()) drop the exit code its worker command ends with, 1 after an
    # "Unrecoverable error": a supervisor would take that crash for a clean stop. The worker keeps it.
    signals.worker_init.connect(remember, weak=False)
    try:
        rt.celery.worker_main(argv=worker_argv(settings, loglevel=loglevel, quiet=quiet))
        if not controllers:  # Celery refused to make a worker (and said why)
            return 1
        return int(controllers[-1].exitcode or 0)
    finally:
        signals.worker_init.disconnect(remember)
        if trimmer is not None:
            trimmer.stop()
        if sweeper is not None:
            sweeper.stop()
        if server is not None:
            server.shutdown()


def _logging_is_configured(**_: Any) -> None:
    pass
