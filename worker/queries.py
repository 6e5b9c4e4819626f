"""Queries: the read side. Jobs and audit events as frozen values, never ORM rows.

Every read of PHI (a job's answer or error text) and every audit query is itself audited,
with the reader's name, in the same transaction as the read.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker import audit
from worker.batch_store import BatchStatus
from worker.errors import JobNotFound
from worker.lifecycle import TERMINAL, JobStatus
from worker.models import AuditEvent, Batch, Job, utcnow
from worker.runtime import Runtime, runtime
from worker.settings import Settings
from worker.store import open_text

__all__ = [
    "JobView",
    "AuditFilter",
    "FleetSnapshot",
    "get_job",
    "wait_for_job",
    "job_events",
    "failed_jobs",
    "audit_query",
    "fleet_snapshot",
    "key_ids_in_use",
]


@dataclass(frozen=True)
class JobView:
    """A job as a producer sees it."""

    id: str
    status: JobStatus
    assistant_id: str
    custom_id: str | None
    idempotency_key: str | None
    actor: str
    attempts: int
    max_attempts: int
    answer: str | None
    error: str | None
    error_class: str | None
    http_status: int | None
    created_at: datetime
    started_at: datetime | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    finished_at: datetime | None
    #: Why the job waits for ``next_attempt_at`` when no attempt failed: "rate limit" (the fleet's budget
    #: is spent) or "cooldown after HTTP 429"; None otherwise.
    throttled: str | None = None

    @property
    def done(self) -> bool:
        """True once the job is succeeded, failed or cancelled: nothing will change it."""
        return self.status in TERMINAL

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, datetime):
                data[key] = value.isoformat()
        data["status"] = str(self.status)
        return data


def _reader(rt: Runtime, reader: str | None) -> str:
    return reader or rt.settings.actor or "reader"


def get_job(job_id: str, *, reader: str | None = None, settings: Settings | None = None) -> JobView:
    """The job's current state, its answer or error included (that read is audited).

    Raises:
        JobNotFound: no job has this id (never reported as "pending").
        StoreUnavailable: the database cannot be reached.
        DecryptionFailed: a stored value was moved or altered, or its key is gone.
    """
    rt = runtime(settings)
    with rt.transaction() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        return _read(session, job, _reader(rt, reader))


def _read(session: Session, job: Job, reader: str) -> JobView:
    view = _view(session, job)
    if view.answer is not None or view.error is not None:
        audit.record(session=session, action=audit.Action.RESULT_READ, job_id=job.id, actor=reader,
                     assistant_id=job.assistant_id, outcome=str(view.status))  # fmt: skip
    return view


def job_status(job_id: str, *, settings: Settings | None = None) -> JobStatus:
    """Only the status (no PHI, so not audited); for polling.

    Raises:
        JobNotFound: no job has this id.
    """
    with runtime(settings).transaction() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        if status is None:
            raise JobNotFound(job_id)
        return JobStatus(status)


def wait_for_job(
    job_id: str,
    *,
    timeout: float | None = None,
    poll: float = 0.05,
    reader: str | None = None,
    settings: Settings | None = None,
) -> JobView:
    """Block until the job is finished (or ``timeout`` seconds pass) and return its state.

    Raises:
        JobNotFound: no job has this id.
        TimeoutError: ``timeout`` passed first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = poll
    while (status := job_status(job_id, settings=settings)) not in TERMINAL:
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} is still {status} after {timeout:g}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    return get_job(job_id, reader=reader, settings=settings)


def failed_jobs(*, limit: int = 100, reader: str | None = None, settings: Settings | None = None) -> list[JobView]:
    """Failed jobs, most recent first, with their reasons (the dead-letter view; each read is audited)."""
    rt = runtime(settings)
    with rt.transaction() as session:
        rows = session.scalars(
            select(Job).where(Job.status == JobStatus.FAILED).order_by(Job.finished_at.desc()).limit(limit)
        )
        who = _reader(rt, reader)
        return [_read(session, job, who) for job in rows]


@dataclass(frozen=True)
class FleetSnapshot:
    """Counts for the metrics exporter: no job ids, no PHI."""

    #: Every status, with 0 for the ones no job has.
    by_status: dict[str, int]
    #: How long the longest-waiting job has waited for a worker (queued since, or its retry due since).
    oldest_waiting_seconds: float
    #: Batches still validating or in progress.
    open_batches: int


def fleet_snapshot(*, settings: Settings | None = None) -> FleetSnapshot:
    """Jobs by status and the oldest wait, in three indexed queries (not audited: no PHI is read).

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    now = utcnow()
    with runtime(settings).transaction() as session:
        counts = {status: n for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status))}
        # A queued job's updated_at is when it was queued (submitted, or replayed).
        queued = session.scalar(select(func.min(Job.updated_at)).where(Job.status == JobStatus.QUEUED))
        due = session.scalar(select(func.min(Job.next_attempt_at))
                             .where(Job.status == JobStatus.RETRYING, Job.next_attempt_at <= now))  # fmt: skip
        open_batches = Batch.status.in_((BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS))
        batches = session.scalar(select(func.count()).select_from(Batch).where(open_batches))
    since = min((t for t in (queued, due) if t is not None), default=now)
    return FleetSnapshot(
        by_status={str(s): int(counts.get(str(s), 0)) for s in JobStatus},
        oldest_waiting_seconds=max(0.0, (now - since).total_seconds()),
        open_batches=int(batches or 0),
    )


def key_ids_in_use(url: str, *, timeout: float) -> set[str]:
    """The ids of the keys that encrypt the newest job and the oldest unfinished one (what a worker will need
    next), on a connection of its own, for a health check; nothing is decrypted.

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    from worker import db
    from worker.crypto import Keyring

    engine = db.make_engine(url, connect_timeout=timeout)
    unfinished = Job.status.in_((JobStatus.QUEUED, JobStatus.RETRYING, JobStatus.RUNNING))
    try:
        with db.session_scope(db.make_session_factory(engine)) as session:
            newest = session.scalar(select(Job.payload).where(Job.payload.is_not(None))
                                    .order_by(Job.created_at.desc()).limit(1))  # fmt: skip
            waiting = session.scalar(select(Job.payload).where(unfinished, Job.payload.is_not(None))
                                     .order_by(Job.created_at).limit(1))  # fmt: skip
    finally:
        engine.dispose()
    return {Keyring.key_id_of(stored) for stored in (newest, waiting) if stored}


@dataclass(frozen=True)
class AuditFilter:
    """What an audit query selects; every field is optional. Times are aware datetimes."""

    job_id: str | None = None
    batch_id: str | None = None
    assistant_id: str | None = None
    actor: str | None = None
    action: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 1000

    def where(self) -> list[Any]:
        columns = ("job_id", "batch_id", "assistant_id", "actor", "action", "outcome")
        clauses: list[Any] = [getattr(AuditEvent, c) == getattr(self, c) for c in columns if getattr(self, c)]
        if self.since is not None:
            clauses.append(AuditEvent.occurred_at >= self.since)
        if self.until is not None:
            clauses.append(AuditEvent.occurred_at < self.until)
        return clauses

    def describe(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(self).items() if v is not None}


def audit_query(
    query: AuditFilter = AuditFilter(),
    *,
    export: bool = False,
    reader: str | None = None,
    settings: Settings | None = None,
) -> list[audit.AuditRecord]:
    """Audit events matching ``query``, oldest first. The query is itself audited
    (``audit.exported`` when ``export``), after the events it returns."""
    rt = runtime(settings)
    with rt.transaction() as session:
        rows = session.scalars(select(AuditEvent).where(*query.where()).order_by(AuditEvent.seq).limit(query.limit))
        found = [audit.to_record(row) for row in rows]
        action = audit.Action.AUDIT_EXPORTED if export else audit.Action.AUDIT_QUERIED
        audit.record(session=session, action=action, job_id=None, actor=_reader(rt, reader),
                     detail={"filter": query.describe(), "events": len(found)})  # fmt: skip
        return found


def job_events(
    job_id: str, *, include_reads: bool = False, reader: str | None = None, settings: Settings | None = None
) -> list[audit.AuditRecord]:
    """The job's audit trail, oldest first: what happened to it (and, with ``include_reads``,
    who read it). The query is audited.

    Raises:
        JobNotFound: no job has this id.
    """
    rt = runtime(settings)
    with rt.transaction() as session:
        if session.get(Job, job_id) is None:
            raise JobNotFound(job_id)
        events = audit.events_for_job(session=session, job_id=job_id)
        audit.record(session=session, action=audit.Action.AUDIT_QUERIED, job_id=None, actor=_reader(rt, reader),
                     detail={"filter": {"job_id": job_id}, "events": len(events)})  # fmt: skip
    return events if include_reads else [e for e in events if e.action not in audit.READS]


_WAITING = frozenset({JobStatus.QUEUED, JobStatus.RETRYING})


def _view(session: Session, job: Job) -> JobView:
    return JobView(
        id=job.id,
        status=JobStatus(job.status),
        assistant_id=job.assistant_id,
        custom_id=job.custom_id,
        idempotency_key=job.idempotency_key,
        actor=job.actor,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        answer=open_text(session, "answer", job.id, job.answer),
        error=open_text(session, "error", job.id, job.error),
        error_class=job.error_class,
        http_status=job.http_status,
        created_at=job.created_at,
        started_at=job.started_at,
        last_attempt_at=job.last_attempt_at,
        next_attempt_at=job.next_attempt_at,
        finished_at=job.finished_at,
        throttled=job.throttle_reason if job.status in _WAITING else None,
    )
