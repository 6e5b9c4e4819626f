"""Inputs: turn what a person types (a JSON file, stdin, --text, --image) into a job request.

Shapes the request and refuses what no request has (a file over the size limit, JSON that cannot be
parsed, unknown or mistyped fields: the rule batch lines share); ``messages.validate_messages`` judges
the messages, in the producer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..errors import InvalidMessages
from ..images.refs import scheme_of
from ..messages import REQUEST_FIELDS, check_fields, load_json
from ..settings import MAX_REQUEST_BYTES

__all__ = ["Request", "build_request", "image_part"]


@dataclass(frozen=True)
class Request:
    messages: list[dict[str, Any]]
    assistant_id: str | None = None
    custom_id: str | None = None
    idempotency_key: str | None = None
    subject: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_request(
    file: str | None,
    *,
    text: tuple[str, ...] = (),
    images: tuple[str, ...] = (),
    system: str | None = None,
    max_bytes: int = MAX_REQUEST_BYTES,
) -> Request:
    """A request from a JSON file ('-' for stdin) or from text and image shorthands. A file larger
    than ``max_bytes`` (QBGW_MAX_REQUEST_BYTES) is refused before it is read.

    Raises:
        InvalidMessages: the file is unreadable, too large, or not JSON of an accepted shape (unknown
            fields, a field of the wrong type).
        click.UsageError: nothing was given, or both a file and --text/--image (exit 2, as every usage
            mistake).
    """
    if file is not None and (text or images):
        raise click.UsageError("give either a messages FILE or --text/--image, not both")
    if file is not None:
        request = _from_json(file, max_bytes)
    elif text or images:
        parts = [{"type": "text", "text": t} for t in text] + [image_part(i) for i in images]
        request = Request(messages=[{"role": "user", "content": parts}])
    else:
        raise click.UsageError("nothing to send: give a messages FILE ('-' for stdin) or --text/--image")
    if system:
        request = Request(
            messages=[{"role": "developer", "content": system}, *request.messages],
            assistant_id=request.assistant_id,
            custom_id=request.custom_id,
            idempotency_key=request.idempotency_key,
            subject=request.subject,
        )
    return request


def _from_json(file: str, max_bytes: int) -> Request:
    name = "stdin" if file == "-" else file
    try:
        raw = _read(file, name, max_bytes)
        data = load_json(raw)
        del raw  # the text is parsed: do not hold it beside the objects while they are validated
        if isinstance(data, dict):
            check_fields(data, REQUEST_FIELDS)
    except InvalidMessages as exc:
        raise InvalidMessages(f"{name}: {exc}") from None
    if isinstance(data, list):
        return Request(messages=data)
    if isinstance(data, dict) and "messages" in data:
        return Request(
            messages=data["messages"],
            assistant_id=data.get("smart_chat_assistant_id"),
            custom_id=data.get("custom_id"),
            idempotency_key=data.get("idempotency_key"),
            subject=data.get("subject"),
        )
    raise InvalidMessages(f'{name}: expected a JSON list of messages or an object with "messages"')


def _read(file: str, name: str, max_bytes: int) -> str:
    too_large = f"over the request limit of {max_bytes} bytes (QBGW_MAX_REQUEST_BYTES)"
    try:
        if file == "-":
            raw = sys.stdin.read(max_bytes + 1)  # characters: never more than their UTF-8 bytes
            if len(raw) > max_bytes:
                raise InvalidMessages(f"more than {max_bytes} characters is {too_large}")
            return raw
        size = Path(file).stat().st_size
        if size > max_bytes:
            raise InvalidMessages(f"{size} bytes is {too_large}")
        with open(file, encoding="utf-8") as handle:  # bounded too: a pipe or a device has no size
            raw = handle.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise InvalidMessages(f"more than {max_bytes} characters is {too_large}")
        return raw
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidMessages(f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None


def image_part(ref: str) -> dict[str, Any]:
    """An ``image_url`` part for ``--image``: a URL (any scheme: one other than https, data or file is
    refused at submit, by name) or a local file (made an absolute path; the file itself is checked at
    submit and read by the worker, never inlined here). A relative file name with a colon, such as
    ``scan:1.png``, reads as a URL: write ``./scan:1.png``.
    """
    if scheme_of(ref) is not None:
        return {"type": "image_url", "image_url": {"url": ref}}
    return {"type": "image_url", "image_url": {"url": str(Path(ref).expanduser().absolute())}}
