"""Service: start a Celery worker process for qbgw (``qbgw worker``) and say how it ended.

It waits for the database to be reachable, routes every line the process would print into the log, keeps
kombu's Redis transport from crashing on a broker restart (``qbgw.runtime.broker_guard``), and returns the exit code
of Celery's worker, which Celery itself drops.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import celery.apps.worker
from celery import signals

from ..errors import StoreUnavailable
from ..ops import logs, metrics
from ..runtime.broker_guard import guard_redis_channels
from ..runtime.context import Runtime
from ..runtime.locator import runtime
from ..settings import Settings
from ..store import schema
from .heap import HeapTrimmer
from .sealer import Sealer
from .sweeper import Sweeper
from .tasks import register

__all__ = ["run_worker", "worker_argv", "DB_WAIT_FIRST", "DB_WAIT_MAX"]


log = logging.getLogger("qbgw.worker")

#: Seconds between attempts to reach the database at start: doubled after each failure up to the maximum.
DB_WAIT_FIRST, DB_WAIT_MAX = 1.0, 30.0
#: How long one of those attempts may take (a host that drops packets would hold a connect for minutes).
DB_PROBE_TIMEOUT = 5.0


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
    (SIGTERM, or a stop while still waiting for the database), non-zero when Celery stopped on an error it
    cannot recover from (logged as "Unrecoverable error") or by SIGINT (SIGQUIT, Celery's cold shutdown: 0).

    Raises:
        ConfigError: the database is not migrated (and is not the embedded default), its URL is unusable, or
            the metrics port cannot be bound.
    """
    log_format = logs.configure(settings, loglevel)
    logging.captureWarnings(True)  # Celery's warnings become log lines too (JSON, filtered)
    if log_format == "json":
        logs.capture_output()
    # Celery says a few lines (the warm shutdown, a stack dump on SIGUSR1) from its signal handlers, straight to
    # the file descriptors, past any handler: they go to the log instead.
    said = logs.SignalSafeLines("celery.apps.worker").start()
    celery.apps.worker.safe_say = said.say
    # A receiver of setup_logging tells Celery to leave logging alone: its records go through our handler
    # (and its redacting filter), in our format, in this process and in prefork children.
    signals.setup_logging.connect(_logging_is_configured, weak=False)
    guard_redis_channels()  # or a Redis restart can stop the worker (see worker/broker_guard.py)
    try:
        rt = runtime(settings)
        if not _wait_for_database(rt):
            log.info("stopped while waiting for the database")
            return 0
        return _run(rt, settings, loglevel=loglevel, quiet=log_format == "json")
    finally:
        said.stop()


def _run(rt: Runtime, settings: Settings, *, loglevel: str, quiet: bool) -> int:
    server = None
    if settings.metrics_port:
        server = metrics.serve(metrics.registry_for(), settings.metrics_host, settings.metrics_port)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    sweeper = Sweeper(settings, settings.sweep_interval).start() if settings.sweep_interval else None
    sealer = Sealer(settings).start() if settings.audit_seal == "block" else None
    trimmer = HeapTrimmer.start_if_possible(settings.heap_trim_interval)
    controllers: list[Any] = []

    def remember(sender: Any, **_: Any) -> None:
        controllers.append(sender)

    # Celery's worker_main() (and app.start()) drop the exit code its worker command ends with, 1 after an
    # "Unrecoverable error": a supervisor would take that crash for a clean stop. The worker keeps it.
    signals.worker_init.connect(remember, weak=False)
    try:
        register(rt.celery)  # the app publishes by name; the worker is where the task runs
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
        if sealer is not None:
            sealer.stop()
        if server is not None:
            server.shutdown()


def _wait_for_database(rt: Runtime) -> bool:
    """Open the database (migrating the embedded default), waiting for it while it cannot be reached, as the
    broker is waited for; False if SIGTERM or SIGINT came first.

    Raises:
        ConfigError: the database is not migrated, or its URL is unusable: waiting would not help.
    """
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        delay = DB_WAIT_FIRST
        while True:
            try:
                # A probe of its own first, on a bounded connect, so that a stop request is heard within seconds.
                schema.probe(rt.settings.effective_database_url, timeout=DB_PROBE_TIMEOUT)
                rt.session_factory  # noqa: B018 - fail now, not at the first job, if the database is not usable
                return not stop.is_set()
            except StoreUnavailable as exc:
                log.warning("database unreachable (%s): retrying in %gs", exc, delay)
            if stop.wait(delay):
                return False
            delay = min(delay * 2, DB_WAIT_MAX)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _logging_is_configured(**_: Any) -> None:
    pass
