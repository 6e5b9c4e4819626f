"""Sweeper: re-announce jobs whose broker message may have been lost. The database is the
source of truth, so a lost message (a broker restarted empty, a publish that failed after the
commit) delays a job but never loses it; a duplicate message is a no-op at the claim.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from worker import store
from worker.celery_app import publish
from worker.models import utcnow
from worker.runtime import runtime
from worker.settings import Settings

__all__ = ["sweep"]

log = logging.getLogger("qbgw.sweeper")


def sweep(*, settings: Settings | None = None, grace: float | None = None) -> list[str]:
    """Publish a message again for every stale job; returns their ids.

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    wait = timedelta(seconds=rt.settings.sweep_grace if grace is None else grace)
    with rt.transaction() as session:
        stale = store.stale_jobs(session=session, now=utcnow(), grace=wait)
    for job_id in stale:
        publish(rt.celery, job_id)
        log.info("job %s: re-announced by the sweeper", job_id)
    return stale
