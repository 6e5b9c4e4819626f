"""Emulator of the QuickBlox HIPAA AI Gateway (POST /ai/ai_extensions/ai_gateway) over a real socket.

Used by the tests (in a thread on port 0), by developers (``qbgw emulator``) and in docker-compose.

Checks, in order: QB-Token (401), feature switch (405), body shape (400), assistant id (404), images
(400/422), scripted faults, random faults; then 200 ``{"answer": "..."}`` with an answer of exactly this form::

    Assistant <id>: you said "<text>". Image 1: png 64x48. Image 2: url image, not fetched.

``<text>`` is the last user message's text (its string content, or its text parts joined by one
space) with directives removed and ends trimmed; "Image k" names each image of all the messages, in
order, as "<jpeg|png> <width>x<height>" or "url image, not fetched". No images: one sentence.

Scripted faults: a string content or text part may hold ``[[emulator:NAME]]`` or
``[[emulator:NAME=VALUE]]``, either with an optional ``xN`` suffix (``fail=503x2``, ``resetx1``):
then it applies only to the first N arrivals of the same raw body (by sha256, counting arrivals that
passed the contract checks), so the retries of one job count up; without it, every time. An unknown
or malformed directive is a 400. Names:

- ``fail=STATUS`` (400-599): that status with ``{"errors": ["<reason phrase>"]}``; 401 gets the
  ``{"errors": {"base": ["Required session does not exist"]}}`` shape.
- ``retry-after=SECONDS``: a ``Retry-After: SECONDS`` header (as written) on a fail or html answer.
- ``sleep=SECONDS``: wait before answering, on top of the configured latency.
- ``malformed``: 200 ``{"result": 1}``, no "answer".
- ``html[=STATUS]``: STATUS (default 502) with ``<html><body>Bad Gateway</body></html>``, text/html.
- ``reset``: no answer; the connection is closed with a TCP reset (SO_LINGER 0).
Precedence: reset, fail, html, malformed.

Random faults (``EmulatorConfig.fault_rate``, ``fault_seed``, ``fault_kinds``, ``hang_seconds``,
``retry_after``; the kinds are described in ``qbgw.emulator.faults``): one draw per POST to the gateway
path, from a ``random.Random`` seeded with ``fault_seed`` (again on reset() and when the seed is
reconfigured), so a sequential run repeats its decisions. With probability ``fault_rate`` a kind is
chosen uniformly; ``reset-before`` acts at once, before the body is read (so it can hit any POST, even
one that would fail the contract checks); any other kind replaces the answer of a request that passed
the contract checks and has no active scripted fault (if it has one, the drawn kind is dropped).

Accounting (``stats()``, GET /_emulator/stats; cleared by reset()): ``requests``, ``by_status`` (the
status sent, or "reset-before"/"reset-after" for a TCP reset; a hang counts under its late status),
``connections``, ``faults`` (injected faults by kind, scripted ones named as the random kinds: fail=S
is "S", or "429-retry-after" with a retry-after; html=S is "S"; sleep is "hang"; reset is
"reset-after"), ``last_fault_at`` (time.time() or None), ``retry_after_sent`` (429s with Retry-After),
``early_retries`` (requests whose body, by sha256, had a 429 with Retry-After R sent less than R
seconds before they arrived) and ``bodies`` (distinct body digests seen).

Control endpoints (no token): GET /_emulator/stats, GET /_emulator/arrivals, POST /_emulator/reset,
GET /_emulator/config, POST /_emulator/config (a JSON object of the EmulatorConfig fields to change).

Assumptions (not in the QuickBlox docs):

- Error bodies other than 401 are ``{"errors": ["..."]}`` as on the sibling AI endpoints; the 405 text.
- 400 for a malformed body, naming the field (``messages[1].content[0].type``); roles are system,
  developer, user and assistant; unknown keys are ignored; images are accepted in any role.
- 404 ``{"errors": ["Smart chat assistant not found"]}`` for an unknown assistant id.
- 422 ``Accepted image types: jpeg, png`` (type judged by magic bytes, the declared type not compared;
  a non-image declared type gets it too) and ``Max image size: 50MB`` (50 MiB of decoded bytes).
  400 for a data URI that is not base64 or has invalid base64 (strict: no whitespace) and for a URL
  scheme other than http, https or data. http(s) image URLs are accepted and never fetched.
- Over 80 MiB of body: 413 ``{"errors": ["Request body too large"]}`` and the connection closed; a
  chunked body: 411. GET (or any other method) on the gateway path: 404, not 405.
- With a valid token the answer carries ``QB-Token-ExpirationDate`` ("%Y-%m-%d %H:%M:%S UTC"; now + 2 h for a
  configured token). Sessions (POST/GET /session.json, issued tokens, API keys): ``qbgw.emulator.sessions``.
- Every POST to the gateway path counts in stats and arrivals, whatever its outcome (a reset, a hang);
  the configured latency delays every gateway answer or reset, never a control call.
- A random 502 carries the html page of a proxy, not JSON; a random 429 says ``Too Many Requests``.
- An early retry is judged by the time the request line arrived against the time the 429 was sent.
- ``rate_limit`` (the plan's calls per second): every gateway and session call counts, in a sliding
  one-second window, the refused ones too; a call beyond it gets 429 ``{"errors": ["Too Many Requests"]}``
  (counted in faults as "429-plan"), with ``Retry-After`` only if ``rate_limit_retry_after`` is set.
"""

from __future__ import annotations

import collections
import dataclasses
import email.utils
import json
import math
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from ..errors import InvalidImage
from ..images.info import MAX_IMAGE_BYTES, parse_data_uri, sniff
from .faults import DIRECTIVE as _DIRECTIVE
from .faults import FAULT_KINDS, FEATURE_OFF, Ledger, directive_kinds, directive_reply, random_reply
from .faults import Reply as _Reply
from .faults import error_reply as _errors
from .faults import json_reply as _json
from .faults import parse_directives as _parse_directives
from .faults import phrase as _phrase
from .sessions import SESSION_FIELDS, SESSION_PATH, Sessions, session_config_json

__all__ = ["FAULT_KINDS", "GATEWAY_PATH", "MAX_BODY_BYTES", "ROLES", "EmulatorConfig", "Emulator", "serve"]

GATEWAY_PATH = "/ai/ai_extensions/ai_gateway"
MAX_BODY_BYTES = 80 * 1024 * 1024  # base64 of a 50 MiB image is ~67 MiB, plus the JSON around it
ROLES = ("system", "developer", "user", "assistant")
_LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class EmulatorConfig:
    """What the emulated application accepts (``assistants`` empty: any assistant id), and its random faults."""

    tokens: frozenset[str] = frozenset({"emulator-token"})
    assistants: frozenset[str] = frozenset({"65d5f3473d5d68095462165d"})
    feature_enabled: bool = True
    latency: float = 0.0
    max_image_bytes: int = MAX_IMAGE_BYTES
    fault_rate: float = 0.0  # probability of a random fault, for a request that passed the contract checks
    fault_seed: int | None = None  # seeds the fault draws (again on reset() and when reconfigured)
    fault_kinds: tuple[str, ...] = FAULT_KINDS  # chosen uniformly
    hang_seconds: float = 30.0  # how long a "hang" waits before answering
    retry_after: int = 1  # the Retry-After seconds of a "429-retry-after"
    # The application's plan: calls per second (gateway and session calls together) beyond which it
    # answers 429 "Too Many Requests" (0: no limit), and the Retry-After of those 429s (0: none, as QuickBlox).
    rate_limit: int = 0
    rate_limit_retry_after: int = 0
    # Sessions (``qbgw.emulator.sessions``): the application's credentials, its users and API keys.
    application_id: str = "22"
    auth_key: str = "wJHd4cQSxpQGWx5"
    auth_secret: str = "emulator-auth-secret"  # noqa: S105 - the emulator's documented test credentials
    users: tuple[tuple[str, str], ...] = (("amigo30", "amigo30pass"),)  # (login, password)
    api_keys: frozenset[str] = frozenset({"emulator-api-key"})
    session_idle_seconds: float = 7200.0  # an issued token expires this long after its last use
    session_clock_skew: float = 3600.0  # how far a session request's timestamp may be from now


class _Rejected(Exception):
    """Ends the handling of a request early with this reply."""

    def __init__(self, reply: _Reply) -> None:
        super().__init__(reply)
        self.reply = reply


class _Part(NamedTuple):
    kind: str  # "text" | "image"
    value: str
    where: str  # "messages[1].content[0]", for error messages


def _bad(reason: str) -> _Rejected:
    return _Rejected(_errors(400, reason))


def _parse_call(raw: bytes) -> tuple[str, list[tuple[str, tuple[_Part, ...]]]]:
    """The assistant id and the (role, parts) of each message, or a 400."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise _bad("Request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _bad("Request body must be a JSON object")
    assistant = body.get("smart_chat_assistant_id")
    if not isinstance(assistant, str) or not assistant:
        raise _bad("smart_chat_assistant_id must be a non-empty string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list")
    return assistant, [_parse_message(f"messages[{i}]", m) for i, m in enumerate(messages)]


def _parse_message(where: str, message: object) -> tuple[str, tuple[_Part, ...]]:
    if not isinstance(message, dict):
        raise _bad(f"{where} must be an object")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise _bad(f"{where}.role must be one of {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, str):
        return role, (_Part("text", content, f"{where}.content"),)
    if not isinstance(content, list) or not content:
        raise _bad(f"{where}.content must be a string or a non-empty list of parts")
    return role, tuple(_parse_part(f"{where}.content[{j}]", p) for j, p in enumerate(content))


def _parse_part(where: str, part: object) -> _Part:
    if not isinstance(part, dict):
        raise _bad(f"{where} must be an object")
    if part.get("type") == "text":
        if not isinstance(part.get("text"), str):
            raise _bad(f"{where}.text must be a string")
        return _Part("text", part["text"], where)
    if part.get("type") == "image_url":
        image = part.get("image_url")
        if not isinstance(image, dict) or not isinstance(image.get("url"), str):
            raise _bad(f"{where}.image_url.url must be a string")
        return _Part("image", image["url"], where)
    raise _bad(f'{where}.type must be "text" or "image_url"')


def _describe_image(part: _Part, max_bytes: int) -> str:
    scheme = part.value.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        return "url image, not fetched"
    if scheme != "data":
        raise _bad(f"{part.where}.image_url.url must be an http, https or data URL")
    try:
        _, data = parse_data_uri(part.value)
    except InvalidImage as e:
        if not part.value[5:].lower().startswith("image/"):
            raise _Rejected(_errors(422, "Accepted image types: jpeg, png")) from None
        raise _bad(f"{part.where}.image_url.url: {e}") from None
    if len(data) > max_bytes:
        raise _Rejected(_errors(422, f"Max image size: {max_bytes / (1024 * 1024):g}MB"))
    try:
        info = sniff(data, max_bytes=max_bytes)
    except InvalidImage:
        raise _Rejected(_errors(422, "Accepted image types: jpeg, png")) from None
    return f"{info.kind} {info.width}x{info.height}"


def _answer(assistant: str, messages: list[tuple[str, tuple[_Part, ...]]], max_bytes: int) -> str:
    parts = [p for _, message_parts in messages for p in message_parts]
    images = [_describe_image(p, max_bytes) for p in parts if p.kind == "image"]
    user = [message_parts for role, message_parts in messages if role == "user"]
    texts = (_DIRECTIVE.sub("", p.value).strip() for p in (user[-1] if user else ()) if p.kind == "text")
    said = " ".join(t for t in texts if t)
    sentences = [f'Assistant {assistant}: you said "{said}".']
    sentences += [f"Image {k}: {description}." for k, description in enumerate(images, 1)]
    return " ".join(sentences)


def _directives(messages: list[tuple[str, tuple[_Part, ...]]]) -> list[tuple[str, str, int | None]]:
    """(name, value or "", times or None) of every directive in the text, checked, in order."""
    try:
        return _parse_directives(p.value for _, parts in messages for p in parts if p.kind == "text")
    except ValueError as e:
        raise _bad(str(e)) from None


def _updated(config: EmulatorConfig, changes: Mapping[str, object]) -> EmulatorConfig:
    """A copy of ``config`` with ``changes`` checked and applied; a ValueError names a bad field."""
    converted: dict[str, Any] = {name: _field(name, value) for name, value in changes.items()}
    return dataclasses.replace(config, **converted)


def _field(name: str, value: object) -> object:
    if name not in _FIELDS:
        raise ValueError(f"unknown config field {name!r}")
    rule, valid, convert = _FIELDS[name]
    if not valid(value):
        raise ValueError(f"{name} must be {rule}")
    return convert(value)


# bool is an int subclass: the numeric fields refuse it explicitly (JSON true is no latency).
def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value: object) -> bool:
    return isinstance(value, list | tuple | set | frozenset) and all(isinstance(v, str) for v in value)


def _kinds(value: object) -> bool:
    if not isinstance(value, list | tuple) or not all(isinstance(k, str) and k in FAULT_KINDS for k in value):
        return False
    return 0 < len(value) == len(set(value))


_FIELDS: dict[str, tuple[str, Callable[[Any], bool], Callable[[Any], object]]] = {
    "tokens": ("a list of strings", _strings, frozenset),
    "assistants": ("a list of strings", _strings, frozenset),
    "feature_enabled": ("true or false", lambda v: isinstance(v, bool), bool),
    "latency": ("a number of seconds >= 0", lambda v: _number(v) and v >= 0, float),
    "max_image_bytes": ("a positive integer", lambda v: _integer(v) and v > 0, int),
    "fault_rate": ("a number from 0 to 1", lambda v: _number(v) and 0 <= v <= 1, float),
    "fault_seed": ("an integer or null", lambda v: v is None or _integer(v), lambda v: v),
    "fault_kinds": (f"a non-empty list of distinct kinds of {', '.join(FAULT_KINDS)}", _kinds, tuple),
    "hang_seconds": ("a number of seconds >= 0", lambda v: _number(v) and v >= 0, float),
    "retry_after": ("an integer of seconds >= 0", lambda v: _integer(v) and v >= 0, int),
    "rate_limit": ("an integer of calls per second >= 0", lambda v: _integer(v) and v >= 0, int),
    "rate_limit_retry_after": ("an integer of seconds >= 0", lambda v: _integer(v) and v >= 0, int),
    **SESSION_FIELDS,
}


def _checked(config: EmulatorConfig) -> EmulatorConfig:
    return _updated(config, {f.name: getattr(config, f.name) for f in dataclasses.fields(config)})


def _guarded(call: Callable[[], _Reply | None]) -> _Reply | None:
    try:
        return call()
    except _Rejected as rejected:
        return rejected.reply
    except Exception:  # an emulator bug: say so, rather than drop the connection like a fault
        traceback.print_exc()
        return _errors(500, "Emulator error", close=True)


def _config_json(config: EmulatorConfig) -> dict[str, object]:
    fields = dataclasses.asdict(config)
    return {
        **fields,
        "tokens": sorted(config.tokens),
        "assistants": sorted(config.assistants),
        **session_config_json(config),
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, emulator: Emulator, address: tuple[str, int]) -> None:
        self.emulator = emulator
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) that can stall for seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        self.emulator._count_connection()
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:  # under the lock, so that stop() never shuts a reused descriptor
            self.open_sockets.discard(request)
            super().shutdown_request(request)

    def close_open_sockets(self) -> None:
        """Wake the idle keep-alive handlers, so that a stopped emulator answers nothing more."""
        with self.sockets_lock:
            for sock in self.open_sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hanging up is no news
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY on every accepted socket (StreamRequestHandler.setup sets it): without it, a
    # keep-alive client waits ~40 ms per request, Nagle's algorithm against its delayed ACK.
    disable_nagle_algorithm = True
    server: _Server
    unread = 0  # bytes of a refused body still in the socket

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a stderr line per request would drown the test and worker output

    def do_GET(self) -> None:
        self.server.emulator._handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise _Rejected(_errors(411, "Length Required", close=True))
        length = self.headers.get("Content-Length", "0")
        if not (length.isascii() and length.isdigit()):
            raise _Rejected(_errors(400, "Invalid Content-Length", close=True))
        if int(length) > MAX_BODY_BYTES:
            self.unread = int(length)
            raise _Rejected(_errors(413, "Request body too large", close=True))
        try:
            body = self.rfile.read(int(length))
        except OSError:
            body = b""
        if len(body) < int(length):
            raise _Rejected(_errors(400, "Incomplete request body", close=True))
        return body

    def send(self, reply: _Reply | None) -> None:
        if reply is None:
            self._abort()
            return
        self.close_connection = self.close_connection or reply.close
        head = [f"{self.protocol_version} {reply.status} {_phrase(reply.status)}"]
        head += [f"Content-Type: {reply.content_type}", f"Content-Length: {len(reply.body)}"]
        head += [f"Date: {email.utils.formatdate(usegmt=True)}", "Server: qbgw-emulator"]
        head += [f"{k}: {v}" for k, v in reply.headers]
        head += ["Connection: close"] if self.close_connection else []
        try:
            # One write: headers and body in separate segments would meet the client's delayed ACK.
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body)
        except OSError:
            self.close_connection = True
            return
        if self.unread:
            self._drain()

    def _drain(self) -> None:
        # Read and drop the rest of a refused body for a while: closing with unread data sends a
        # reset, and the client, still sending, would never read our answer.
        deadline = time.monotonic() + _LINGER_SECONDS
        self.connection.settimeout(_LINGER_SECONDS)
        try:
            while self.unread > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(self.unread, 1 << 16))
                if not chunk:
                    break
                self.unread -= len(chunk)
        except OSError:
            pass

    def _abort(self) -> None:
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # drop the file's reference first, so that close() really closes now
        self.connection.close()


class Emulator:
    """The gateway emulator on ``host:port`` (port 0: any free port, read back in ``url``)."""

    def __init__(self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self._config = _checked(config or EmulatorConfig())
        self._ledger = Ledger(self._config.fault_seed)
        self._offset = 0.0  # how far the emulator's clock is ahead of the wall clock (advance())
        self._sessions = Sessions(self.now)
        self._calls: collections.deque[float] = collections.deque()  # the last second's calls, for the plan
        self._server = _Server(self, (host, port))
        self._host = host
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._server.server_port}"

    def now(self) -> float:
        """The emulator's clock (Unix seconds): sessions expire and signatures are checked against it."""
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the emulator's clock ``seconds`` ahead, as if that much time had passed: a test sees an idle
        session expire without sleeping."""
        with self._lock:
            self._offset += seconds

    @property
    def config(self) -> EmulatorConfig:
        with self._lock:
            return self._config

    def start(self) -> Emulator:
        if self._thread is not None:  # `with Emulator(...).start() as emu:` must not serve twice
            return self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="qbgw-emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() would wait forever for a loop that never ran
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.close_open_sockets()
        self._server.server_close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        try:
            self._server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self._server.close_open_sockets()
            self._server.server_close()

    def stats(self) -> dict[str, object]:
        return {**self._ledger.stats(), **self._sessions.stats()}

    def expire_sessions(self) -> int:
        """Expire every session token the emulator issued; the next use of one gets the 401."""
        return self._sessions.expire_all()

    def arrivals(self) -> list[float]:
        return self._ledger.arrivals()

    def reconfigure(self, **changes: object) -> None:
        with self._lock:
            self._config = _updated(self._config, changes)
            if "fault_seed" in changes:
                self._ledger.reseed(self._config.fault_seed)

    def reset(self) -> None:
        with self._lock:
            self._ledger.reset(self._config.fault_seed)
            self._calls.clear()
        self._sessions.reset()

    def _count_connection(self) -> None:
        self._ledger.connection()

    def _over_plan(self, config: EmulatorConfig) -> bool:
        """Count a call against the plan; True if it is one too many in the last second."""
        if not config.rate_limit:  # no plan set: nothing to count (a plan set later starts its window then)
            return False
        with self._lock:
            now = time.monotonic()
            self._calls.append(now)
            while self._calls and self._calls[0] <= now - 1.0:
                self._calls.popleft()
            return 0 < config.rate_limit < len(self._calls)

    def _handle(self, handler: _Handler) -> None:
        if urlsplit(handler.path).path == SESSION_PATH:
            config, headers = self.config, handler.headers
            if self._over_plan(config):
                handler.read_body()
                handler.send(self._too_many(config))
                return
            handler.send(_guarded(lambda: self._sessions.handle(config, handler.command, headers, handler.read_body())))
            return
        if handler.command != "POST" or urlsplit(handler.path).path != GATEWAY_PATH:
            handler.send(_guarded(lambda: self._control(handler, handler.read_body())))
            return
        config = self.config
        arrived, kind = self._ledger.arrive(config.fault_rate, config.fault_kinds)
        if kind == "reset-before":  # decided before the body, so before the contract checks
            self._ledger.fault(kind)
            self._finish(handler, None, None, reset=kind)
            return
        try:
            raw = handler.read_body()
        except _Rejected as rejected:
            self._finish(handler, rejected.reply, None)
            return
        digest = self._ledger.body(raw, arrived)
        if self._over_plan(config):
            self._finish(handler, self._too_many(config), digest)
            return
        self._finish(handler, _guarded(lambda: self._gateway(handler.headers, raw, digest, kind)), digest)

    def _too_many(self, config: EmulatorConfig) -> _Reply:
        self._ledger.fault("429-plan")
        reply = _errors(429, "Too Many Requests")
        if config.rate_limit_retry_after:
            return dataclasses.replace(reply, headers=(("Retry-After", str(config.rate_limit_retry_after)),))
        return reply

    def _finish(self, handler: _Handler, reply: _Reply | None, digest: str | None, reset: str = "reset-after") -> None:
        time.sleep(self.config.latency)
        self._ledger.outcome(reset if reply is None else str(reply.status), reply, digest)
        handler.send(reply)

    def _gateway(self, headers: Message, raw: bytes, digest: str, kind: str | None) -> _Reply | None:
        config = self.config
        admitted = self._sessions.admit(config, headers)  # a static or issued QB-Token, or an API key
        if admitted is None:
            return _errors(401)
        if not config.feature_enabled:
            return _errors(405, FEATURE_OFF)
        assistant, messages = _parse_call(raw)
        if config.assistants and assistant not in config.assistants:
            return _errors(404, "Smart chat assistant not found")
        answer = _answer(assistant, messages, config.max_image_bytes)
        reply = self._faulty(self._active(digest, _directives(messages)), answer, kind, config)
        if reply is None:
            return None
        return dataclasses.replace(reply, headers=(*reply.headers, *admitted))

    def _faulty(self, active: dict[str, str], answer: str, kind: str | None, config: EmulatorConfig) -> _Reply | None:
        """The directives' reply if they inject a fault, else the random fault's, else the answer."""
        injected = directive_kinds(active)
        if injected or kind is None:
            self._ledger.fault(*injected)
            time.sleep(float(active.get("sleep") or 0))
            return directive_reply(active, answer)
        self._ledger.fault(kind)
        time.sleep(config.hang_seconds if kind == "hang" else 0)
        return random_reply(kind, answer, config.retry_after)

    def _active(self, digest: str, directives: list[tuple[str, str, int | None]]) -> dict[str, str]:
        """The directives active for this arrival of this body, by name."""
        if not directives:
            return {}
        arrival = self._ledger.directive_arrival(digest)
        return {name: value for name, value, times in directives if times is None or arrival <= times}

    def _control(self, handler: _Handler, raw: bytes) -> _Reply:
        route = (handler.command, urlsplit(handler.path).path)
        if route == ("POST", "/_emulator/config"):
            return self._set_config(raw)
        if route == ("POST", "/_emulator/reset"):
            self.reset()
            return _json(200, self.stats())
        views: dict[tuple[str, str], Callable[[], object]] = {
            ("GET", "/_emulator/stats"): self.stats,
            ("GET", "/_emulator/arrivals"): lambda: {"arrivals": self.arrivals()},
            ("GET", "/_emulator/config"): lambda: _config_json(self.config),
        }
        view = views.get(route)
        return _json(200, view()) if view else _errors(404, "Not found")

    def _set_config(self, raw: bytes) -> _Reply:
        try:
            changes = json.loads(raw)
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object of config fields")
            self.reconfigure(**changes)
        except ValueError as e:
            return _errors(400, str(e))
        return _json(200, _config_json(self.config))


def serve(config: EmulatorConfig, host: str, port: int) -> None:
    """Run an emulator in this thread until interrupted, announcing its address on stderr."""
    emulator = Emulator(config, host, port)
    print(f"qbgw emulator listening on {emulator.url}", file=sys.stderr, flush=True)
    emulator.serve_forever()
