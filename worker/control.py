"""Control: an operator's or producer's changes to existing jobs (cancel, replay), audited."""

from __future__ import annotations

from worker import store
from worker.lifecycle import JobStatus
from worker.models import utcnow
from worker.producer import announce
from worker.runtime import runtime
from worker.settings import Settings

__all__ = ["cancel", "replay"]


def cancel(job_id: str, *, actor: str | None = None, settings: Settings | None = None) -> JobStatus:
    """Cancel a job. A waiting job is cancelled at once; a running one when its attempt ends
    (its answer, if any, is then not kept). Returns ``cancelled``, or ``running`` for the latter.

    Raises:
        JobNotFound: no job has this id.
        JobStateConflict: the job already succeeded or failed.
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    with rt.transaction() as session:
        return store.cancel(
            session=session, job_id=job_id, actor=actor or rt.settings.actor or "operator", now=utcnow()
        )


def replay(job_id: str, *, actor: str | None = None, settings: Settings | None = None) -> int:
    """Queue a failed job again, with a fresh budget of attempts; returns its next attempt number.

    The job keeps its id, history and audit trail; the replay is audited.

    Raises:
        JobNotFound: no job has this id.
        JobStateConflict: the job has not failed.
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    with rt.transaction() as session:
        attempt = store.replay(session=session, job_id=job_id, actor=actor or rt.settings.actor or "operator",
                               extra_attempts=rt.settings.max_attempts, now=utcnow())  # fmt: skip
    announce(rt, job_id)  # if the broker is down, the job waits in the database for the sweeper
    return attempt
