"""Audit: append events to the audit log, inside the caller's transaction. Never commits.

An event holds who, what, when, which job and attempt, the outcome, and digests and sizes of
the bodies involved: never message text, images, answers or tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.models import AuditEvent, utcnow

__all__ = ["Action", "AuditRecord", "record", "digest", "events_for_job"]


class Action(StrEnum):
    SUBMITTED = "job.submitted"
    ATTEMPT_REQUEST = "attempt.request"
    ATTEMPT_RESPONSE = "attempt.response"
    ATTEMPT_ERROR = "attempt.error"
    #: The worker holding the attempt stopped (its lease ran out); the call's fate is unknown.
    ATTEMPT_INTERRUPTED = "attempt.interrupted"
    RETRY_SCHEDULED = "job.retry_scheduled"
    SUCCEEDED = "job.succeeded"
    FAILED = "job.failed"
    CANCEL_REQUESTED = "job.cancel_requested"
    CANCELLED = "job.cancelled"
    REPLAYED = "job.replayed"
    #: The sweeper published a message again (lost, or a retry kept in the database).
    REDISPATCHED = "job.redispatched"


def digest(data: bytes) -> str:
    """Hex sha256: what the audit log keeps instead of a body."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    """An audit event as read back: a plain value, detached from any session."""

    id: int
    occurred_at: datetime
    action: str
    job_id: str | None
    attempt: int | None
    actor: str
    outcome: str | None
    http_status: int | None
    error_class: str | None
    latency_ms: int | None
    request_digest: str | None
    request_bytes: int | None
    response_digest: str | None
    response_bytes: int | None
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["occurred_at"] = self.occurred_at.isoformat()
        return data


def record(
    *,
    session: Session,
    action: Action,
    job_id: str | None,
    actor: str,
    attempt: int | None = None,
    outcome: str | None = None,
    http_status: int | None = None,
    error_class: str | None = None,
    latency_ms: int | None = None,
    request: tuple[str, int] | None = None,
    response: tuple[str, int] | None = None,
    detail: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> None:
    """Add one event to ``session``; ``request``/``response`` are (digest, size) pairs."""
    session.add(
        AuditEvent(
            occurred_at=at or utcnow(),
            action=str(action),
            job_id=job_id,
            attempt=attempt,
            actor=actor,
            outcome=outcome,
            http_status=http_status,
            error_class=error_class,
            latency_ms=latency_ms,
            request_digest=request[0] if request else None,
            request_bytes=request[1] if request else None,
            response_digest=response[0] if response else None,
            response_bytes=response[1] if response else None,
            detail=json.dumps(detail, sort_keys=True) if detail else None,
        )
    )


def events_for_job(*, session: Session, job_id: str) -> list[AuditRecord]:
    """The job's events, oldest first."""
    rows = session.scalars(select(AuditEvent).where(AuditEvent.job_id == job_id).order_by(AuditEvent.id))
    return [_to_record(row) for row in rows]


def _to_record(row: AuditEvent) -> AuditRecord:
    return AuditRecord(
        id=row.id,
        occurred_at=row.occurred_at,
        action=row.action,
        job_id=row.job_id,
        attempt=row.attempt,
        actor=row.actor,
        outcome=row.outcome,
        http_status=row.http_status,
        error_class=row.error_class,
        latency_ms=row.latency_ms,
        request_digest=row.request_digest,
        request_bytes=row.request_bytes,
        response_digest=row.response_digest,
        response_bytes=row.response_bytes,
        detail=json.loads(row.detail) if row.detail else {},
    )
