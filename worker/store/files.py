"""Files: the OpenAI-compatible ``/v1/files`` and the OpenAI batches made from them. A file's content and name
are PHI, encrypted with the payload keys (bound to the row and column); deleting or purging a file erases both
and keeps the row. Every upload, read of content, delete and purge is audited (digests and sizes only).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ..audit import events as audit
from ..audit.crypto import Keyring, aad_for
from ..errors import BatchNotFound, FileNotFound
from .jobs import KEYRING
from .models import File, OpenAIBatch

__all__ = [
    "new_file_id",
    "add_file",
    "get_file",
    "list_files",
    "read_content",
    "erase",
    "purge_chunk",
    "add_openai_batch",
    "get_openai_batch",
    "list_openai_batches",
    "CHUNK",
]

CHUNK = 500


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex


def _seal(session: Session, table: str, column: str, row_id: str, plaintext: str | None) -> str | None:
    if plaintext is None:
        return None
    keyring: Keyring = session.info[KEYRING]
    return keyring.encrypt(plaintext, aad=aad_for(table, column, row_id))


def _open(session: Session, table: str, column: str, row_id: str, stored: str | None) -> str | None:
    if stored is None:
        return None
    keyring: Keyring = session.info[KEYRING]
    return keyring.decrypt(stored, aad=aad_for(table, column, row_id))


def filename_of(session: Session, row: File) -> str | None:
    """The file's name as uploaded (None once erased)."""
    return _open(session, "files", "filename", row.id, row.filename)


def add_file(
    session: Session,
    *,
    file_id: str,
    actor: str,
    purpose: str,
    filename: str,
    content: str,
    size: int,
    digest: str,
    now: datetime,
) -> File:
    """Store a file (content and name encrypted) and audit the upload with its digest (of the bytes uploaded:
    ``audit.digest``) and size."""
    row = File(
        id=file_id,
        actor=actor,
        purpose=purpose,
        filename=_seal(session, "files", "filename", file_id, filename),
        bytes=size,
        content=_seal(session, "files", "content", file_id, content),
        created_at=now,
        deleted_at=None,
    )
    session.add(row)
    audit.record(
        session=session,
        action=audit.Action.FILE_UPLOADED,
        job_id=None,
        actor=actor,
        request=(digest, size),
        detail={"file_id": file_id, "purpose": purpose},
    )
    return row


def get_file(session: Session, file_id: str) -> File:
    """Raises FileNotFound if no file has this id."""
    row = session.get(File, file_id)
    if row is None:
        raise FileNotFound(file_id)
    return row


def list_files(
    session: Session, *, actor: str | None, purpose: str | None, after: str | None, limit: int, newest_first: bool
) -> list[File]:
    """Files not deleted nor purged (of ``actor`` when given), ordered by creation time then id; ``after``: the id
    the previous page ended with."""
    query = select(File).where(File.deleted_at.is_(None))
    if actor is not None:
        query = query.where(File.actor == actor)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    if after is not None:
        cursor = session.get(File, after)
        if cursor is None or (actor is not None and cursor.actor != actor):  # a page after nothing is no page
            raise FileNotFound(after, "after")
        if cursor is not None:
            if newest_first:
                query = query.where(
                    (File.created_at < cursor.created_at) | ((File.created_at == cursor.created_at) & (File.id < after))
                )
            else:
                query = query.where(
                    (File.created_at > cursor.created_at) | ((File.created_at == cursor.created_at) & (File.id > after))
                )
    order = (File.created_at.desc(), File.id.desc()) if newest_first else (File.created_at, File.id)
    return list(session.scalars(query.order_by(*order).limit(limit)))


def read_content(session: Session, row: File, *, reader: str, via: str, batch_id: str | None = None) -> str | None:
    """The file's content (None once erased); the read is audited (``file.read``) with ``reader``."""
    content = _open(session, "files", "content", row.id, row.content)
    if content is not None:
        audit.record(
            session=session,
            action=audit.Action.FILE_READ,
            job_id=None,
            batch_id=batch_id,
            actor=reader,
            response=(audit.digest(content.encode()), row.bytes),
            detail={"file_id": row.id, "via": via},
        )
    return content


def erase(session: Session, row: File, *, actor: str, now: datetime, purged: bool) -> bool:
    """Erase the file's content and name (a delete, or a purge); False if it was erased already."""
    done = session.execute(
        update(File)
        .where(File.id == row.id, File.deleted_at.is_(None))
        .values(content=None, filename=None, deleted_at=now)
    )
    if not done.rowcount:  # type: ignore[attr-defined]
        return False
    audit.record(
        session=session,
        action=audit.Action.FILE_PURGED if purged else audit.Action.FILE_DELETED,
        job_id=None,
        actor=actor,
        detail={"file_id": row.id},
    )
    session.refresh(row)
    return True


def purge_chunk(session: Session, *, cutoff: datetime, actor: str, now: datetime) -> int:
    """Erase up to CHUNK files uploaded before ``cutoff`` that still hold content, each audited; returns how many."""
    rows = list(
        session.scalars(
            select(File).where(File.created_at < cutoff, File.deleted_at.is_(None)).order_by(File.id).limit(CHUNK)
        )
    )
    return sum(erase(session, row, actor=actor, now=now, purged=True) for row in rows)


def add_openai_batch(
    session: Session,
    *,
    batch_id: str,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, Any] | None,
    actor: str,
    now: datetime,
) -> OpenAIBatch:
    text = None if metadata is None else json.dumps(metadata, ensure_ascii=False)
    row = OpenAIBatch(
        batch_id=batch_id,
        input_file_id=input_file_id,
        endpoint=endpoint,
        completion_window=completion_window,
        metadata_=_seal(session, "openai_batches", "metadata", batch_id, text),
        actor=actor,
        created_at=now,
    )
    session.add(row)
    return row


def metadata_of(session: Session, row: OpenAIBatch) -> dict[str, Any] | None:
    text = _open(session, "openai_batches", "metadata", row.batch_id, row.metadata_)
    return None if text is None else dict(json.loads(text))


def get_openai_batch(session: Session, batch_id: str) -> OpenAIBatch | None:
    return session.get(OpenAIBatch, batch_id)


def list_openai_batches(session: Session, *, actor: str | None, after: str | None, limit: int) -> list[OpenAIBatch]:
    """OpenAI batches (of ``actor`` when given), newest first; ``after``: the batch id the previous page ended with."""
    query = select(OpenAIBatch)
    if actor is not None:
        query = query.where(OpenAIBatch.actor == actor)
    if after is not None:
        cursor = session.get(OpenAIBatch, after)
        if cursor is None or (actor is not None and cursor.actor != actor):  # a page after nothing is no page
            raise BatchNotFound(after)
        if cursor is not None:
            query = query.where(
                (OpenAIBatch.created_at < cursor.created_at)
                | ((OpenAIBatch.created_at == cursor.created_at) & (OpenAIBatch.batch_id < after))
            )
    order = (OpenAIBatch.created_at.desc(), OpenAIBatch.batch_id.desc())
    return list(session.scalars(query.order_by(*order).limit(limit)))
