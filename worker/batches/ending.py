"""Ending: a batch cancelled or expired as one decision, then its unfinished jobs cancelled chunk by chunk; a
run that stopped short is finished by the next sweep. Takes a ``Runtime``.
"""

from __future__ import annotations

from ..lifecycle import utcnow
from ..runtime.context import Runtime
from ..store import batches as batch_store
from ..store.batches import ENDED, BatchStatus
from .views import BatchView, settled

__all__ = ["current", "end", "expire_overdue"]


def current(rt: Runtime, batch_id: str) -> BatchView:
    """The batch's status and counts (no PHI is read). A batch past its window is expired now.

    Raises:
        BatchNotFound: no batch has this id.
        StoreUnavailable: the database cannot be reached.
    """
    with rt.transaction() as session:
        batch = batch_store.get(session=session, batch_id=batch_id)
        overdue = batch.status not in ENDED and batch.expires_at <= utcnow()
    if overdue:
        end(rt, batch_id, BatchStatus.EXPIRED, batch_store.EXPIRY_ACTOR)
    with rt.transaction() as session:
        batch = batch_store.get(session=session, batch_id=batch_id)
        return settled(session, [batch])[0]


def expire_overdue(rt: Runtime) -> list[str]:
    """Expire every batch past its completion window (the sweeper calls this); returns their ids. Also
    finishes cancelling the jobs of a batch whose end was decided by a run that did not get that far."""
    with rt.transaction() as session:
        overdue = batch_store.overdue(session=session, now=utcnow())
        unswept = batch_store.unswept(session=session)
    for batch_id, status in unswept:
        _cancel_unfinished(
            rt,
            batch_id,
            batch_store.EXPIRY_ACTOR if status == BatchStatus.EXPIRED else "operator",
            expired=status == BatchStatus.EXPIRED,
        )
    return [batch_id for batch_id in overdue if end(rt, batch_id, BatchStatus.EXPIRED, batch_store.EXPIRY_ACTOR)]


def end(rt: Runtime, batch_id: str, status: BatchStatus, actor: str) -> bool:
    """End the batch ``status`` (cancelled or expired), then cancel its unfinished jobs chunk by chunk.
    False: it had ended already (an end decided before is finished, should its run have stopped short).

    The end is decided first, in one transaction (see ``batch_store.end``): however many sweepers and
    readers race, an expired batch stays expired, a completed one completed."""
    with rt.transaction() as session:
        batch = batch_store.get(session=session, batch_id=batch_id, lock=True)
        counts = batch_store.counts(session=session, batch_ids=[batch_id])[batch_id]
        # It may have completed unnoticed (only reads settle it): then it is not cancelled or expired.
        batch_store.settle(session=session, batch=batch, counts=counts, now=utcnow())
        decided = batch.status not in ENDED and batch_store.end(
            session=session, batch=batch, status=status, actor=actor, pending=counts.pending, now=utcnow()
        )
        ended = BatchStatus(batch.status)
    if ended in (BatchStatus.CANCELLED, BatchStatus.EXPIRED):
        _cancel_unfinished(rt, batch_id, actor, expired=ended is BatchStatus.EXPIRED)
    return decided


def _cancel_unfinished(rt: Runtime, batch_id: str, actor: str, *, expired: bool) -> int:
    """Cancel the batch's jobs that are not finished (a running one when its attempt ends), a chunk per
    transaction; returns how many."""
    cancelled = 0
    while True:
        with rt.transaction() as session:
            ids = batch_store.unfinished_jobs(session=session, batch_id=batch_id, limit=batch_store.CHUNK)
            if not ids:
                return cancelled
            cancelled += batch_store.cancel_jobs(
                session=session, job_ids=ids, actor=actor, expired=expired, now=utcnow()
            )
