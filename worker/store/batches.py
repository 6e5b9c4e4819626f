"""Batch store: the write side of batches. Every function takes the caller's session and never
commits. A batch's counts are read from its jobs; its row holds only what its jobs cannot say
(when it started, how it ended, its window).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from ..audit import events as audit
from ..errors import BatchNotFound, JobStateConflict
from ..lifecycle import TERMINAL, JobStatus
from ..store import jobs as store
from .models import AuditEvent, Batch, Job

__all__ = [
    "BatchStatus",
    "Counts",
    "create_batch",
    "insert_jobs",
    "start",
    "get",
    "recent",
    "counts",
    "settle",
    "jobs_of",
    "unfinished_jobs",
    "cancel_jobs",
    "end",
    "overdue",
    "unswept",
    "EXPIRY_ACTOR",
    "CHUNK",
]

#: Jobs per transaction when a batch is stored or its jobs are cancelled (and per round of publishing).
CHUNK = 500
#: Who cancels the jobs of a batch whose window ran out, in the audit trail.
EXPIRY_ACTOR = "batch-expiry"
_PENDING = [str(s) for s in JobStatus if s not in TERMINAL]


class BatchStatus(StrEnum):
    #: Its lines are valid; its jobs are being stored (and already run as they are).
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    #: Every job is finished: succeeded, failed (see the counts) or cancelled one by one.
    COMPLETED = "completed"
    #: Cancelled by someone: waiting jobs were cancelled, running ones end cancelled.
    CANCELLED = "cancelled"
    #: The completion window ran out: unfinished jobs were cancelled, finished ones keep their results.
    EXPIRED = "expired"


#: Statuses a batch ends in (``completed`` becomes ``in_progress`` again if a job is replayed).
ENDED = frozenset({BatchStatus.COMPLETED, BatchStatus.CANCELLED, BatchStatus.EXPIRED})
#: Statuses of a batch that can still be cancelled or expire.
RUNNING = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)


@dataclass(frozen=True)
class Counts:
    """How a batch's jobs stand; ``pending`` is every job not finished yet."""

    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    pending: int = 0


def create_batch(
    *,
    session: Session,
    batch_id: str,
    actor: str,
    assistant_id: str | None,
    total: int,
    skipped: int,
    window: timedelta,
    now: datetime,
) -> None:
    """Insert the batch (status validating) with its ``batch.created`` event."""
    session.add(
        Batch(
            id=batch_id,
            status=BatchStatus.VALIDATING,
            actor=actor,
            assistant_id=assistant_id,
            total=total,
            skipped=skipped,
            created_at=now,
            expires_at=now + window,
            updated_at=now,
        )
    )
    audit.record(
        session=session,
        action=audit.Action.BATCH_CREATED,
        job_id=None,
        batch_id=batch_id,
        actor=actor,
        assistant_id=assistant_id,
        detail={"jobs": total, "skipped_lines": skipped, "window_seconds": int(window.total_seconds())},
    )


def insert_jobs(*, session: Session, jobs: Sequence[store.NewJob], announced: bool, now: datetime) -> None:
    """Insert ``jobs`` (queued) in one statement, with their ``job.submitted`` events.

    ``announced`` says their messages are published right after the commit; otherwise the
    sweeper publishes them.
    """
    rows = []
    for new in jobs:
        payload, digest = new.payload, new.payload_digest()
        rows.append(
            {
                "id": new.id,
                "status": str(JobStatus.QUEUED),
                "assistant_id": new.assistant_id,
                "payload": store.seal_text(session, "payload", new.id, new.stored_payload),
                "payload_digest": digest,
                "custom_id": new.custom_id,
                "idempotency_key": None,
                "actor": new.actor,
                "attempts": 0,
                "max_attempts": new.max_attempts,
                "created_at": now,
                "updated_at": now,
                "announced_at": now if announced else None,
                "batch_id": new.batch_id,
                "subject": store.seal_subject(session, new),
                "subject_index": new.subject_index,
                "request_digest": None if new.request is None else new.request[0],
                "request_bytes": None if new.request is None else new.request[1],
            }
        )
        store.audit_submitted(session, new, payload, digest)
    session.execute(insert(Job), rows)


def start(*, session: Session, batch_id: str, now: datetime) -> None:
    """Every job is stored: validating → in_progress (a batch cancelled meanwhile stays so)."""
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status == BatchStatus.VALIDATING)
        .values(status=BatchStatus.IN_PROGRESS, in_progress_at=now, updated_at=now)
    )


def get(*, session: Session, batch_id: str, lock: bool = False) -> Batch:
    """Raises BatchNotFound if no batch has this id."""
    batch = session.get(Batch, batch_id, with_for_update=lock)
    if batch is None:
        raise BatchNotFound(batch_id)
    return batch


def recent(*, session: Session, limit: int) -> list[Batch]:
    """The most recent batches first."""
    return list(session.scalars(select(Batch).order_by(Batch.created_at.desc()).limit(limit)))


def counts(*, session: Session, batch_ids: Sequence[str]) -> dict[str, Counts]:
    """Counts per batch (a batch without jobs gets zeros)."""
    tally: dict[str, dict[str, int]] = {b: {} for b in batch_ids}
    query = select(Job.batch_id, Job.status, func.count()).where(Job.batch_id.in_(batch_ids))
    rows = session.execute(query.group_by(Job.batch_id, Job.status))
    for batch_id, status, n in rows:
        tally[str(batch_id)][status] = n
    return {b: _counts(t) for b, t in tally.items()}


def _counts(by_status: dict[str, int]) -> Counts:
    return Counts(
        succeeded=by_status.get(JobStatus.SUCCEEDED, 0),
        failed=by_status.get(JobStatus.FAILED, 0),
        cancelled=by_status.get(JobStatus.CANCELLED, 0),
        pending=sum(by_status.get(s, 0) for s in _PENDING),
    )


def settle(*, session: Session, batch: Batch, counts: Counts, now: datetime) -> None:
    """in_progress ⇄ completed as the counts say: completed when nothing is pending (at the
    time the last job finished); in_progress again if a failed job was replayed.

    A compare-and-set on the status read: a batch that another transaction cancelled or expired meanwhile
    stays as that transaction left it (``batch`` is refreshed)."""
    if batch.status not in (BatchStatus.IN_PROGRESS, BatchStatus.COMPLETED):
        return
    done = counts.pending == 0
    if done == (batch.status == BatchStatus.COMPLETED):
        return
    last = session.scalar(select(func.max(Job.finished_at)).where(Job.batch_id == batch.id)) if done else None
    values = {
        "status": BatchStatus.COMPLETED if done else BatchStatus.IN_PROGRESS,
        "completed_at": (last or now) if done else None,
        "updated_at": now,
    }
    _compare_and_set(session, batch, (batch.status,), values)


def _compare_and_set(session: Session, batch: Batch, expected: Sequence[str], values: Mapping[str, object]) -> bool:
    """Change the batch row only if its status is still one of ``expected``; True if it did. ``batch`` then
    holds what the row holds."""
    changed = session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status.in_([str(s) for s in expected]))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.refresh(batch)
    return bool(changed.rowcount == 1)  # type: ignore[attr-defined]


def jobs_of(*, session: Session, batch_id: str, statuses: Sequence[str] | None = None) -> list[Job]:
    """The batch's jobs (those in ``statuses`` only, when given), sorted by custom_id."""
    query = select(Job).where(Job.batch_id == batch_id)
    if statuses is not None:
        query = query.where(Job.status.in_([str(s) for s in statuses]))
    return list(session.scalars(query.order_by(Job.custom_id)))


def unfinished_jobs(*, session: Session, batch_id: str, limit: int) -> list[str]:
    """Ids of the batch's jobs that are not finished and not already asked to cancel."""
    return list(
        session.scalars(
            select(Job.id)
            .where(Job.batch_id == batch_id, Job.status.in_(_PENDING), Job.cancel_requested_at.is_(None))
            .limit(limit)
        )
    )


def cancel_jobs(*, session: Session, job_ids: Sequence[str], actor: str, expired: bool, now: datetime) -> int:
    """Cancel each job with ``store.cancel`` (waiting: at once; running: when its attempt ends).
    A job of an expired batch cancelled at once says so in its error. Returns how many were
    cancelled or asked to cancel."""
    done = 0
    for job_id in job_ids:
        try:
            status = store.cancel(session=session, job_id=job_id, actor=actor, now=now)
        except JobStateConflict:
            continue  # it finished meanwhile: its result stands
        done += 1
        if expired and status is JobStatus.CANCELLED:
            reason = "the batch's completion window ended before the job ran"
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(error_class="Expired", error=store.seal_text(session, "error", job_id, reason))
            )
    return done


def end(*, session: Session, batch: Batch, status: BatchStatus, actor: str, pending: int, now: datetime) -> bool:
    """Decide that the running batch ends ``status`` (cancelled or expired), with its event: one decision
    however many callers race (a compare-and-set from validating or in_progress). False: it had ended
    already (completed, cancelled or expired), and nothing changed. Its unfinished jobs are cancelled
    afterwards (:func:`cancel_jobs`), in transactions of their own."""
    stamp = {"expired_at": now} if status is BatchStatus.EXPIRED else {"cancelled_at": now}
    if not _compare_and_set(session, batch, RUNNING, {"status": status, "updated_at": now, **stamp}):
        return False
    action = audit.Action.BATCH_EXPIRED if status is BatchStatus.EXPIRED else audit.Action.BATCH_CANCELLED
    audit.record(
        session=session,
        action=action,
        job_id=None,
        batch_id=batch.id,
        actor=actor,
        outcome=str(status),
        detail={"jobs_to_cancel": pending},
    )
    return True


def ended_by(*, session: Session, batch_id: str) -> str | None:
    """Who cancelled (or expired) the batch: the actor of its batch.cancelled or batch.expired event. In block
    mode that event may still be staged: the caller chains staged events first, before this transaction
    (``Runtime.chain_staged``)."""
    actions = [str(audit.Action.BATCH_CANCELLED), str(audit.Action.BATCH_EXPIRED)]
    return session.scalar(
        select(AuditEvent.actor)
        .where(AuditEvent.batch_id == batch_id, AuditEvent.action.in_(actions))
        .order_by(AuditEvent.seq.desc())
        .limit(1)
    )


def overdue(*, session: Session, now: datetime) -> list[str]:
    """Batches whose completion window has ended while they still run."""
    running = [str(s) for s in RUNNING]
    return list(session.scalars(select(Batch.id).where(Batch.status.in_(running), Batch.expires_at <= now)))


def unswept(*, session: Session) -> list[tuple[str, str]]:
    """(batch id, status) of cancelled or expired batches that still have jobs neither finished nor asked to
    cancel: the end was decided, and the run that cancels its jobs did not finish (a crash)."""
    ended = [str(BatchStatus.CANCELLED), str(BatchStatus.EXPIRED)]
    rows = session.execute(
        select(Batch.id, Batch.status)
        .where(Batch.status.in_(ended))
        .where(
            select(Job.id)
            .where(Job.batch_id == Batch.id, Job.status.in_(_PENDING), Job.cancel_requested_at.is_(None))
            .exists()
        )
    )
    return [(str(row.id), str(row.status)) for row in rows]
