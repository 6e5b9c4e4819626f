"""subjects: a job may say whom it is about (encrypted), with a keyed blind index on the job and its audit events

``jobs.subject`` holds the subject encrypted like the payload; ``jobs.subject_index`` and
``audit_events.subject_index`` its HMAC-SHA256 under QBGW_SUBJECT_KEY, indexed for equality look-ups (the
access report). An event's hash covers ``subject_index`` when it is not NULL, so every event already written
keeps its hash. On PostgreSQL ``qbgw_audit_seal`` inserts the new column.

Revision ID: c7d2a9e4f1b6
Revises: b8e2f4a61c3d
Create Date: 2026-12-05 21:30:00+00:00
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "c7d2a9e4f1b6"
down_revision: str | None = "b8e2f4a61c3d"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _v3_seal() -> str:
    """The v3 function, from the revision that made it (this one adds a column to it; a downgrade puts it back)."""
    path = Path(__file__).with_name("20261204_2345_audit_chain_v3_time_at_seal_a3c1d5e7f920.py")
    spec = importlib.util.spec_from_file_location("qbgw_migration_v3_seal", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.PG_SEAL_V3)


def _with_subjects(seal: str) -> str:
    """The v3 seal, inserting each event's ``subject_index`` too (the hashes are unchanged: the client hashed it)."""
    replacements = (
        ("response_bytes, detail)\n", "response_bytes, detail, subject_index)\n"),
        ("e.response_bytes, e.detail\n", "e.response_bytes, e.detail, e.subject_index\n"),
        ("response_bytes integer, detail text)", "response_bytes integer, detail text, subject_index text)"),
    )
    for old, new in replacements:
        if seal.count(old) != 1:
            raise RuntimeError(f"the v3 seal has changed: cannot find {old!r} once")
        seal = seal.replace(old, new)
    return seal


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("subject", sa.Text(), nullable=True))
        batch.add_column(sa.Column("subject_index", sa.String(64), nullable=True))
        batch.create_index("ix_jobs_subject_index", ["subject_index"])
    # Not in batch mode: on SQLite that would copy the table, and its append-only triggers with it, lost.
    op.add_column("audit_events", sa.Column("subject_index", sa.String(64), nullable=True))
    op.create_index("ix_audit_events_subject_index_seq", "audit_events", ["subject_index", "seq"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_with_subjects(_v3_seal()))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_v3_seal())
    op.drop_index("ix_audit_events_subject_index_seq", table_name="audit_events")
    op.drop_column("audit_events", "subject_index")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_subject_index")
        batch.drop_column("subject_index")
        batch.drop_column("subject")
