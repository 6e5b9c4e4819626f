"""Logs: one handler for every qbgw process (worker, CLI, exporter), as JSON Lines or as text for a
terminal, behind a filter that blots out secrets before any formatter sees a record.

What the filter removes: every secret value the settings hold (tokens, the auth secret, passwords,
encryption and anchor keys), anything that looks like a credential (``QB-Token: ...``,
``Bearer ...``, ``token=...``), base64 data URIs (an image is PHI), and every ``extra`` field that is
not on :data:`ALLOWED_FIELDS`. Message texts are PHI-free by the code's own discipline (ids, counts,
error classes); the filter is the net under it, and ``tests/e2e/test_canary.py`` searches the output.

A worker logging JSON writes nothing but log records: :func:`capture_output` turns what would reach its two
streams some other way (a library's print, a thread's traceback) into records, and :class:`SignalSafeLines`
does the same for lines said from signal handlers (Celery's "worker: Warm shutdown").
"""

from __future__ import annotations

import io
import json
import logging
import queue
import re
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

from ..settings import Settings

__all__ = [
    "ALLOWED_FIELDS",
    "JsonFormatter",
    "RedactingFilter",
    "SignalSafeLines",
    "TextFormatter",
    "capture_output",
    "configure",
    "REDACTED",
]

REDACTED = "[redacted]"

#: The ``extra`` fields a log record may carry to a handler (and that the JSON format prints).
ALLOWED_FIELDS = (
    "job_id",
    "batch_id",
    "attempt",
    "status",
    "outcome",
    "http_status",
    "error_class",
    "latency_ms",
    "worker",
    "queue",
    "recovered",
    "dispatched",
    "expired",
    "delay_s",
)

#: Attributes every LogRecord has (and what formatters add): never treated as an ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}

_CREDENTIAL = re.compile(
    r"(?i)\b(qb-token|authorization|api[_-]?key|auth[_-]?secret|password|passwd|secret|token)"
    r"(\"?\s*[:=]\s*\"?)((?:bearer|apikey)\s+)?[^\s\"',;&]+"
)
_BEARER = re.compile(r"(?i)\b(bearer|apikey)\s+[A-Za-z0-9._~+/=-]{8,}")
_DATA_URI = re.compile(r"data:[\w.+-]+/[\w.+-]+;base64,[A-Za-z0-9+/=_-]*")

#: Marks the handler :func:`configure` installed, so that configuring again replaces it.
_OURS = "_qbgw_handler"


class RedactingFilter(logging.Filter):
    """Rewrites a record in place (message merged with its args, exception text, extras) without secrets.

    Put it on handlers, not loggers: a logger's filters do not see records that propagate from its children.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        values = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._secrets = re.compile("|".join(re.escape(v) for v in values)) if values else None

    def redact(self, text: str) -> str:
        if self._secrets is not None:
            text = self._secrets.sub(REDACTED, text)
        if "base64," in text:
            text = _DATA_URI.sub(lambda m: m.group(0).split(",", 1)[0] + "," + REDACTED, text)
        text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
        return _CREDENTIAL.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_qbgw_redacted", False):  # the same record reaches several handlers
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep what can be shown, not the arguments
            message = str(record.msg)
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for name in list(record.__dict__):
            if name not in _STANDARD and not name.startswith("_") and name not in ALLOWED_FIELDS:
                setattr(record, name, REDACTED)
        record._qbgw_redacted = True
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the allowed extras present, and exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ALLOWED_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``2024-05-01 10:00:00,123 INFO qbgw.worker: job ... attempt 1: succeeded (HTTP 200, 12 ms)``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (a CLI runner swaps it), like logging's last resort;
    under :func:`capture_output`, to the stream that was there before."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        stream = sys.stderr
        return stream.real if isinstance(stream, _LineLog) else stream

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure(settings: Settings | None, level: int | str = logging.INFO, *, stream: TextIO | None = None) -> str:
    """Send every log record of this process through one redacting handler (to ``stream``, or standard error)
    in the format the settings ask for (``QBGW_LOG_FORMAT``); replaces a handler an earlier call installed,
    and puts the filter on every other handler of the root logger too. Returns the format ("json" or "text")."""
    chosen = settings.log_format if settings is not None else "auto"
    if chosen == "auto":
        chosen = "text" if (stream or sys.stderr).isatty() else "json"
    redactor = RedactingFilter(settings.secret_values if settings is not None else ())
    handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    handler.addFilter(redactor)
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
        old.close()
    for other in root.handlers:  # a handler someone else installed (pytest's, a library's) is filtered too
        for stale in [f for f in other.filters if isinstance(f, RedactingFilter)]:
            other.removeFilter(stale)
        other.addFilter(redactor)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    global _redactor
    _redactor = redactor
    return chosen


#: The filter of the handler :func:`configure` installed last (what a record that cannot reach it is redacted with).
_redactor = RedactingFilter()


class SignalSafeLines:
    """Lines said from signal handlers, logged by a thread of their own (``say`` has ``safe_say``'s signature).

    A signal handler runs between two bytecodes of the main thread, which may be in the middle of a stream
    write of a log handler; writing again from the handler can fail ("reentrant call") or cut a line in two.
    So ``say`` only hands the line over: ``SimpleQueue.put`` is safe there.
    """

    def __init__(self, logger: str, level: int = logging.WARNING) -> None:
        self._log = logging.getLogger(logger)
        self._level = level
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="qbgw-signal-lines", daemon=True)

    def say(self, message: str, *_: Any) -> None:
        self._lines.put(str(message))

    def start(self) -> SignalSafeLines:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Log what is still queued, then end the thread."""
        self._lines.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (line := self._lines.get()) is not None:
            self._log.log(self._level, "%s", line.strip("\n"))


def capture_output() -> None:
    """From now on, what this process writes to ``sys.stdout`` or ``sys.stderr`` (a library's print, a traceback
    a thread prints) becomes log records, one per line (WARNING, loggers ``py.stdout``/``py.stderr``), and an
    uncaught exception becomes one record with its traceback. For a process whose output must be log records
    only (a worker logging JSON). Writes to the file descriptors themselves are not seen."""
    sys.stdout = _LineLog("py.stdout", sys.stdout)
    sys.stderr = _LineLog("py.stderr", sys.stderr)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    sys.unraisablehook = _log_unraisable


class _LineLog(io.TextIOBase):
    """A text stream that logs each line written to it; ``real`` is the stream it stands in for."""

    def __init__(self, logger: str, real: TextIO) -> None:
        super().__init__()
        self.real = real
        self._log = logging.getLogger(logger)
        self._local = threading.local()  # each thread's unfinished line, and whether it is logging one

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.real.fileno()

    def write(self, text: str) -> int:
        local = self._local
        if getattr(local, "busy", False):  # logging itself failed and reports it here: write it out, once
            self.real.write(_bare_record(self._log.name, text))
            return len(text)
        *lines, local.pending = (getattr(local, "pending", "") + text).split("\n")
        self._emit(lines)
        return len(text)

    def flush(self) -> None:
        pending, self._local.pending = getattr(self._local, "pending", ""), ""
        self._emit([pending])

    def _emit(self, lines: list[str]) -> None:
        self._local.busy = True
        try:
            for line in lines:
                if line.strip():
                    self._log.warning("%s", line)
        finally:
            self._local.busy = False


def _bare_record(logger: str, text: str) -> str:
    """``text`` as one JSON line without going through any handler (for when the handler is what failed)."""
    record = logging.makeLogRecord(
        {"name": logger, "levelno": logging.ERROR, "levelname": "ERROR", "msg": _redactor.redact(text.strip("\n"))}
    )
    return JsonFormatter().format(record) + "\n"


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("qbgw").critical("uncaught %s: %s", kind.__name__, value, exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("qbgw").error("thread %s died: %s", name, args.exc_type.__name__, exc_info=args.exc_value)


def _log_unraisable(args: Any) -> None:
    logging.getLogger("qbgw").warning(
        "%s: %r", args.err_msg or "Exception ignored in", args.object, exc_info=args.exc_value
    )
