"""Gateway: the only module that talks HTTP. One ``requests.Session`` per worker process.

``GatewayClient.send`` never raises for an upstream failure: it returns an ``Exchange`` that
holds either the answer or the mapped error, with the sizes, digests and latency the audit
log needs, so that every attempt is recorded the same way whatever happened.
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Protocol

import requests

from .. import errors
from ..audit.events import digest
from ..settings import Secret

__all__ = [
    "EXPIRY_HEADER",
    "GATEWAY_PATH",
    "Exchange",
    "GatewayClient",
    "HttpReply",
    "StaticToken",
    "TokenProvider",
    "call_json",
    "encode_request",
    "error_reasons",
    "parse_retry_after",
]

GATEWAY_PATH = "/ai/ai_extensions/ai_gateway"
USER_AGENT = "qbgw/0.1"
#: The response header that announces when the session token expires ("2017-11-29 07:11:18 UTC").
EXPIRY_HEADER = "QB-Token-ExpirationDate"


def encode_request(assistant_id: str, messages: list[dict[str, Any]]) -> bytes:
    """The exact body sent to the gateway (its digest goes into the audit log)."""
    body = {"smart_chat_assistant_id": assistant_id, "messages": messages}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Exchange:
    """One attempt's outcome: ``answer`` or ``error`` is set, never both."""

    answer: str | None
    error: errors.GatewayError | None
    status: int | None
    latency_ms: int
    response_digest: str | None
    response_bytes: int | None
    #: Seconds the call waited for a slot in the fleet's rate limit before it was sent.
    throttled: float = 0.0

    def answer_text(self) -> str:
        """The answer. Raises InvalidTransition if there is none (a caller recording a success without one)."""
        if self.answer is None:
            raise errors.InvalidTransition("an exchange without an answer cannot be recorded as a success")
        return self.answer

    def failure(self) -> errors.GatewayError:
        """The error. Raises InvalidTransition if there is none (a caller recording a failure with an answer)."""
        if self.error is None:
            raise errors.InvalidTransition("an exchange with an answer cannot be recorded as a failure")
        return self.error


class BodyStream(Protocol):
    """A request body read block by block, whose length is known in advance."""

    def __len__(self) -> int: ...

    def read(self, size: int = -1) -> bytes: ...


class StaticToken:
    """A ``QB-Token`` given in the settings: it cannot be renewed when the upstream rejects it."""

    can_renew = False

    def __init__(self, token: Secret) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "StaticToken()"

    def current(self) -> Secret:
        return self._token

    def headers(self) -> dict[str, str]:
        return {"QB-Token": self._token.reveal()}

    def renew(self) -> None:
        """Raises AuthenticationFailed: a static token cannot be renewed."""
        raise errors.AuthenticationFailed("a static QB-Token cannot be renewed", 401)

    def superseded(self) -> bool:
        return False

    def observe(self, token: str, expires: str | None) -> None:
        pass  # nothing to renew ahead of time


class TokenProvider(Protocol):
    """Where the gateway's credentials come from (see ``qbgw.upstream.auth``).

    ``current`` is the token (or key) the next call uses, fingerprinted in the audit log; ``headers`` are
    the HTTP headers that carry it; ``renew`` makes a new session after a 401 (when ``can_renew``);
    ``superseded`` says, after a 401, that the shared session is already another than the one sent (and
    takes it);
    ``observe`` is told the ``QB-Token-ExpirationDate`` of each response to ``token``. ``current``,
    ``headers`` and ``renew`` raise a GatewayError when no session can be had.
    """

    can_renew: bool

    def current(self) -> Secret: ...

    def headers(self) -> dict[str, str]: ...

    def renew(self) -> None: ...

    def superseded(self) -> bool: ...

    def observe(self, token: str, expires: str | None) -> None: ...


class GatewayClient:
    """Calls ``POST {base_url}/ai/ai_extensions/ai_gateway`` with a ``QB-Token``."""

    def __init__(
        self,
        base_url: str,
        token: Secret | TokenProvider,
        *,
        timeout: tuple[float, float],
        session: requests.Session | None = None,
        pool_size: int = 10,
    ) -> None:
        self.url = base_url.rstrip("/") + GATEWAY_PATH
        self.tokens: TokenProvider = StaticToken(token) if isinstance(token, Secret) else token
        self._timeout = timeout
        if session is None:
            session = requests.Session()
            # One kept-alive connection per worker thread; the default pool of 10 would discard
            # (and re-open) connections under a pool of 32 threads.
            adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max(pool_size, 1))
            session.mount("https://", adapter)
            session.mount("http://", adapter)
            _read_environment_once(session, self.url)
        self._session = session
        #: The POST as ``Session.request`` prepares it (the session's headers merged in), without a token or a
        #: body: :meth:`_prepared` copies it per call rather than prepare each request anew.
        self._template = session.prepare_request(requests.Request("POST", self.url, headers=_HEADERS))

    def __repr__(self) -> str:
        return f"GatewayClient({self.url!r}, timeout={self._timeout})"

    def close(self) -> None:
        self._session.close()

    def send(self, body: bytes | BodyStream) -> Exchange:
        """POST ``body`` once (bytes, or a file-like stream with a length); the result or the
        mapped error is in the returned Exchange (also when no session token could be had)."""
        started = time.perf_counter()
        try:
            credentials = self.tokens.headers()
        except errors.GatewayError as exc:
            return Exchange(None, exc, None, _since(started), None, None)
        try:
            prepared = self._prepared(body, credentials)
            if prepared is None:  # the session holds cookies: Session.request adds them
                response = self._session.post(
                    self.url,
                    data=body,
                    headers={**_HEADERS, **credentials},
                    timeout=self._timeout,
                    allow_redirects=False,
                )
            else:
                response = self._session.send(prepared, timeout=self._timeout, allow_redirects=False)
            content = response.content
        except requests.RequestException as exc:
            return Exchange(None, _map_transport_error(exc), None, _since(started), None, None)
        except errors.ResolutionFailed as exc:  # a streamed image changed or vanished while it was being sent
            return Exchange(None, exc, None, _since(started), None, None)
        latency = _since(started)
        if EXPIRY_HEADER in response.headers:  # the session's sliding expiry, renewed ahead of it
            self.tokens.observe(credentials.get("QB-Token", ""), response.headers[EXPIRY_HEADER])
        answer, error = interpret(response.status_code, content, response.headers)
        return Exchange(answer, error, response.status_code, latency, digest(content), len(content))

    def _prepared(self, body: bytes | BodyStream, credentials: dict[str, str]) -> requests.PreparedRequest | None:
        """The request ``Session.request`` would prepare for ``body`` with ``credentials``, made from the
        template rather than anew (merging the session's settings, parsing the URL). None where
        ``Session.request`` adds per call what the template cannot hold: cookies to send (a gateway that set
        one), or settings it reads from the environment (a session given with ``trust_env``)."""
        if self._session.cookies or self._session.trust_env:
            return None
        prepared = self._template.copy()
        prepared.headers.pop("Content-Length", None)  # (the template's, for no body) made again for this body
        prepared.headers.update(credentials)
        prepared.prepare_body(body, None)
        return prepared


#: The headers of every gateway call (the token's are added per call).
_HEADERS = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": USER_AGENT}


def _read_environment_once(session: requests.Session, url: str) -> None:
    """Take the proxy (HTTPS_PROXY, NO_PROXY, ...) and CA bundle (REQUESTS_CA_BUNDLE) settings from the
    environment now, not on every request: requests re-reads and scans the whole environment per call
    when ``trust_env`` is on (5% of a worker's CPU, measured). ``~/.netrc`` is not used: the gateway
    authenticates with its own header."""
    session.proxies = requests.utils.get_environ_proxies(url)
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.trust_env = False


@dataclass(frozen=True)
class HttpReply:
    """A response of :func:`call_json`: status, headers (case-insensitive) and raw body."""

    status: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        return _json(self.content)


def call_json(
    method: str,
    url: str,
    *,
    timeout: tuple[float, float],
    body: Mapping[str, object] | None = None,
    headers: Mapping[str, str] | None = None,
    what: str = "QuickBlox",
) -> HttpReply:
    """One JSON request outside the gateway path (``POST /session.json``), on a connection of its own.

    Raises UpstreamUnavailable or UpstreamTimeout when no response came back (the message names ``what``,
    never the body: it may hold credentials).
    """
    sent = {"Accept": "application/json", "User-Agent": USER_AGENT, **(headers or {})}
    try:
        # Never follow a redirect: the body holds a signature and maybe a password.
        response = requests.request(method, url, json=body, headers=sent, timeout=timeout, allow_redirects=False)
        return HttpReply(response.status_code, response.headers, response.content)
    except requests.RequestException as exc:
        raise _map_transport_error(exc, what) from None


def interpret(status: int, content: bytes, headers: Any = None) -> tuple[str | None, errors.GatewayError | None]:
    """Map a response onto (answer, None) or (None, error): the one place statuses are read."""
    body = _json(content)
    if 200 <= status < 300:
        if isinstance(body, dict) and isinstance(body.get("answer"), str):
            return body["answer"], None
        return None, errors.MalformedResponse(f"gateway answered {_phrase(status)} without an answer", status)
    reasons = error_reasons(body)
    message = f"gateway answered {_phrase(status)}"
    if status == 429:
        retry_after = parse_retry_after((headers or {}).get("Retry-After"))
        return None, errors.RateLimited(message, status, reasons, retry_after)
    kind: type[errors.GatewayError]
    if status == 408 or status >= 500:
        kind = errors.UpstreamServerError
    elif status == 401:
        kind = errors.AuthenticationFailed
    elif status == 405:
        kind = errors.FeatureDisabled
    else:
        kind = errors.UpstreamRejected
    return None, kind(message, status, reasons)


def error_reasons(body: Any) -> tuple[str, ...]:
    """The error strings of ``{"errors": [...]}`` or ``{"errors": {"base": [...], ...}}``."""
    found = body.get("errors") if isinstance(body, dict) else None
    if isinstance(found, str):
        return (found,)
    if isinstance(found, list):
        return tuple(str(item) for item in found)
    if isinstance(found, dict):
        reasons: list[str] = []
        for key, value in found.items():
            items = value if isinstance(value, list) else [value]
            reasons.extend(str(v) if key == "base" else f"{key}: {v}" for v in items)
        return tuple(reasons)
    return ()


RETRY_AFTER_MAX = 3600.0
"""The longest pause a ``Retry-After`` can ask for: a larger value (or a date years ahead) would hold
every job of the fleet; an hour is honoured, more is read as an hour."""


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), at most an hour."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), RETRY_AFTER_MAX)  # float() of 400 digits is inf: min() bounds it
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        delta = (when - (now or datetime.now(UTC))).total_seconds()
    except (TypeError, ValueError, OverflowError):
        return None
    return min(max(0.0, delta), RETRY_AFTER_MAX)


def _map_transport_error(exc: requests.RequestException, what: str = "gateway") -> errors.GatewayError:
    # ConnectTimeout subclasses both ConnectionError and Timeout: the request never left, so
    # it is "unavailable"; a ReadTimeout means the upstream may have acted on it.
    if isinstance(exc, requests.ConnectTimeout):
        return errors.UpstreamUnavailable(f"{what} connect timeout")
    if isinstance(exc, requests.Timeout):
        return errors.UpstreamTimeout(f"{what} read timeout: no answer in time")
    if isinstance(exc, requests.ConnectionError):
        return errors.UpstreamUnavailable(f"{what} connection failed ({type(exc).__name__})")
    return errors.UpstreamUnavailable(f"{what} request failed ({type(exc).__name__})")


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def _phrase(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _since(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)
