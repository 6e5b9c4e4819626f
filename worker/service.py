"""Service: start a Celery worker process for qbgw (``qbgw worker``)."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals

from worker import logs, metrics
from worker.broker_guard import guard_redis_channels
from worker.heap import HeapTrimmer
from worker.runtime import runtime
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


def run_worker(settings: Settings, *, loglevel: str = "INFO") -> None:
    """Run a worker in this process until it is stopped (SIGTERM: warm shutdown).

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
    server = None
    if settings.metrics_port:
        server = metrics.serve(metrics.registry_for(), settings.metrics_host, settings.metrics_port)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    sweeper = Sweeper(settings, settings.sweep_interval).start() if settings.sweep_interval else None
    trimmer = HeapTrimmer.start_if_possible(settings.heap_trim_interval)
    try:
        rt.celery.worker_main(argv=worker_argv(settings, loglevel=loglevel, quiet=log_format == "json"))
    finally:
        if trimmer is not None:
            trimmer.stop()
        if sweeper is not None:
            sweeper.stop()
        if server is not None:
            server.shutdown()


def _logging_is_configured(**_: Any) -> None:
    pass
