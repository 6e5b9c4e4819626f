"""purgeable payloads: a job's PHI can be erased under the retention policy

Revision ID: 3c9e5f7a2b18
Revises: 8d2f4a6c1e37
Create Date: 2026-11-25 19:10:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3c9e5f7a2b18"
down_revision: str | None = "8d2f4a6c1e37"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("payload", existing_type=sa.Text(), nullable=True)
        batch.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("purged_at")
        batch.alter_column("payload", existing_type=sa.Text(), nullable=False)
