"""Control: an operator's or producer's changes to existing jobs and batches (cancel, replay), audited. Part
of the facade: each call resolves ``settings`` (the environment when None) into this process's runtime.
"""

from __future__ import annotations

from .batches import ending
from .batches.views import BatchView
from .lifecycle import JobStatus, utcnow
from .runtime.dispatch import announce
from .runtime.locator import runtime
from .settings import Settings
from .store import jobs as store
from .store.batches import BatchStatus

__all__ = ["cancel", "replay", "cancel_batch"]


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
        attempt = store.replay(
            session=session,
            job_id=job_id,
            actor=actor or rt.settings.actor or "operator",
            extra_attempts=rt.settings.max_attempts,
            now=utcnow(),
        )
    announce(rt, job_id)  # if the broker is down, the job waits in the database for the sweeper
    return attempt


def cancel_batch(batch_id: str, *, actor: str | None = None, settings: Settings | None = None) -> BatchView:
    """Cancel every job of the batch not finished yet (running ones when their attempt ends);
    finished jobs keep their results. A batch that has ended is left as it is.

    Raises:
        BatchNotFound: no batch has this id.
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    ending.end(rt, batch_id, BatchStatus.CANCELLED, actor or rt.settings.actor or "operator")
    return ending.current(rt, batch_id)
