"""Events: what the audit log records, and how its chain is hashed. Pure; no SQL (``store.chain`` seals).

An event holds who, what, when, which job and attempt, the outcome, and digests and sizes of
the bodies involved: never message text, images, answers or tokens. Events are staged in the
caller's transaction and chained when it commits, so an event exists exactly when its change does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

__all__ = [
    "GENESIS",
    "Action",
    "AuditRecord",
    "Sealed",
    "event",
    "record",
    "add",
    "digest",
    "fingerprint",
    "chain_hash",
    "chain_hash_v1",
    "chain_hash_v2",
    "content_hash",
    "link_hash",
    "stamp",
    "PENDING",
    "READS",
    "CHAINED",
    "CONTENT",
    "OPTIONAL",
    "UNKNOWN",
]


#: The "previous hash" of the first event.
GENESIS = "0" * 64


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
    #: Someone ran an access report for a subject (the event carries its blind index, never the subject).
    ACCESS_REPORTED = "audit.access_report"
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
    #: An API key of ``qbgw serve`` was created (with rotation: for the same principal), or revoked.
    API_KEY_CREATED = "apikey.created"
    API_KEY_REVOKED = "apikey.revoked"
    #: A request to ``qbgw serve`` presented no key, or one that is unknown, expired or revoked (never the secret).
    AUTH_FAILED = "auth.failed"
    #: One attempt to POST a webhook (its outcome: delivered, pending: tried again later, failed).
    WEBHOOK_ATTEMPT = "webhook.attempt"
    #: An operator queued a failed webhook delivery again.
    WEBHOOK_REDELIVERED = "webhook.redelivered"
    #: A principal's webhook signing secret was made or rotated (never the secret).
    WEBHOOK_SECRET_ROTATED = "webhook.secret_rotated"  # noqa: S105 - an event name
    #: A console user was created (``qbgw users create``), disabled, or given a new password (never the password).
    USER_CREATED = "user.created"
    USER_DISABLED = "user.disabled"
    USER_PASSWORD_RESET = "user.password_reset"  # noqa: S105 - an event name
    #: A console sign-in succeeded, or failed (the reason and the source address; never the password presented).
    CONSOLE_SIGNED_IN = "console.signed_in"
    CONSOLE_SIGNIN_FAILED = "console.signin_failed"
    #: A console session ended: signed out by its user, or after QBGW_CONSOLE_IDLE_TIMEOUT idle.
    CONSOLE_SIGNED_OUT = "console.signed_out"
    #: A signed-in user viewed a console page (detail: the page and its non-PHI parameters).
    CONSOLE_VIEWED = "console.viewed"
    #: The console refused a request: a form without its CSRF token, a role without the right, an API key.
    CONSOLE_REFUSED = "console.refused"
    #: A file was uploaded through the OpenAI-compatible ``/v1/files`` (its digest and size, never its content).
    FILE_UPLOADED = "file.uploaded"
    #: Someone read a file's content (PHI): the file itself, or a batch's input read to create the batch.
    FILE_READ = "file.read"
    #: A file's content and name were erased: by its owner or an admin (deleted), or by the retention policy.
    FILE_DELETED = "file.deleted"
    FILE_PURGED = "file.purged"


#: Actions that record a read, not a change.
READS = frozenset(
    {
        Action.RESULT_READ,
        Action.AUDIT_QUERIED,
        Action.AUDIT_EXPORTED,
        Action.AUDIT_VERIFIED,
        Action.ACCESS_REPORTED,
        Action.BATCH_EXPORTED,
        Action.CONSOLE_VIEWED,
        Action.FILE_READ,
    }
)


def digest(data: bytes) -> str:
    """Hex sha256: what the audit log keeps instead of a body."""
    return hashlib.sha256(data).hexdigest()


def fingerprint(secret: str) -> str:
    """A short, stable fingerprint of a token: enough to tell tokens apart, useless to replay."""
    return hashlib.sha256(b"qbgw-token-fp\x00" + secret.encode()).hexdigest()[:12] if secret else ""


#: The columns a row's hash covers (with the previous hash), in the order of the canonical form.
CHAINED = (
    "seq",
    "occurred_at",
    "action",
    "job_id",
    "batch_id",
    "assistant_id",
    "attempt",
    "actor",
    "token_fp",
    "outcome",
    "http_status",
    "error_class",
    "latency_ms",
    "request_digest",
    "request_bytes",
    "response_digest",
    "response_bytes",
    "detail",
)


#: What format v2's content hash covers: every chained column but the position (seq).
CONTENT_V2 = tuple(name for name in CHAINED if name != "seq")

#: What the current format's (v3) content hash covers: every chained column but the position (seq) and the
#: time (occurred_at), both given at the seal, under the chain head's lock.
CONTENT = tuple(name for name in CHAINED if name not in ("seq", "occurred_at"))


#: A column the canonical form holds only when it is not NULL, so that every event written before it existed
#: keeps its hash, and one that has it cannot lose or change it unseen.
OPTIONAL = ("subject_index",)


def _canonical(row: Mapping[str, Any], names: tuple[str, ...]) -> bytes:
    fields = {name: row.get(name) for name in names}
    for name in OPTIONAL:
        if row.get(name) is not None:
            fields[name] = row[name]
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


#: What the current format's (v3) content hash hashes before the event's canonical JSON.
CONTENT_TAG = b"qbgw-audit-v3-content\x00"


def content_hash(row: Mapping[str, Any]) -> str:
    """The current format (v3), part one: the event's canonical JSON without its seq and its time; needs no
    lock."""
    return hashlib.sha256(CONTENT_TAG + _canonical(row, CONTENT)).hexdigest()


def canonical_content(row: Mapping[str, Any]) -> str:
    """The canonical JSON that :func:`content_hash` hashes (after CONTENT_TAG)."""
    return _canonical(row, CONTENT).decode()


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
    #: The blind index of the job's subject, if it has one (never the subject).
    subject_index: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["occurred_at"] = self.occurred_at.isoformat()
        return data


class Unknown:
    """The type of :data:`UNKNOWN`."""


#: An event's subject index the seal must look up (the job's), as opposed to None: it has none.
UNKNOWN = Unknown()


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
    subject_index: str | None | Unknown = UNKNOWN,
) -> dict[str, Any]:
    """One event's columns, not chained yet; ``request``/``response`` are (digest, size). Its time
    (``occurred_at``) and its place (``seq``) are given when its transaction commits (:func:`seal`).
    ``subject_index``: the blind index of the job's subject when the caller knows it (None: the job has none);
    left out, the seal reads it from the job (``store.chain``)."""
    if not isinstance(actor, str):  # hashed as given, stored as text: anything else would break the chain for good
        raise TypeError(f"an audit event's actor must be a string, got {type(actor).__name__}")
    built = {
        "action": str(action),
        "job_id": job_id,
        "batch_id": batch_id,
        "assistant_id": assistant_id,
        "attempt": attempt,
        "actor": actor,
        "token_fp": token_fp,
        "outcome": outcome,
        "http_status": http_status,
        "error_class": error_class,
        "latency_ms": latency_ms,
        "request_digest": request[0] if request else None,
        "request_bytes": request[1] if request else None,
        "response_digest": response[0] if response else None,
        "response_bytes": response[1] if response else None,
        "detail": json.dumps(detail, sort_keys=True) if detail else None,
    }
    if not isinstance(subject_index, Unknown):
        built["subject_index"] = subject_index
    return built


def record(*, session: Session, **fields: Any) -> None:
    """Add one event (the keywords of :func:`event`) to ``session``'s transaction.

    The event is chained and inserted when the transaction commits (``store.chain.seal``), so it
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
