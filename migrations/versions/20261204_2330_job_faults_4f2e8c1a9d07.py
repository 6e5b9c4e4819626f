"""job faults: unexpected failures in a row, so that a job that cannot be sent ends

Revision ID: 4f2e8c1a9d07
Revises: 7e4b2a9d5c13
Create Date: 2026-12-04 23:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "4f2e8c1a9d07"
down_revision: str | None = "7e4b2a9d5c13"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("faults", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("faults")
