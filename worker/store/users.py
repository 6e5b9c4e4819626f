"""Console users and sessions in the database (``qbgw users``, ``/console``). Only an argon2 hash of a password
and a sha256 of a session's token are stored; rows are never deleted."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .models import ConsoleSession, ConsoleUser

__all__ = ["UserRow", "token_id", "get", "all_users", "add", "start_session", "session_row", "end_sessions"]


@dataclass(frozen=True)
class UserRow:
    """A console user as stored (no password hash)."""

    name: str
    role: str
    created_at: datetime
    created_by: str
    password_set_at: datetime
    disabled_at: datetime | None
    failures: int
    locked_until: datetime | None

    def state(self, now: datetime) -> str:
        """ "active", "locked" (until ``locked_until``) or "disabled"."""
        if self.disabled_at is not None:
            return "disabled"
        if self.locked_until is not None and self.locked_until > now:
            return "locked"
        return "active"

    @property
    def actor(self) -> str:
        """The audit trail's "who" for everything the user does in the console."""
        return f"user:{self.name}"


def _row(user: ConsoleUser) -> UserRow:
    return UserRow(
        user.name,
        user.role,
        user.created_at,
        user.created_by,
        user.password_set_at,
        user.disabled_at,
        user.failures,
        user.locked_until,
    )


def token_id(token: str) -> str:
    """What the database keeps of a session token: its sha256 (the token is 256 random bits)."""
    return hashlib.sha256(b"qbgw-console-session\x00" + token.encode()).hexdigest()


def get(session: Session, name: str, *, lock: bool = False) -> tuple[UserRow, ConsoleUser] | None:
    user = session.get(ConsoleUser, name, with_for_update=lock)
    return None if user is None else (_row(user), user)


def all_users(session: Session) -> list[UserRow]:
    return [_row(u) for u in session.scalars(select(ConsoleUser).order_by(ConsoleUser.name)).all()]


def add(session: Session, *, name: str, role: str, password_hash: str, created_by: str, now: datetime) -> UserRow:
    user = ConsoleUser(
        name=name,
        role=role,
        password_hash=password_hash,
        created_at=now,
        created_by=created_by,
        password_set_at=now,
        disabled_at=None,
        failures=0,
        locked_until=None,
    )
    session.add(user)
    session.flush()
    return _row(user)


def start_session(session: Session, *, token: str, user_name: str, source: str, now: datetime) -> None:
    session.add(
        ConsoleSession(
            id=token_id(token), user_name=user_name, created_at=now, last_seen_at=now, ended_at=None, source=source
        )
    )


def session_row(session: Session, token: str) -> ConsoleSession | None:
    return session.get(ConsoleSession, token_id(token))


def end_sessions(session: Session, user_name: str, now: datetime) -> int:
    """End every open session of a user (disabled, or given a new password); how many there were."""
    done = session.execute(
        update(ConsoleSession)
        .where(ConsoleSession.user_name == user_name, ConsoleSession.ended_at.is_(None))
        .values(ended_at=now)
    )
    return int(done.rowcount)  # type: ignore[attr-defined]
