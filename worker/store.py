"""Store: the write side of the job table. Every function takes the caller's session and never
commits, so a status change and its audit events land in one transaction.

Claims and finishes are compare-and-set updates: a second delivery of a message, or a worker
whose lease was taken over, changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker import audit
from worker.errors import GatewayError, IdempotencyConflict
from worker.lifecycle import CLAIMABLE, JobStatus, check_transition
from worker.models import Job

__all__ = ["NewJob", "Claim", "KeyRace", "create_job", "claim", "record_success", "record_failure", "stale_jobs"]


class KeyRace(Exception):
    """Two producers inserted the same idempotency key at once; run the transaction again."""


@dataclass(frozen=True)
class NewJob:
    """What a producer asks for, already validated."""

    id: str
    assistant_id: str
    messages: list[dict[str, Any]]
    custom_id: str | None
    idempotency_key: str | None
    actor: str
    max_attempts: int

    def payload(self) -> str:
        return json.dumps({"messages": self.messages}, separators=(",", ":"), sort_keys=True)

    def payload_digest(self) -> str:
        return audit.digest(f"{self.assistant_id}\n{self.payload()}".encode())


@dataclass(frozen=True)
class Claim:
    """A job a worker now holds for one attempt."""

    job_id: str
    attempt: int
    assistant_id: str
    messages: list[dict[str, Any]]
    max_attempts: int
    actor: str


def create_job(*, session: Session, new: NewJob, now: datetime) -> tuple[str, bool]:
    """Insert ``new`` (status queued) with its ``job.submitted`` event.

    Returns (job id, created): with an idempotency key seen before, the first job's id and False.

    Raises:
        IdempotencyConflict: the key names a job with another assistant or other messages.
        KeyRace: another transaction inserted the same key first; retry in a new transaction.
    """
    payload, payload_digest = new.payload(), new.payload_digest()
    if new.idempotency_key is not None:
        existing = session.scalar(select(Job).where(Job.idempotency_key == new.idempotency_key))
        if existing is not None:
            if existing.payload_digest != payload_digest:
                raise IdempotencyConflict(
                    f"idempotency key {new.idempotency_key!r} already names job {existing.id} "
                    "with a different assistant or messages"
                )
            return existing.id, False
    session.add(
        Job(
            id=new.id,
            status=JobStatus.QUEUED,
            assistant_id=new.assistant_id,
            payload=payload,
            payload_digest=payload_digest,
            custom_id=new.custom_id,
            idempotency_key=new.idempotency_key,
            actor=new.actor,
            attempts=0,
            max_attempts=new.max_attempts,
            created_at=now,
            updated_at=now,
        )
    )
    try:
        session.flush()
    except IntegrityError as exc:
        raise KeyRace(new.idempotency_key) from exc
    audit.record(
        session=session,
        action=audit.Action.SUBMITTED,
        job_id=new.id,
        actor=new.actor,
        request=(payload_digest, len(payload)),
        detail={"assistant_id": new.assistant_id, "custom_id": new.custom_id, "messages": len(new.messages)},
        at=now,
    )
    return new.id, True


def claim(*, session: Session, job_id: str, worker: str, lease: timedelta, now: datetime) -> Claim | None:
    """Take the job for one attempt, if it is queued, or retrying and due. None: nothing to do."""
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status.in_([str(s) for s in CLAIMABLE]),
            (Job.next_attempt_at.is_(None)) | (Job.next_attempt_at <= now),
        )
        .values(
            status=JobStatus.RUNNING,
            attempts=Job.attempts + 1,
            claimed_by=worker,
            lease_expires_at=now + lease,
            next_attempt_at=None,
            last_attempt_at=now,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    job = session.execute(
        select(Job.attempts, Job.assistant_id, Job.payload, Job.max_attempts, Job.actor, Job.started_at).where(
            Job.id == job_id
        )
    ).one()
    if job.started_at is None:
        session.execute(update(Job).where(Job.id == job_id).values(started_at=now))
    return Claim(
        job_id=job_id,
        attempt=job.attempts,
        assistant_id=job.assistant_id,
        messages=json.loads(job.payload)["messages"],
        max_attempts=job.max_attempts,
        actor=job.actor,
    )


def record_success(*, session: Session, claim: Claim, worker: str, answer: str, now: datetime) -> bool:
    """Store the answer and finish the job; False if this worker no longer holds it."""
    done = _finish(
        session, claim, worker, JobStatus.SUCCEEDED, now,
        answer=answer, error=None, error_class=None, http_status=200, finished_at=now,
    )  # fmt: skip
    if done:
        audit.record(session=session, action=audit.Action.SUCCEEDED, job_id=claim.job_id, actor=worker,
                     attempt=claim.attempt, outcome="succeeded", http_status=200, at=now)  # fmt: skip
    return done


def record_failure(
    *, session: Session, claim: Claim, worker: str, error: GatewayError, retry_at: datetime | None, now: datetime
) -> bool:
    """Fail the job, or (``retry_at`` given) set it retrying; False if this worker lost it."""
    status = JobStatus.RETRYING if retry_at is not None else JobStatus.FAILED
    done = _finish(
        session, claim, worker, status, now,
        error=_reason(error), error_class=type(error).__name__, http_status=error.status,
        next_attempt_at=retry_at, finished_at=None if retry_at else now,
    )  # fmt: skip
    if done:
        action = audit.Action.RETRY_SCHEDULED if retry_at else audit.Action.FAILED
        detail = {"next_attempt_at": retry_at.isoformat()} if retry_at else None
        audit.record(session=session, action=action, job_id=claim.job_id, actor=worker, attempt=claim.attempt,
                     outcome=str(status), http_status=error.status, error_class=type(error).__name__,
                     detail=detail, at=now)  # fmt: skip
    return done


def _finish(session: Session, claim: Claim, worker: str, status: JobStatus, now: datetime, **values: Any) -> bool:
    check_transition(JobStatus.RUNNING, status)
    result = session.execute(
        update(Job)
        .where(
            Job.id == claim.job_id,
            Job.status == JobStatus.RUNNING,
            Job.attempts == claim.attempt,
            Job.claimed_by == worker,
        )
        .values(status=status, claimed_by=None, lease_expires_at=None, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _reason(error: GatewayError) -> str:
    if error.reasons:
        return f"{error.message}: {'; '.join(error.reasons)}"
    return error.message


def stale_jobs(*, session: Session, now: datetime, grace: timedelta, limit: int = 1000) -> list[str]:
    """Jobs that should be running but whose message may be lost: queued and untouched for
    ``grace``, or retrying and overdue by ``grace``."""
    rows = session.scalars(
        select(Job.id)
        .where(
            ((Job.status == JobStatus.QUEUED) & (Job.updated_at <= now - grace))
            | (
                (Job.status == JobStatus.RETRYING)
                & (Job.next_attempt_at <= now - grace)
                & (Job.updated_at <= now - grace)
            )
        )
        .order_by(Job.created_at)
        .limit(limit)
    )
    ids = list(rows)
    if ids:
        # Touched, so that the next sweep leaves them alone for another ``grace``.
        session.execute(update(Job).where(Job.id.in_(ids)).values(updated_at=now))
    return ids
