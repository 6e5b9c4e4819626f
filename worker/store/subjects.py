"""Subjects: the SQL of the access report. Finds a subject's jobs and their events by the blind index (indexed),
and walks the chain over the report's period. Takes a session; never sees the subject itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from ..audit import events as audit
from ..audit.anchors import Anchor
from ..audit.events import CHAINED, OPTIONAL, AuditRecord
from ..audit.verify import Span, VerifyReport, check_span
from .chain import to_record
from .models import AuditChainHead, AuditEvent, Job

__all__ = ["SubjectJob", "subject_jobs", "subject_events", "verify_period", "last_verification", "record_report"]


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
    # Two indexed look-ups, not one OR (PostgreSQL would scan every job for it).
    by_row = select(Job.id).where(Job.subject_index == subject_index)
    by_events = select(AuditEvent.job_id).where(
        AuditEvent.subject_index == subject_index, AuditEvent.job_id.is_not(None)
    )
    ids = sorted({*session.scalars(by_row), *session.scalars(by_events)})
    rows = [job for chunk in _chunks(ids) for job in session.scalars(select(Job).where(Job.id.in_(chunk)))]
    rows.sort(key=lambda job: (job.created_at, job.id))
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
    session: Session,
    subject_index: str,
    jobs: list[SubjectJob],
    *,
    start: datetime | None,
    end: datetime | None,
) -> list[AuditRecord]:
    """The events in [start, end) that carry the index or belong to one of ``jobs``, and the exports
    (``batch.exported``) of their batches, in chain order."""
    conditions: list[Any] = [AuditEvent.subject_index == subject_index]
    conditions += [AuditEvent.job_id.in_(chunk) for chunk in _chunks([j.job_id for j in jobs])]
    batches = sorted({j.batch_id for j in jobs if j.batch_id is not None})
    conditions += [
        (AuditEvent.action == "batch.exported") & AuditEvent.batch_id.in_(chunk) for chunk in _chunks(batches)
    ]
    found: dict[int, AuditRecord] = {}
    for condition in conditions:
        query: Select[Any] = select(AuditEvent).where(condition)
        if start is not None:
            query = query.where(AuditEvent.occurred_at >= start)
        if end is not None:
            query = query.where(AuditEvent.occurred_at < end)
        for row in session.scalars(query):
            found.setdefault(row.seq, to_record(row))
    return [found[seq] for seq in sorted(found)]


def verify_period(
    session: Session,
    anchors: list[Anchor],
    key: bytes,
    shown: list[int],
    *,
    start: datetime | None,
    end: datetime | None,
) -> VerifyReport:
    """The chain over [start, end) checked by index, without a walk (``audit.verify.check_span``): the shown
    events (``shown``: their seqs) recomputed and linked, no event missing, the signed anchors matched."""
    first, last = _ends(session, start, end)
    starts = session.execute(select(AuditChainHead.v2_from, AuditChainHead.v3_from).where(AuditChainHead.id == 1))
    v2_from, v3_from = starts.first() or (1, 1)
    first, last = min([first or 0, *shown] or [0]), max([last or 0, *shown] or [0])
    if first == 0:
        first = 1
    count = session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.seq.between(first, last)))
    at_anchors = [a.seq for a in anchors if a.kind == "head" and first <= a.seq <= last]
    stored: dict[int, str] = {}
    for chunk in _chunks(at_anchors):
        query = select(AuditEvent.seq, AuditEvent.row_hash).where(AuditEvent.seq.in_(chunk))
        stored.update({seq: row_hash for seq, row_hash in session.execute(query)})
    wanted = sorted({n for seq in shown for n in (seq - 1, seq, seq + 1)})
    columns = [getattr(AuditEvent, name) for name in (*CHAINED, *OPTIONAL, "prev_hash", "row_hash")]
    rows: dict[int, Any] = {}
    for chunk in _chunks(wanted):
        for row in session.execute(select(*columns).where(AuditEvent.seq.in_(chunk))).mappings():
            rows[row["seq"]] = row
    bases = [a for a in anchors if a.kind == "base"]
    base = max(bases, key=lambda a: a.seq).row_hash if bases else None
    span = Span(first, last, count or 0, stored, rows, tuple(shown), base)
    return check_span(span, anchors, key, v2_from=v2_from, v3_from=v3_from)


def _ends(session: Session, start: datetime | None, end: datetime | None) -> tuple[int | None, int | None]:
    """The first and last seq of [start, end): by the time index (an event's time follows its seq), where a
    min(seq) filtered on the time would walk the seq index through every event before the period."""
    first = select(AuditEvent.seq).order_by(AuditEvent.occurred_at, AuditEvent.seq).limit(1)
    last = select(AuditEvent.seq).order_by(AuditEvent.occurred_at.desc(), AuditEvent.seq.desc()).limit(1)
    if start is not None:
        first, last = first.where(AuditEvent.occurred_at >= start), last.where(AuditEvent.occurred_at >= start)
    if end is not None:
        first, last = first.where(AuditEvent.occurred_at < end), last.where(AuditEvent.occurred_at < end)
    return session.scalar(first), session.scalar(last)


def _chunks(values: list[Any], size: int = 500) -> list[list[Any]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


def last_verification(session: Session) -> tuple[datetime, str] | None:
    """When the whole chain was last walked (``qbgw audit verify``: an ``audit.verified`` event), and its outcome."""
    query = (
        select(AuditEvent.occurred_at, AuditEvent.outcome)
        .where(AuditEvent.action == "audit.verified")
        .order_by(AuditEvent.occurred_at.desc())
        .limit(1)
    )
    row = session.execute(query).first()
    return None if row is None else (row[0], row[1] or "")


def record_report(session: Session, *, actor: str, subject_index: str, intact: bool, detail: dict[str, Any]) -> None:
    """An access report's own event: the caller, the subject's blind index (never the subject), the outcome of its
    chain check, the period and the counts."""
    audit.record(
        session=session,
        action=audit.Action.ACCESS_REPORTED,
        job_id=None,
        actor=actor,
        outcome="intact" if intact else "tampered",
        subject_index=subject_index,
        detail=detail,
    )
