"""Users of the browser console (``/console`` on ``qbgw serve``): people, not programs. Part of the facade.

A user has a name, a role (``auditor``, ``reader`` or ``admin``: never ``submitter``, the console submits
nothing) and a password kept only as an argon2 hash. Signing in starts a server-side session: the browser holds
a random token, the database only its sha256. A session ends when its user signs out, after
``QBGW_CONSOLE_IDLE_TIMEOUT`` seconds idle, or when the user is disabled or given a new password. After
``QBGW_CONSOLE_MAX_FAILURES`` failed sign-ins in a row a user is locked for ``QBGW_CONSOLE_LOCKOUT`` seconds.
Every change, sign-in, failure (without the password presented), sign-out and page view is audited with the
user as actor, ``user:<name>``.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .access import Role, _check_name
from .audit.events import Action, record
from .errors import InputError, QbgwError
from .lifecycle import utcnow
from .messages import resolve_actor
from .runtime.locator import runtime
from .settings import Settings
from .store import users as user_store
from .store.users import UserRow

__all__ = [
    "CONSOLE_ROLES",
    "MIN_PASSWORD",
    "UserRow",
    "SignInRefused",
    "SessionEnded",
    "Signed",
    "create_user",
    "list_users",
    "disable_user",
    "reset_password",
    "sign_in",
    "current",
    "sign_out",
    "note",
    "csrf_token",
]

#: The roles a console user may have.
CONSOLE_ROLES = (Role.AUDITOR, Role.READER, Role.ADMIN)
#: The shortest password accepted.
MIN_PASSWORD = 12
#: The longest (argon2 takes any length; this bounds the work a sign-in form can ask for).
MAX_PASSWORD = 1024

_HASHER = PasswordHasher()
#: Verified against when the user does not exist, so that an unknown name takes as long as a wrong password.
_DUMMY = _HASHER.hash(secrets.token_urlsafe(16))


class SignInRefused(QbgwError):
    """A sign-in was refused; ``reason`` (for the audit trail) is never shown to the person signing in, except
    that a locked user is told to wait."""

    def __init__(self, reason: str, *, locked: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.locked = locked

    def __str__(self) -> str:
        return f"sign-in refused: {self.reason}"


class SessionEnded(QbgwError):
    """No session, or one that has ended: ``reason`` is "none", "idle", "signed out" or "disabled"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Signed:
    """A signed-in user, proven by a session token."""

    user: UserRow
    token: str

    @property
    def role(self) -> Role:
        return Role(self.user.role)

    @property
    def actor(self) -> str:
        return self.user.actor

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)


def csrf_token(token: str) -> str:
    """The CSRF token of every form of a session: derived from its token (nothing more is stored)."""
    return hmac.new(token.encode(), b"qbgw-console-csrf", "sha256").hexdigest()


def _check_role(role: str) -> Role:
    try:
        checked = Role(role)
    except ValueError:
        checked = None
    if checked not in CONSOLE_ROLES:
        raise InputError(
            f"role: {role!r} is not a console role; use one of {', '.join(r.value for r in CONSOLE_ROLES)}"
        )
    assert checked is not None  # noqa: S101 - for mypy: CONSOLE_ROLES holds no None
    return checked


def _check_password(password: str) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InputError(f"password: use {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    if password.strip() != password:
        raise InputError("password: no leading or trailing spaces (a copy-paste slip would lock its owner out)")
    return password


def _operator(actor: str | None, settings: Settings) -> str:
    return resolve_actor(actor, settings.actor, "operator")


def create_user(
    name: str, role: str, password: str, *, actor: str | None = None, settings: Settings | None = None
) -> UserRow:
    """Create a console user. A name once used (even by a disabled user) is never given to another person.

    Raises:
        InputError: the name, role or password is not accepted, or the name is taken.
    """
    _check_name(name)
    checked = _check_role(role)
    hashed = _HASHER.hash(_check_password(password))
    rt = runtime(settings)
    now = utcnow()
    with rt.transaction() as session:
        found = user_store.get(session, name)
        if found is not None:
            raise InputError(
                f"name: {name!r} is taken by a {found[0].state(now)} user; a name is a person in the audit trail, "
                "so it is never given to anyone else: choose a new name"
            )
        row = user_store.add(
            session,
            name=name,
            role=checked.value,
            password_hash=hashed,
            created_by=_operator(actor, rt.settings),
            now=now,
        )
        record(
            session=session,
            action=Action.USER_CREATED,
            job_id=None,
            actor=_operator(actor, rt.settings),
            detail={"user": name, "role": checked.value},
        )
    return row


def list_users(*, settings: Settings | None = None) -> list[UserRow]:
    """Every console user, disabled ones too (never a password hash)."""
    with runtime(settings).transaction() as session:
        return user_store.all_users(session)


def _existing(session: Any, name: str) -> tuple[UserRow, Any]:
    found = user_store.get(session, name, lock=True) if isinstance(name, str) else None
    if found is None:
        raise InputError(f"name: no console user is called {name!r}; qbgw users list shows them")
    return found


def disable_user(name: str, *, actor: str | None = None, settings: Settings | None = None) -> UserRow:
    """Disable a user at once: their sessions end, they can no longer sign in; the name stays taken.

    Raises:
        InputError: no user has this name.
    """
    rt = runtime(settings)
    now = utcnow()
    with rt.transaction() as session:
        row, user = _existing(session, name)
        if user.disabled_at is None:
            user.disabled_at = now
            ended = user_store.end_sessions(session, name, now)
            record(
                session=session,
                action=Action.USER_DISABLED,
                job_id=None,
                actor=_operator(actor, rt.settings),
                detail={"user": name, "sessions_ended": ended},
            )
        return user_store.get(session, name)[0]  # type: ignore[index]


def reset_password(name: str, password: str, *, actor: str | None = None, settings: Settings | None = None) -> UserRow:
    """Give a user a new password: it unlocks them, and ends their open sessions.

    Raises:
        InputError: no user has this name, or the password is not accepted.
    """
    hashed = _HASHER.hash(_check_password(password))
    rt = runtime(settings)
    now = utcnow()
    with rt.transaction() as session:
        _, user = _existing(session, name)
        user.password_hash, user.password_set_at, user.failures, user.locked_until = hashed, now, 0, None
        ended = user_store.end_sessions(session, name, now)
        record(
            session=session,
            action=Action.USER_PASSWORD_RESET,
            job_id=None,
            actor=_operator(actor, rt.settings),
            detail={"user": name, "sessions_ended": ended},
        )
        return user_store.get(session, name)[0]  # type: ignore[index]


def _verify(stored: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def sign_in(name: str, password: str, *, source: str = "", settings: Settings | None = None) -> Signed:
    """Check a name and password and start a session. A failure is audited (the name tried, the reason, the
    source; never the password) and counted against the user: at QBGW_CONSOLE_MAX_FAILURES in a row they are
    locked for QBGW_CONSOLE_LOCKOUT seconds.

    Raises:
        SignInRefused: unknown user, wrong password, disabled or locked user.
    """
    rt = runtime(settings)
    st = rt.settings
    now = utcnow()
    name = name if isinstance(name, str) else ""
    password = password if isinstance(password, str) else ""
    with rt.transaction() as session:
        found = user_store.get(session, name, lock=True) if 0 < len(name) <= 64 else None
        good = _verify(found[1].password_hash if found else _DUMMY, password[:MAX_PASSWORD])
        reason, locked = "", False
        if found is None:
            reason = "unknown user"
        elif found[0].state(now) == "disabled":
            reason = "disabled user"
        elif found[0].state(now) == "locked":
            reason, locked = "locked user", True
        elif not good:
            user = found[1]
            user.failures += 1
            reason = "wrong password"
            if user.failures >= st.console_max_failures:
                user.locked_until = now + timedelta(seconds=st.console_lockout)
                user.failures = 0
                reason, locked = "wrong password; user locked", True
        if reason:
            detail = {"user": name[:64], "reason": reason, "source": source[:64]}
            record(session=session, action=Action.CONSOLE_SIGNIN_FAILED, job_id=None, actor="anonymous", detail=detail)
        else:
            assert found is not None  # noqa: S101 - no reason means a user was found
            found[1].failures, found[1].locked_until = 0, None
            token = secrets.token_urlsafe(32)
            user_store.start_session(session, token=token, user_name=name, source=source[:64], now=now)
            record(
                session=session,
                action=Action.CONSOLE_SIGNED_IN,
                job_id=None,
                actor=found[0].actor,
                detail={"source": source[:64], "role": found[0].role},
            )
            return Signed(user_store.get(session, name)[0], token)  # type: ignore[index]
    raise SignInRefused(reason, locked=locked)


def current(
    token: str | None,
    *,
    page: str | None = None,
    detail: dict[str, Any] | None = None,
    job_id: str | None = None,
    roles: Collection[Role] | None = None,
    settings: Settings | None = None,
) -> Signed:
    """The signed-in user of a session token; the session is touched (its idle time starts again), and with
    ``page``, the view is audited (``console.viewed``, the user as actor) in the same transaction, unless the
    user's role is not in ``roles`` (the caller refuses the page then). A session idle longer than
    QBGW_CONSOLE_IDLE_TIMEOUT is ended here (``console.signed_out``, reason "idle").

    Raises:
        SessionEnded: no token, an unknown or ended session, an idle one, or a disabled user's.
    """
    if not token or len(token) > 128:
        raise SessionEnded("none")
    rt = runtime(settings)
    now = utcnow()
    with rt.transaction() as session:
        row = user_store.session_row(session, token)
        if row is None or row.ended_at is not None:
            raise SessionEnded("none" if row is None else "signed out")
        found = user_store.get(session, row.user_name)
        if found is None or found[0].disabled_at is not None:
            raise SessionEnded("disabled")
        idle = (now - row.last_seen_at).total_seconds()
        if idle > rt.settings.console_idle_timeout:
            row.ended_at = now
            record(
                session=session,
                action=Action.CONSOLE_SIGNED_OUT,
                job_id=None,
                actor=found[0].actor,
                detail={"reason": "idle", "idle_seconds": int(idle)},
            )
        else:
            row.last_seen_at = now
            if page is not None and (roles is None or Role(found[0].role) in roles):
                record(
                    session=session,
                    action=Action.CONSOLE_VIEWED,
                    job_id=job_id,
                    actor=found[0].actor,
                    detail={"page": page, **(detail or {})},
                )
            return Signed(found[0], token)
    raise SessionEnded("idle")


def sign_out(token: str | None, *, settings: Settings | None = None) -> None:
    """End a session (its user signed out); nothing happens for an unknown or ended one."""
    if not token or len(token) > 128:
        return
    rt = runtime(settings)
    now = utcnow()
    with rt.transaction() as session:
        row = user_store.session_row(session, token)
        if row is None or row.ended_at is not None:
            return
        row.ended_at = now
        record(
            session=session,
            action=Action.CONSOLE_SIGNED_OUT,
            job_id=None,
            actor=f"user:{row.user_name}",
            detail={"reason": "signed out"},
        )


def note(action: Action, actor: str, detail: dict[str, Any], *, settings: Settings | None = None) -> None:
    """Audit something the console refused or did outside a page view (``console.refused``, ...)."""
    with runtime(settings).transaction() as session:
        record(session=session, action=action, job_id=None, actor=actor, detail=detail)
