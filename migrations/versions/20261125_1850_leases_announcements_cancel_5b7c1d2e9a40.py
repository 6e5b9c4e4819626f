"""announcements and cancellation requests on jobs

Revision ID: 5b7c1d2e9a40
Revises: 0e1aac1b38c2
Create Date: 2026-11-25 18:50:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5b7c1d2e9a40"
down_revision: str | None = "0e1aac1b38c2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("announced_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True))
    # Jobs already queued were announced when they were submitted.
    op.execute("UPDATE jobs SET announced_at = created_at WHERE status IN ('queued', 'retrying')")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cancel_requested_at")
        batch.drop_column("announced_at")
