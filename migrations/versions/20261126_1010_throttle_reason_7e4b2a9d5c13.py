"""throttle reason: a job that waits for the fleet's rate limit says so

Revision ID: 7e4b2a9d5c13
Revises: 9b4e7d2a1c60
Create Date: 2026-11-26 10:10:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7e4b2a9d5c13"
down_revision: str | None = "9b4e7d2a1c60"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("throttle_reason", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("throttle_reason")
