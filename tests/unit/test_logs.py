"""The redacting filter and the two formats: secrets, credentials, data URIs and unknown extras never reach
a handler's output; allowed fields come out as JSON fields."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

import pytest

from qbgw.ops.logs import (
    REDACTED,
    JsonFormatter,
    RedactingFilter,
    SignalSafeLines,
    TextFormatter,
    capture_output,
    configure,
)
from qbgw.settings import Secret, Settings

SECRET = "tok-5f1c9e27d3-secret"
KEY = "B" * 43 + "="


@pytest.fixture
def out() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose records go through the filter and the JSON formatter into a string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter([SECRET, KEY]))
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("qbgw.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_secret_in_the_message_or_in_its_args_is_redacted(out: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = out
    logger.info(f"calling with {SECRET} inline")
    logger.info("calling with %s as an argument, key %s", SECRET, KEY)
    logger.info("a dict argument %(token)s", {"token": SECRET})
    text = stream.getvalue()
    assert SECRET not in text
    assert KEY not in text
    assert [line["message"] for line in lines(stream)] == [
        f"calling with {REDACTED} inline",
        f"calling with {REDACTED} as an argument, key {REDACTED}",
        f"a dict argument {REDACTED}",
    ]


def test_a_secret_in_an_exception_is_redacted(out: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = out
    try:
        raise RuntimeError(f"refused token {SECRET}")
    except RuntimeError:
        logger.exception("call failed")
    (line,) = lines(stream)
    assert SECRET not in stream.getvalue()
    assert "RuntimeError: refused token" in str(line["exc"])


@pytest.mark.parametrize(
    ("message", "kept", "gone"),
    [
        ("header QB-Token: 0a1b2c3d4e5f67 sent", "QB-Token: [redacted] sent", "0a1b2c3d4e5f67"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.x.y", "Authorization: [redacted]", "eyJhbGci"),
        ("got Bearer abcdefghijklmnop back", "Bearer [redacted]", "abcdefghijklmnop"),
        ('{"password": "hunter2-long"}', '{"password": "[redacted]', "hunter2"),
        ("url=https://x?token=abc123456&x=1", "token=[redacted]&x=1", "abc123456"),
        ("image data:image/png;base64,iVBORw0KGgoAAAANSUhEUg== end", "data:image/png;base64,[redacted] end", "iVBOR"),
    ],
)
def test_credential_shapes_and_inline_images_are_redacted_without_knowing_the_value(
    out: tuple[logging.Logger, io.StringIO], message: str, kept: str, gone: str
) -> None:
    logger, stream = out
    logger.warning(message)
    (line,) = lines(stream)
    assert kept in str(line["message"])
    assert gone not in stream.getvalue()


def test_allowed_extras_become_fields_and_any_other_extra_is_redacted(out: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = out
    extra = {
        "job_id": "j-1",
        "attempt": 2,
        "outcome": "retrying",
        "http_status": 503,
        "latency_ms": 12,
        "worker": "host:1",
        "messages": "Patient Zbrovsky",
    }
    logger.info("job %s attempt %d: retrying", "j-1", 2, extra=extra)
    (line,) = lines(stream)
    assert {k: line[k] for k in ("job_id", "attempt", "outcome", "http_status", "latency_ms", "worker")} == {
        "job_id": "j-1",
        "attempt": 2,
        "outcome": "retrying",
        "http_status": 503,
        "latency_ms": 12,
        "worker": "host:1",
    }
    assert set(line) >= {"ts", "level", "logger", "message"}
    assert "messages" not in line
    assert "Zbrovsky" not in stream.getvalue()


def test_an_unknown_extra_is_redacted_for_text_formats_too() -> None:
    record = logging.LogRecord("qbgw", logging.INFO, __file__, 1, "payload %s", ("x",), None)
    record.payload = "Patient Zbrovsky"
    RedactingFilter().filter(record)
    assert record.payload == REDACTED
    assert logging.Formatter("%(message)s %(payload)s").format(record) == f"payload x {REDACTED}"


def test_the_settings_name_every_secret_they_hold() -> None:
    settings = Settings(
        token=Secret(SECRET),
        encryption_keys=Secret(f"k1:{KEY},k2:{'C' * 43}="),
        anchor_key=Secret("ab" * 32),
        database_url="postgresql+psycopg://qbgw:db-pass-1234@db/qbgw",
        broker_url="redis://:redis-pass-99@r:6379/0",
    )
    found = set(settings.secret_values)
    assert {SECRET, KEY, "C" * 43 + "=", "ab" * 32, "db-pass-1234", "redis-pass-99"} <= found


def test_configure_installs_one_filtered_handler_in_the_chosen_format() -> None:
    root = logging.getLogger()
    before = list(root.handlers), root.level
    stream = io.StringIO()
    settings = Settings(token=Secret(SECRET), log_format="text")
    try:
        assert configure(settings, "INFO", stream=stream) == "text"
        assert configure(settings.with_(log_format="json"), "INFO", stream=stream) == "json"
        ours = [h for h in root.handlers if getattr(h, "_qbgw_handler", False)]
        assert len(ours) == 1
        assert isinstance(ours[0].formatter, JsonFormatter)
        logging.getLogger("qbgw.anything").warning("token %s", SECRET)
        assert json.loads(stream.getvalue())["message"] == f"token {REDACTED}"
        assert configure(settings.with_(log_format="auto"), "INFO", stream=stream) == "json"  # not a terminal
    finally:
        for handler in [h for h in root.handlers if h not in before[0]]:
            root.removeHandler(handler)
        root.setLevel(before[1])


def test_the_text_format_reads_as_a_line_for_people() -> None:
    record = logging.LogRecord("qbgw.worker", logging.INFO, __file__, 1, "job %s: ok", ("j-1",), None)
    assert TextFormatter().format(record).endswith(" INFO qbgw.worker: job j-1: ok")


@pytest.fixture
def root_records() -> Iterator[list[logging.LogRecord]]:
    """Every record that reaches the root logger while the test runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(handler)
    yield records
    root.removeHandler(handler)


def test_captured_output_becomes_one_record_per_line_and_a_thread_death_one_record(
    root_records: list[logging.LogRecord],
) -> None:
    saved = sys.stdout, sys.stderr, sys.excepthook, threading.excepthook, sys.unraisablehook
    try:
        capture_output()
        print("half a ", end="")
        print("line\nand another")
        print("on stderr", file=sys.stderr)
        thread = threading.Thread(target=lambda: 1 / 0, name="doomed")
        thread.start()
        thread.join()
    finally:
        sys.stdout, sys.stderr, sys.excepthook, threading.excepthook, sys.unraisablehook = saved
    said = [(r.name, r.getMessage()) for r in root_records]
    assert said[:3] == [("py.stdout", "half a line"), ("py.stdout", "and another"), ("py.stderr", "on stderr")]
    (death,) = [r for r in root_records if r.name == "qbgw"]
    assert death.getMessage() == "thread doomed died: ZeroDivisionError"
    assert death.exc_info is not None


def test_a_line_said_in_a_signal_handler_is_logged_by_a_thread(root_records: list[logging.LogRecord]) -> None:
    lines = SignalSafeLines("qbgw.test-signal").start()
    said = "worker: Warm shutdown (MainProcess)"
    previous = signal.signal(signal.SIGUSR2, lambda *_: lines.say(said, sys.__stdout__))  # safe_say's arguments
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, previous)
        lines.stop()  # logs what is queued first
    assert [(r.name, r.levelname, r.getMessage()) for r in root_records] == [("qbgw.test-signal", "WARNING", said)]
