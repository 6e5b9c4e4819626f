"""Subjects: the SQL of the access report. Finds a subject's jobs and their events by the blind index (indexed),
and walks the chain over the report's period. Takes a session; never sees the subject itself.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session

from ..audit.anchors import Anchor
from ..audit.events import CHAINED, OPTIONAL, AuditRecord
from ..audit.verify import VerifyReport, check_span
from .chain import to_record
from .models import GENESIS, AuditChainHead, AuditEvent, Job

__all__ = ["SubjectJob", "subject_jobs", "subject_events", "verify_period"]


@dataclass(frozen=True)
class SubjectJob:
    """A job about the subject, as its row says now (no PHI)."""

    job_id: str
    status: str
    assistant_id: str
    actor: str
    created_at: datetime
    custom_id: str | None
    batch_id: str | None
    purged: bool


def subject_jobs(session: Session, subject_index: str) -> list[SubjectJob]:
    """Every job whose subject has this blind index (the job rows' index, and their events': a job whose events
    carry it is listed even if its row was changed), oldest first."""
    from_events = select(AuditEvent.job_id).where(
        AuditEvent.subject_index == subject_index, AuditEvent.job_id.is_not(None)
    )
    query = select(Job).where(or_(Job.subject_index == subject_index, Job.id.in_(from_events)))
    rows = session.scalars(query.order_by(Job.created_at, Job.id))
    return [
        SubjectJob(
            job.id,
            job.status,
            job.assistant_id,
            job.actor,
            job.created_at,
            job.custom_id,
            job.batch_id,
            job.purged_at is not None,
        )
        for job in rows
    ]


def subject_events(
    session: Session, subject_index: str, job_ids: list[str], *, start: datetime | None, end: datetime | None
) -> list[AuditRecord]:
    """The events in [start, end) that carry the index or belong to one of ``job_ids``, in chain order."""
    where: list[Any] = [AuditEvent.subject_index == subject_index]
    found: dict[int, AuditRecord] = {}
    for chunk in [None, *(job_ids[i : i + 500] for i in range(0, len(job_ids), 500))]:
        query: Select[Any] = select(AuditEvent).where(*where if chunk is None else [AuditEvent.job_id.in_(chunk)])
        if start is not None:
            query = query.where(AuditEvent.occurred_at >= start)
        if end is not None:
            query = query.where(AuditEvent.occurred_at < end)
        for row in session.scalars(query):
            found.setdefault(row.seq, to_record(row))
    return [found[seq] for seq in sorted(found)]


def verify_period(
    session: Session, anchors: list[Anchor], key: bytes, *, start: datetime | None, end: datetime | None
) -> VerifyReport:
    """Walk the chain over [start, end) (every event in it, each hash and link, the signed anchors among them)."""
    span = select(func.min(AuditEvent.seq), func.max(AuditEvent.seq))
    if start is not None:
        span = span.where(AuditEvent.occurred_at >= start)
    if end is not None:
        span = span.where(AuditEvent.occurred_at < end)
    first, last = session.execute(span).one()
    starts = session.execute(select(AuditChainHead.v2_from, AuditChainHead.v3_from).where(AuditChainHead.id == 1))
    v2_from, v3_from = starts.first() or (1, 1)
    if first is None:
        return check_span([], anchors, key, after=(0, GENESIS), last=0)
    before = session.execute(select(AuditEvent.seq, AuditEvent.row_hash).where(AuditEvent.seq == first - 1)).first()
    bases = [a for a in anchors if a.kind == "base" and a.seq == first - 1]
    after = (first - 1, before.row_hash if before else (bases[0].row_hash if bases else GENESIS))
    rows = _rows(session, first, last)
    try:
        return check_span(rows, anchors, key, after=after, last=last, v2_from=v2_from, v3_from=v3_from)
    finally:
        rows.close()


def _rows(session: Session, first: int, last: int) -> Generator[Any]:
    columns = [getattr(AuditEvent, name) for name in (*CHAINED, *OPTIONAL, "prev_hash", "row_hash")]
    query = select(*columns).where(AuditEvent.seq.between(first, last)).order_by(AuditEvent.seq)
    result = session.execute(query.execution_options(yield_per=20_000))
    try:
        yield from result.mappings()
    finally:
        result.close()
