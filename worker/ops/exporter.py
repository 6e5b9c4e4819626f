"""Exporter: the database's view as Prometheus gauges (jobs by status, the oldest waiting job, open batches,
broker queue depth, the age of the audit checkpoint), computed at scrape time in ``qbgw metrics serve``, one
process for the fleet, so N workers do not run the same queries. Names are listed in ``ops.metrics``'s table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..audit.anchors import last_anchor
from ..errors import QbgwError
from ..runtime.app import backlog
from ..runtime.context import Runtime
from ..store.reads import fleet_snapshot

__all__ = ["FleetCollector"]

log = logging.getLogger("qbgw.metrics")
Metric = Any


# --- the database's view --------------------------------------------------------------------------
class FleetCollector(Collector):
    """Gauges computed when scraped, from the database, the broker and the anchor file. Each part that
    cannot be read is left out of the scrape and said by ``qbgw_up{part}`` = 0 (never a stale value)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.settings = rt.settings

    def collect(self) -> Iterator[Metric]:
        rt = self.rt
        up = GaugeMetricFamily("qbgw_up", "1 if this part could be read at this scrape, else 0", labels=["part"])
        started = time.perf_counter()
        try:
            with rt.transaction() as session:
                snapshot = fleet_snapshot(session)
        except QbgwError as exc:
            log.warning("metrics: cannot read the database: %s", exc)
            up.add_metric(["database"], 0)
        else:
            up.add_metric(["database"], 1)
            yield from _job_gauges(snapshot)
        queues = self.settings.queues
        depths = [(queue, backlog(rt.celery, queue, unknown_queue=0)) for queue in queues]
        up.add_metric(["broker"], 0 if any(depth is None for _, depth in depths) else 1)
        depth = GaugeMetricFamily("qbgw_queue_depth", "Messages waiting in a broker queue", labels=["queue"])
        for queue, count in depths:
            if count is not None:
                depth.add_metric([queue], count)
        yield depth
        anchor = last_anchor(self.settings.anchor_path)
        up.add_metric(["audit_anchor_file"], 0 if anchor is None else 1)
        if anchor is not None:
            yield GaugeMetricFamily(
                "qbgw_audit_checkpoint_age_seconds",
                "Seconds since the last signed audit anchor (checkpoint) was written",
                value=max(0.0, time.time() - anchor.timestamp()),
            )
            yield GaugeMetricFamily(
                "qbgw_audit_checkpoint_seq", "The audit event sequence number the last anchor signs", value=anchor.seq
            )
        yield up
        yield GaugeMetricFamily(
            "qbgw_scrape_duration_seconds",
            "How long this scrape of the database's view took",
            value=time.perf_counter() - started,
        )


def _job_gauges(snapshot: Any) -> Iterable[Metric]:
    jobs = GaugeMetricFamily("qbgw_jobs", "Jobs in the database by status", labels=["status"])
    for status, count in sorted(snapshot.by_status.items()):
        jobs.add_metric([status], count)
    yield jobs
    yield GaugeMetricFamily(
        "qbgw_oldest_waiting_job_age_seconds",
        "How long the job that has waited longest for a worker has waited (queued since, or retry due since); "
        "0 when none waits",
        value=snapshot.oldest_waiting_seconds,
    )
    yield GaugeMetricFamily(
        "qbgw_batches_open", "Batches that are validating or in progress", value=snapshot.open_batches
    )
