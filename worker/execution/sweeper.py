"""Sweeper: the database's side of delivery. It takes back jobs whose worker died mid-call
(their lease ran out), and publishes a message for every job that needs one: retries kept in
the database until due, and jobs whose message was lost (a broker restarted empty, a publish
that failed after the commit). A duplicate message is a no-op at the claim.

Every ``qbgw worker`` runs it in a background thread (``QBGW_SWEEP_INTERVAL``); ``qbgw sweep``
runs it once or on a schedule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from ..batches.ending import expire_overdue
from ..errors import QbgwError
from ..lifecycle import utcnow
from ..ops import metrics
from ..runtime.app import backlog, publish
from ..runtime.context import Runtime
from ..runtime.locator import runtime
from ..settings import Settings
from ..store import jobs as store
from ..store.chain import Anchorer
from . import webhooks
from .periodic import Periodic

__all__ = ["SweepReport", "sweep", "Sweeper"]

log = logging.getLogger("qbgw.sweeper")


@dataclass(frozen=True)
class SweepReport:
    #: Jobs taken back from a dead worker and set to retry.
    recovered: list[str] = field(default_factory=list)
    #: Jobs a message was published for.
    dispatched: list[str] = field(default_factory=list)
    #: Batches whose completion window ran out (their unfinished jobs were cancelled).
    expired: list[str] = field(default_factory=list)


def sweep(rt: Runtime, *, grace: float | None = None) -> SweepReport:
    """One sweep: recover interrupted attempts, then publish what needs publishing, then expire
    batches past their completion window.

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    wait = timedelta(seconds=rt.settings.sweep_grace if grace is None else grace)
    with rt.transaction() as session:
        recovered = store.recover_interrupted(session=session, now=utcnow())
    # A queue the broker does not know holds nothing (Redis drops a queue with its data); None: no answer.
    counts = [backlog(rt.celery, q, unknown_queue=0) for q in rt.settings.queues]
    waiting = None if None in counts else sum(c for c in counts if c is not None)
    with rt.transaction() as session:
        due = store.due_for_dispatch(session=session, now=utcnow(), grace=wait, broker_backlog=waiting)
        in_batches = store.batch_members(session=session, job_ids=due)
    published = []
    for job_id in due:
        try:  # a batch's jobs go back to the batch queue, behind interactive ones
            publish(rt.celery, job_id, queue=rt.settings.queue_for(in_batch=job_id in in_batches))
        except Exception as exc:  # the broker is down: the next sweep after the grace tries again
            log.warning(
                "job %s: could not publish (%s)",
                job_id,
                type(exc).__name__,
                extra={"job_id": job_id, "error_class": type(exc).__name__},
            )
            continue
        published.append(job_id)
    expired = expire_overdue(rt)
    try:
        webhooks.promote(rt)
    except QbgwError as exc:
        log.warning("sweep: webhooks not promoted (%s)", exc)
    metrics.swept(recovered=len(recovered), dispatched=len(published), expired=len(expired))
    if recovered or published or expired:
        log.info(
            "sweep: %d interrupted attempt(s) recovered, %d job(s) dispatched, %d batch(es) expired",
            len(recovered),
            len(published),
            len(expired),
            extra={"recovered": len(recovered), "dispatched": len(published), "expired": len(expired)},
        )
    return SweepReport(recovered=recovered, dispatched=published, expired=expired)


class Sweeper(Periodic):
    """Runs :func:`sweep` every ``interval`` seconds in a daemon thread until stopped."""

    def __init__(self, settings: Settings, interval: float) -> None:
        super().__init__(interval, name="qbgw-sweeper")
        self.settings = settings
        self._anchorer = Anchorer(settings)

    def step(self) -> None:
        try:
            rt = runtime(self.settings)  # per sweep: a forked child finds its own
            sweep(rt)
            rt.keyring.reload()  # a rotated key is used from now on
            if self._anchorer.due():
                rt.chain_staged()  # the anchor covers what block sealing staged; its transaction takes no lock
                with rt.transaction() as session:
                    self._anchorer.tick(session)
        except QbgwError as exc:  # the database or broker is away; the next sweep tries again
            metrics.swept(failed=True)
            log.warning("sweep failed: %s", exc, extra={"error_class": type(exc).__name__})
        except OSError as exc:
            log.warning("could not write an audit anchor: %s", exc)

    def failed_unexpectedly(self, exc: Exception) -> None:  # jobs depend on the sweeping to end
        metrics.swept(failed=True)
        log.error("sweep failed unexpectedly: %s", type(exc).__name__, extra={"error_class": type(exc).__name__})
