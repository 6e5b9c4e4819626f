"""hash-chained, append-only audit events

Revision ID: 8d2f4a6c1e37
Revises: 5b7c1d2e9a40
Create Date: 2026-11-25 19:00:00+00:00

Adds the chain columns (existing events are chained in id order), the chain head, columns and
indexes for audit queries, and triggers that refuse UPDATE, DELETE and (PostgreSQL) TRUNCATE on
audit_events.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8d2f4a6c1e37"
down_revision: str | None = "5b7c1d2e9a40"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS = "0" * 64
FIELDS = (
    "seq",
    "occurred_at",
    "action",
    "job_id",
    "batch_id",
    "assistant_id",
    "attempt",
    "actor",
    "token_fp",
    "outcome",
    "http_status",
    "error_class",
    "latency_ms",
    "request_digest",
    "request_bytes",
    "response_digest",
    "response_bytes",
    "detail",
)

PG_FUNCTION = """
CREATE OR REPLACE FUNCTION qbgw_audit_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql
"""


def _hash(prev: str, row: dict[str, object]) -> str:
    # A frozen copy of worker.audit.chain_hash as of this revision.
    when = row["occurred_at"]
    fields = {k: row[k] for k in FIELDS}
    fields["occurred_at"] = when.isoformat(timespec="microseconds") if hasattr(when, "isoformat") else when
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(b"qbgw-audit-v1\x00" + prev.encode() + b"\x00" + canonical.encode()).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("prev_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("row_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("assistant_id", sa.String(128), nullable=True))
        batch.add_column(sa.Column("token_fp", sa.String(16), nullable=True))
    head_seq, head_hash = _chain_existing()
    with op.batch_alter_table("audit_events") as batch:
        for column, width in (("seq", None), ("prev_hash", 64), ("row_hash", 64)):
            kind = sa.BigInteger() if width is None else sa.String(width)
            batch.alter_column(column, existing_type=kind, nullable=False)
        batch.create_unique_constraint(op.f("uq_audit_events_seq"), ["seq"])
    op.create_index(op.f("ix_audit_events_actor"), "audit_events", ["actor"])
    op.create_index(op.f("ix_audit_events_assistant_id"), "audit_events", ["assistant_id"])
    op.create_index(op.f("ix_audit_events_batch_id"), "audit_events", ["batch_id"])
    head = op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("row_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_chain_head")),
    )
    op.bulk_insert(head, [{"id": 1, "seq": head_seq, "row_hash": head_hash}])
    _append_only_triggers()


def _chain_existing() -> tuple[int, str]:
    connection = op.get_bind()
    table = sa.table(
        "audit_events",
        sa.column("id"),
        *(sa.column(f) for f in FIELDS if f != "seq"),
        sa.column("seq"),
        sa.column("prev_hash"),
        sa.column("row_hash"),
    )
    rows = connection.execute(sa.select(table).order_by(table.c.id)).mappings().all()
    prev, seq = GENESIS, 0
    for row in rows:
        seq += 1
        values = {**row, "seq": seq}
        row_hash = _hash(prev, values)
        connection.execute(
            table.update().where(table.c.id == row["id"]).values(seq=seq, prev_hash=prev, row_hash=row_hash)
        )
        prev = row_hash
    return seq, prev


def _append_only_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
        op.execute(
            "CREATE TRIGGER audit_events_no_update_delete BEFORE UPDATE OR DELETE ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION qbgw_audit_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
            "FOR EACH STATEMENT EXECUTE FUNCTION qbgw_audit_append_only()"
        )
        return
    for verb in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER audit_events_no_{verb.lower()} BEFORE {verb} ON audit_events "
            f"BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: {verb} refused'); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events")
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_update_delete ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS qbgw_audit_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_delete")
    op.drop_table("audit_chain_head")
    op.drop_index(op.f("ix_audit_events_batch_id"), "audit_events")
    op.drop_index(op.f("ix_audit_events_assistant_id"), "audit_events")
    op.drop_index(op.f("ix_audit_events_actor"), "audit_events")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_constraint(op.f("uq_audit_events_seq"), type_="unique")
        for column in ("token_fp", "assistant_id", "row_hash", "prev_hash", "seq"):
            batch.drop_column(column)
