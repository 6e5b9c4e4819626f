"""API keys of ``qbgw serve`` in the database: created, looked up, revoked, expired. Only a hash of each secret
is stored; the secret exists once, in what :func:`create` returns."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ..audit.crypto import Keyring, aad_for
from .jobs import KEYRING
from .models import ApiKey

__all__ = [
    "KeyRow",
    "PREFIX",
    "create",
    "find",
    "by_name",
    "revoke",
    "expire_by",
    "split",
    "matches",
    "all_keys",
    "webhook_url",
]

#: Every key starts so, which lets a secret scanner (and a person) tell a qbgw key from other strings.
PREFIX = "qbgw_"


@dataclass(frozen=True)
class KeyRow:
    """A key as stored (no secret)."""

    id: str
    name: str
    role: str
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None

    def state(self, now: datetime) -> str:
        """ "active", "expired" or "revoked"."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


def _row(key: ApiKey) -> KeyRow:
    return KeyRow(key.id, key.name, key.role, key.created_at, key.created_by, key.expires_at, key.revoked_at)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split(presented: str) -> tuple[str, str] | None:
    """(key id, secret) of a presented key ``qbgw_<id>_<secret>``, or None when it is not of that form."""
    if not presented.startswith(PREFIX):
        return None
    key_id, sep, secret = presented[len(PREFIX) :].partition("_")
    if not sep or not (8 <= len(key_id) <= 16) or not key_id.isalnum() or not key_id.isascii() or len(secret) < 20:
        return None
    return key_id, secret


def matches(stored_hash: str, secret: str) -> bool:
    return hmac.compare_digest(stored_hash, _hash(secret))


def create(
    session: Session,
    *,
    name: str,
    role: str,
    created_by: str,
    now: datetime,
    expires_at: datetime | None,
    webhook_url: str | None = None,
) -> tuple[KeyRow, str]:
    """Store a new key; returns it and the full key to show once."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    key = ApiKey(
        id=key_id,
        name=name,
        role=role,
        secret_hash=_hash(secret),
        created_at=now,
        created_by=created_by,
        expires_at=expires_at,
        revoked_at=None,
        webhook_url=None if webhook_url is None else _seal(session, key_id, webhook_url),
    )
    session.add(key)
    session.flush()
    return _row(key), f"{PREFIX}{key_id}_{secret}"


def _seal(session: Session, key_id: str, url: str) -> str:
    keyring: Keyring = session.info[KEYRING]
    return keyring.encrypt(url, aad=aad_for("api_keys", "webhook_url", key_id))


def webhook_url(session: Session, key_id: str) -> str | None:
    """The key's default webhook URL (decrypted), if it has one."""
    key = session.get(ApiKey, key_id)
    if key is None or key.webhook_url is None:
        return None
    keyring: Keyring = session.info[KEYRING]
    return keyring.decrypt(key.webhook_url, aad=aad_for("api_keys", "webhook_url", key_id))


def find(session: Session, key_id: str) -> tuple[KeyRow, str] | None:
    """The key with this id and its stored hash."""
    key = session.get(ApiKey, key_id)
    return None if key is None else (_row(key), key.secret_hash)


def by_name(session: Session, name: str) -> list[KeyRow]:
    rows = session.scalars(select(ApiKey).where(ApiKey.name == name).order_by(ApiKey.created_at)).all()
    return [_row(k) for k in rows]


def all_keys(session: Session) -> list[KeyRow]:
    return [_row(k) for k in session.scalars(select(ApiKey).order_by(ApiKey.name, ApiKey.created_at)).all()]


def revoke(session: Session, key_id: str, now: datetime) -> bool:
    """Revoke one key; False when it was already revoked."""
    done = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=now)
    )
    return bool(done.rowcount)  # type: ignore[attr-defined]


def expire_by(session: Session, key_ids: list[str], when: datetime) -> None:
    """Make keys expire at ``when`` at the latest (rotation's overlap)."""
    for key_id in key_ids:
        key = session.get(ApiKey, key_id, with_for_update=True)
        if key is not None and (key.expires_at is None or key.expires_at > when):
            key.expires_at = when
