"""Auth: how a worker gets its QuickBlox credentials: the session signature, ``POST /session.json``, and
the token providers the gateway client asks (static token, application or user session, API key).
HTTP goes through ``qbgw.upstream.gateway``; shared sessions live in ``qbgw.upstream.sessions``.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

from .. import errors
from ..audit.crypto import Keyring
from ..audit.events import fingerprint
from ..settings import PREFIX, Secret, Settings
from .gateway import (
    EXPIRY_HEADER,
    HttpReply,
    StaticToken,
    TokenProvider,
    call_json,
    error_reasons,
    parse_retry_after,
)
from .ratelimit import Gate
from .sessions import FileCache, MemoryCache, RedisCache, SessionCache, SessionInfo

__all__ = [
    "SESSION_PATH",
    "ApiKeyToken",
    "AuthReport",
    "Credentials",
    "SessionInfo",
    "SessionToken",
    "check_auth",
    "create_session",
    "credentials_of",
    "describe_session",
    "parse_expiration",
    "require_credentials",
    "session_request",
    "shared_cache",
    "sign",
    "signing_string",
    "token_provider",
]

SESSION_PATH = "/session.json"
#: "The session gets expired in 2 hours after the last request": assumed when no expiry is announced.
SESSION_LIFETIME = 7200.0
#: The cached expiry is written back at most this often when gateway answers extend it.
_WRITE_BACK_SECONDS = 60.0
#: After a failed creation, a process asks again no sooner than this (its jobs get the same error meanwhile),
#: so wrong credentials or an outage do not turn every job of a fleet into a call to the session endpoint.
FAILURE_COOLDOWN = 10.0

log = logging.getLogger("qbgw.auth")

#: No version of the shared session has been read yet.
_UNREAD = object()


def signing_string(params: Mapping[str, object]) -> str:
    """The string QuickBlox signs: ``key=value`` pairs (a nested object as ``key[sub]=value``), raw values,
    sorted, joined with ``&``; ``signature`` itself left out."""
    pairs: list[str] = []
    for key, value in params.items():
        if key == "signature":
            continue
        if isinstance(value, Mapping):
            pairs += [f"{key}[{sub}]={subvalue}" for sub, subvalue in value.items()]
        else:
            pairs.append(f"{key}={value}")
    return "&".join(sorted(pairs))


def sign(params: Mapping[str, object], auth_secret: str) -> str:
    """HMAC-SHA1 of :func:`signing_string`, keyed by the auth secret, as lowercase hex."""
    return hmac.new(auth_secret.encode(), signing_string(params).encode(), hashlib.sha1).hexdigest()


@dataclass(frozen=True)
class Credentials:
    """What ``POST /session.json`` needs; a user login makes it a user session."""

    application_id: str
    auth_key: str
    auth_secret: Secret
    user_login: str = ""
    user_password: Secret = field(default_factory=lambda: Secret(""))

    @property
    def kind(self) -> str:
        return "user" if self.user_login else "application"

    def cache_key(self, base_url: str) -> str:
        """Names this identity's shared session; holds no secret."""
        who = f"{base_url.rstrip('/')}|{self.application_id}|{self.user_login}"
        return hashlib.sha256(who.encode()).hexdigest()[:32]


def session_request(
    credentials: Credentials, *, nonce: int | None = None, timestamp: int | None = None
) -> dict[str, object]:
    """The signed body of ``POST /session.json``: a fresh nonce and the current time unless given."""
    app_id = credentials.application_id
    params: dict[str, object] = {
        "application_id": int(app_id) if app_id.isascii() and app_id.isdigit() else app_id,
        "auth_key": credentials.auth_key,
        "nonce": secrets.randbelow(2**31 - 1) + 1 if nonce is None else nonce,
        "timestamp": int(time.time()) if timestamp is None else timestamp,
    }
    if credentials.user_login:
        params["user"] = {"login": credentials.user_login, "password": credentials.user_password.reveal()}
    params["signature"] = sign(params, credentials.auth_secret.reveal())
    return params


def parse_expiration(value: str | None) -> float | None:
    """Unix seconds of a ``QB-Token-ExpirationDate`` header (``2017-11-29 07:11:18 UTC``), None if unreadable."""
    try:
        return float(calendar.timegm(time.strptime((value or "").strip(), "%Y-%m-%d %H:%M:%S UTC")))
    except ValueError:
        return None


def create_session(base_url: str, credentials: Credentials, *, timeout: tuple[float, float]) -> SessionInfo:
    """A new session from ``POST {base_url}/session.json``.

    Raises:
        UpstreamUnavailable, UpstreamTimeout: no answer came back.
        AuthenticationFailed: 401 (for a user session: a wrong login or password).
        UpstreamRejected: another 4xx; 422 "Unexpected signature" means a wrong key, secret or clock.
        RateLimited, UpstreamServerError: 429, 408 or 5xx.
        MalformedResponse: a success without a session token.
    """
    url, body = base_url.rstrip("/") + SESSION_PATH, session_request(credentials)
    reply = call_json("POST", url, body=body, timeout=timeout, what=f"session endpoint {url}")
    if not 200 <= reply.status < 300:
        raise _refusal(reply, _hint(reply.status, credentials.kind))
    return _session_of(reply, time.time())


def describe_session(base_url: str, token: Secret, *, timeout: tuple[float, float]) -> SessionInfo:
    """The session of ``token`` from ``GET {base_url}/session.json``; raises as :func:`create_session`."""
    url = base_url.rstrip("/") + SESSION_PATH
    headers = {"QB-Token": token.reveal()}
    reply = call_json("GET", url, headers=headers, timeout=timeout, what=f"session endpoint {url}")
    if not 200 <= reply.status < 300:
        raise _refusal(reply, "check QBGW_TOKEN: it may have expired (2 hours after its last use)")
    return _session_of(reply, time.time(), token)


def _session_of(reply: HttpReply, now: float, token: Secret | None = None) -> SessionInfo:
    doc = reply.json()
    session = doc.get("session") if isinstance(doc, dict) else None
    issued = session.get("token") if isinstance(session, dict) else None
    if not isinstance(session, dict) or not (token or (isinstance(issued, str) and issued)):
        raise errors.MalformedResponse(
            f"the session endpoint answered HTTP {reply.status} without a session", reply.status
        )
    user_id = session.get("user_id")
    expires = parse_expiration(reply.headers.get(EXPIRY_HEADER)) or now + SESSION_LIFETIME
    return SessionInfo(
        token or Secret(session["token"]),
        str(session.get("application_id", "")),
        user_id if isinstance(user_id, int) else 0,
        expires,
        now,
    )


def _hint(status: int, kind: str) -> str:
    if status == 422:
        return f"check {PREFIX}APPLICATION_ID, {PREFIX}AUTH_KEY, {PREFIX}AUTH_SECRET and this machine's clock"
    if status == 401 and kind == "user":
        return f"check {PREFIX}USER_LOGIN and {PREFIX}USER_PASSWORD"
    return ""


def _refusal(reply: HttpReply, hint: str) -> errors.GatewayError:
    reasons = error_reasons(reply.json())
    try:
        phrase = f"HTTP {reply.status} {HTTPStatus(reply.status).phrase}"
    except ValueError:
        phrase = f"HTTP {reply.status}"
    message = f"QuickBlox refused the session ({phrase}{': ' + '; '.join(reasons) if reasons else ''})"
    message += f": {hint}" if hint else ""
    if reply.status == 429:
        return errors.RateLimited(message, 429, reasons, parse_retry_after(reply.headers.get("Retry-After")))
    if reply.status == 408 or reply.status >= 500:
        return errors.UpstreamServerError(message, reply.status, reasons)
    if reply.status == 401:
        return errors.AuthenticationFailed(message, 401, reasons)
    return errors.UpstreamRejected(message, reply.status, reasons)


class SessionToken:
    """An application or user session, shared through ``cache`` by every worker that uses the same identity.

    A session is made lazily, under the cache's lock (a fleet that starts together, or meets an expired
    session together, creates one), replaced ``margin`` seconds before the expiry the server announced
    (each gateway answer slides it), and replaced after a 401 by :meth:`renew`.
    """

    can_renew = True

    def __init__(
        self,
        credentials: Credentials,
        base_url: str,
        *,
        timeout: tuple[float, float],
        cache: SessionCache,
        margin: float,
        gate: Gate | None = None,
    ) -> None:
        self.credentials = credentials
        self._gate = gate  # the fleet's rate limit: session creation counts against the plan too
        self._base_url = base_url
        self._timeout = timeout
        self._cache = cache
        self._margin = margin
        self._key = credentials.cache_key(base_url)
        self._session: SessionInfo | None = None
        self._mutex = threading.Lock()  # one creation per process at a time
        # Guards every swap of self._session: observe() must not put back a session another thread replaced.
        self._swap = threading.Lock()
        self._seen = threading.local()  # the token this thread last sent: the one a 401 is about
        self._written_expiry = 0.0
        self._failed: tuple[float, errors.GatewayError] | None = None  # (until when, the error) of a creation
        self._version: Hashable = _UNREAD  # the shared session's version when this process last read it

    def __repr__(self) -> str:
        return f"SessionToken({self.credentials.kind}, application {self.credentials.application_id})"

    @property
    def session(self) -> SessionInfo | None:
        """The session this process holds now (None before the first call)."""
        return self._session

    def current(self) -> Secret:
        """The session token, made or replaced first if needed: when it is due for renewal, or when the shared
        session changed since this process last read it (another worker renewed it). Raises as
        :func:`create_session`."""
        info = self._session
        moved = self._cache.version(self._key) != self._version
        if info is None or moved or time.time() >= info.renew_at(self._margin):
            info = self._refresh(stale=None)
        self._seen.token = info.token
        return info.token

    def headers(self) -> dict[str, str]:
        return {"QB-Token": self.current().reveal()}

    def renew(self) -> None:
        """Replace the session the gateway rejected: the token this thread last used. If another thread or
        worker has replaced it already, that session is taken. Raises as :func:`create_session`."""
        rejected = getattr(self._seen, "token", None) or (self._session.token if self._session else None)
        info = self._refresh(stale=rejected)
        self._seen.token = info.token
        log.info("renewed the QuickBlox %s session (token %s)", self.credentials.kind, fingerprint(info.token.reveal()))

    def superseded(self) -> bool:
        """After a 401: True if the shared session is no longer the token this thread sent (another worker
        renewed it meanwhile); it is taken, and the caller retries with it instead of renewing. One read of
        the cache, only after a 401."""
        sent = getattr(self._seen, "token", None)
        with self._mutex:
            version = self._cache.version(self._key)
            shared = self._usable(self._cache.get(self._key), sent)
            if shared is None:
                return False
            with self._swap:
                self._session, self._version = shared, version
        self._seen.token = shared.token
        return True

    def observe(self, token: str, expires: str | None) -> None:
        """Note the expiry a gateway answer announced for ``token`` (the window slides with each call)."""
        when, info = parse_expiration(expires), self._session
        if when is None or info is None or info.token.reveal() != token or when == info.expires_at:
            return
        with self._swap:
            if self._session is not info:  # replaced meanwhile (a renewal): the old token's expiry is no news
                return
            info = self._session = info.expiring_at(when, time.time())
        if when < self._written_expiry or when - self._written_expiry >= _WRITE_BACK_SECONDS:
            with self._cache.lock(self._key):
                shared = self._cache.get(self._key)
                if shared is None or shared.token == info.token:
                    self._cache.put(self._key, info)
                    self._version = self._cache.version(self._key)  # our own write is no news
            self._written_expiry = when

    def _refresh(self, stale: Secret | None) -> SessionInfo:
        with self._mutex:
            # The version first: a write that lands between the two reads shows as a change at the next check.
            version = self._cache.version(self._key)
            info = self._usable(self._cache.get(self._key), stale) or self._usable(self._session, stale)
            if info is None:
                with self._cache.lock(self._key):
                    info = self._usable(self._cache.get(self._key), stale) or self._create()
                    version = self._cache.version(self._key)
            with self._swap:
                self._session, self._version = info, version
            return info

    def _create(self) -> SessionInfo:
        if self._failed is not None and time.time() < self._failed[0]:
            raise type(self._failed[1])(*self._failed[1].args)  # a fresh copy: raised in many threads
        if self._gate is not None:
            self._gate.wait()
        try:
            info = create_session(self._base_url, self.credentials, timeout=self._timeout)
        except errors.GatewayError as exc:
            if isinstance(exc, errors.RateLimited) and self._gate is not None:
                self._gate.rate_limited(exc.retry_after)
            self._failed = (time.time() + FAILURE_COOLDOWN, exc)
            log.warning("cannot create a QuickBlox %s session: %s", self.credentials.kind, exc)
            raise
        self._failed = None
        self._cache.put(self._key, info)
        self._written_expiry = info.expires_at
        log.info("created a QuickBlox %s session (token %s)", self.credentials.kind, fingerprint(info.token.reveal()))
        return info

    def _usable(self, info: SessionInfo | None, stale: Secret | None) -> SessionInfo | None:
        if info is None or info.token == stale or time.time() >= info.renew_at(self._margin):
            return None
        return info


class ApiKeyToken:
    """A server API key sent as ``Authorization: ApiKey <key>``. Permanent, so nothing to renew.

    Unverified: the AI gateway's pages list only ``QB-Token``; test before relying on it.
    """

    can_renew = False

    def __init__(self, key: Secret) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "ApiKeyToken()"

    def current(self) -> Secret:
        return self._key  # fingerprinted in the audit log like a token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"ApiKey {self._key.reveal()}"}

    def renew(self) -> None:
        """Raises AuthenticationFailed: an API key cannot be renewed."""
        raise errors.AuthenticationFailed(f"an API key cannot be renewed: check {PREFIX}API_KEY", 401)

    def superseded(self) -> bool:
        return False

    def observe(self, token: str, expires: str | None) -> None:
        pass


_REQUIRED = {
    "static": ("token",),
    "apikey": ("api_key",),
    "application": ("application_id", "auth_key", "auth_secret"),
    "user": ("application_id", "auth_key", "auth_secret", "user_login", "user_password"),
}


def require_credentials(settings: Settings) -> None:
    """Raises ConfigError naming the QBGW_ variables that ``QBGW_AUTH`` needs and that are empty."""
    missing = [PREFIX + name.upper() for name in _REQUIRED[settings.auth] if not getattr(settings, name)]
    if missing:
        raise errors.ConfigError(f"{PREFIX}AUTH={settings.auth} needs {', '.join(missing)} (empty or unset)")


def credentials_of(settings: Settings) -> Credentials:
    """Raises ConfigError when the settings lack what ``QBGW_AUTH`` needs."""
    require_credentials(settings)
    login = settings.user_login if settings.auth == "user" else ""
    return Credentials(
        settings.application_id,
        settings.auth_key,
        settings.auth_secret,
        login,
        settings.user_password if login else Secret(""),
    )


def shared_cache(settings: Settings, keyring: Keyring) -> SessionCache:
    """Redis (``QBGW_REDIS_URL``, else the broker when it is Redis), a file in the data directory on the
    embedded default, else memory (Settings refuse a session kind of ``QBGW_AUTH`` there)."""
    if settings.coordination_url:
        hold = settings.connect_timeout + settings.read_timeout + 5
        return RedisCache(settings.coordination_url, keyring, hold_seconds=hold)
    if settings.is_embedded_broker:
        return FileCache(settings.data_dir / "sessions", keyring)
    return MemoryCache()


def token_provider(
    settings: Settings, keyring: Callable[[], Keyring] | None = None, gate: Gate | None = None
) -> TokenProvider:
    """The provider ``QBGW_AUTH`` names. ``keyring`` (the runtime's) encrypts shared sessions; ``gate`` (the
    fleet's rate limit) admits each session creation.

    Raises ConfigError: a static token may be empty (the gateway then answers 401), any other kind's
    credentials may not.
    """
    if settings.auth == "static":
        return StaticToken(settings.token)
    if settings.auth == "apikey":
        require_credentials(settings)
        return ApiKeyToken(settings.api_key)
    credentials = credentials_of(settings)
    cache = shared_cache(settings, keyring()) if keyring is not None else MemoryCache()
    return SessionToken(
        credentials,
        settings.base_url,
        timeout=(settings.connect_timeout, settings.read_timeout),
        cache=cache,
        margin=settings.session_renew_margin,
        gate=gate,
    )


@dataclass(frozen=True)
class AuthReport:
    """What ``qbgw auth check`` found: who the credentials are, and until when; never the token."""

    kind: str
    base_url: str
    application_id: str
    user_id: int | None
    expires_at: float | None
    token_fingerprint: str

    def lines(self) -> list[str]:
        who = "an application session" if self.user_id == 0 else f"user {self.user_id}"
        expires = "never (an API key), not checked: the AI gateway's support is unverified"
        if self.expires_at is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.expires_at))
            expires = f"{when} (in {self.expires_at - time.time():.0f} s; each call moves it later)"
        return [
            f"provider: {self.kind} ({PREFIX}AUTH) at {self.base_url}",
            f"application: {self.application_id or '-'}",
            f"as: {'-' if self.user_id is None else who}",
            f"token fingerprint: {self.token_fingerprint}",
            f"expires: {expires}",
        ]


def check_auth(settings: Settings) -> AuthReport:
    """Create a session with the configured credentials (a static token: look its session up) and say who
    it is. Nothing is cached or printed of the token but its fingerprint.

    Raises:
        ConfigError: credentials that ``QBGW_AUTH`` needs are missing.
        GatewayError: as :func:`create_session` (422 bad signature, 401, unreachable host, ...).
    """
    require_credentials(settings)
    timeout = (settings.connect_timeout, settings.read_timeout)
    if settings.auth == "apikey":
        return AuthReport(
            "apikey", settings.base_url, settings.application_id, None, None, fingerprint(settings.api_key.reveal())
        )
    if settings.auth == "static":
        info = describe_session(settings.base_url, settings.token, timeout=timeout)
    else:
        info = create_session(settings.base_url, credentials_of(settings), timeout=timeout)
    return AuthReport(
        settings.auth,
        settings.base_url,
        info.application_id,
        info.user_id,
        info.expires_at,
        fingerprint(info.token.reveal()),
    )
