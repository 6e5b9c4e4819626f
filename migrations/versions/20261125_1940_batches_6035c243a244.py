"""batches: jobs submitted together, with a lifecycle and a completion window

Revision ID: 6035c243a244
Revises: 6a1d3b9c4f52
Create Date: 2026-11-25 19:40:00+00:00

A batch's counts are read from its jobs (``jobs.batch_id``), so nothing on the workers' path
writes to ``batches``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "6035c243a244"
down_revision: str | None = "6a1d3b9c4f52"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("assistant_id", sa.String(128), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("in_progress_at", TS, nullable=True),
        sa.Column("completed_at", TS, nullable=True),
        sa.Column("cancelled_at", TS, nullable=True),
        sa.Column("expired_at", TS, nullable=True),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
    )
    op.create_index(op.f("ix_batches_status"), "batches", ["status"])
    op.create_index(op.f("ix_batches_created_at"), "batches", ["created_at"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("batch_id", sa.String(36), nullable=True))
        batch.create_index(batch.f("ix_jobs_batch_id"), ["batch_id"])
        batch.create_foreign_key(batch.f("fk_jobs_batch_id_batches"), "batches", ["batch_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(batch.f("fk_jobs_batch_id_batches"), type_="foreignkey")
        batch.drop_index(batch.f("ix_jobs_batch_id"))
        batch.drop_column("batch_id")
    op.drop_table("batches")
