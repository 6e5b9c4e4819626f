"""Files of the OpenAI-compatible endpoints (``qbgw.compat``) on both databases: content and name encrypted at
rest, every read audited, a delete and a purge erase them, key rotation re-encrypts them (and an OpenAI batch's
metadata), and a batch is made only from its owner's file, every line checked first."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from qbgw import compat
from qbgw.admin import purge_phi, rotate_keys
from qbgw.audit.crypto import Keyring
from qbgw.errors import FileNotFound, InputError, InvalidBatch
from qbgw.lifecycle import utcnow
from qbgw.queries import audit_query
from qbgw.runtime.locator import runtime
from qbgw.settings import Secret, Settings
from qbgw.store.models import File, OpenAIBatch
from qbgw.store.reads import AuditFilter
from tests.conftest import ASSISTANT

SECRET_TEXT = "Patient Jane Roe-4471 reports chest pain"


def line(custom_id: str, text: str = SECRET_TEXT, **params: object) -> str:
    body = {"model": ASSISTANT, "messages": [{"role": "user", "content": text}], **params}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def upload(settings: Settings, *lines: str, actor: str = "key:web", name: str = "roe-4471.jsonl") -> compat.FileInfo:
    content = "".join(text + "\n" for text in lines).encode()
    return compat.upload_file(content, filename=name, purpose="batch", actor=actor, settings=settings)


def test_a_file_is_encrypted_at_rest_and_every_read_is_audited(settings: Settings) -> None:
    info = upload(settings, line("a"))
    assert (info.filename, info.purpose, info.actor) == ("roe-4471.jsonl", "batch", "key:web")
    with runtime(settings).transaction() as session:
        row = session.get(File, info.id)
        assert row is not None
        assert row.content is not None
        assert row.filename is not None
        assert SECRET_TEXT not in row.content
        assert "roe-4471" not in row.filename
        assert row.content.startswith("v1:")
    assert compat.file_content(info.id, reader="key:reader", settings=settings).decode() == line("a") + "\n"
    reads = audit_query(AuditFilter(action="file.read"), settings=settings)
    assert [(e.actor, e.detail["file_id"]) for e in reads] == [("key:reader", info.id)]
    uploads = audit_query(AuditFilter(action="file.uploaded"), settings=settings)
    assert uploads[0].request_bytes == info.bytes
    with pytest.raises(FileNotFound):
        compat.file_content(info.id, reader="key:other", owner="key:other", settings=settings)


def test_a_deleted_file_is_erased_and_gone(settings: Settings) -> None:
    info = upload(settings, line("a"))
    compat.delete_file(info.id, actor="key:web", settings=settings)
    with runtime(settings).transaction() as session:
        row = session.get(File, info.id)
        assert row is not None
        assert (row.content, row.filename) == (None, None)
        assert row.deleted_at is not None
    with pytest.raises(FileNotFound):
        compat.file_content(info.id, reader="key:web", settings=settings)
    with pytest.raises(FileNotFound):
        compat.delete_file(info.id, actor="key:web", settings=settings)
    assert [e.actor for e in audit_query(AuditFilter(action="file.deleted"), settings=settings)] == ["key:web"]
    assert compat.list_files(settings=settings) == []
    with pytest.raises(FileNotFound):
        compat.file_info(info.id, settings=settings)


def test_purge_erases_files_older_than_the_cutoff(settings: Settings) -> None:
    old, recent = upload(settings, line("a")), upload(settings, line("b"))
    with runtime(settings).transaction() as session:
        session.execute(update(File).where(File.id == old.id).values(created_at=utcnow() - timedelta(days=40)))
    assert purge_phi(older_than=timedelta(days=30), actor="retention-job", settings=settings) == 1
    with pytest.raises(FileNotFound):
        compat.file_content(old.id, reader="key:web", settings=settings)
    assert compat.file_content(recent.id, reader="key:web", settings=settings)
    purged = audit_query(AuditFilter(action="file.purged"), settings=settings)
    assert [(e.actor, e.detail["file_id"]) for e in purged] == [("retention-job", old.id)]


def test_key_rotation_reencrypts_files_and_batch_metadata(settings: Settings) -> None:
    on_file = settings.with_(encryption_keys=Secret(""))
    if on_file.database_url:
        Keyring({"k0": b"\x01" * 32}, "k0").save(on_file.keyring_path)
    info = upload(on_file, line("a"))
    batch = compat.create_batch(
        info.id, endpoint="/v1/chat/completions", metadata={"ward": "4B"}, actor="key:web", settings=on_file
    )
    rotation = rotate_keys(actor="security-officer", settings=on_file)
    prefix = f"v1:{rotation.new_primary}:"
    with runtime(on_file).transaction() as session:
        stored = [
            *session.scalars(select(File.content)),
            *session.scalars(select(File.filename)),
            *session.scalars(select(OpenAIBatch.metadata_)),
        ]
    assert len(stored) == 3
    assert all(value.startswith(prefix) for value in stored), stored
    assert compat.file_content(info.id, reader="key:web", settings=on_file).decode() == line("a") + "\n"
    assert compat.get_batch(compat.batch_id_of(batch.id), settings=on_file).metadata == {"ward": "4B"}


def test_a_batch_is_made_from_its_owners_file_with_every_line_checked(settings: Settings) -> None:
    info = upload(settings, line("a"), line("b", temperature=0.5), "not json", line("a"))
    with pytest.raises(FileNotFound):
        compat.create_batch(info.id, endpoint="/v1/chat/completions", actor="key:x", owner="key:x", settings=settings)
    with pytest.raises(InvalidBatch) as caught:
        compat.create_batch(info.id, endpoint="/v1/chat/completions", actor="key:web", settings=settings)
    assert [n for n, _ in caught.value.problems] == [2, 3, 4]
    assert caught.value.problems[0][1].startswith("body.temperature: not supported by the gateway")
    with pytest.raises(InputError, match="endpoint"):
        compat.create_batch(info.id, endpoint="/v1/embeddings", actor="key:web", settings=settings)
    with pytest.raises(InputError, match="purpose"):
        compat.upload_file(b"x\n", filename="a", purpose="fine-tune", actor="key:web", settings=settings)
    good = upload(settings, line("a"), line("b"))
    made = compat.create_batch(good.id, endpoint="/v1/chat/completions", actor="key:web", settings=settings)
    assert made.view.total == 2
    assert made.input_file_id == good.id
    assert [b.id for b in compat.list_batches(owner="key:web", settings=settings)] == [made.id]
    assert compat.list_batches(owner="key:x", settings=settings) == []
