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

from psycopg import sql
from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from worker.models import AuditChainHead, AuditEvent, utcnow

__all__ = ["Action", "AuditRecord", "event", "record", "add", "seal_argument", "seal", "seal_at_commit",
           "install_commit_seal", "discard", "digest", "fingerprint", "chain_hash", "chain_hash_v1", "chain_hash_v2",
           "content_hash", "link_hash", "stamp", "events_for_job"]  # fmt: skip


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


#: What format v2's content hash covers: every chained column but the position (seq).
CONTENT_V2 = tuple(name for name in CHAINED if name != "seq")

#: What the current format's (v3) content hash covers: every chained column but the position (seq) and the
#: time (occurred_at), both given at the seal, under the chain head's lock.
CONTENT = tuple(name for name in CHAINED if name not in ("seq", "occurred_at"))


def _canonical(row: Mapping[str, Any], names: tuple[str, ...]) -> bytes:
    fields = {name: row.get(name) for name in names}
    if "occurred_at" in fields:
        fields["occurred_at"] = stamp(fields["occurred_at"])
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def stamp(when: Any) -> Any:
    """An event's time as the hashes spell it: UTC, ISO 8601 with microseconds
    (``2026-12-04T23:30:00.123456+00:00``)."""
    return when.astimezone(UTC).isoformat(timespec="microseconds") if isinstance(when, datetime) else when


def chain_hash_v1(prev_hash: str, row: Mapping[str, Any]) -> str:
    """Format v1 (events before ``audit_chain_head.v2_from``): sha256 over a domain tag, the previous
    event's hash and the event's canonical JSON, seq included."""
    return hashlib.sha256(b"qbgw-audit-v1\x00" + prev_hash.encode() + b"\x00" + _canonical(row, CHAINED)).hexdigest()


def chain_hash_v2(prev_hash: str, row: Mapping[str, Any]) -> str:
    """Format v2 (events from ``v2_from`` to before ``v3_from``): the content (without seq) hashed before the
    lock, linked to the previous hash and the seq under it."""
    content = hashlib.sha256(b"qbgw-audit-v2-content\x00" + _canonical(row, CONTENT_V2)).hexdigest()
    return hashlib.sha256(f"qbgw-audit-v2|{prev_hash}|{int(row['seq'])}|{content}".encode()).hexdigest()


def content_hash(row: Mapping[str, Any]) -> str:
    """The current format (v3), part one: the event's canonical JSON without its seq and its time; needs no
    lock."""
    return hashlib.sha256(b"qbgw-audit-v3-content\x00" + _canonical(row, CONTENT)).hexdigest()


def link_hash(prev_hash: str, seq: int, occurred_at: str, content: str) -> str:
    """The current format (v3), part two: the chain link of the previous hash, the seq and the time the seal
    gave the event (:func:`stamp`), done under the head's lock (also by PostgreSQL's ``qbgw_audit_seal``,
    which must compute exactly this)."""
    return hashlib.sha256(f"qbgw-audit-v3|{prev_hash}|{seq}|{occurred_at}|{content}".encode()).hexdigest()


def chain_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    """The current format (v3): the link of the row's seq, time and content hash to the previous hash."""
    return link_hash(prev_hash, int(row["seq"]), stamp(row["occurred_at"]), content_hash(row))


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


def event(
    *,
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
) -> dict[str, Any]:
    """One event's columns, not chained yet; ``request``/``response`` are (digest, size). Its time
    (``occurred_at``) and its place (``seq``) are given when its transaction commits (:func:`seal`)."""
    return {
        "action": str(action), "job_id": job_id, "batch_id": batch_id, "assistant_id": assistant_id,
        "attempt": attempt, "actor": actor, "token_fp": token_fp, "outcome": outcome, "http_status": http_status,
        "error_class": error_class, "latency_ms": latency_ms,
        "request_digest": request[0] if request else None, "request_bytes": request[1] if request else None,
        "response_digest": response[0] if response else None, "response_bytes": response[1] if response else None,
        "detail": json.dumps(detail, sort_keys=True) if detail else None,
    }  # fmt: skip


def record(*, session: Session, **fields: Any) -> None:
    """Add one event (the keywords of :func:`event`) to ``session``'s transaction.

    The event is chained and inserted when the transaction commits (see :func:`seal`), so it
    exists exactly when the change it describes does.
    """
    add(session, event(**fields))


def add(session: Session, built: dict[str, Any]) -> None:
    """Add an event made by :func:`event` to ``session``'s transaction (see :func:`record`)."""
    session.info.setdefault(PENDING, []).append(built)


#: Where a session keeps the events it has not sealed yet.
PENDING = "qbgw_audit_pending"


@dataclass(frozen=True)
class Sealed:
    """What one commit added to the chain: events ``first``..``last``, the last one's hash."""

    first: int
    last: int
    row_hash: str


def seal(session: Session) -> Sealed | None:
    """Chain and insert the session's pending events now; returns what was added, or None.

    Locks the chain head row until the transaction ends, so concurrent transactions chain in
    the order they commit, and stamps the events with the time under that lock, so their times
    follow the same order. The content hashes are computed before the lock is taken.
    """
    pending = session.info.pop(PENDING, None)
    if not pending:
        return None
    contents = [content_hash(event) for event in pending]
    head = session.execute(select(AuditChainHead).where(AuditChainHead.id == 1).with_for_update()).scalar_one()
    # The time under the lock, never behind the chain's last (a clock stepped back): occurred_at follows seq.
    at = utcnow() if head.last_at is None else max(utcnow(), head.last_at)
    seq, prev, spelled = head.seq, head.row_hash, stamp(at)
    for event, content in zip(pending, contents, strict=True):
        seq += 1
        event["seq"], event["prev_hash"], event["occurred_at"] = seq, prev, at
        event["row_hash"] = prev = link_hash(prev, seq, spelled, content)
    session.execute(insert(AuditEvent), pending)
    first = head.seq + 1
    head.seq, head.row_hash, head.last_at = seq, prev, at
    session.flush()
    return Sealed(first, seq, prev)


@dataclass
class Staged:
    """Events handed to the transaction's COMMIT (PostgreSQL); ``sealed`` is set once it ran."""

    payload: str
    sealed: Sealed | None = None


#: Where a pooled PostgreSQL connection keeps the events its next COMMIT must seal first.
STAGED = "qbgw_audit_staged"
#: Set on a dialect whose commits seal staged events (see :func:`install_commit_seal`).
COMMIT_SEALS = "qbgw_commit_seals"
#: The seal (lock the head, link and insert the events, move the head: ``qbgw_audit_seal``, which a migration
#: made) and the COMMIT, as one simple-protocol query: one message, one round trip. The events are a literal
#: (quoted by psycopg), as the simple protocol takes no parameters.
SEAL_AND_COMMIT_SQL = sql.SQL("SELECT first_seq, last_seq, last_hash FROM qbgw_audit_seal({}::jsonb); COMMIT")


def seal_at_commit(session: Session) -> Sealed | Staged | None:
    """Called just before the transaction commits: on PostgreSQL (with :func:`install_commit_seal`),
    hash the pending events and stage them for the COMMIT, which sends one ``qbgw_audit_seal``
    call in the same round trip, so the head's row lock is held for no client round trip at all;
    elsewhere, :func:`seal` them now."""
    if not getattr(session.get_bind().dialect, COMMIT_SEALS, False):
        return seal(session)
    pending = session.info.pop(PENDING, None)
    if not pending:
        return None
    staged = Staged(seal_argument(pending))
    session.connection().connection.info[STAGED] = staged
    return staged


def seal_argument(pending: list[dict[str, Any]]) -> str:
    """The events as ``qbgw_audit_seal`` takes them (a JSON array, in chain order): each event's columns,
    its position ``i`` and its content hash ``c``, hashed here, before the chain head is locked (the function
    gives them their seq and time under the lock)."""
    rows = []
    for i, pending_event in enumerate(pending):
        row = {name: pending_event[name] for name in CONTENT}
        row["i"], row["c"] = i, content_hash(pending_event)
        rows.append(row)
    return json.dumps(rows, separators=(",", ":"))


def install_commit_seal(engine: Engine) -> None:
    """On PostgreSQL, make ``engine``'s COMMIT seal the events staged by :func:`seal_at_commit`:
    ``qbgw_audit_seal(...)`` and COMMIT go out together (one query), so the chain head is locked
    only while the server runs them, never while this process waits for the GIL."""
    dialect = engine.dialect
    if dialect.name != "postgresql" or getattr(dialect, COMMIT_SEALS, False):
        return
    plain_commit, plain_rollback = dialect.do_commit, dialect.do_rollback

    def do_commit(connection: Any) -> None:
        staged: Staged | None = connection.info.pop(STAGED, None)
        if staged is None:
            plain_commit(connection)
            return
        # Not psycopg's pipeline mode (seal, then COMMIT, in one pipeline): it did the same in one round
        # trip too, but its client side cost 2.5x the CPU of one query (measured), 14% of a worker's.
        # An error in the seal aborts the rest of the query: the COMMIT does not run, the caller rolls back.
        cursor = connection.dbapi_connection.cursor()
        cursor.execute(SEAL_AND_COMMIT_SQL.format(sql.Literal(staged.payload)))
        first, last, row_hash = cursor.fetchone()
        staged.sealed = Sealed(int(first), int(last), str(row_hash))

    def do_rollback(connection: Any) -> None:
        connection.info.pop(STAGED, None)  # the events describe nothing that happened
        plain_rollback(connection)

    dialect.do_commit = do_commit  # type: ignore[method-assign, assignment]
    dialect.do_rollback = do_rollback  # type: ignore[method-assign, assignment]
    setattr(dialect, COMMIT_SEALS, True)


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
