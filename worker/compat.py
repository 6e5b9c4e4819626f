"""Compat: the facade of the OpenAI-compatible endpoints of ``qbgw serve`` (files, batches made from a file, chat
completion requests). A file holds PHI: stored encrypted, every read of it audited, erased by a delete or a
purge. An OpenAI batch is a qbgw batch (its jobs, retries, audit trail) plus the input file, endpoint and
metadata it was created with; every line is validated when it is created, and a bad line refuses the batch
naming the line and the field.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from .access import parse_duration
from .audit.events import digest as audit_digest
from .batches import input as batch_input
from .batches.ending import current
from .batches.submission import store_batch
from .batches.views import BatchView
from .errors import BatchNotFound, FileNotFound, InputError
from .images.resolve import policy
from .lifecycle import utcnow
from .messages import has_lone_surrogate, validate_webhook_url
from .runtime.locator import runtime
from .settings import Settings
from .store import files as file_store
from .store.models import File, OpenAIBatch

__all__ = [
    "FileInfo",
    "OpenAIBatchInfo",
    "MAX_FILE_BYTES",
    "ENDPOINTS",
    "upload_file",
    "file_info",
    "file_content",
    "delete_file",
    "list_files",
    "create_batch",
    "get_batch",
    "list_batches",
    "batch_id_of",
    "openai_batch_id",
]

#: The largest file accepted (OpenAI's Batch API takes input files up to 200 MB).
MAX_FILE_BYTES = 200 * 1024 * 1024
#: The endpoints an OpenAI batch may name: OpenAI's chat completions (model = the assistant's id), or the gateway's.
ENDPOINTS = (batch_input.CHAT_URL, batch_input.GATEWAY_URL)
PURPOSES = ("batch",)
MAX_METADATA = 16
#: The longest page of a list.
MAX_PAGE = 10_000
_FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
_BATCH_ID = re.compile(r"^batch_[0-9a-f]{32}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class FileInfo:
    """A file's metadata; ``filename`` is None once erased (or when the reader may not see it)."""

    id: str
    actor: str
    purpose: str
    filename: str | None
    bytes: int
    created_at: datetime
    deleted_at: datetime | None


@dataclass(frozen=True)
class OpenAIBatchInfo:
    """What an OpenAI batch adds to its qbgw batch."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None
    view: BatchView


def openai_batch_id(batch_id: str) -> str:
    """``batch_`` and the qbgw batch's UUID without dashes (so the two kinds of id never collide)."""
    return "batch_" + uuid.UUID(batch_id).hex


def is_openai_batch_id(value: str) -> bool:
    """Whether ``value`` has the shape of an OpenAI batch's id (``batch_`` and 32 hex digits)."""
    return bool(_BATCH_ID.match(value))


def batch_id_of(openai_id: str) -> str:
    """The qbgw batch's id of an OpenAI batch id. Raises BatchNotFound for anything that is not one."""
    if not isinstance(openai_id, str) or not _BATCH_ID.match(openai_id):
        raise BatchNotFound(str(openai_id)[:64])
    return str(uuid.UUID(openai_id[len("batch_") :]))


def _info(session: Session, row: File) -> FileInfo:
    return FileInfo(
        row.id, row.actor, row.purpose, file_store.filename_of(session, row), row.bytes, row.created_at, row.deleted_at
    )


def _find(session: Session, file_id: str, owner: str | None) -> File:
    if not isinstance(file_id, str) or not _FILE_ID.match(file_id):
        raise FileNotFound(str(file_id)[:64])
    row = file_store.get_file(session, file_id)
    if owner is not None and row.actor != owner:
        raise FileNotFound(file_id)  # another principal's file does not exist for this one
    if row.deleted_at is not None:  # deleted or purged: the row stays for the audit trail, the file is gone
        raise FileNotFound(file_id)
    return row


def upload_file(
    content: bytes, *, filename: str | None, purpose: str, actor: str, settings: Settings | None = None
) -> FileInfo:
    """Store a file (content and name encrypted) for ``actor``; the upload is audited with its digest and size.

    Raises:
        InputError: the purpose is not ``batch``, the file is empty, over MAX_FILE_BYTES, or not UTF-8 text.
    """
    return upload_handed([content], filename=filename, purpose=purpose, actor=actor, settings=settings)


def upload_handed(
    handed: list[bytes], *, filename: str | None, purpose: str, actor: str, settings: Settings | None = None
) -> FileInfo:
    """:func:`upload_file` of the content in ``handed``, which it takes out of the list: the bytes are let go of
    once decoded (when the caller kept no other reference), so a large file is not held as bytes and as text
    while it is encrypted."""
    content = handed.pop()
    if purpose not in PURPOSES:
        raise InputError(f"purpose: {str(purpose)[:40]!r} is not accepted; use 'batch'")
    if not content:
        raise InputError("file: the file is empty; upload JSON Lines, one request per line")
    size = len(content)
    if size > MAX_FILE_BYTES:
        raise InputError(f"file: {size} bytes; at most {MAX_FILE_BYTES} bytes are accepted")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"file: not UTF-8 text (byte {exc.start}); upload JSON Lines") from None
    digest = audit_digest(content)
    del content
    name = _CONTROL.sub("", filename or "upload.jsonl")[:255] or "upload.jsonl"
    rt = runtime(settings)
    with rt.transaction() as session:
        row = file_store.add_file(
            session,
            file_id=file_store.new_file_id(),
            actor=actor,
            purpose=purpose,
            filename=name,
            content=text,
            size=size,
            digest=digest,
            now=utcnow(),
        )
        session.flush()
        return _info(session, row)


def file_info(file_id: str, *, owner: str | None = None, settings: Settings | None = None) -> FileInfo:
    """A file's metadata (no content is read). ``owner``: only that principal's files exist.

    Raises:
        FileNotFound: no such file (or another principal's), or it was deleted or purged.
    """
    with runtime(settings).transaction() as session:
        return _info(session, _find(session, file_id, owner))


def file_content(file_id: str, *, reader: str, owner: str | None = None, settings: Settings | None = None) -> bytes:
    """A file's content; the read is audited (``file.read``) with ``reader``.

    Raises:
        FileNotFound: no such file, another principal's, or it was deleted or purged.
    """
    with runtime(settings).transaction() as session:
        row = _find(session, file_id, owner)
        content = file_store.read_content(session, row, reader=reader, via="files.content")
    if content is None:
        raise FileNotFound(file_id)
    return content.encode("utf-8")


def delete_file(file_id: str, *, actor: str, owner: str | None = None, settings: Settings | None = None) -> FileInfo:
    """Erase a file's content and name (audited ``file.deleted``); the row stays (id, size, times), the file is
    not found from then on.

    Raises:
        FileNotFound: no such file, another principal's, or deleted already.
    """
    with runtime(settings).transaction() as session:
        row = _find(session, file_id, owner)
        if not file_store.erase(session, row, actor=actor, now=utcnow(), purged=False):
            raise FileNotFound(file_id)
        return _info(session, row)


def list_files(
    *,
    owner: str | None = None,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = 100,
    newest_first: bool = True,
    settings: Settings | None = None,
) -> list[FileInfo]:
    """Files not deleted nor purged, of ``owner`` when given: a page of ``limit`` after the file ``after``."""
    if not 1 <= limit <= MAX_PAGE + 1:  # one more than a page: whether there is another
        raise InputError(f"limit: must be between 1 and {MAX_PAGE}, got {limit}")
    for name, value in (("purpose", purpose), ("after", after)):  # compared in SQL: text a column can hold
        if value is not None and (
            not isinstance(value, str)
            or len(value) > 128
            or any(ord(c) < 32 for c in value)
            or has_lone_surrogate(value)
        ):
            raise InputError(f"{name}: must be at most 128 characters of text, without control characters")
    with runtime(settings).transaction() as session:
        rows = file_store.list_files(
            session, actor=owner, purpose=purpose, after=after, limit=limit, newest_first=newest_first
        )
        return [_info(session, row) for row in rows]


def _check_metadata(metadata: object) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA:
        raise InputError(f"metadata: must be an object of at most {MAX_METADATA} string values")
    for key, value in metadata.items():
        if not isinstance(key, str) or len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise InputError("metadata: keys are strings of at most 64 characters, values strings of at most 512")
        for text in (key, value):  # stored, then sent back as JSON: it must be Unicode text
            if has_lone_surrogate(text):
                raise InputError(f"metadata: {key[:64]!r} holds a lone UTF-16 surrogate, which is not Unicode text")
    return metadata


def create_batch(
    input_file_id: str,
    *,
    endpoint: str,
    completion_window: str = "24h",
    metadata: object = None,
    actor: str,
    owner: str | None = None,
    webhook_url: str | None = None,
    settings: Settings | None = None,
) -> OpenAIBatchInfo:
    """A batch of the lines of file ``input_file_id``: every line is validated now, against ``endpoint`` (each
    line's ``url``), and one bad line refuses the whole batch, naming it, before anything is stored. Reading the
    file is audited (``file.read``).

    Raises:
        InputError: the endpoint, completion_window or metadata is not accepted.
        FileNotFound: no such file (or another principal's), or it was deleted.
        InvalidBatch: lines are invalid: (line number, ``field: reason``) for each.
    """
    if endpoint not in ENDPOINTS:
        raise InputError(f"endpoint: {str(endpoint)[:80]!r} is not accepted; use {' or '.join(ENDPOINTS)}")
    if not isinstance(completion_window, str):
        raise InputError("completion_window: must be a string such as '24h'")
    window = parse_duration(completion_window, "completion_window")
    checked = _check_metadata(metadata)
    rt = runtime(settings)
    hook = (
        None if webhook_url is None else validate_webhook_url(webhook_url, development=rt.settings.webhooks_development)
    )
    with rt.transaction() as session:
        try:
            row = _find(session, input_file_id, owner)
        except FileNotFound:
            raise FileNotFound(str(input_file_id)[:64], "input_file_id") from None
        if row.purpose != "batch":
            raise InputError(f"input_file_id: {input_file_id} has purpose {row.purpose!r}; upload it with 'batch'")
        text = file_store.read_content(session, row, reader=actor, via="batches.create")
    if text is None:
        raise FileNotFound(input_file_id, "input_file_id")
    parsed = batch_input.parse_lines(
        batch_input.split_lines(text), default_assistant=None, policy=policy(rt.settings), endpoint=endpoint
    )

    def with_batch(session: Session, batch_id: str) -> None:
        file_store.add_openai_batch(
            session,
            batch_id=batch_id,
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=completion_window,
            metadata=checked,
            actor=actor,
            now=utcnow(),
        )

    batch_id = store_batch(
        rt, parsed, assistant_id=None, window=window, actor=actor, webhook_url=hook, with_batch=with_batch
    )
    return get_batch(batch_id, settings=settings)


def get_batch(batch_id: str, *, owner: str | None = None, settings: Settings | None = None) -> OpenAIBatchInfo:
    """An OpenAI batch by its qbgw batch id (settled, as ``queries.get_batch``).

    Raises:
        BatchNotFound: no batch has this id, it was not made through the OpenAI endpoints, or is another's.
    """
    rt = runtime(settings)
    with rt.transaction() as session:
        row = file_store.get_openai_batch(session, batch_id)
        if row is None or (owner is not None and row.actor != owner):
            raise BatchNotFound(batch_id)
        info = _openai(session, row)
    return OpenAIBatchInfo(**{**info, "view": current(rt, batch_id)})


def _openai(session: Session, row: OpenAIBatch) -> dict[str, Any]:
    return {
        "id": openai_batch_id(row.batch_id),
        "input_file_id": row.input_file_id,
        "endpoint": row.endpoint,
        "completion_window": row.completion_window,
        "metadata": file_store.metadata_of(session, row),
    }


def list_batches(
    *, owner: str | None = None, after: str | None = None, limit: int = 20, settings: Settings | None = None
) -> list[OpenAIBatchInfo]:
    """OpenAI batches newest first (of ``owner`` when given), a page of ``limit`` after the batch ``after``."""
    if not 1 <= limit <= MAX_PAGE + 1:
        raise InputError(f"limit: must be between 1 and {MAX_PAGE}, got {limit}")
    after_id = None if after is None else batch_id_of(after)
    rt = runtime(settings)
    with rt.transaction() as session:
        try:
            rows = file_store.list_openai_batches(session, actor=owner, after=after_id, limit=limit)
        except BatchNotFound:
            raise BatchNotFound(after or "", "after") from None
        found = [(row.batch_id, _openai(session, row)) for row in rows]
    return [OpenAIBatchInfo(**{**info, "view": current(rt, batch_id)}) for batch_id, info in found]
