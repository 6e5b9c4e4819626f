"""Audit: append events to the audit log, inside the caller's transaction. Never commits.

An event holds who, what, when, which job and attempt, the outcome, and digests and sizes of
the bodies involved: never message text, images, answers or tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from worker.models import AuditChainHead, AuditEvent, utcnow

__all__ = ["Action", "AuditRecord", "record", "seal", "discard", "digest", "fingerprint", "chain_hash",
           "events_for_job"]  # fmt: skip


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
    #: An attempt whose request was audited was held back before sending (the fleet began a 429 cooldown
    #: meanwhile): nothing was sent, and the attempt does not count against the job's attempts.
    ATTEMPT_UNSENT = "attempt.unsent"
    #: The fleet's rate limit or a 429 cooldown made the job wait (no attempt spent; not a failure).
    THROTTLED = "job.throttled"
    #: The sweeper published a message again (lost, or a retry kept in the database).
    REDISPATCHED = "job.redispatched"
    #: Someone read a job's answer or error (PHI).
    RESULT_READ = "result.read"
    AUDIT_QUERIED = "audit.queried"
    AUDIT_EXPORTED = "audit.exported"
    AUDIT_VERIFIED = "audit.verified"
    #: Events older than the retention period were dropped (by an explicit, owner-run command).
    AUDIT_DROPPED = "audit.dropped"
    KEY_ROTATED = "key.rotated"
    #: A worker replaced a rejected QuickBlox session token (fingerprints only).
    SESSION_RENEWED = "session.renewed"
    #: A job's PHI (payload, answer, error text) was erased under the retention policy.
    PURGED = "job.purged"
    #: A batch was stored (its jobs each have their own job.submitted).
    BATCH_CREATED = "batch.created"
    #: A batch was cancelled, or its completion window ran out: its unfinished jobs were cancelled.
    BATCH_CANCELLED = "batch.cancelled"
    BATCH_EXPIRED = "batch.expired"
    #: Someone exported a batch's results (each job's read is also a result.read).
    BATCH_EXPORTED = "batch.exported"


#: Actions that record a read, not a change.
READS = frozenset({Action.RESULT_READ, Action.AUDIT_QUERIED, Action.AUDIT_EXPORTED, Action.AUDIT_VERIFIED,
                   Action.BATCH_EXPORTED})  # fmt: skip


def digest(data: bytes) -> str:
    """Hex sha256: what the audit log keeps instead of a body."""
    return hashlib.sha256(data).hexdigest()


def fingerprint(secret: str) -> str:
    """A short, stable fingerprint of a token: enough to tell tokens apart, useless to replay."""
    return hashlib.sha256(b"qbgw-token-fp\x00" + secret.encode()).hexdigest()[:12] if secret else ""


#: The columns a row's hash covers (with the previous hash), in the order of the canonical form.
CHAINED = ("seq", "occurred_at", "action", "job_id", "batch_id", "assistant_id", "attempt", "actor", "token_fp",
           "outcome", "http_status", "error_class", "latency_ms", "request_digest", "request_bytes",
           "response_digest", "response_bytes", "detail")  # fmt: skip


def chain_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    """sha256 over a domain tag, the previous event's hash and the event's canonical JSON."""
    fields = {name: row.get(name) for name in CHAINED}
    when = fields["occurred_at"]
    if isinstance(when, datetime):
        fields["occurred_at"] = when.astimezone(UTC).isoformat(timespec="microseconds")
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(b"qbgw-audit-v1\x00" + prev_hash.encode() + b"\x00" + canonical.encode()).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    """An audit event as read back: a plain value, detached from any session."""

    seq: int
    occurred_at: datetime
    action: str
    job_id: str | None
    batch_id: str | None
    assistant_id: str | None
    attempt: int | None
    actor: str
    token_fp: str | None
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
    assistant_id: str | None = None,
    batch_id: str | None = None,
    token_fp: str | None = None,
    at: datetime | None = None,
) -> None:
    """Add one event to ``session``'s transaction; ``request``/``response`` are (digest, size).

    The event is chained and inserted when the transaction commits (see :func:`seal`), so it
    exists exactly when the change it describes does.
    """
    session.info.setdefault(PENDING, []).append(
        {
            "occurred_at": at or utcnow(),
            "action": str(action), "job_id": job_id, "batch_id": batch_id, "assistant_id": assistant_id,
            "attempt": attempt, "actor": actor, "token_fp": token_fp, "outcome": outcome, "http_status": http_status,
            "error_class": error_class, "latency_ms": latency_ms,
            "request_digest": request[0] if request else None, "request_bytes": request[1] if request else None,
            "response_digest": response[0] if response else None, "response_bytes": response[1] if response else None,
            "detail": json.dumps(detail, sort_keys=True) if detail else None,
        }
    )  # fmt: skip


#: Where a session keeps the events it has not sealed yet.
PENDING = "qbgw_audit_pending"


@dataclass(frozen=True)
class Sealed:
    """What one commit added to the chain: events ``first``..``last``, the last one's hash."""

    first: int
    last: int
    row_hash: str


def seal(session: Session) -> Sealed | None:
    """Chain and insert the session's pending events; returns what was added, or None.

    Locks the chain head row until the transaction ends, so concurrent transactions chain in
    the order they commit; called just before commit to keep that lock short.
    """
    pending = session.info.pop(PENDING, None)
    if not pending:
        return None
    head = session.execute(select(AuditChainHead).where(AuditChainHead.id == 1).with_for_update()).scalar_one()
    seq, prev = head.seq, head.row_hash
    for event in pending:
        seq += 1
        event["seq"], event["prev_hash"] = seq, prev
        event["row_hash"] = prev = chain_hash(prev, event)
    session.execute(insert(AuditEvent), pending)
    first = head.seq + 1
    head.seq, head.row_hash = seq, prev
    session.flush()
    return Sealed(first, seq, prev)


def discard(session: Session) -> None:
    """The transaction rolled back: its events describe nothing that happened."""
    session.info.pop(PENDING, None)


def events_for_job(*, session: Session, job_id: str) -> list[AuditRecord]:
    """The job's events, oldest first (including those this transaction has not sealed yet)."""
    seal(session)
    rows = session.scalars(select(AuditEvent).where(AuditEvent.job_id == job_id).order_by(AuditEvent.seq))
    return [to_record(row) for row in rows]


def to_record(row: AuditEvent) -> AuditRecord:
    return AuditRecord(
        seq=row.seq,
        occurred_at=row.occurred_at,
        action=row.action,
        job_id=row.job_id,
        batch_id=row.batch_id,
        assistant_id=row.assistant_id,
        attempt=row.attempt,
        actor=row.actor,
        token_fp=row.token_fp,
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
