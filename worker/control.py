"""Control: an operator's or producer's changes to existing jobs and batches (cancel, replay), audited. Part
of the facade: each call resolves ``settings`` (the environment when None) into this process's runtime.
"""

from __future__ import annotations

from .audit.events import Action
from .audit.events import record as audit_record
from .batches import ending
from .batches.views import BatchView
from .errors import InputError
from .execution.webhooks import publish as publish_webhook
from .lifecycle import JobStatus, utcnow
from .messages import resolve_actor
from .runtime.dispatch import announce
from .runtime.locator import runtime
from .settings import Settings
from .store import jobs as store
from .store import webhooks as webhook_store
from .store.batches import BatchStatus
from .store.webhooks import Delivery

__all__ = ["cancel", "replay", "cancel_batch", "redeliver_webhook"]


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
            session=session, job_id=job_id, actor=resolve_actor(actor, rt.settings.actor, "operator"), now=utcnow()
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
            actor=resolve_actor(actor, rt.settings.actor, "operator"),
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
    ending.end(rt, batch_id, BatchStatus.CANCELLED, resolve_actor(actor, rt.settings.actor, "operator"))
    return ending.current(rt, batch_id)


def redeliver_webhook(delivery_id: str, *, actor: str | None = None, settings: Settings | None = None) -> Delivery:
    """Queue a failed webhook delivery again, with a fresh retry window (audited). Returns it as it is now.

    Raises:
        InputError: no delivery has this id, or it has not failed.
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    with rt.transaction() as session:
        found = webhook_store.get(session, delivery_id)
        if found is None:
            raise InputError(
                f"delivery id: no webhook delivery has the id {delivery_id!r}; qbgw webhooks failed lists them"
            )
        if not webhook_store.redeliver(session, delivery_id, now=utcnow()):
            raise InputError(
                f"delivery {delivery_id} is {found.status}, not failed: only a failed delivery is redelivered"
            )
        audit_record(
            session=session,
            action=Action.WEBHOOK_REDELIVERED,
            job_id=found.job_id,
            batch_id=found.batch_id,
            actor=resolve_actor(actor, rt.settings.actor, "operator"),
            detail={"delivery_id": delivery_id, "event": found.event},
        )
    try:
        publish_webhook(rt, delivery_id)
    except Exception:  # noqa: S110 - the broker is away: the next sweep publishes it (it is pending)
        pass
    with rt.transaction() as session:
        now = webhook_store.get(session, delivery_id)
    return now or found
