"""audit query indexes: each filter paired with the result order

Revision ID: 6a1d3b9c4f52
Revises: 3c9e5f7a2b18
Create Date: 2026-11-25 19:25:00+00:00

bench/audit_scale.py showed PostgreSQL walking the seq index and filtering (222 ms for a batch
over a million events) instead of using single-column indexes, and no index on outcome.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "6a1d3b9c4f52"
down_revision: str | None = "3c9e5f7a2b18"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW = {
    "ix_audit_events_actor_seq": ["actor", "seq"],
    "ix_audit_events_assistant_id_seq": ["assistant_id", "seq"],
    "ix_audit_events_batch_id_seq": ["batch_id", "seq"],
    "ix_audit_events_outcome_seq": ["outcome", "seq"],
    "ix_audit_events_action_occurred_at": ["action", "occurred_at"],
}
OLD = {
    "ix_audit_events_actor": ["actor"],
    "ix_audit_events_assistant_id": ["assistant_id"],
    "ix_audit_events_batch_id": ["batch_id"],
    "ix_audit_events_action": ["action"],
}


def upgrade() -> None:
    for name, columns in NEW.items():
        op.create_index(name, "audit_events", columns)
    for name in OLD:
        op.drop_index(name, "audit_events")


def downgrade() -> None:
    for name, columns in OLD.items():
        op.create_index(name, "audit_events", columns)
    for name in NEW:
        op.drop_index(name, "audit_events")
