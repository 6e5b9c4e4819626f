"""Maintenance: the SQL of key rotation and retention, run by an operator while jobs keep running. Each call
is one small chunk in the caller's transaction, with compare-and-set updates, so a worker writing the same
row at the same moment is never overwritten; each change is audited (``admin`` drives the chunks).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Row, delete, or_, select, text, update
from sqlalchemy.orm import Session

from ..audit import events as audit
from ..audit.crypto import Keyring, aad_for
from ..lifecycle import TERMINAL, utcnow
from .jobs import KEYRING, open_text, seal_text
from .models import ApiKey, AuditEvent, File, Job, OpenAIBatch, WebhookDelivery, WebhookSecret

__all__ = [
    "PHI_COLUMNS",
    "CHUNK",
    "Reencrypted",
    "reencrypt_chunk",
    "purge_chunk",
    "count_by_key",
    "last_before",
    "delete_through",
]

#: The encrypted columns of a job.
PHI_COLUMNS = ("payload", "answer", "error", "subject")
#: Jobs per transaction.
CHUNK = 200


class Reencrypted(NamedTuple):
    """One chunk of a rotation: values re-encrypted, rows looked at, the last row's id (where the next starts)."""

    changed: int
    rows: int
    last_id: str


def reencrypt_chunk(session: Session, *, key_id: str, after_id: str) -> Reencrypted:
    """Re-encrypt, under the keyring's primary (``key_id``), the values of the next CHUNK jobs after ``after_id``
    that hold a value under another key."""
    prefix = f"v1:{key_id}:"
    stale = or_(*(getattr(Job, c).is_not(None) & ~getattr(Job, c).startswith(prefix) for c in PHI_COLUMNS))
    rows = session.execute(
        select(Job.id, *(getattr(Job, c) for c in PHI_COLUMNS))
        .where(Job.id > after_id, stale)
        .order_by(Job.id)
        .limit(CHUNK)
    ).all()
    changed = sum(_reencrypt_row(session, row, prefix) for row in rows)
    return Reencrypted(changed, len(rows), rows[-1].id if rows else after_id)


#: Encrypted columns outside the jobs table: (model, table, column), each re-encrypted by key rotation too.
OTHER_SEALED = (
    (WebhookDelivery, "webhook_deliveries", "url"),
    (WebhookSecret, "webhook_secrets", "secret"),
    (ApiKey, "api_keys", "webhook_url"),
    (File, "files", "content"),
    (File, "files", "filename"),
    (OpenAIBatch, "openai_batches", "metadata_"),
)


def reencrypt_others(session: Session, *, key_id: str) -> int:
    """Re-encrypt, under ``key_id``, up to CHUNK values of each encrypted column outside the jobs table (webhook
    URLs and signing secrets) held under another key; returns how many changed (0: none is left)."""
    prefix = f"v1:{key_id}:"
    changed = 0
    for model, table, column in OTHER_SEALED:
        field = getattr(model, column)
        key = getattr(model, "batch_id" if model is OpenAIBatch else "id")
        rows = session.execute(
            select(key, field).where(field.is_not(None), ~field.startswith(prefix)).limit(CHUNK)
        ).all()
        keyring: Keyring = session.info[KEYRING]
        for row_id, stored in rows:
            aad = aad_for(table, column.rstrip("_"), row_id)  # metadata_ is the column "metadata"
            fresh = keyring.encrypt(keyring.decrypt(stored, aad=aad), aad=aad)
            result = session.execute(update(model).where(key == row_id, field == stored).values({field: fresh}))
            changed += int(result.rowcount)  # type: ignore[attr-defined]
    return changed


def _reencrypt_row(session: Session, row: Row[Any], prefix: str) -> int:
    changed = 0
    for column in PHI_COLUMNS:
        stored = getattr(row, column)
        if stored is None or stored.startswith(prefix):
            continue
        fresh = seal_text(session, column, row.id, open_text(session, column, row.id, stored))
        # Compare-and-set: a worker that rewrote the value meanwhile wins; the next pass sees it.
        result = session.execute(
            update(Job).where(Job.id == row.id, getattr(Job, column) == stored).values({column: fresh})
        )
        changed += int(result.rowcount)  # type: ignore[attr-defined]
    return changed


def purge_chunk(session: Session, *, cutoff: datetime, actor: str) -> int:
    """Erase the PHI of up to CHUNK finished jobs that finished before ``cutoff`` (status, timestamps and the
    audit trail stay), each purge audited; returns how many (0: none is left)."""
    ids = list(
        session.scalars(
            select(Job.id)
            .where(Job.status.in_([str(s) for s in TERMINAL]), Job.finished_at < cutoff, Job.purged_at.is_(None))
            .limit(CHUNK)
        )
    )
    if ids:
        now = utcnow()
        session.execute(
            update(Job)
            .where(Job.id.in_(ids))
            .values(
                payload=None,
                answer=None,
                error=None,
                subject=None,
                # the body's digest is derived from the messages: it goes with them (the audit events keep theirs)
                request_digest=None,
                request_bytes=None,
                purged_at=now,
                updated_at=now,
            )
        )
    for job_id in ids:
        audit.record(
            session=session,
            action=audit.Action.PURGED,
            job_id=job_id,
            actor=actor,
            detail={"cutoff": cutoff.isoformat()},
        )
    return len(ids)


def count_by_key(session: Session) -> dict[str, int]:
    """How many stored values each key id encrypts (rotation progress)."""
    counts: dict[str, int] = {}
    for column in PHI_COLUMNS:
        col = getattr(Job, column)
        for (stored,) in session.execute(select(col).where(col.is_not(None))):
            kid = Keyring.key_id_of(stored)
            counts[kid] = counts.get(kid, 0) + 1
    return counts


def last_before(session: Session, before: datetime) -> tuple[int, str] | None:
    """(seq, row hash) of the last audit event that occurred before ``before``, or None."""
    row = session.execute(
        select(AuditEvent.seq, AuditEvent.row_hash)
        .where(AuditEvent.occurred_at < before)
        .order_by(AuditEvent.seq.desc())
        .limit(1)
    ).first()
    return None if row is None else (int(row.seq), str(row.row_hash))


def delete_through(session: Session, seq: int) -> int:
    """Delete the audit events up to ``seq``, lifting the append-only trigger for this transaction (the owner
    only: see ``roles.require_owner``); returns how many."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete"))
        result = session.execute(delete(AuditEvent).where(AuditEvent.seq <= seq))
        session.execute(text("ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_update_delete"))
        return int(result.rowcount)  # type: ignore[attr-defined]
    trigger = session.execute(
        text("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = 'audit_events_no_delete'")
    ).scalar_one()
    session.execute(text("DROP TRIGGER audit_events_no_delete"))
    result = session.execute(delete(AuditEvent).where(AuditEvent.seq <= seq))
    session.execute(text(trigger))
    return int(result.rowcount)  # type: ignore[attr-defined]
