"""api keys and webhooks for qbgw serve; PostgreSQL tells listeners when a job ends (NOTIFY qbgw_job_ended)

The keys table holds only a hash of each secret. The trigger lets a long-poll (``GET /v1/jobs/{id}?wait=``)
wake when the job's transaction commits instead of polling; NOTIFY is delivered at commit, never for a
transaction that rolled back. SQLite has no NOTIFY: the server polls there, on a bounded interval.

Revision ID: b8e2f4a61c3d
Revises: a3c1d5e7f920
Create Date: 2026-12-05 04:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b8e2f4a61c3d"
down_revision: str | None = "a3c1d5e7f920"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)

PG_NOTIFY = """
CREATE OR REPLACE FUNCTION qbgw_job_ended_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('qbgw_job_ended', NEW.id);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
"""

PG_TRIGGER = """
CREATE TRIGGER jobs_ended_notify AFTER UPDATE OF status ON jobs
FOR EACH ROW
WHEN (OLD.status IS DISTINCT FROM NEW.status AND NEW.status IN ('succeeded', 'failed', 'cancelled'))
EXECUTE FUNCTION qbgw_job_ended_notify();
"""


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("webhook_url", sa.Text(), nullable=True),
    )
    op.create_index("ix_api_keys_name", "api_keys", ["name"])
    op.create_table(
        "webhook_secrets",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("principal", sa.String(128), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=True),
    )
    op.create_index("ix_webhook_secrets_principal", "webhook_secrets", ["principal"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("job_id", sa.String(36), nullable=True),
        sa.Column("batch_id", sa.String(36), nullable=True),
        sa.Column("principal", sa.String(128), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("event", sa.String(32), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("pending_since", TS, nullable=True),
        sa.Column("next_attempt_at", TS, nullable=True),
        sa.Column("lease_until", TS, nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(255), nullable=True),
        sa.Column("delivered_at", TS, nullable=True),
    )
    op.create_index("ix_webhook_deliveries_job_id", "webhook_deliveries", ["job_id"])
    op.create_index("ix_webhook_deliveries_batch_id", "webhook_deliveries", ["batch_id"])
    op.create_index("ix_webhook_deliveries_status_next", "webhook_deliveries", ["status", "next_attempt_at"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_NOTIFY)
        op.execute(PG_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS jobs_ended_notify ON jobs")
        op.execute("DROP FUNCTION IF EXISTS qbgw_job_ended_notify()")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_secrets")
    op.drop_index("ix_api_keys_name", table_name="api_keys")
    op.drop_table("api_keys")
