"""files and OpenAI batches: the OpenAI-compatible /v1/files and /v1/batches of qbgw serve

A file's content and name are PHI, encrypted with the payload keys; deleting or purging one erases them and
keeps the row (no DELETE is granted). An OpenAI batch is a qbgw batch plus the input file, endpoint and
metadata (encrypted) its creator named.

Revision ID: d5e8b1c3a7f2
Revises: e3b6f0d8c2a4
Create Date: 2026-12-05 21:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d5e8b1c3a7f2"
down_revision: str | None = "e3b6f0d8c2a4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.Text(), nullable=True),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("deleted_at", TS, nullable=True),
    )
    op.create_index("ix_files_actor", "files", ["actor"])
    op.create_index("ix_files_created_at", "files", ["created_at"])
    op.create_table(
        "openai_batches",
        sa.Column("batch_id", sa.String(36), primary_key=True),
        sa.Column("input_file_id", sa.String(40), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("metadata", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name="fk_openai_batches_batch_id_batches"),
    )
    op.create_index("ix_openai_batches_actor", "openai_batches", ["actor"])
    op.create_index("ix_openai_batches_created_at", "openai_batches", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_openai_batches_created_at", table_name="openai_batches")
    op.drop_index("ix_openai_batches_actor", table_name="openai_batches")
    op.drop_table("openai_batches")
    op.drop_index("ix_files_created_at", table_name="files")
    op.drop_index("ix_files_actor", table_name="files")
    op.drop_table("files")
