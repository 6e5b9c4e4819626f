"""Emulator of the QuickBlox HIPAA AI Gateway (POST /ai/ai_extensions/ai_gateway) over a real socket.

Used by the tests (in a thread on port 0), by developers (``qbgw emulator``) and in docker-compose.

Checks, in order: QB-Token (401), feature switch (405), body shape (400), assistant id (404), images
(400/422), scripted faults; then 200 ``{"answer": "..."}`` with an answer of exactly this form::

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
- With a valid token the answer carries ``QB-Token-ExpirationDate`` (now + 2 h, "%Y-%m-%d %H:%M:%S UTC").
- Every POST to the gateway path counts in stats and arrivals, whatever its outcome ("reset" for an
  aborted one); the configured latency delays every gateway answer, never a control call.
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
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from worker.errors import InvalidImage
from worker.imageinfo import MAX_IMAGE_BYTES, parse_data_uri, sniff

__all__ = ["GATEWAY_PATH", "MAX_BODY_BYTES", "ROLES", "EmulatorConfig", "Emulator", "serve"]

GATEWAY_PATH = "/ai/ai_extensions/ai_gateway"
MAX_BODY_BYTES = 80 * 1024 * 1024  # base64 of a 50 MiB image is ~67 MiB, plus the JSON around it
ROLES = ("system", "developer", "user", "assistant")
_JSON = "application/json; charset=utf-8"
_LINGER_SECONDS = 2.0
_DIRECTIVE = re.compile(r"\[\[emulator:([^\]]*)\]\]")
_DIRECTIVE_PARTS = re.compile(r"([a-z-]+?)(?:=([0-9.]+))?(?:x([0-9]+))?")
_DIRECTIVE_VALUES = {  # what each name's value must match; "" means no value
    "fail": r"[45][0-9][0-9]",
    "html": r"([45][0-9][0-9])?",
    "sleep": r"[0-9]+(\.[0-9]+)?",
    "retry-after": r"[0-9]+(\.[0-9]+)?",
    "malformed": "",
    "reset": "",
}
_FIELD_RULES = {
    "tokens": "a list of strings",
    "assistants": "a list of strings",
    "feature_enabled": "true or false",
    "latency": "a number of seconds >= 0",
    "max_image_bytes": "a positive integer",
}


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


class _Part(NamedTuple):
    kind: str  # "text" | "image"
    value: str
    where: str  # "messages[1].content[0]", for error messages


def _json(status: int, payload: object, *, close: bool = False) -> _Reply:
    return _Reply(status, json.dumps(payload).encode(), close=close)


def _errors(status: int, *reasons: str, close: bool = False) -> _Reply:
    if status == 401:  # the documented shape of an expired or unknown session
        return _json(401, {"errors": {"base": ["Required session does not exist"]}}, close=close)
    return _json(status, {"errors": list(reasons)}, close=close)


#: The 405 body text (an assumption: the docs give the status, not the words).
FEATURE_OFF = "HIPAA AI Gateway feature is not enabled for this application"


def _bad(reason: str) -> _Rejected:
    return _Rejected(_errors(400, reason))


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


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
    found: list[tuple[str, str, int | None]] = []
    texts = (p.value for _, parts in messages for p in parts if p.kind == "text")
    for inner in (d for text in texts for d in _DIRECTIVE.findall(text)):
        m = _DIRECTIVE_PARTS.fullmatch(inner)
        rule = _DIRECTIVE_VALUES.get(m[1]) if m else None
        if m is None or rule is None or not re.fullmatch(rule, m[2] or ""):
            raise _bad(f"Invalid emulator directive [[emulator:{inner}]]")
        found.append((m[1], m[2] or "", int(m[3]) if m[3] else None))
    return found


def _fault_reply(faults: dict[str, str], answer: str) -> _Reply | None:
    """The answer the active faults call for; None for a reset."""
    if "reset" in faults:
        return None
    extra = (("Retry-After", faults["retry-after"]),) if "retry-after" in faults else ()
    if "fail" in faults:
        status = int(faults["fail"])
        reason = FEATURE_OFF if status == 405 else _phrase(status)
        return dataclasses.replace(_errors(status, reason), headers=extra)
    if "html" in faults:
        status = int(faults["html"] or 502)
        page = f"<html><body>{_phrase(status)}</body></html>".encode()
        return _Reply(status, page, content_type="text/html; charset=utf-8", headers=extra)
    return _json(200, {"result": 1} if "malformed" in faults else {"answer": answer})


def _updated(config: EmulatorConfig, changes: Mapping[str, object]) -> EmulatorConfig:
    """A copy of ``config`` with ``changes`` checked and applied; a ValueError names a bad field."""
    converted: dict[str, Any] = {name: _field(name, value) for name, value in changes.items()}
    return dataclasses.replace(config, **converted)


def _field(name: str, value: object) -> object:
    # bool is an int subclass: the numeric fields refuse it explicitly (JSON true is no latency).
    if name in ("tokens", "assistants") and isinstance(value, list | tuple | set | frozenset):
        if all(isinstance(v, str) for v in value):
            return frozenset(value)
    elif name == "feature_enabled" and isinstance(value, bool):
        return value
    elif name == "latency" and isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    elif name == "max_image_bytes" and isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    elif name not in _FIELD_RULES:
        raise ValueError(f"unknown config field {name!r}")
    raise ValueError(f"{name} must be {_FIELD_RULES[name]}")


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
        if not length.isdigit():
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
        self._config = config or EmulatorConfig()
        self._requests = self._connections = 0
        self._by_status: dict[str, int] = {}
        self._arrivals: list[float] = []
        self._seen: dict[str, int] = {}  # arrivals per sha256 of a body holding directives
        self._server = _Server(self, (host, port))
        self._host = host
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._server.server_port}"

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
            body = handler.read_body()
            reply = self._gateway(handler.headers.get("QB-Token"), body) if gateway else self._control(handler, body)
        except _Rejected as rejected:
            reply = rejected.reply
        except Exception:  # an emulator bug: say so, rather than drop the connection like a fault
            traceback.print_exc()
            reply = _errors(500, "Emulator error", close=True)
        if gateway:
            self._count_outcome(reply)
        handler.send(reply)

    def _count_outcome(self, reply: _Reply | None) -> None:
        key = "reset" if reply is None else str(reply.status)
        with self._lock:
            self._by_status[key] = self._by_status.get(key, 0) + 1
            latency = self._config.latency
        time.sleep(latency)

    def _gateway(self, token: str | None, raw: bytes) -> _Reply | None:
        config = self.config
        if token is None or token not in config.tokens:
            return _errors(401)
        if not config.feature_enabled:
            return _errors(405, FEATURE_OFF)
        assistant, messages = _parse_call(raw)
        if config.assistants and assistant not in config.assistants:
            return _errors(404, "Smart chat assistant not found")
        answer = _answer(assistant, messages, config.max_image_bytes)
        faults = self._faults(raw, _directives(messages))
        time.sleep(float(faults.get("sleep") or 0))
        reply = _fault_reply(faults, answer)
        expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() + 7200))
        if reply is None:
            return None
        return dataclasses.replace(reply, headers=(*reply.headers, ("QB-Token-ExpirationDate", expires)))

    def _faults(self, raw: bytes, directives: list[tuple[str, str, int | None]]) -> dict[str, str]:
        """The directives active for this arrival of this body, by name."""
        if not directives:
            return {}
        digest = hashlib.sha256(raw).hexdigest()
        with self._lock:
            self._seen[digest] = arrival = self._seen.get(digest, 0) + 1
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
