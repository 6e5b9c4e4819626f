"""Maintenance: key rotation and retention, run by an operator while jobs keep running.

Both work in small batches with compare-and-set updates, so a worker writing the same row
at the same moment is never overwritten, and both are audited.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, delete, or_, select, text, update
from sqlalchemy.orm import Session

from worker import audit, integrity, roles
from worker.crypto import FOLLOW_SECONDS, Keyring
from worker.errors import ConfigError, JobStateConflict
from worker.lifecycle import TERMINAL
from worker.models import AuditEvent, Job, utcnow
from worker.runtime import runtime
from worker.settings import Settings
from worker.store import open_text, seal_text

__all__ = ["Rotation", "Dropped", "rotate_keys", "purge_phi", "count_by_key", "drop_audit_before", "PHI_COLUMNS"]

log = logging.getLogger("qbgw.maintenance")

#: The encrypted columns of a job.
PHI_COLUMNS = ("payload", "answer", "error")
BATCH = 200


@dataclass(frozen=True)
class Rotation:
    old_primary: str
    new_primary: str
    values_reencrypted: int


def rotate_keys(*, actor: str = "operator", settings: Settings | None = None, max_passes: int = 20) -> Rotation:
    """Add a new primary key to the keyring file and re-encrypt every stored value to it.

    Every running process that encrypts (producers, workers) switches to the new key within
    ``crypto.FOLLOW_SECONDS``; passes repeat until no value under an older key is left and that
    time has passed, so a value another process encrypted just before it switched is re-encrypted too.

    Raises:
        ConfigError: the keys come from QBGW_ENCRYPTION_KEYS (rotate them there), or the
            keyring file cannot be written.
    """
    rt = runtime(settings)
    if rt.settings.encryption_keys:
        raise ConfigError("keys come from QBGW_ENCRYPTION_KEYS: add the new key first in that list and restart; "
                          "`qbgw keys rotate` rotates a keyring file")  # fmt: skip
    current = Keyring.load(rt.settings.keyring_path)
    rotated, new_id = current.with_new_primary()
    rotated.save(rt.settings.keyring_path)
    saved = time.monotonic()
    rt.keyring.reload()
    total = 0
    for _ in range(max_passes):
        done = _reencrypt_pass(rt.settings, new_id)
        total += done
        settling = FOLLOW_SECONDS + 0.5 - (time.monotonic() - saved)
        if done == 0 and settling <= 0:
            break
        if done == 0:
            time.sleep(settling)  # processes may still encrypt with the old key until then
    with rt.transaction() as session:
        audit.record(session=session, action=audit.Action.KEY_ROTATED, job_id=None, actor=actor,
                     detail={"old_primary": current.primary, "new_primary": new_id, "values": total})  # fmt: skip
    return Rotation(current.primary, new_id, total)


def _reencrypt_pass(settings: Settings, new_id: str) -> int:
    rt = runtime(settings)
    changed, last_id = 0, ""
    prefix = f"v1:{new_id}:"
    while True:
        with rt.transaction() as session:
            stale = or_(*(getattr(Job, c).is_not(None) & ~getattr(Job, c).startswith(prefix) for c in PHI_COLUMNS))
            rows = session.execute(
                select(Job.id, *(getattr(Job, c) for c in PHI_COLUMNS))
                .where(Job.id > last_id, stale).order_by(Job.id).limit(BATCH)
            ).all()  # fmt: skip
            for row in rows:
                changed += _reencrypt_row(session, row, prefix)
        if len(rows) < BATCH:
            return changed
        last_id = rows[-1].id


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


def purge_phi(*, older_than: timedelta, actor: str = "operator", settings: Settings | None = None) -> int:
    """Erase the PHI of finished jobs older than ``older_than`` (finished before now - that).

    Status, timestamps and the whole audit trail stay: the chain still verifies, and each
    purge is audited per job.
    """
    rt = runtime(settings)
    cutoff = utcnow() - older_than
    purged = 0
    while True:
        with rt.transaction() as session:
            ids = list(session.scalars(
                select(Job.id).where(Job.status.in_([str(s) for s in TERMINAL]), Job.finished_at < cutoff,
                                     Job.purged_at.is_(None)).limit(BATCH)
            ))  # fmt: skip
            if not ids:
                return purged
            now = utcnow()
            session.execute(update(Job).where(Job.id.in_(ids)).values(payload=None, answer=None, error=None,
                                                                      purged_at=now, updated_at=now))  # fmt: skip
            for job_id in ids:
                audit.record(session=session, action=audit.Action.PURGED, job_id=job_id, actor=actor,
                             detail={"cutoff": cutoff.isoformat()})  # fmt: skip
            purged += len(ids)


def count_by_key(*, settings: Settings | None = None) -> dict[str, int]:
    """How many stored values each key id encrypts (rotation progress)."""
    rt = runtime(settings)
    counts: dict[str, int] = {}
    with rt.transaction() as session:
        for column in PHI_COLUMNS:
            col = getattr(Job, column)
            for (stored,) in session.execute(select(col).where(col.is_not(None))):
                kid = Keyring.key_id_of(stored)
                counts[kid] = counts.get(kid, 0) + 1
    return counts


@dataclass(frozen=True)
class Dropped:
    through_seq: int
    events: int


def drop_audit_before(*, before: datetime, actor: str = "operator", settings: Settings | None = None) -> Dropped:
    """Drop the audit events that occurred before ``before``, which must be older than the
    retention period. The chain stays verifiable: the last dropped event's hash is signed into
    the anchor file as the chain's new base before anything is deleted. Needs the database
    owner (the append-only triggers are lifted for this one transaction).

    Raises:
        JobStateConflict: ``before`` is within the retention period (QBGW_AUDIT_RETENTION_DAYS).
        ConfigError: on PostgreSQL, the connected role does not own ``audit_events`` (an application role).
    """
    rt = runtime(settings)
    limit = utcnow() - timedelta(days=rt.settings.audit_retention_days)
    if before > limit:
        raise JobStateConflict(
            f"refused: audit events younger than {rt.settings.audit_retention_days} days "
            f"(after {limit.date()}) are kept; QBGW_AUDIT_RETENTION_DAYS sets the period"
        )
    with rt.transaction() as session:
        roles.require_owner(session, table="audit_events", command="qbgw audit drop")  # before the base anchor
        row = session.execute(
            select(AuditEvent.seq, AuditEvent.row_hash).where(AuditEvent.occurred_at < before)
            .order_by(AuditEvent.seq.desc()).limit(1)
        ).first()  # fmt: skip
        if row is None:
            return Dropped(0, 0)
        integrity.write_anchor(rt.settings, row.seq, row.row_hash, kind="base")
        count = _delete_through(session, row.seq)
        audit.record(session=session, action=audit.Action.AUDIT_DROPPED, job_id=None, actor=actor,
                     detail={"through_seq": row.seq, "events": count, "before": before.isoformat()})  # fmt: skip
    return Dropped(row.seq, count)


def _delete_through(session: Session, seq: int) -> int:
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
