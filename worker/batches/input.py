"""Batch input: JSON Lines (ours or OpenAI's batch shape) or a folder of images, parsed and validated
line by line before anything is stored. Reads files and image headers; no database, no broker.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, InvalidBatch, InvalidMessages
from ..images.refs import Policy
from ..messages import (
    MAX_KEY,
    chat_request,
    check_fields,
    load_json,
    validate_assistant_id,
    validate_key,
    validate_messages,
    validate_subject,
)

__all__ = [
    "BatchLine",
    "ParsedBatch",
    "parse_lines",
    "read_lines",
    "image_lines",
    "GATEWAY_URL",
    "CHAT_URL",
    "MAX_LINES",
]

#: The ``url`` of an OpenAI-style batch line: the gateway's path.
GATEWAY_URL = "/ai/ai_extensions/ai_gateway"
#: The ``url`` of a line written for OpenAI's chat completions: its body's ``model`` is the assistant's id.
CHAT_URL = "/v1/chat/completions"
MAX_LINES = 50_000
OURS = frozenset({"custom_id", "smart_chat_assistant_id", "messages", "subject"})
OPENAI = frozenset({"custom_id", "method", "url", "body", "subject"})
BODY = frozenset({"smart_chat_assistant_id", "messages"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".pdf"})
_PLACEHOLDER = re.compile(r"\{(name|stem|path)\}")
#: A byte that was not UTF-8, as ``surrogateescape`` keeps it.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class BatchLine:
    """One valid line: a job to create."""

    number: int
    custom_id: str
    assistant_id: str
    messages: list[dict[str, Any]]
    #: Whom the job is about (normalised), if the line says.
    subject: str | None = None

    def as_input(self) -> dict[str, Any]:
        line = {"custom_id": self.custom_id, "smart_chat_assistant_id": self.assistant_id, "messages": self.messages}
        if self.subject is not None:
            line["subject"] = self.subject
        return line


@dataclass(frozen=True)
class ParsedBatch:
    """The valid lines, and (line number, reason) for each invalid one."""

    lines: list[BatchLine]
    problems: list[tuple[int, str]]


def parse_lines(
    raw: Iterable[str | dict[str, Any]],
    *,
    default_assistant: str | None,
    policy: Policy,
    skip_invalid: bool = False,
    endpoint: str | None = None,
) -> ParsedBatch:
    """Validate every line (a JSON text or an already parsed object); blank lines are ignored. ``endpoint``: the
    ``url`` every line must name (an OpenAI batch's endpoint; None: any accepted one).

    Raises:
        InvalidBatch: a line is invalid (unless ``skip_invalid``), no line is valid, or there are
            more than MAX_LINES lines; nothing has been stored.
    """
    lines: list[BatchLine] = []
    problems: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for number, item in enumerate(raw, start=1):
        if isinstance(item, str) and not item.strip():
            continue
        if len(lines) + len(problems) >= MAX_LINES:
            raise InvalidBatch(f"batch rejected: more than {MAX_LINES} lines; split it; nothing was stored")
        try:
            line = _parse_line(number, item, default_assistant, policy, endpoint)
            if line.custom_id in seen:
                raise InvalidMessages(f"custom_id {line.custom_id!r} repeats line {seen[line.custom_id]}")
        except InputError as exc:
            problems.append((number, str(exc)))
            continue
        seen[line.custom_id] = number
        lines.append(line)
    _judge(lines, problems, skip_invalid)
    return ParsedBatch(lines, problems)


def _judge(lines: list[BatchLine], problems: list[tuple[int, str]], skip_invalid: bool) -> None:
    total = len(lines) + len(problems)
    if total == 0:
        raise InvalidBatch("batch rejected: it has no lines; nothing was stored")
    if problems and not skip_invalid:
        raise InvalidBatch(
            f"batch rejected: {len(problems)} of {total} line(s) invalid; nothing was stored "
            "(fix them, or pass --skip-invalid / skip_invalid=True to submit the valid ones)",
            tuple(problems),
        )
    if not lines:
        raise InvalidBatch(f"batch rejected: none of its {total} line(s) is valid; nothing was stored", tuple(problems))


def _parse_line(
    number: int, item: str | dict[str, Any], default_assistant: str | None, policy: Policy, endpoint: str | None
) -> BatchLine:
    data = _decode(item, policy.max_request_bytes)
    if endpoint is not None and data.get("url") != endpoint:
        url = data.get("url")
        raise InvalidMessages(
            f"url: {url[:80] if isinstance(url, str) else url!r}; every line of this batch must have url {endpoint!r}, "
            "the batch's endpoint"
        )
    shaped = "body" in data or "url" in data or "method" in data  # OpenAI's line: the request is its body
    body = _openai_body(data) if shaped else check_fields(data, OURS)
    custom_id = data.get("custom_id")
    if custom_id is None:
        raise InvalidMessages(f"custom_id: required, a non-empty string of at most {MAX_KEY} characters")
    # Errors name a field as the line does: body.model or body.smart_chat_assistant_id, body.messages[0]...
    inside = "body." if shaped else ""
    named = inside + ("model" if data.get("url") == CHAT_URL else "smart_chat_assistant_id")
    assistant = body.get("smart_chat_assistant_id")
    if assistant is None and default_assistant is not None:
        assistant, named = default_assistant, "smart_chat_assistant_id"  # the batch's default, not the line's
    if assistant is None or assistant == "":
        raise InvalidMessages(f"{named}: required (the line has none, and no default was given)")
    return BatchLine(
        number,
        validate_key("custom_id", custom_id),
        validate_assistant_id(assistant, field=named),
        validate_messages(body.get("messages"), policy, field=inside + "messages"),
        None if data.get("subject") is None else validate_subject(data["subject"]),
    )


def _decode(item: str | dict[str, Any], limit: int) -> dict[str, Any]:
    if isinstance(item, str):
        stray = _NOT_UTF8.search(item)
        if stray is not None:  # read with surrogateescape: the byte that is not UTF-8, where it is
            raise InvalidMessages(
                f"not UTF-8 text: the byte 0x{ord(stray.group()) - 0xDC00:02X} at column {stray.start() + 1}; "
                "save the file as UTF-8"
            )
        if len(item) > limit:  # characters: never more than its UTF-8 bytes
            raise InvalidMessages(
                f"the line's {len(item)} characters are over the request limit of {limit} "
                "bytes (QBGW_MAX_REQUEST_BYTES)"
            )
        item = load_json(item, one_line=True)
    if not isinstance(item, dict):
        raise InvalidMessages(f"must be a JSON object, got {type(item).__name__}")
    return item


def _openai_body(data: dict[str, Any]) -> dict[str, Any]:
    check_fields(data, OPENAI)
    method, url = data.get("method"), data.get("url")
    if method not in (None, "POST"):
        raise InvalidMessages(f"method: {method[:20]!r}; only POST is accepted")
    if url not in (None, GATEWAY_URL, CHAT_URL):
        raise InvalidMessages(f"url: {url[:80]!r}; only {GATEWAY_URL} or {CHAT_URL} is accepted")
    body = data.get("body")
    if url == CHAT_URL:  # OpenAI's chat completion body: model is the assistant's id; nothing else is honoured
        model, messages = chat_request(body, "body")
        return {"smart_chat_assistant_id": model, "messages": messages}
    if not isinstance(body, dict):
        raise InvalidMessages("body: required, an object with smart_chat_assistant_id and messages")
    return check_fields(body, BODY, "body")


def read_lines(path: str | os.PathLike[str]) -> list[str]:
    """The lines of a JSON Lines file ('-' for stdin).

    Split at line feeds (a carriage return before one is dropped) and nowhere else, as JSON Lines says:
    a JSON string may hold U+2028, U+2029 or U+0085, and a stray form feed is its own line's problem,
    where ``str.splitlines`` would cut the line in two and shift every later line's number.

    Bytes that are not UTF-8 are kept as they are (``surrogateescape``): the line holding them is refused by its
    number, like any other bad line (``--skip-invalid`` skips it), not the whole file.

    Raises:
        InvalidBatch: the file cannot be read.
    """
    try:
        text = _read_stdin() if str(path) == "-" else _read(Path(path))
    except OSError as exc:
        raise InvalidBatch(f"{path}: cannot read: {exc.strerror or exc}") from None
    return split_lines(text)


def split_lines(text: str) -> list[str]:
    """JSON Lines text cut into its lines, as :func:`read_lines` reads them (a byte order mark before the first
    line, which some editors write, is not part of it)."""
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _read(path: Path) -> str:
    # newline="": no "\r" becomes a line break; surrogateescape: a line that is not UTF-8 is that line's problem
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as handle:
        return handle.read()


def _read_stdin() -> str:
    stream = getattr(sys.stdin, "buffer", None)
    return stream.read().decode("utf-8", "surrogateescape") if stream is not None else sys.stdin.read()


def image_lines(pattern: str, prompt: str) -> list[dict[str, Any]]:
    """One line per image or PDF that ``pattern`` (a folder, or a glob) names, sorted by path: custom_id
    is the file name, the user message ``prompt`` (with {name}, {stem}, {path} filled in) and the file.

    Two files of the same name (from different folders) make duplicate custom ids, which
    :func:`parse_lines` reports.

    Raises:
        InvalidBatch: the pattern matches no image or PDF.
        InvalidMessages: the prompt is empty.
    """
    if not prompt.strip():
        raise InvalidMessages("--prompt: required, a non-empty text ({name}, {stem} and {path} are filled in)")
    unknown = sorted(set(re.findall(r"\{(\w*)\}", prompt)) - {"name", "stem", "path"})
    if unknown:
        raise InvalidMessages(
            f"--prompt: {{{unknown[0]}}} is not filled in by anything; "
            "the placeholders are {name}, {stem} and {path}"
        )
    folder = Path(pattern).expanduser()
    matches = sorted(folder.iterdir()) if folder.is_dir() else sorted(Path(p) for p in glob.glob(str(folder)))
    files = [p.absolute() for p in matches if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not files:
        raise InvalidBatch(f"{pattern}: no .png, .jpg, .jpeg or .pdf file matches")
    return [_image_line(path, prompt) for path in files]


def _image_line(path: Path, prompt: str) -> dict[str, Any]:
    values = {"name": path.name, "stem": path.stem, "path": str(path)}
    text = _PLACEHOLDER.sub(lambda m: values[m.group(1)], prompt)
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": str(path)}}]
    return {"custom_id": path.name, "messages": [{"role": "user", "content": content}]}
