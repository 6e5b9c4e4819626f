"""Sessions of the gateway emulator (``qbgw.emulator``): ``POST /session.json`` with the documented
signature check, ``GET /session.json``, the tokens it issued (expiring after an idle time) and API keys.
Stdlib only; the signature is computed here independently of the client's ``qbgw.upstream.auth``.

Assumptions (not in the QuickBlox docs):

- A body is JSON (the server also takes a form; the client sends JSON); not JSON: 400.
- A missing field, an unknown application id or auth key, a timestamp more than ``session_clock_skew``
  seconds (default 3600: the current docs' 60 minutes; the legacy docs said 10) from now: 422
  ``{"errors":{"base":["Unexpected signature"]}}``, as for a wrong signature.
- A (timestamp, nonce) pair seen before: 422 ``{"errors":{"base":["Timestamp and nonce already used"]}}``.
- A user session's wrong login or password: 401 ``{"errors":["Unauthorized"]}`` (as seen in the field);
  only ``user[login]`` is supported, not email or social logins. A user's id is derived from the login.
- ``POST /session.json`` carries no ``QB-Token-ExpirationDate`` (the client then assumes 2 hours); every
  answer to a request with a valid token does: now + 2 h for a configured static token, now +
  ``session_idle_seconds`` for an issued one, whose idle time restarts with each accepted request.
- ``Authorization: ApiKey <key>`` with a key of ``api_keys`` is accepted by the gateway path (the AI
  gateway's support for API keys is unverified); it gets no expiry header.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any, Protocol

from .faults import Reply, error_reply, json_reply

__all__ = ["SESSION_FIELDS", "SESSION_PATH", "SessionConfig", "Sessions", "session_config_json"]

SESSION_PATH = "/session.json"
_STATIC_LIFETIME = 7200.0
_EXPIRY = "QB-Token-ExpirationDate"


class SessionConfig(Protocol):
    """The fields of ``EmulatorConfig`` that sessions read."""

    @property
    def tokens(self) -> frozenset[str]: ...
    @property
    def application_id(self) -> str: ...
    @property
    def auth_key(self) -> str: ...
    @property
    def auth_secret(self) -> str: ...
    @property
    def users(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def api_keys(self) -> frozenset[str]: ...
    @property
    def session_idle_seconds(self) -> float: ...
    @property
    def session_clock_skew(self) -> float: ...


def _pairs(value: object) -> bool:
    if isinstance(value, Mapping):
        value = list(value.items())
    return isinstance(value, list | tuple) and all(
        isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in value
    )


def _as_pairs(value: Any) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(login), str(password)) for login, password in items))


def _seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


#: Rules for ``EmulatorConfig``'s session fields: (what it must be, check, conversion).
SESSION_FIELDS: dict[str, tuple[str, Callable[[Any], bool], Callable[[Any], object]]] = {
    "application_id": ("a string", lambda v: isinstance(v, str), str),
    "auth_key": ("a string", lambda v: isinstance(v, str), str),
    "auth_secret": ("a string", lambda v: isinstance(v, str), str),
    "users": ("an object of login: password", _pairs, _as_pairs),
    "api_keys": ("a list of strings", lambda v: isinstance(v, list | tuple | set | frozenset), frozenset),
    "session_idle_seconds": ("a number of seconds > 0", _seconds, float),
    "session_clock_skew": ("a number of seconds > 0", _seconds, float),
}


def session_config_json(config: SessionConfig) -> dict[str, object]:
    """The session fields as JSON values (GET /_emulator/config)."""
    return {"users": dict(config.users), "api_keys": sorted(config.api_keys)}


def _expiry(when: float) -> tuple[tuple[str, str], ...]:
    return ((_EXPIRY, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))),)


def _signature(body: Mapping[str, object], secret: str) -> str:
    pairs = []
    for key, value in body.items():
        if key == "signature":
            continue
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        pairs += [f"{key}[{sub}]={v}" if sub is not None else f"{key}={v}" for sub, v in items]
    return hmac.new(secret.encode(), "&".join(sorted(pairs)).encode(), hashlib.sha1).hexdigest()


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _unexpected(reason: str = "Unexpected signature") -> Reply:
    return json_reply(422, {"errors": {"base": [reason]}})


@dataclass
class _Issued:
    session: dict[str, object]  # as returned at creation
    last_used: float


class Sessions:
    """The sessions one emulator issued; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._clock = clock  # the emulator's: a test moves it on instead of sleeping
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._issued: dict[str, _Issued] = {}
            self._used: dict[tuple[str, str], float] = {}  # (timestamp, nonce) -> when it arrived
            self._created = 0
            self._refused = 0

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {"sessions_created": self._created, "sessions_refused": self._refused}

    def expire_all(self) -> int:
        """Forget every issued session at once (as the real server does after two idle hours,
        or on a server-side logout); returns how many there were."""
        with self._lock:
            count = len(self._issued)
            self._issued = {}
            return count

    def handle(self, config: SessionConfig, method: str, headers: Message, raw: bytes) -> Reply:
        """``POST``: create a session; ``GET``: the session of the ``QB-Token``; else 404."""
        if method == "POST":
            reply = self._create(config, raw)
            with self._lock:
                self._refused += reply.status != 201
            return reply
        if method == "GET":
            session = self._session_of(config, headers.get("QB-Token"))
            if session is None:
                return error_reply(401)
            return dataclasses.replace(json_reply(200, {"session": session[0]}), headers=session[1])
        return error_reply(404, "Not found")

    def admit(self, config: SessionConfig, headers: Message) -> tuple[tuple[str, str], ...] | None:
        """The headers to add to the answer of a request with valid credentials; None: a 401."""
        api_key = (headers.get("Authorization") or "").removeprefix("ApiKey ")
        if api_key and api_key in config.api_keys:
            return ()
        found = self._session_of(config, headers.get("QB-Token"))
        return None if found is None else found[1]

    def _session_of(
        self, config: SessionConfig, token: str | None
    ) -> tuple[dict[str, object], tuple[tuple[str, str], ...]] | None:
        now = self._clock()
        if token is not None and token in config.tokens:
            static = {"application_id": config.application_id, "user_id": 0, "token": token}
            return static, _expiry(now + _STATIC_LIFETIME)
        with self._lock:
            issued = self._issued.get(token or "")
            if issued is None:
                return None
            if now - issued.last_used > config.session_idle_seconds:
                del self._issued[token or ""]
                return None
            issued.last_used = now  # the window slides with each accepted request
            return issued.session, _expiry(now + config.session_idle_seconds)

    def _create(self, config: SessionConfig, raw: bytes) -> Reply:
        try:
            body = json.loads(raw)
        except ValueError:
            return error_reply(400, "Request body is not valid JSON")
        if not isinstance(body, dict):
            return error_reply(400, "Request body must be a JSON object")
        refused = _check_signature(config, body, self._clock())
        if refused is not None:
            return refused
        user_id = _user_id(config, body.get("user"))
        if user_id is None:
            return json_reply(401, {"errors": ["Unauthorized"]})
        return self._issue(config, body, user_id)

    def _issue(self, config: SessionConfig, body: dict[str, Any], user_id: int) -> Reply:
        now, app_id = self._clock(), config.application_id
        pair = (str(body["timestamp"]), str(body["nonce"]))
        with self._lock:
            self._used = {p: at for p, at in self._used.items() if now - at <= 2 * config.session_clock_skew}
            if pair in self._used:
                return _unexpected("Timestamp and nonce already used")
            self._used[pair] = now
            self._created += 1
            token = secrets.token_hex(20)
            session: dict[str, object] = {
                "application_id": int(app_id) if app_id.isascii() and app_id.isdigit() else app_id,
                "token": token,
                "ts": body["timestamp"],
                "nonce": body["nonce"],
                "user_id": user_id,
                "created_at": _iso(now),
                "updated_at": _iso(now),
                "id": self._created,
                "_id": str(self._created),
            }
            self._issued[token] = _Issued(session, now)
        return json_reply(201, {"session": session})


def _check_signature(config: SessionConfig, body: dict[str, Any], now: float) -> Reply | None:
    """A 422 for a missing field, unknown application, stale timestamp or wrong signature; else None."""
    if any(body.get(k) in (None, "") for k in ("application_id", "auth_key", "timestamp", "nonce", "signature")):
        return _unexpected()
    if str(body["application_id"]) != config.application_id or body["auth_key"] != config.auth_key:
        return _unexpected()
    try:
        skew = abs(now - float(body["timestamp"]))
    except (TypeError, ValueError):
        return _unexpected()
    signature = body["signature"]
    if not isinstance(signature, str) or not hmac.compare_digest(signature, _signature(body, config.auth_secret)):
        return _unexpected()
    return _unexpected() if skew > config.session_clock_skew else None


def _user_id(config: SessionConfig, user: object) -> int | None:
    """0 for an application session; the user's id for a known login and password; None: refused."""
    if user is None:
        return 0
    if not isinstance(user, dict):
        return None
    login, password = user.get("login"), user.get("password")
    known = dict(config.users)
    if not isinstance(login, str) or login not in known or not hmac.compare_digest(known[login], str(password)):
        return None
    return 1_000_000 + zlib.crc32(login.encode()) % 9_000_000
