"""Metrics: every Prometheus metric qbgw exports is named here, and only here (docs/operations.md's table
lists them). Two kinds:

- worker metrics, counted in the process that does the work (attempts, latency, retries,
  throttling waits, sweeps), cheap enough for the hot path: label children are cached and nothing
  touches the database;
- the database's view (jobs by status, the oldest waiting job, broker queue depth, the age of the
  audit checkpoint), computed at scrape time by ``ops.exporter.FleetCollector`` in ``qbgw metrics serve``,
  one process for the fleet, so N workers do not run the same queries.

No label ever holds a job id, a message or anything a producer wrote: only closed sets (outcomes,
statuses, error class names, queue names).

Multi-process: a worker serves its own counters on ``QBGW_METRICS_PORT``. With
``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client keeps every process's values in files there
(prefork children included) and an endpoint serves the sum over all of them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    multiprocess,
    start_http_server,
)
from prometheus_client.registry import Collector

from ..errors import ConfigError
from ..settings import prometheus_multiproc_dir

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric

__all__ = [
    "ATTEMPTS",
    "ATTEMPT_SECONDS",
    "RETRIES",
    "SWEEP_DISPATCHED",
    "SWEEP_RECOVERED",
    "THROTTLED",
    "THROTTLE_WAIT_SECONDS",
    "attempt",
    "registry_for",
    "serve",
    "swept",
    "throttled",
]

log = logging.getLogger("qbgw.metrics")

#: Seconds; from a fast emulator answer to a read timeout.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# A "_created" series per counter doubles what Prometheus stores and says nothing a restart does not.
disable_created_metrics()  # type: ignore[no-untyped-call]

# --- worker metrics -------------------------------------------------------------------------------
ATTEMPTS = Counter(
    "qbgw_attempts_total",
    "Deliveries of a job to a worker by outcome (tasks.Outcome: succeeded, retrying, failed, cancelled, lost, "
    "skipped) and the upstream's HTTP status ('none': no HTTP answer: a timeout, a reset, nothing sent)",
    ["outcome", "http_status"],
)
ATTEMPT_SECONDS = Histogram(
    "qbgw_attempt_duration_seconds",
    "Time of one upstream call, from the request to the end of its answer (or its error)",
    buckets=LATENCY_BUCKETS,
)
RETRIES = Counter(
    "qbgw_retries_total",
    "Attempts that ended in a retry being scheduled, by the error that caused it (an errors.py class name)",
    ["reason"],
)
STORE_RETRIES = Counter(
    "qbgw_store_unavailable_total",
    "Deliveries put back on the broker because the database could not be reached",
)
TASK_ERRORS = Counter(
    "qbgw_task_errors_total",
    "Deliveries that ended in an error no attempt could record (DecryptionFailed: a key is missing), by class",
    ["error_class"],
)
THROTTLED = Counter(
    "qbgw_throttled_total",
    "Attempts that waited for the fleet rate limiter before calling the upstream",
)
THROTTLE_WAIT_SECONDS = Histogram(
    "qbgw_throttle_wait_seconds",
    "How long an attempt waited for the fleet rate limiter",
    buckets=WAIT_BUCKETS,
)
SWEEPS = Counter("qbgw_sweeps_total", "Sweeps run, by result (ok, failed)", ["result"])
SWEEP_RECOVERED = Counter(
    "qbgw_sweeper_recovered_total",
    "Running jobs taken back by the sweeper after their worker's lease ran out (audited attempt.interrupted)",
)
SWEEP_DISPATCHED = Counter(
    "qbgw_sweeper_dispatched_total",
    "Messages the sweeper published: retries kept in the database that came due, and lost messages",
)
SWEEP_EXPIRED = Counter("qbgw_sweeper_batches_expired_total", "Batches the sweeper expired")


@functools.lru_cache(maxsize=256)
def _attempt_child(outcome: str, status: int | None) -> Any:
    # labels() hashes and locks on every call; the set of (outcome, status) pairs is small.
    return ATTEMPTS.labels(outcome, "none" if status is None else str(status))


@functools.lru_cache(maxsize=64)
def _retry_child(reason: str) -> Any:
    return RETRIES.labels(reason)


def attempt(outcome: str, status: int | None = None, latency_ms: int | None = None, error: str | None = None) -> None:
    """Count one delivery: its outcome, the upstream's status, the call's latency (None: no call was made) and,
    for a retry, the error class that caused it."""
    _attempt_child(str(outcome), status).inc()
    if latency_ms is not None:
        ATTEMPT_SECONDS.observe(latency_ms / 1000)
    if outcome == "retrying":
        _retry_child(error or "unknown").inc()


def store_unavailable() -> None:
    STORE_RETRIES.inc()


def task_error(error_class: str) -> None:
    TASK_ERRORS.labels(error_class).inc()


def throttled(seconds: float) -> None:
    """Tell the metrics an attempt waited ``seconds`` for the fleet rate limiter (call it once per wait that
    happened; a limiter that let the attempt through at once calls nothing)."""
    THROTTLED.inc()
    THROTTLE_WAIT_SECONDS.observe(max(0.0, seconds))


def swept(*, recovered: int = 0, dispatched: int = 0, expired: int = 0, failed: bool = False) -> None:
    SWEEPS.labels("failed" if failed else "ok").inc()
    SWEEP_RECOVERED.inc(recovered)
    SWEEP_DISPATCHED.inc(dispatched)
    SWEEP_EXPIRED.inc(expired)


# --- serving --------------------------------------------------------------------------------------
def registry_for(*, fleet: Collector | None = None, workers: bool = True) -> CollectorRegistry:
    """What an endpoint serves: this process's worker metrics (or, with PROMETHEUS_MULTIPROC_DIR, the sum over
    every process writing there), and with ``fleet`` the database's view (``ops.exporter.FleetCollector``)."""
    multiproc = prometheus_multiproc_dir()
    if workers and multiproc is None and fleet is None:
        return REGISTRY
    registry = CollectorRegistry()
    if workers and multiproc is not None:
        multiprocess.MultiProcessCollector(registry, path=str(multiproc))  # type: ignore[no-untyped-call]
    elif workers:
        registry.register(_Forward(REGISTRY))
    if fleet is not None:
        registry.register(fleet)
    return registry


class _Forward(Collector):
    """Another registry's metrics (the default one, where the worker metrics and process metrics live)."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return iter(self.source.collect())


def serve(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve ``registry`` on http://host:port/metrics in a daemon thread; returns the server (shutdown()).

    Raises:
        ConfigError: the port cannot be bound (in use: give each worker on a host its own QBGW_METRICS_PORT).
    """
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror} (QBGW_METRICS_PORT)") from None
    return server
