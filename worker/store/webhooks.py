"""Webhook deliveries and signing secrets in the database.

A delivery is made ``waiting`` in the transaction that stores its job (or batch), so a job never ends
without its webhook; when the job ends, :func:`promote` makes it ``pending`` with its body fixed. An attempt
leases it (:func:`lease`: two messages for one delivery make one attempt), then :func:`finish` records the
answer: ``delivered``, another try later, or ``failed``. URLs and secrets are encrypted like payloads.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from ..audit.crypto import Keyring, aad_for
from ..lifecycle import TERMINAL
from .jobs import KEYRING
from .models import Batch, Job, WebhookDelivery, WebhookSecret

__all__ = [
    "Delivery",
    "WAITING",
    "PENDING",
    "DELIVERED",
    "FAILED",
    "add_waiting",
    "promote",
    "waiting_batches",
    "any_waiting",
    "promote_batch",
    "due",
    "lease",
    "finish",
    "failed",
    "redeliver",
    "add_secret",
    "signing_secrets",
    "seal",
    "unseal",
    "get",
]

WAITING, PENDING, DELIVERED, FAILED = "waiting", "pending", "delivered", "failed"
#: What an attempt's end is when a newer attempt had taken the delivery (never a delivery's status).
SUPERSEDED = "superseded"


@dataclass(frozen=True)
class Delivery:
    """A delivery as an attempt or an operator sees it (the URL decrypted only for the attempt)."""

    id: str
    job_id: str | None
    batch_id: str | None
    principal: str
    status: str
    event: str | None
    body: str | None
    attempts: int
    created_at: datetime
    pending_since: datetime | None
    next_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    delivered_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data.pop("body")
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in data.items()}


def _delivery(row: WebhookDelivery) -> Delivery:
    return Delivery(
        row.id,
        row.job_id,
        row.batch_id,
        row.principal,
        row.status,
        row.event,
        row.body,
        row.attempts,
        row.created_at,
        row.pending_since,
        row.next_attempt_at,
        row.last_status,
        row.last_error,
        row.delivered_at,
    )


def seal(session: Session, table: str, column: str, row_id: str, plaintext: str) -> str:
    keyring: Keyring = session.info[KEYRING]
    return keyring.encrypt(plaintext, aad=aad_for(table, column, row_id))


def unseal(session: Session, table: str, column: str, row_id: str, stored: str) -> str:
    keyring: Keyring = session.info[KEYRING]
    return keyring.decrypt(stored, aad=aad_for(table, column, row_id))


def add_waiting(
    session: Session, *, url: str, principal: str, now: datetime, job_id: str | None = None, batch_id: str | None = None
) -> str:
    """A delivery for the end of a job (or, with only ``batch_id``, of a batch), in the caller's transaction."""
    delivery_id = str(uuid.uuid4())
    session.add(
        WebhookDelivery(
            id=delivery_id,
            job_id=job_id,
            batch_id=batch_id if job_id is None else None,
            principal=principal,
            url=seal(session, "webhook_deliveries", "url", delivery_id, url),
            status=WAITING,
            attempts=0,
            created_at=now,
        )
    )
    return delivery_id


def _body(event: str, subject: dict[str, Any], now: datetime) -> str:
    return json.dumps({"type": event, "timestamp": now.isoformat(), "data": subject}, separators=(",", ":"))


def promote(session: Session, *, now: datetime, job_ids: list[str] | None = None, limit: int = 500) -> list[str]:
    """Make the waiting deliveries of ended jobs pending (all of them, or those of ``job_ids``); returns their ids."""
    query = (
        select(WebhookDelivery.id, Job.id, Job.status, Job.custom_id, Job.batch_id)
        .join(Job, Job.id == WebhookDelivery.job_id)
        .where(WebhookDelivery.status == WAITING, Job.status.in_([str(s) for s in TERMINAL]))
        .limit(limit)
    )
    if job_ids is not None:
        query = query.where(WebhookDelivery.job_id.in_(job_ids))
    promoted = []
    for delivery_id, job_id, status, custom_id, batch_id in session.execute(query).all():
        subject = {"id": job_id, "status": status, "custom_id": custom_id, "batch_id": batch_id}
        if _make_pending(session, delivery_id, f"job.{status}", _body(f"job.{status}", subject, now), now):
            promoted.append(delivery_id)
    return promoted


def any_waiting(session: Session) -> bool:
    """Whether any job's delivery waits for its end."""
    found = session.scalar(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == WAITING, WebhookDelivery.job_id.is_not(None))
        .limit(1)
    )
    return found is not None


def waiting_batches(session: Session, limit: int = 100) -> list[str]:
    """Batches whose end a delivery waits for and that have ended, or whose jobs have all ended (a read settles
    those to completed): never the ones still running, however many there are."""
    unfinished = (
        select(Job.id)
        .where(Job.batch_id == WebhookDelivery.batch_id, Job.status.not_in([str(s) for s in TERMINAL]))
        .exists()
    )
    query = (
        select(WebhookDelivery.batch_id)
        .join(Batch, Batch.id == WebhookDelivery.batch_id)
        .where(WebhookDelivery.status == WAITING, WebhookDelivery.job_id.is_(None))
        .where(or_(Batch.status.in_(["completed", "cancelled", "expired"]), ~unfinished))
        .order_by(WebhookDelivery.created_at)
        .limit(limit)
    )
    return [b for b in session.scalars(query).all() if b is not None]


def promote_batch(session: Session, *, batch_id: str, status: str, now: datetime) -> list[str]:
    """Make the waiting delivery of an ended batch pending."""
    rows = session.scalars(
        select(WebhookDelivery.id).where(
            WebhookDelivery.batch_id == batch_id, WebhookDelivery.job_id.is_(None), WebhookDelivery.status == WAITING
        )
    ).all()
    subject = {"id": batch_id, "status": status, "custom_id": None, "batch_id": batch_id}
    event = f"batch.{status}"
    return [d for d in rows if _make_pending(session, d, event, _body(event, subject, now), now)]


def _make_pending(session: Session, delivery_id: str, event: str, body: str, now: datetime) -> bool:
    done = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == WAITING)
        .values(status=PENDING, event=event, body=body, pending_since=now, next_attempt_at=now)
    )
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


def due(session: Session, *, now: datetime, grace: timedelta = timedelta(0), limit: int = 500) -> list[str]:
    """Pending deliveries whose next attempt was due ``grace`` ago (its message had that long to arrive) and
    that no attempt holds now (a lease that ran out is not given the grace again)."""
    query = (
        select(WebhookDelivery.id)
        .where(
            WebhookDelivery.status == PENDING,
            WebhookDelivery.next_attempt_at <= now - grace,
            or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now),
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )
    return list(session.scalars(query).all())


def lease(session: Session, delivery_id: str, *, now: datetime, hold: timedelta) -> tuple[Delivery, str] | None:
    """Take one attempt at a due delivery: (the delivery, its URL), or None when it is not due or another
    attempt holds it."""
    taken = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == PENDING,
            WebhookDelivery.next_attempt_at <= now,
            or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now),
        )
        .values(lease_until=now + hold, attempts=WebhookDelivery.attempts + 1)
    )
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        return None
    row = session.get(WebhookDelivery, delivery_id, populate_existing=True)  # as the UPDATE left it
    if row is None:
        return None
    return _delivery(row), unseal(session, "webhook_deliveries", "url", row.id, row.url)


def finish(
    session: Session,
    delivery_id: str,
    *,
    attempt: int,
    now: datetime,
    delivered: bool,
    status: int | None,
    error: str | None,
    retry_at: datetime | None,
) -> str:
    """Record the end of attempt ``attempt``; returns the delivery's new status, or SUPERSEDED when a newer
    attempt took the delivery meanwhile (this one outlived its lease): then nothing is changed."""
    new = DELIVERED if delivered else (PENDING if retry_at is not None else FAILED)
    done = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == PENDING,
            WebhookDelivery.attempts == attempt,
        )
        .values(
            status=new,
            lease_until=None,
            last_status=status,
            last_error=None if error is None else error[:255],
            next_attempt_at=retry_at if new == PENDING else None,
            delivered_at=now if delivered else None,
        )
    )
    return new if done.rowcount == 1 else SUPERSEDED  # type: ignore[attr-defined]


def get(session: Session, delivery_id: str) -> Delivery | None:
    row = session.get(WebhookDelivery, delivery_id)
    return None if row is None else _delivery(row)


def failed(session: Session, *, limit: int = 100) -> list[Delivery]:
    rows = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.status == FAILED)
        .order_by(WebhookDelivery.pending_since.desc())
        .limit(limit)
    ).all()
    return [_delivery(r) for r in rows]


def redeliver(session: Session, delivery_id: str, *, now: datetime) -> bool:
    """Queue a failed delivery again, with a fresh retry window; False unless it had failed."""
    done = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == FAILED)
        .values(status=PENDING, pending_since=now, next_attempt_at=now, attempts=0, lease_until=None)
    )
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


def add_secret(session: Session, *, principal: str, now: datetime, overlap: timedelta | None) -> str:
    """A new signing secret for ``principal`` (``whsec_`` + base64 of 24 random bytes); the unexpired ones
    expire after ``overlap`` (None: at once). Returns the secret."""
    current = session.scalars(
        select(WebhookSecret).where(
            WebhookSecret.principal == principal,
            or_(WebhookSecret.expires_at.is_(None), WebhookSecret.expires_at > now),
        )
    ).all()
    ends = now + (overlap or timedelta(0))
    for old in current:
        if old.expires_at is None or old.expires_at > ends:
            old.expires_at = ends
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    secret_id = str(uuid.uuid4())
    session.add(
        WebhookSecret(
            id=secret_id,
            principal=principal,
            secret=seal(session, "webhook_secrets", "secret", secret_id, secret),
            created_at=now,
            expires_at=None,
        )
    )
    return secret


def signing_secrets(session: Session, principal: str, now: datetime) -> list[str]:
    """The principal's unexpired secrets, newest first."""
    rows = session.scalars(
        select(WebhookSecret)
        .where(
            WebhookSecret.principal == principal,
            or_(WebhookSecret.expires_at.is_(None), WebhookSecret.expires_at > now),
        )
        .order_by(WebhookSecret.created_at.desc())
    ).all()
    return [unseal(session, "webhook_secrets", "secret", r.id, r.secret) for r in rows]
