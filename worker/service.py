"""Service: start a Celery worker process for qbgw (``qbgw worker``)."""

from __future__ import annotations

import logging
import os

from worker.runtime import runtime
from worker.settings import Settings
from worker.sweeper import Sweeper

__all__ = ["run_worker", "worker_argv"]


def worker_argv(settings: Settings, *, loglevel: str = "INFO") -> list[str]:
    """The ``celery worker`` arguments for ``settings``."""
    return [
        "worker",
        f"--loglevel={loglevel}",
        f"--pool={settings.pool}",
        f"--concurrency={settings.concurrency}",
        # Listed in order of precedence: interactive jobs before batch jobs.
        f"--queues={settings.queue},{settings.effective_batch_queue}",
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
        ConfigError: the database is not migrated (and is not the embedded default).
    """
    logging.getLogger("qbgw").setLevel(loglevel.upper())
    rt = runtime(settings)
    rt.session_factory  # noqa: B018 - fail now, not at the first job, if the database is not usable
    sweeper = Sweeper(settings, settings.sweep_interval).start() if settings.sweep_interval else None
    try:
        rt.celery.worker_main(argv=worker_argv(settings, loglevel=loglevel))
    finally:
        if sweeper is not None:
            sweeper.stop()
