"""Emulator of the QuickBlox HIPAA AI Gateway (POST /ai/ai_extensions/ai_gateway) over a real socket.

Used by the tests (in a thread on port 0), by developers (``qbgw emulator``) and in docker-compose.

Checks, in order: QB-Token (401), feature switch (405), body shape (400), assistant id (404), images
(400/422), then scripted faults, then a 200 ``{"answer": ...}`` of this exact form::

    Assistant <id>: you said "<text>". Image 1: png 64x48. Image 2: url image, not fetched.

``<text>`` is the last user message's text (a string content, or its text parts joined by one space)
with the directives removed and the ends trimmed; "Image k" names every image of all messages in
order, as "<jpeg|png> <width>x<height>" or "url image, not fetched". Without images the answer ends
after the first sentence.

Scripted faults: any string content or text part may hold ``[[emulator:NAME]]``,
``[[emulator:NAME=VALUE]]``, ``[[emulator:NAMExN]]`` or ``[[emulator:NAME=VALUExN]]``. With ``xN`` the
directive applies only to the first N arrivals of the same raw body (sha256; arrivals that passed the
contract checks count), so retries of one job count up; without it, every time. An unknown or
malformed directive is a 400. NAMEs:

- ``fail=STATUS``: answer STATUS (400-599) with ``{"errors": [<reason phrase>]}`` (401: the
  ``{"errors": {"base": ["Required session does not exist"]}}`` shape).
- ``retry-after=SECONDS``: add ``Retry-After: SECONDS`` (as written) to a ``fail`` or ``html`` answer.
- ``sleep=SECONDS``: wait that long before answering (on top of the configured latency).
- ``malformed``: answer 200 ``{"result": 1}`` (no "answer").
- ``html[=STATUS]``: answer STATUS (default 502) with an HTML body and a text/html content type.
- ``reset``: close the connection with a TCP reset (SO_LINGER 0) and no answer.
When several apply: reset, then fail, then html, then malformed.

Control endpoints (no token): GET /_emulator/stats, GET /_emulator/arrivals, POST /_emulator/reset,
GET or POST /_emulator/config (POST takes a JSON object of EmulatorConfig fields to change).

Assumptions (not in the QuickBlox docs):

- Error bodies other than 401 are ``{"errors": ["..."]}``, as on the sibling AI endpoints; the 405 text.
- 400 for a malformed body, naming the offending field (``messages[1].content[0].type``); roles are
  system, developer, user, assistant; extra keys are ignored; images in any role are accepted.
- 404 ``{"errors": ["Smart chat assistant not found"]}`` for an unknown assistant id.
- 422 for images: ``Accepted image types: jpeg, png`` (type judged by magic bytes, declared type not
  compared; a non-image declared type also gets it) and ``Max image size: 50MB`` (50 MiB, raw bytes).
  400 for a data URI that is not base64 or has invalid base64 (strict: no whitespace), and for a URL
  scheme other than http, https or data. http(s) image URLs are never fetched.
- A body over 80 MiB gets 413 ``{"errors": ["Request body too large"]}`` and the connection closed;
  a chunked body gets 411. GET and other methods on the gateway path get 404, not 405.
- Responses to a valid token carry ``QB-Token-ExpirationDate`` (now + 2 h, "%Y-%m-%d %H:%M:%S UTC").
- Every POST to the gateway path counts in stats and arrivals, whatever its outcome ("reset" for
  an aborted one); the configured latency applies to every gateway answer, not to control calls.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import http
import json
import re
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from worker.errors import InvalidImage
from worker.imageinfo import MAX_IMAGE_BYTES, parse_data_uri, sniff

__all__ = ["GATEWAY_PATH", "MAX_BODY_BYTES", "EmulatorConfig", "Emulator", "serve"]

GATEWAY_PATH = "/ai/ai_extensions/ai_gateway"
MAX_BODY_BYTES = 80 * 1024 * 1024  # base64 of a 50 MiB image is ~67 MiB, plus the JSON around it
ROLES = ("system", "developer", "user", "assistant")
_JSON = "application/json; charset=utf-8"
_SESSION_GONE = "Required session does not exist"
_LINGER_SECONDS = 2.0
_DIRECTIVE = re.compile(r"\[\[emulator:([^\]]*)\]\]")
_DIRECTIVE_BODY = re.compile(r"(?P<name>[a-z-]+?)(?:=(?P<value>\d+(?:\.\d+)?))?(?:x(?P<times>\d+))?")


@dataclass(frozen=True)
class EmulatorConfig:
    """What the emulated application accepts; ``assistants`` empty means any assistant id."""

    tokens: frozenset[str] = frozenset({"emulator-token"})
    assistants: frozenset[str] = frozenset({"65d5f3473d5d68095462165d"})
    feature_enabled: bool = True
    latency: float = 0.0
    max_image_bytes: int = MAX_IMAGE_BYTES


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    content_type: str = _JSON
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False


class _Rejected(Exception):
    """Ends the handling of a request early with this reply."""

    def __init__(self, reply: _Reply) -> None:
        super().__init__(reply)
        self.reply = reply


def _json(status: int, payload: object, *, close: bool = False, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
    return _Reply(status, json.dumps(payload).encode(), headers=headers, close=close)


def _errors(status: int, *reasons: str, close: bool = False) -> _Reply:
    if status == 401:
        return _json(401, {"errors": {"base": [_SESSION_GONE]}}, close=close)
    return _json(status, {"errors": list(reasons)}, close=close)


def _bad(reason: str) -> _Rejected:
    return _Rejected(_errors(400, reason))


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


@dataclass(frozen=True)
class _Part:
    kind: str  # "text" | "image"
    value: str
    where: str


@dataclass(frozen=True)
class _Call:
    assistant: str
    roles: tuple[str, ...]
    parts: tuple[tuple[_Part, ...], ...]  # per message


def _parse_call(raw: bytes) -> _Call:
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
    checked = [_parse_message(i, m) for i, m in enumerate(messages)]
    return _Call(assistant, tuple(r for r, _ in checked), tuple(p for _, p in checked))


def _parse_message(i: int, message: object) -> tuple[str, tuple[_Part, ...]]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _bad(f"{where} must be an object")
    role = message.get("role")
    if role not in ROLES:
        raise _bad(f"{where}.role must be one of {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, str):
        return str(role), (_Part("text", content, f"{where}.content"),)
    if not isinstance(content, list) or not content:
        raise _bad(f"{where}.content must be a string or a non-empty list of parts")
    return str(role), tuple(_parse_part(f"{where}.content[{j}]", p) for j, p in enumerate(content))


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


def _answer(call: _Call, max_bytes: int) -> str:
    images = [_describe_image(p, max_bytes) for parts in call.parts for p in parts if p.kind == "image"]
    user = [parts for role, parts in zip(call.roles, call.parts, strict=True) if role == "user"]
    texts = (_DIRECTIVE.sub("", p.value).strip() for p in (user[-1] if user else ()) if p.kind == "text")
    said = " ".join(t for t in texts if t)
    sentences = [f'Assistant {call.assistant}: you said "{said}".']
    sentences += [f"Image {k}: {description}." for k, description in enumerate(images, 1)]
    return " ".join(sentences)


@dataclass
class _Plan:
    """The faults that apply to one arrival."""

    sleep: float = 0.0
    reset: bool = False
    fail: int | None = None
    html: int | None = None
    malformed: bool = False
    retry_after: str | None = None


def _directives(call: _Call) -> list[tuple[str, str, str | None, int | None]]:
    """(text inside the brackets, name, value, times) of every directive, in order."""
    found = []
    for parts in call.parts:
        for part in parts:
            for inner in _DIRECTIVE.findall(part.value) if part.kind == "text" else ():
                m = _DIRECTIVE_BODY.fullmatch(inner)
                if not m:
                    raise _bad(f"Invalid emulator directive [[emulator:{inner}]]")
                times = int(m["times"]) if m["times"] else None
                found.append((inner, m["name"], m["value"], times))
    return found


def _apply(plan: _Plan, inner: str, name: str, value: str | None) -> None:
    if name in ("reset", "malformed") and value is None:
        plan.reset = plan.reset or name == "reset"
        plan.malformed = plan.malformed or name == "malformed"
    elif name == "html" or (name == "fail" and value):
        setattr(plan, name, _status(inner, value))
    elif name == "sleep" and value:
        plan.sleep += float(value)
    elif name == "retry-after" and value:
        plan.retry_after = value
    else:
        raise _bad(f"Invalid emulator directive [[emulator:{inner}]]")


def _status(inner: str, value: str | None) -> int:
    if value is None:
        return 502
    if not value.isdigit() or not 400 <= int(value) <= 599:
        raise _bad(f"Invalid emulator directive [[emulator:{inner}]]: the status must be 400-599")
    return int(value)


def _fault_reply(plan: _Plan) -> _Reply | None:
    extra = (("Retry-After", plan.retry_after),) if plan.retry_after else ()
    if plan.fail is not None:
        reply = _errors(plan.fail, _phrase(plan.fail))
        return dataclasses.replace(reply, headers=extra)
    if plan.html is not None:
        page = f"<html><body>{_phrase(plan.html)}</body></html>".encode()
        return _Reply(plan.html, page, content_type="text/html; charset=utf-8", headers=extra)
    if plan.malformed:
        return _json(200, {"result": 1})
    return None


def _str_set(value: object) -> frozenset[str]:
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple | set | frozenset):
        raise ValueError("must be a list of strings")
    if not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    return frozenset(value)


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError("must be a number of seconds >= 0")
    return float(value)


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("must be a positive integer")
    return value


_FIELDS: dict[str, Callable[[object], object]] = {
    "tokens": _str_set,
    "assistants": _str_set,
    "feature_enabled": _flag,
    "latency": _seconds,
    "max_image_bytes": _positive_int,
}


def _updated(config: EmulatorConfig, changes: Mapping[str, object]) -> EmulatorConfig:
    """A copy of ``config`` with ``changes`` checked and applied; ValueError names a bad field."""
    converted: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in _FIELDS:
            raise ValueError(f"unknown config field {name!r}")
        try:
            converted[name] = _FIELDS[name](value)
        except ValueError as e:
            raise ValueError(f"{name} {e}") from None
    return dataclasses.replace(config, **converted)


def _config_json(config: EmulatorConfig) -> dict[str, object]:
    fields = dataclasses.asdict(config)
    return {**fields, "tokens": sorted(config.tokens), "assistants": sorted(config.assistants)}


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
        with self.sockets_lock:
            self.open_sockets.discard(request)
            super().shutdown_request(request)

    def close_open_sockets(self) -> None:
        """Wake idle keep-alive handlers so that a stopped emulator answers nothing more."""
        with self.sockets_lock:
            for sock in self.open_sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY on every accepted socket (set in setup()): without it a keep-alive client waits
    # ~40 ms per request, Nagle's algorithm against its delayed ACK.
    disable_nagle_algorithm = True
    server: _Server
    unread = 0

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one stderr line per request would drown the test and worker output

    def do_GET(self) -> None:
        self.server.emulator._handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise _Rejected(_errors(411, "Length Required", close=True))
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            raise _Rejected(_errors(400, "Invalid Content-Length", close=True))
        if length > MAX_BODY_BYTES:
            self.unread = length
            raise _Rejected(_errors(413, "Request body too large", close=True))
        try:
            body = self.rfile.read(length)
        except OSError:
            body = b""
        if len(body) < length:
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
        # Read and drop the rest of a refused body for a while, so that the client, still sending,
        # gets to read our answer instead of a reset caused by unread data at close.
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
        self.rfile.close()  # drops the file's reference, so that close() below really closes
        self.connection.close()


class Emulator:
    """The gateway emulator on ``host:port`` (0: any free port, read back in ``url``)."""

    def __init__(self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self._config = config or EmulatorConfig()
        self._requests = self._connections = 0
        self._by_status: dict[str, int] = {}
        self._arrivals: list[float] = []
        self._seen: dict[str, int] = {}
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class(self, (host, port))
        self._thread: threading.Thread | None = None
        self._host = f"[{host}]" if ":" in host else host

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._server.server_port}"

    @property
    def config(self) -> EmulatorConfig:
        with self._lock:
            return self._config

    def start(self) -> Emulator:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="qbgw-emulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits forever for a loop that never ran
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
        with self._lock:
            by_status = dict(self._by_status)
            return {"requests": self._requests, "by_status": by_status, "connections": self._connections}

    def arrivals(self) -> list[float]:
        with self._lock:
            return list(self._arrivals)

    def reconfigure(self, **changes: object) -> None:
        with self._lock:
            self._config = _updated(self._config, changes)

    def reset(self) -> None:
        with self._lock:
            self._requests = self._connections = 0
            self._by_status.clear()
            self._arrivals.clear()
            self._seen.clear()

    def _count_connection(self) -> None:
        with self._lock:
            self._connections += 1

    def _handle(self, handler: _Handler) -> None:
        path = urlsplit(handler.path).path
        gateway = handler.command == "POST" and path == GATEWAY_PATH
        if gateway:
            with self._lock:
                self._requests += 1
                self._arrivals.append(time.time())
        try:
            reply = self._route(handler, path, gateway)
        except _Rejected as rejected:
            reply = rejected.reply
        except Exception:  # an emulator bug: say so rather than drop the connection like a fault
            traceback.print_exc()
            reply = _errors(500, "Emulator error", close=True)
        if gateway:
            self._finish_gateway(reply)
        handler.send(reply)

    def _finish_gateway(self, reply: _Reply | None) -> None:
        key = "reset" if reply is None else str(reply.status)
        with self._lock:
            self._by_status[key] = self._by_status.get(key, 0) + 1
            latency = self._config.latency
        if latency:
            time.sleep(latency)

    def _route(self, handler: _Handler, path: str, gateway: bool) -> _Reply | None:
        body = handler.read_body()
        if gateway:
            return self._gateway(handler.headers.get("QB-Token"), body)
        control = _CONTROL.get((handler.command, path))
        return control(self, body) if control else _errors(404, "Not found")

    def _gateway(self, token: str | None, raw: bytes) -> _Reply | None:
        config = self.config
        if token is None or token not in config.tokens:
            return _errors(401)
        expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() + 7200))
        reply = self._checked_gateway(config, raw)
        if reply is None:
            return None
        return dataclasses.replace(reply, headers=(*reply.headers, ("QB-Token-ExpirationDate", expires)))

    def _checked_gateway(self, config: EmulatorConfig, raw: bytes) -> _Reply | None:
        if not config.feature_enabled:
            return _errors(405, "HIPAA AI Gateway feature is not enabled for this application")
        call = _parse_call(raw)
        if config.assistants and call.assistant not in config.assistants:
            return _errors(404, "Smart chat assistant not found")
        answer = _answer(call, config.max_image_bytes)
        plan = self._plan(raw, call)
        if plan.sleep:
            time.sleep(plan.sleep)
        if plan.reset:
            return None
        return _fault_reply(plan) or _json(200, {"answer": answer})

    def _plan(self, raw: bytes, call: _Call) -> _Plan:
        directives = _directives(call)
        plan = _Plan()
        if not directives:
            return plan
        for inner, name, value, _ in directives:  # validate all, even the ones already used up
            _apply(_Plan(), inner, name, value)
        digest = hashlib.sha256(raw).hexdigest()
        with self._lock:
            self._seen[digest] = arrival = self._seen.get(digest, 0) + 1
        for inner, name, value, times in directives:
            if times is None or arrival <= times:
                _apply(plan, inner, name, value)
        return plan

    def _control_stats(self, _: bytes) -> _Reply:
        return _json(200, self.stats())

    def _control_arrivals(self, _: bytes) -> _Reply:
        return _json(200, {"arrivals": self.arrivals()})

    def _control_reset(self, _: bytes) -> _Reply:
        self.reset()
        return _json(200, self.stats())

    def _control_get_config(self, _: bytes) -> _Reply:
        return _json(200, _config_json(self.config))

    def _control_set_config(self, raw: bytes) -> _Reply:
        try:
            changes = json.loads(raw)
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object of config fields")
            self.reconfigure(**changes)
        except ValueError as e:
            return _errors(400, str(e))
        return _json(200, _config_json(self.config))


_CONTROL: dict[tuple[str, str], Callable[[Emulator, bytes], _Reply]] = {
    ("GET", "/_emulator/stats"): Emulator._control_stats,
    ("GET", "/_emulator/arrivals"): Emulator._control_arrivals,
    ("POST", "/_emulator/reset"): Emulator._control_reset,
    ("GET", "/_emulator/config"): Emulator._control_get_config,
    ("POST", "/_emulator/config"): Emulator._control_set_config,
}


def serve(config: EmulatorConfig, host: str, port: int) -> None:
    """Run an emulator in this thread until interrupted, announcing its address on stderr."""
    emulator = Emulator(config, host, port)
    print(f"qbgw emulator listening on {emulator.url}", file=sys.stderr, flush=True)
    emulator.serve_forever()
