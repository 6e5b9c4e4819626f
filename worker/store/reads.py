"""Reads: jobs and audit events as frozen values, never ORM rows, in the caller's session. Every read of PHI
(a job's answer or error text) and every audit query is audited in the same transaction, with the reader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from ..audit import events as audit
from ..audit.crypto import Keyring, aad_for
from ..errors import DecryptionFailed, InvalidMessages, JobNotFound
from ..lifecycle import TERMINAL, JobStatus, utcnow
from . import db
from .batches import BatchStatus
from .chain import events_for_job, to_record
from .jobs import KEYRING
from .models import AuditEvent, Batch, Job

__all__ = [
    "JobView",
    "AuditFilter",
    "FleetSnapshot",
    "read_job",
    "status_of",
    "job_metadata",
    "failed",
    "query_audit",
    "job_trail",
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


def read_job(session: Session, job_id: str, reader: str, admit: Admit | None = None) -> JobView:
    """The job's current state, its answer or error included (that read is audited as ``reader``). ``admit``
    sees the job without its PHI first, and may refuse the read by raising (nothing is then decrypted or
    audited).

    Raises:
        JobNotFound: no job has this id (never reported as "pending").
        DecryptionFailed: a stored value was moved or altered, or its key is gone.
    """
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(job_id)
    if admit is not None:
        admit(_view(session, job, phi=False))
    return _read(session, job, reader)


#: A check of a job (seen without its PHI) before it is read with it: raises to refuse the read.
Admit = Callable[[JobView], None]


@dataclass(frozen=True)
class Expect:
    """What an :data:`Admit` lets through, stated for a database to check in the statement that reads (and
    audits) the job: that ``owner`` submitted it (None: anyone) and, if ``ended``, that it has ended. A job
    that does not meet it is shown to the Admit, to refuse it with its own error."""

    owner: str | None = None
    ended: bool = False


def job_metadata(session: Session, job_id: str) -> tuple[JobView, str | None]:
    """The job without its PHI (``answer`` and ``error`` are None; not audited) and its batch id.

    Raises JobNotFound."""
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(job_id)
    return _view(session, job, phi=False), job.batch_id


def status_of(session: Session, job_id: str) -> JobStatus:
    """Only the status (no PHI, so not audited). Raises JobNotFound."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        raise JobNotFound(job_id)
    return JobStatus(status)


def failed(session: Session, *, limit: int, reader: str) -> list[JobView]:
    """Failed jobs, most recent first, with their reasons (each read is audited). A job whose reason cannot be
    decrypted (its key is gone) is listed with that said in place of its reason, not read: one such job hid every
    other from the dead-letter view."""
    query = select(Job).where(Job.status == JobStatus.FAILED).order_by(Job.finished_at.desc()).limit(limit)
    found = []
    for job in session.scalars(query).all():
        try:
            found.append(_read(session, job, reader))  # (decrypted before its read event is made)
        except DecryptionFailed as exc:
            found.append(replace(_view(session, job, phi=False), error=f"(unreadable here: {exc})"))
    return found


def query_audit(session: Session, query: AuditFilter, *, export: bool, reader: str) -> list[audit.AuditRecord]:
    """Audit events matching ``query``, oldest first; the query is audited after the events it returns
    (``audit.exported`` when ``export``). Events staged for the block sealer are not read: the caller chains them
    first, before this transaction (``Runtime.chain_staged``)."""
    rows = session.scalars(select(AuditEvent).where(*query.where()).order_by(AuditEvent.seq).limit(query.limit))
    found = [to_record(row) for row in rows]
    action = audit.Action.AUDIT_EXPORTED if export else audit.Action.AUDIT_QUERIED
    audit.record(
        session=session,
        action=action,
        job_id=None,
        actor=reader,
        detail={"filter": query.describe(), "events": len(found)},
    )
    return found


def job_trail(session: Session, job_id: str, *, reader: str, include_reads: bool) -> list[audit.AuditRecord]:
    """The job's audit trail, oldest first (with ``include_reads``, who read it too); the query is audited.

    Raises:
        JobNotFound: no job has this id.
    """
    if session.get(Job, job_id) is None:
        raise JobNotFound(job_id)
    events = events_for_job(session=session, job_id=job_id)
    audit.record(
        session=session,
        action=audit.Action.AUDIT_QUERIED,
        job_id=None,
        actor=reader,
        detail={"filter": {"job_id": job_id}, "events": len(events)},
    )
    return events if include_reads else [e for e in events if e.action not in audit.READS]


def _read(session: Session, job: Job, reader: str) -> JobView:
    view = _view(session, job)
    event = read_event(view, job, reader)
    if event is not None:
        audit.add(session, event)
    return view


def read_event(view: JobView, job: Any, reader: str) -> dict[str, Any] | None:
    """The ``result.read`` event of ``view`` (read from ``job``, a row with the jobs table's columns) by
    ``reader``: None when the view holds no PHI (no answer, no error), so nothing was disclosed."""
    if view.answer is None and view.error is None:
        return None
    return result_read_event(view.id, reader, view.assistant_id, str(view.status), job.subject_index)


def result_read_event(
    job_id: str, reader: str, assistant_id: str, outcome: str, subject_index: str | None
) -> dict[str, Any]:
    """The ``result.read`` event of a job's answer or error (``outcome``: the job's status) by ``reader``."""
    return audit.event(
        action=audit.Action.RESULT_READ,
        job_id=job_id,
        actor=reader,
        assistant_id=assistant_id,
        outcome=outcome,
        subject_index=subject_index,
    )


@dataclass(frozen=True)
class FleetSnapshot:
    """Counts for the metrics exporter: no job ids, no PHI."""

    #: Every status, with 0 for the ones no job has.
    by_status: dict[str, int]
    #: How long the longest-waiting job has waited for a worker (queued since, or its retry due since).
    oldest_waiting_seconds: float
    #: Batches still validating or in progress.
    open_batches: int


def fleet_snapshot(session: Session) -> FleetSnapshot:
    """Jobs by status and the oldest wait, in three indexed queries (not audited: no PHI is read).

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    now = utcnow()
    counts = {status: n for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status))}
    # A queued job's updated_at is when it was queued (submitted, or replayed).
    queued = session.scalar(select(func.min(Job.updated_at)).where(Job.status == JobStatus.QUEUED))
    due = session.scalar(
        select(func.min(Job.next_attempt_at)).where(Job.status == JobStatus.RETRYING, Job.next_attempt_at <= now)
    )
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
    engine = db.make_engine(url, connect_timeout=timeout)
    unfinished = Job.status.in_((JobStatus.QUEUED, JobStatus.RETRYING, JobStatus.RUNNING))
    try:
        with db.session_scope(db.make_session_factory(engine)) as session:
            newest = session.scalar(
                select(Job.payload).where(Job.payload.is_not(None)).order_by(Job.created_at.desc()).limit(1)
            )
            waiting = session.scalar(
                select(Job.payload).where(unfinished, Job.payload.is_not(None)).order_by(Job.created_at).limit(1)
            )
    finally:
        engine.dispose()
    return {Keyring.key_id_of(stored) for stored in (newest, waiting) if stored}


#: The most events one audit query returns.
MAX_LIMIT = 1_000_000_000


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
    #: Only events after this position in the chain: a cursor, the last ``seq`` of the previous page.
    after_seq: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or not 1 <= self.limit <= MAX_LIMIT:
            raise InvalidMessages(
                f"limit: must be a whole number of events from 1 to {MAX_LIMIT}; got {str(self.limit)[:40]}"
            )
        after = self.after_seq
        if after is not None and (isinstance(after, bool) or not isinstance(after, int) or not 0 <= after < 2**63):
            raise InvalidMessages(f"after_seq: must be a seq (a whole number, 0 or more); got {str(after)[:40]}")
        for name in ("since", "until"):
            when = getattr(self, name)
            if when is not None and (not isinstance(when, datetime) or when.utcoffset() is None):
                got = "a naive datetime" if isinstance(when, datetime) else type(when).__name__
                raise InvalidMessages(
                    f"{name}: must be a datetime with a time zone (datetime(2026, 12, 1, tzinfo=UTC)); got {got}"
                )
        for name in ("job_id", "batch_id", "assistant_id", "actor", "action", "outcome"):
            if not isinstance(getattr(self, name), str | None):
                raise InvalidMessages(f"{name}: must be a string; got {type(getattr(self, name)).__name__}")

    def where(self) -> list[Any]:
        columns = ("job_id", "assistant_id", "actor", "action", "outcome")
        clauses: list[Any] = [getattr(AuditEvent, c) == getattr(self, c) for c in columns if getattr(self, c)]
        if self.batch_id:  # the batch's own events and those of its jobs (an attempt's event names its job only)
            jobs = select(Job.id).where(Job.batch_id == self.batch_id)
            clauses.append(or_(AuditEvent.batch_id == self.batch_id, AuditEvent.job_id.in_(jobs)))
        if self.since is not None:
            clauses.append(AuditEvent.occurred_at >= self.since)
        if self.until is not None:
            clauses.append(AuditEvent.occurred_at < self.until)
        if self.after_seq is not None:
            clauses.append(AuditEvent.seq > self.after_seq)
        return clauses

    def describe(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(self).items() if v is not None}


_WAITING = frozenset({JobStatus.QUEUED, JobStatus.RETRYING})


def _view(session: Session, job: Job, *, phi: bool = True) -> JobView:
    return view_of(job, session.info[KEYRING] if phi else None)


def view_of(job: Any, keyring: Keyring | None) -> JobView:
    """``job`` (an ORM row, or any row with the jobs table's columns) as a view; its answer and error
    decrypted with ``keyring`` (None: without them, no PHI)."""

    def opened(column: str, stored: str | None) -> str | None:
        if keyring is None or stored is None:
            return None
        return keyring.decrypt(stored, aad=aad_for("jobs", column, job.id))

    return JobView(
        id=job.id,
        status=JobStatus(job.status),
        assistant_id=job.assistant_id,
        custom_id=job.custom_id,
        idempotency_key=job.idempotency_key,
        actor=job.actor,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        answer=opened("answer", job.answer),
        error=opened("error", job.error),
        error_class=job.error_class,
        http_status=job.http_status,
        created_at=_utc(job.created_at),
        started_at=_utc(job.started_at),
        last_attempt_at=_utc(job.last_attempt_at),
        next_attempt_at=_utc(job.next_attempt_at),
        finished_at=_utc(job.finished_at),
        throttled=job.throttle_reason if job.status in _WAITING else None,
    )


def _utc(value: Any) -> Any:
    """A timestamp in UTC (a raw row's are in the connection's time zone; the ORM's are UTC already)."""
    return None if value is None else value.astimezone(UTC)
