"""Faults of the gateway emulator (``qbgw.emulator``): its replies, the scripted directives, the random
faults and the thread-safe accounting that shows whether clients behave. Stdlib only.

Random fault kinds (``FAULT_KINDS``), each chosen uniformly from ``EmulatorConfig.fault_kinds``:

- ``429``: 429 ``{"errors": ["Too Many Requests"]}`` without Retry-After.
- ``429-retry-after``: the same with ``Retry-After: <retry_after>`` (integer seconds).
- ``500``, ``503``: that status with ``{"errors": ["<reason phrase>"]}``.
- ``502``: 502 with ``<html><body>Bad Gateway</body></html>``, text/html, as a proxy in front would send.
- ``hang``: wait ``hang_seconds``, then the normal answer (a client with a shorter timeout gave up).
- ``reset-before``: a TCP reset (SO_LINGER 0) after the request line and headers, before the body.
- ``reset-after``: the whole request read, then a TCP reset instead of an answer.
- ``malformed``: 200 ``{"result": 1}``, no "answer".
"""

from __future__ import annotations

import dataclasses
import hashlib
import http
import json
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "DIRECTIVE",
    "FAULT_KINDS",
    "FEATURE_OFF",
    "Directive",
    "Ledger",
    "Reply",
    "directive_kinds",
    "directive_reply",
    "error_reply",
    "json_reply",
    "parse_directives",
    "phrase",
    "random_reply",
]

FAULT_KINDS = ("429", "429-retry-after", "500", "502", "503", "hang", "reset-before", "reset-after", "malformed")
#: The 405 body text (an assumption: the docs give the status, not the words).
FEATURE_OFF = "HIPAA AI Gateway feature is not enabled for this application"
JSON_TYPE = "application/json; charset=utf-8"
DIRECTIVE = re.compile(r"\[\[emulator:([^\]]*)\]\]")
_DIRECTIVE_PARTS = re.compile(r"([a-z-]+?)(?:=([0-9.]+))?(?:x([0-9]+))?")
_DIRECTIVE_VALUES = {  # what each name's value must match; "" means no value
    "fail": r"[45][0-9][0-9]",
    "html": r"([45][0-9][0-9])?",
    "sleep": r"[0-9]+(\.[0-9]+)?",
    "retry-after": r"[0-9]+(\.[0-9]+)?",
    "malformed": "",
    "reset": "",
}

#: (name, value or "", times or None) of one ``[[emulator:...]]`` directive.
Directive = tuple[str, str, int | None]


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False


def phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def json_reply(status: int, payload: object, *, close: bool = False) -> Reply:
    return Reply(status, json.dumps(payload).encode(), close=close)


def error_reply(status: int, *reasons: str, close: bool = False) -> Reply:
    if status == 401:  # the documented shape of an expired or unknown session
        return json_reply(401, {"errors": {"base": ["Required session does not exist"]}}, close=close)
    return json_reply(status, {"errors": list(reasons)}, close=close)


def _html_reply(status: int) -> Reply:
    page = f"<html><body>{phrase(status)}</body></html>".encode()
    return Reply(status, page, content_type="text/html; charset=utf-8")


def parse_directives(texts: Iterable[str]) -> list[Directive]:
    """Every directive in the texts, checked, in order; a ValueError names a bad one."""
    found: list[Directive] = []
    for inner in (d for text in texts for d in DIRECTIVE.findall(text)):
        m = _DIRECTIVE_PARTS.fullmatch(inner)
        rule = _DIRECTIVE_VALUES.get(m[1]) if m else None
        if m is None or rule is None or not re.fullmatch(rule, m[2] or ""):
            raise ValueError(f"Invalid emulator directive [[emulator:{inner}]]")
        found.append((m[1], m[2] or "", int(m[3]) if m[3] else None))
    return found


def directive_reply(active: Mapping[str, str], answer: str) -> Reply | None:
    """The answer the active directives call for; None for a reset."""
    if "reset" in active:
        return None
    extra = (("Retry-After", active["retry-after"]),) if "retry-after" in active else ()
    if "fail" in active:
        status = int(active["fail"])
        reason = FEATURE_OFF if status == 405 else phrase(status)
        return dataclasses.replace(error_reply(status, reason), headers=extra)
    if "html" in active:
        return dataclasses.replace(_html_reply(int(active["html"] or 502)), headers=extra)
    return json_reply(200, {"result": 1} if "malformed" in active else {"answer": answer})


def directive_kinds(active: Mapping[str, str]) -> list[str]:
    """The fault kinds the active directives inject, named as the random ones (sleep is a "hang")."""
    kinds = ["hang"] if float(active.get("sleep") or 0) > 0 else []
    if "reset" in active:
        return [*kinds, "reset-after"]
    if "fail" in active:
        retry = active["fail"] == "429" and "retry-after" in active
        return [*kinds, "429-retry-after" if retry else active["fail"]]
    if "html" in active:
        return [*kinds, active["html"] or "502"]
    return [*kinds, "malformed"] if "malformed" in active else kinds


def random_reply(kind: str, answer: str, retry_after: int) -> Reply | None:
    """The reply of a random fault of this kind (after any hang); None for a reset."""
    if kind == "reset-after":
        return None
    if kind == "malformed":
        return json_reply(200, {"result": 1})
    if kind == "502":
        return _html_reply(502)
    if kind == "429-retry-after":
        return dataclasses.replace(error_reply(429, phrase(429)), headers=(("Retry-After", str(retry_after)),))
    if kind.isascii() and kind.isdigit():
        return error_reply(int(kind), phrase(int(kind)))
    return json_reply(200, {"answer": answer})  # a hang: the answer, late


def _retry_after(reply: Reply | None) -> float | None:
    """The Retry-After seconds of a 429 that carries one."""
    if reply is None or reply.status != 429:
        return None
    value = next((v for k, v in reply.headers if k.lower() == "retry-after"), None)
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) else None


class Ledger:
    """Thread-safe accounting of the gateway traffic, and the seeded source of the random faults."""

    def __init__(self, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._random = random.Random(seed)  # noqa: S311 - reproducible fault draws, not secrets
        self._clear()

    def _clear(self) -> None:
        self._requests = self._connections = self._early_retries = self._retry_after_sent = 0
        self._by_status: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._last_fault_at: float | None = None
        self._arrivals: list[float] = []
        self._directive_arrivals: dict[str, int] = {}  # per digest of a body holding directives
        self._bodies: set[str] = set()
        self._not_before: dict[str, float] = {}  # digest -> end of the last Retry-After sent for it

    def reset(self, seed: int | None) -> None:
        with self._lock:
            self._clear()
            self._random.seed(seed)

    def reseed(self, seed: int | None) -> None:
        with self._lock:
            self._random.seed(seed)

    def connection(self) -> None:
        with self._lock:
            self._connections += 1

    def arrive(self, fault_rate: float, fault_kinds: tuple[str, ...]) -> tuple[float, str | None]:
        """Count a gateway request; its arrival time and the random fault drawn for it, if any."""
        with self._lock:
            now = time.time()
            self._requests += 1
            self._arrivals.append(now)
            if fault_rate <= 0 or not fault_kinds or self._random.random() >= fault_rate:
                return now, None
            return now, self._random.choice(fault_kinds)

    def body(self, raw: bytes, arrived: float) -> str:
        """Note a request body that arrived at ``arrived``; its sha256 digest."""
        digest = hashlib.sha256(raw).hexdigest()
        with self._lock:
            self._bodies.add(digest)
            if arrived < self._not_before.get(digest, -math.inf):
                self._early_retries += 1
        return digest

    def directive_arrival(self, digest: str) -> int:
        """Count an arrival (past the contract checks) of a body holding directives; which one it is."""
        with self._lock:
            self._directive_arrivals[digest] = arrival = self._directive_arrivals.get(digest, 0) + 1
        return arrival

    def fault(self, *kinds: str) -> None:
        if not kinds:
            return
        with self._lock:
            self._faults.update(kinds)
            self._last_fault_at = time.time()

    def outcome(self, key: str, reply: Reply | None, digest: str | None) -> None:
        """Count what a gateway request got (``key``: its status, or the reset), just before it is sent."""
        seconds = _retry_after(reply)
        with self._lock:
            self._by_status[key] += 1
            if seconds is not None:
                self._retry_after_sent += 1
                if digest is not None:
                    self._not_before[digest] = time.time() + seconds

    def arrivals(self) -> list[float]:
        with self._lock:
            return list(self._arrivals)

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "requests": self._requests,
                "by_status": dict(self._by_status),
                "connections": self._connections,
                "faults": dict(self._faults),
                "last_fault_at": self._last_fault_at,
                "early_retries": self._early_retries,
                "retry_after_sent": self._retry_after_sent,
                "bodies": len(self._bodies),
            }
