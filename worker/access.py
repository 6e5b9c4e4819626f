"""Access: the API keys of ``qbgw serve`` and the principals they prove. Part of the facade.

A key is ``qbgw_<id>_<secret>``; the database keeps only a hash of the secret. A principal is the key's
name in a role; the actor of every audit event a request causes is ``key:<name>``, proven by the key, never
named by the caller. Creating, rotating and revoking keys, and every refused key, are audited (never the
secret). Roles, deny by default, are enforced by the HTTP layer (:mod:`qbgw.api`) from :data:`PERMISSIONS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from .audit.events import Action, record
from .errors import InputError, Unauthenticated
from .lifecycle import utcnow
from .messages import resolve_actor, validate_webhook_url
from .runtime.locator import runtime
from .settings import Settings
from .store import keys as key_store
from .store import webhooks
from .store.keys import KeyRow

__all__ = [
    "Role",
    "Principal",
    "KeyRow",
    "PERMISSIONS",
    "create_key",
    "rotate_key",
    "revoke_key",
    "list_keys",
    "authenticate",
    "parse_duration",
    "webhook_secret",
]


class Role(StrEnum):
    """What a key may do. ``submitter``: submit, and read and cancel its own jobs. ``reader``: read every job's
    status and result. ``auditor``: the audit trail and job metadata, never message text nor answers.
    ``admin``: replay, and job metadata; keys are managed with ``qbgw api-keys`` on the server."""

    SUBMITTER = "submitter"
    READER = "reader"
    AUDITOR = "auditor"
    ADMIN = "admin"


#: Who may do what over HTTP (deny by default). "own": only on jobs and batches the principal submitted; a
#: job of another principal answers 404, as if it did not exist.
PERMISSIONS: dict[str, dict[Role, str]] = {
    "jobs.submit": {Role.SUBMITTER: "any"},
    "jobs.status": {Role.SUBMITTER: "own", Role.READER: "any", Role.AUDITOR: "any", Role.ADMIN: "any"},
    "jobs.result": {Role.SUBMITTER: "own", Role.READER: "any"},
    "jobs.cancel": {Role.SUBMITTER: "own", Role.ADMIN: "any"},
    "jobs.replay": {Role.ADMIN: "any"},
    "jobs.events": {Role.SUBMITTER: "own", Role.AUDITOR: "any", Role.ADMIN: "any"},
    "batches.submit": {Role.SUBMITTER: "any"},
    "batches.status": {Role.SUBMITTER: "own", Role.READER: "any", Role.AUDITOR: "any", Role.ADMIN: "any"},
    "batches.results": {Role.SUBMITTER: "own", Role.READER: "any"},
    "batches.cancel": {Role.SUBMITTER: "own", Role.ADMIN: "any"},
    # The OpenAI-compatible endpoints (docs/openai.md): a file's content is PHI, its metadata is not.
    "files.upload": {Role.SUBMITTER: "any"},
    "files.status": {Role.SUBMITTER: "own", Role.READER: "any", Role.AUDITOR: "any", Role.ADMIN: "any"},
    "files.content": {Role.SUBMITTER: "own", Role.READER: "any"},
    "files.delete": {Role.SUBMITTER: "own", Role.ADMIN: "any"},
    "audit.events": {Role.AUDITOR: "any"},
    "audit.verify": {Role.AUDITOR: "any", Role.ADMIN: "any"},
    "audit.access_report": {Role.AUDITOR: "any"},
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DURATION = re.compile(r"^(\d{1,6})([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: The longest duration accepted (a key's lifetime, an overlap, a batch's window).
MAX_DURATION = timedelta(days=3650)


@dataclass(frozen=True)
class Principal:
    """Who a request is: the key's name and role, proven by the key."""

    name: str
    role: Role
    key_id: str
    #: The key's default webhook URL (for jobs and batches submitted without one).
    webhook_url: str | None = None
    #: When the key stops being accepted (None: never, unless revoked).
    expires_at: datetime | None = None

    @property
    def actor(self) -> str:
        """The audit trail's "who" for everything this principal's requests cause."""
        return f"key:{self.name}"


def parse_duration(text: str, what: str = "duration") -> timedelta:
    """``90d``, ``12h``, ``30m``, ``45s`` or ``2w``."""
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if not match or int(match.group(1)) == 0:
        raise InputError(f"{what}: {text!r} is not a duration; use a positive number and a unit: 90d, 12h, 30m, 2w")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > MAX_DURATION.total_seconds():
        raise InputError(f"{what}: {text!r} is longer than the longest accepted, {MAX_DURATION.days}d (10 years)")
    return timedelta(seconds=seconds)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(
            f"name: {name!r} is not accepted; use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit"
        )
    return name


def _check_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise InputError(f"role: {role!r} is not a role; use one of {', '.join(r.value for r in Role)}") from None


def _operator(actor: str | None, settings: Settings) -> str:
    return resolve_actor(actor, settings.actor, "operator")


def create_key(
    name: str,
    role: str,
    *,
    expires_in: timedelta | None = None,
    webhook_url: str | None = None,
    actor: str | None = None,
    settings: Settings | None = None,
) -> tuple[KeyRow, str]:
    """Create a key for a new principal; returns it and the key itself, which is shown only now. ``webhook_url``:
    where the ends of the jobs and batches it submits without one are POSTed. The principal gets a webhook
    signing secret if it has none (:func:`webhook_secret` shows it).

    Raises:
        InputError: the name or role is not accepted, or the name already has an active key (rotate it).
        StoreUnavailable: the database cannot be reached.
    """
    _check_name(name)
    checked = _check_role(role)
    rt = runtime(settings)
    hook = (
        None if webhook_url is None else validate_webhook_url(webhook_url, development=rt.settings.webhooks_development)
    )
    now = utcnow()
    with rt.transaction() as session:
        earlier = key_store.by_name(session, name)
        if any(k.state(now) == "active" for k in earlier):
            raise InputError(f"name: {name!r} already has an active key; rotate it (qbgw api-keys rotate) or revoke it")
        if earlier:
            raise InputError(
                f"name: {name!r} was used by key {earlier[-1].id} ({earlier[-1].state(now)}); a name is a principal "
                "and owns its jobs, so it is never given to another party: choose a new name"
            )
        row, secret = key_store.create(
            session,
            name=name,
            role=checked.value,
            created_by=_operator(actor, rt.settings),
            now=now,
            expires_at=None if expires_in is None else now + expires_in,
            webhook_url=hook,
        )
        if not webhooks.signing_secrets(session, f"key:{name}", now):
            webhooks.add_secret(session, principal=f"key:{name}", now=now, overlap=None)
            record(
                session=session,
                action=Action.WEBHOOK_SECRET_ROTATED,
                job_id=None,
                actor=_operator(actor, rt.settings),
                detail={"principal": name, "old_secrets_expire_at": None},
            )
        record(
            session=session,
            action=Action.API_KEY_CREATED,
            job_id=None,
            actor=_operator(actor, rt.settings),
            detail={"key_id": row.id, "principal": name, "role": row.role, "expires_at": _iso(row.expires_at)},
        )
    return row, secret


def rotate_key(
    name: str,
    *,
    overlap: timedelta = timedelta(hours=24),
    expires_in: timedelta | None = None,
    webhook_url: str | None = None,
    actor: str | None = None,
    settings: Settings | None = None,
) -> tuple[KeyRow, str]:
    """A new key for principal ``name`` in the same role; its active keys keep working for ``overlap``, then
    expire. Returns the new key and its secret (shown only now). ``webhook_url``: the new key's default webhook
    (``""``: none); None keeps the one it had.

    Raises:
        InputError: the name has no active key to rotate; the webhook URL is not accepted.
        StoreUnavailable: the database cannot be reached.
    """
    _check_name(name)
    rt = runtime(settings)
    hook = None
    if webhook_url:
        hook = validate_webhook_url(webhook_url, development=rt.settings.webhooks_development)
    now = utcnow()
    with rt.transaction() as session:
        active = [k for k in key_store.by_name(session, name) if k.state(now) == "active"]
        if not active:
            raise InputError(f"name: {name!r} has no active key to rotate; create one (qbgw api-keys create)")
        key_store.expire_by(session, [k.id for k in active], now + overlap)
        row, secret = key_store.create(
            session,
            name=name,
            role=active[-1].role,
            created_by=_operator(actor, rt.settings),
            now=now,
            expires_at=None if expires_in is None else now + expires_in,
            webhook_url=key_store.webhook_url(session, active[-1].id) if webhook_url is None else hook,
        )
        record(
            session=session,
            action=Action.API_KEY_CREATED,
            job_id=None,
            actor=_operator(actor, rt.settings),
            detail={
                "key_id": row.id,
                "principal": name,
                "role": row.role,
                "expires_at": _iso(row.expires_at),
                "replaces": [k.id for k in active],
                "old_keys_expire_at": _iso(now + overlap),
            },
        )
    return row, secret


def revoke_key(key_id: str, *, actor: str | None = None, settings: Settings | None = None) -> KeyRow:
    """Revoke a key at once (by its id, as ``qbgw api-keys list`` shows it).

    Raises:
        InputError: no key has this id.
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    now = utcnow()
    with rt.transaction() as session:
        found = key_store.find(session, key_id) if isinstance(key_id, str) and key_id.isalnum() else None
        if found is None:
            raise InputError(f"key id: no key has the id {key_id!r}; qbgw api-keys list shows them")
        if key_store.revoke(session, key_id, now):
            record(
                session=session,
                action=Action.API_KEY_REVOKED,
                job_id=None,
                actor=_operator(actor, rt.settings),
                detail={"key_id": key_id, "principal": found[0].name, "role": found[0].role},
            )
        after = key_store.find(session, key_id)
        return found[0] if after is None else after[0]


def webhook_secret(
    name: str,
    *,
    rotate: bool = False,
    overlap: timedelta = timedelta(hours=24),
    actor: str | None = None,
    settings: Settings | None = None,
) -> str:
    """The principal's current webhook signing secret (``whsec_...``); with ``rotate``, a new one, the old ones
    still signing for ``overlap`` (a delivery carries a signature per secret meanwhile). Making one is audited.

    Raises:
        InputError: the name is not accepted.
    """
    _check_name(name)
    rt = runtime(settings)
    now = utcnow()
    principal = f"key:{name}"
    with rt.transaction() as session:
        if not key_store.by_name(session, name):
            raise InputError(
                f"name: no key was ever made for {name!r} (qbgw api-keys list); a secret signs a key's webhooks"
            )
        current = webhooks.signing_secrets(session, principal, now)
        if current and not rotate:
            return current[0]
        secret = webhooks.add_secret(session, principal=principal, now=now, overlap=overlap if current else None)
        record(
            session=session,
            action=Action.WEBHOOK_SECRET_ROTATED,
            job_id=None,
            actor=_operator(actor, rt.settings),
            detail={"principal": name, "old_secrets_expire_at": _iso(now + overlap) if current else None},
        )
        return secret


def list_keys(*, settings: Settings | None = None) -> list[KeyRow]:
    """Every key, active or not (never a secret)."""
    with runtime(settings).transaction() as session:
        return key_store.all_keys(session)


def authenticate(presented: str | None, *, source: str = "", settings: Settings | None = None) -> Principal:
    """The principal a presented key proves.

    Raises:
        Unauthenticated: no key, a malformed, unknown, expired or revoked one; the refusal is audited with the
            source address and the key's id when it has one (never the secret).
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    parts = key_store.split(presented) if presented else None
    now = utcnow()
    with rt.transaction() as session:
        reason = "no key" if not presented else "malformed key"
        if parts is not None:
            found = key_store.find(session, parts[0])
            if found is None or not key_store.matches(found[1], parts[1]):
                reason = "unknown key"
            else:
                state = found[0].state(now)
                if state == "active":
                    hook = key_store.webhook_url(session, found[0].id)
                    return Principal(found[0].name, Role(found[0].role), found[0].id, hook, found[0].expires_at)
                reason = f"{state} key"
        detail = {"source": source[:64], "reason": reason}
        if parts is not None:
            detail["key_id"] = parts[0]
        record(session=session, action=Action.AUTH_FAILED, job_id=None, actor="anonymous", detail=detail)
    raise Unauthenticated(reason)


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()
