"""jobs.request_digest and request_bytes: the body a text-only job's attempts send, digested at submit

A job whose body cannot change between its submit and its attempts (no image reference a worker resolves) has
its body's sha256 and size stored with it. On PostgreSQL a worker's claim then seals the attempt's
``attempt.request`` event in the claim's own statement, made by the database from the row: one round trip
where it took two. NULL for every other job, and for the jobs submitted before this revision: their claims
go as before.

Revision ID: a9d4c6e2b7f1
Revises: d5e8b1c3a7f2
Create Date: 2026-12-06 11:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a9d4c6e2b7f1"
down_revision: str | None = "d5e8b1c3a7f2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("request_digest", sa.String(64), nullable=True))
        batch.add_column(sa.Column("request_bytes", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("request_bytes")
        batch.drop_column("request_digest")
