"""Models: the tables (batches, jobs, audit events). SQLAlchemy 2.x declarative; no behaviour here.

The tables run unchanged on SQLite and PostgreSQL; the schema itself is owned by Alembic
(``migrations/``), and a test runs ``alembic check`` so the two cannot drift.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ..audit.events import GENESIS

__all__ = [
    "Base",
    "Batch",
    "Job",
    "AuditEvent",
    "AuditChainHead",
    "AuditPending",
    "ConsoleUser",
    "ConsoleSession",
    "UTCDateTime",
    "GENESIS",
    "File",
    "OpenAIBatch",
]


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always an aware UTC datetime in Python, on every backend.

    SQLite has no time zones and hands back naive values; this puts UTC back on them.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        stored: datetime = value
        return stored.replace(tzinfo=UTC) if stored.tzinfo is None else stored.astimezone(UTC)


# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Batch(Base):
    """Jobs submitted together (``qbgw batch``): the batch's lifecycle. Its counts are read from
    its jobs, so workers never write here."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    #: validating (jobs being stored), in_progress, completed, cancelled or expired.
    status: Mapped[str] = mapped_column(String(16), index=True)
    actor: Mapped[str] = mapped_column(String(128))
    #: The assistant of lines that name none.
    assistant_id: Mapped[str | None] = mapped_column(String(128))
    #: Jobs the batch has (its valid lines), and invalid lines skipped at submit.
    total: Mapped[int] = mapped_column(Integer)
    skipped: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    in_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The end of the completion window: jobs not finished by then are cancelled.
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Job(Base):
    """One gateway request a producer asked for, and where it stands."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    assistant_id: Mapped[str] = mapped_column(String(128))
    #: JSON: {"messages": [...]} exactly as submitted, and {"files": {reference: [size, mtime_ns]}} when they name
    #: local files (PHI, encrypted; NULL once purged).
    payload: Mapped[str | None] = mapped_column(Text)
    #: sha256 of the canonical payload: tells a replayed idempotency key from a reused one.
    payload_digest: Mapped[str] = mapped_column(String(64))
    custom_id: Mapped[str | None] = mapped_column(String(255), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    actor: Mapped[str] = mapped_column(String(128), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    #: The gateway's answer (PHI), set once, on success.
    answer: Mapped[str | None] = mapped_column(Text)
    #: Why the job failed, or why the last attempt did (may echo PHI).
    error: Mapped[str | None] = mapped_column(Text)
    error_class: Mapped[str | None] = mapped_column(String(64))
    http_status: Mapped[int | None] = mapped_column(Integer)
    #: Unexpected failures of class ``error_class`` in a row (InternalError, DecryptionFailed): at
    #: QBGW_MAX_FAULTS the job fails.
    faults: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: When a broker message for the job was last published; NULL: the sweeper must publish one.
    announced_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Set when a cancel arrives while an attempt runs; the attempt then ends the job cancelled.
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Why the job waits for ``next_attempt_at`` when that is the fleet's rate limit or a 429 cooldown
    #: (not a failed attempt); cleared when an attempt starts.
    throttle_reason: Mapped[str | None] = mapped_column(String(32))
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: When the retention policy erased the job's PHI (payload, answer, error text).
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The batch the job was submitted in, if any.
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"), index=True)
    #: Whom the job is about (a patient's record number, ...): PHI, encrypted; NULL when none, or once purged.
    subject: Mapped[str | None] = mapped_column(Text)
    #: The subject's keyed blind index (``qbgw.audit.subjects``), kept after a purge: finds the job by equality.
    subject_index: Mapped[str | None] = mapped_column(String(64), index=True)
    #: The sha256 and size of the body every attempt sends, when it is known at submit (no image reference to
    #: resolve): a claim on PostgreSQL seals its ``attempt.request`` event from them (``qbgw.store.hotpath``).
    request_digest: Mapped[str | None] = mapped_column(String(64))
    request_bytes: Mapped[int | None] = mapped_column(Integer)


class AuditEvent(Base):
    """One thing that happened, append-only and hash-chained. Holds digests and sizes, never
    content: ``row_hash`` covers every other column and the previous event's hash."""

    __tablename__ = "audit_events"
    # Each filter an auditor uses, paired with the order results come in (seq), so a filtered,
    # limited query reads exactly its own rows (measured by bench/audit_scale.py).
    __table_args__ = (
        Index("ix_audit_events_job_id_id", "job_id", "id"),
        Index("ix_audit_events_actor_seq", "actor", "seq"),
        Index("ix_audit_events_assistant_id_seq", "assistant_id", "seq"),
        Index("ix_audit_events_batch_id_seq", "batch_id", "seq"),
        Index("ix_audit_events_outcome_seq", "outcome", "seq"),
        Index("ix_audit_events_action_occurred_at", "action", "occurred_at"),
        Index("ix_audit_events_subject_index_seq", "subject_index", "seq"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    #: Position in the chain: 1, 2, 3, ... without gaps, in commit order.
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    action: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(String(36))
    batch_id: Mapped[str | None] = mapped_column(String(36))
    assistant_id: Mapped[str | None] = mapped_column(String(128))
    attempt: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(128), default="")
    #: A short fingerprint of the QB-Token an attempt used (never the token).
    token_fp: Mapped[str | None] = mapped_column(String(16))
    outcome: Mapped[str | None] = mapped_column(String(32))
    http_status: Mapped[int | None] = mapped_column(Integer)
    error_class: Mapped[str | None] = mapped_column(String(64))
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    request_digest: Mapped[str | None] = mapped_column(String(64))
    request_bytes: Mapped[int | None] = mapped_column(Integer)
    response_digest: Mapped[str | None] = mapped_column(String(64))
    response_bytes: Mapped[int | None] = mapped_column(Integer)
    #: JSON of non-PHI facts (e.g. the retry delay); never message text or answers.
    detail: Mapped[str | None] = mapped_column(Text)
    #: The blind index of the job's subject (never the subject), when it has one; hashed only when not NULL.
    subject_index: Mapped[str | None] = mapped_column(String(64))


class AuditPending(Base):
    """Events staged for the sealer (``QBGW_AUDIT_SEAL=block``, PostgreSQL): one row per transaction, its
    events as ``qbgw_audit_seal`` takes them, deleted in the transaction that chains them. Empty otherwise."""

    __tablename__ = "audit_pending"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    staged_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=text("CURRENT_TIMESTAMP"))
    events: Mapped[Any] = mapped_column(JSON().with_variant(JSONB(), "postgresql"))


class AuditChainHead(Base):
    """The chain's last sequence number and hash: one row, locked by every commit that seals
    events, so that events are chained in commit order."""

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    row_hash: Mapped[str] = mapped_column(String(64))
    #: The first seq chained in format v2 (content hashed before the lock); those before it are v1.
    v2_from: Mapped[int] = mapped_column(BigInteger, default=1, server_default="1")
    #: The first seq chained in format v3 (the time given under the lock, and linked); v2 before it.
    v3_from: Mapped[int] = mapped_column(BigInteger, default=1, server_default="1")
    #: The time the last seal gave its events: the next seal's is never earlier.
    last_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiKey(Base):
    """A key of ``qbgw serve``: who presents it is ``principal`` in role ``role``. Only a hash of the secret is
    kept (the secret is 256 random bits, so a plain sha256 cannot be reversed or guessed)."""

    __tablename__ = "api_keys"

    #: The key's public id: the part of the presented key before its secret (``qbgw_<id>_<secret>``).
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    #: The principal: the actor of every audit event a request with this key causes ("key:<name>").
    name: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128))
    #: After this the key is refused (NULL: never). Rotation sets it on the key it replaces.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The webhook URL of the jobs this key submits without one (encrypted: a URL may carry a token).
    webhook_url: Mapped[str | None] = mapped_column(Text)


class WebhookSecret(Base):
    """A principal's webhook signing secret (encrypted). While a rotation overlaps, several are unexpired and
    a delivery carries one signature per secret (Standard Webhooks)."""

    __tablename__ = "webhook_secrets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    #: The key name (principal) whose deliveries it signs.
    principal: Mapped[str] = mapped_column(String(128), index=True)
    secret: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookDelivery(Base):
    """One event to POST to a receiver: made ``waiting`` with its job or batch, ``pending`` when that ends, then
    ``delivered`` (a 2xx) or ``failed`` (refused, or no 2xx within the retry window). Its id is the
    ``webhook-id``: the same on every attempt, so a receiver can drop a duplicate."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_id: Mapped[str | None] = mapped_column(String(36), index=True)
    batch_id: Mapped[str | None] = mapped_column(String(36), index=True)
    #: The key name (principal) that asked for it: its signing secrets sign the delivery.
    principal: Mapped[str] = mapped_column(String(128))
    #: The receiver's URL (encrypted).
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    #: The event type once known ("job.succeeded", "batch.completed", ...).
    event: Mapped[str | None] = mapped_column(String(32))
    #: The JSON body, fixed when the event became pending (no PHI: ids, status, custom_id).
    body: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    pending_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: An attempt holds the delivery until then (two messages for it: one attempt).
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(255))
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ConsoleUser(Base):
    """A person who signs in to the browser console (``qbgw users``). Only an argon2 hash of the password is
    kept. Never deleted: a disabled user's name stays taken, since the audit trail names them."""

    __tablename__ = "console_users"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: auditor, reader or admin (never submitter: the console submits nothing).
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128))
    password_set_at: Mapped[datetime] = mapped_column(UTCDateTime)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Failed sign-ins in a row; at QBGW_CONSOLE_MAX_FAILURES the user is locked until ``locked_until``.
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ConsoleSession(Base):
    """A signed-in console session. ``id`` is a sha256 of the cookie's token (the token itself is never
    stored); it ends on sign-out, after QBGW_CONSOLE_IDLE_TIMEOUT idle, or when its user is disabled."""

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The address it signed in from.
    source: Mapped[str] = mapped_column(String(64))


class File(Base):
    """A file uploaded through the OpenAI-compatible ``/v1/files`` (a batch's input lines): PHI, so its content
    and name are encrypted; deleting or purging it erases both (the row, without PHI, stays for the trail)."""

    __tablename__ = "files"

    #: ``file-`` and 32 hex digits.
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    #: Who uploaded it ("key:<name>"): another submitter's file does not exist for a submitter.
    actor: Mapped[str] = mapped_column(String(128), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    #: The name the client gave (encrypted: a file name may name a patient).
    filename: Mapped[str | None] = mapped_column(Text)
    #: Its size in bytes, as uploaded.
    bytes: Mapped[int] = mapped_column(BigInteger)
    #: The content (UTF-8 text, encrypted); NULL once deleted or purged.
    content: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    #: When its owner deleted it, or the retention policy purged it (content and name erased).
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class OpenAIBatch(Base):
    """What an OpenAI-style ``POST /v1/batches`` adds to a qbgw batch: the input file and endpoint it named, and
    its metadata (encrypted: free text a client may fill with anything)."""

    __tablename__ = "openai_batches"

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"), primary_key=True)
    input_file_id: Mapped[str] = mapped_column(String(40))
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    metadata_: Mapped[str | None] = mapped_column("metadata", Text)
    actor: Mapped[str] = mapped_column(String(128), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
