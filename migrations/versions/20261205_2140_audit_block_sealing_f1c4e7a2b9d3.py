"""audit events sealed in blocks (QBGW_AUDIT_SEAL=block): staged without the chain head's lock, chained later

With ``QBGW_AUDIT_SEAL=block`` (PostgreSQL) a transaction's audit events are not chained at its COMMIT: they
are written to ``audit_pending`` (one row per transaction, its events as ``qbgw_audit_seal`` takes them) in
the same transaction as the change they record, without taking the chain head's row lock, which today is
held through every commit's flush to disk and so caps the fleet's commits that write events. A sealer (each
worker's, every QBGW_AUDIT_SEAL_INTERVAL) chains the staged rows in the order they were staged, with
``qbgw_audit_seal`` itself, in blocks of many transactions under one lock and one flush, and deletes them
from ``audit_pending`` in the same transaction. The sealer function is SECURITY DEFINER: the application
role may stage (INSERT) and read, never delete or change a staged row.

Revision ID: f1c4e7a2b9d3
Revises: c7d2a9e4f1b6
Create Date: 2026-12-05 21:40:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "f1c4e7a2b9d3"
down_revision: str | None = "c7d2a9e4f1b6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PG_SEAL_PENDING = """
CREATE OR REPLACE FUNCTION qbgw_audit_seal_pending(max_rows integer)
RETURNS TABLE (first_seq bigint, last_seq bigint, last_hash text, sealed_rows integer) AS $$
DECLARE
    r record;
    x record;
    f bigint;
    s bigint;
    h text;
    n integer := 0;
BEGIN
    -- The head's lock first: one sealer at a time, and the rows it reads are every row committed before it.
    PERFORM 1 FROM audit_chain_head WHERE id = 1 FOR UPDATE;
    FOR r IN SELECT id, events FROM audit_pending ORDER BY id LIMIT max_rows LOOP
        SELECT * INTO x FROM qbgw_audit_seal(r.events);
        f := coalesce(f, x.first_seq);
        s := x.last_seq;
        h := x.last_hash;
        DELETE FROM audit_pending WHERE id = r.id;
        n := n + 1;
    END LOOP;
    RETURN QUERY SELECT f, s, h, n;
END;
$$ LANGUAGE plpgsql SECURITY DEFINER SET search_path = {schema}, pg_temp
"""

#: What a transaction's commit calls instead of ``qbgw_audit_seal`` in block mode: the same argument and the same
#: columns returned (all NULL: nothing is chained yet), so the seal-and-commit query and the hot path's
#: statements change only the function's name. No lock is taken.
PG_STAGE = """
CREATE OR REPLACE FUNCTION qbgw_audit_stage(events jsonb)
RETURNS TABLE (first_seq bigint, last_seq bigint, last_hash text) AS $$
BEGIN
    IF jsonb_array_length(events) > 0 THEN
        INSERT INTO audit_pending (events) VALUES (events);
    END IF;
    RETURN QUERY SELECT NULL::bigint, NULL::bigint, NULL::text;
END;
$$ LANGUAGE plpgsql
"""

PG_APPEND_ONLY = """
CREATE OR REPLACE FUNCTION qbgw_audit_pending_guard() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit_pending rows are sealed by qbgw_audit_seal_pending, never changed';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER audit_pending_no_update BEFORE UPDATE ON audit_pending
FOR EACH ROW EXECUTE FUNCTION qbgw_audit_pending_guard();
"""


def upgrade() -> None:
    # On both backends, so the schema is one; only PostgreSQL stages into it (SQLite has one writer at a time
    # and always seals at commit).
    op.create_table(
        "audit_pending",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("staged_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("CURRENT_TIMESTAMP")),
        sa.Column("events", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
    )
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    # SECURITY DEFINER runs as the owner: its search path is fixed (the schema, then pg_temp last), so no
    # caller's temporary table can stand in for one of ours.
    schema = bind.execute(sa.text("SELECT current_schema()")).scalar_one()
    op.execute(PG_SEAL_PENDING.format(schema=bind.dialect.identifier_preparer.quote(schema)))
    op.execute(PG_STAGE)
    op.execute(PG_APPEND_ONLY)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # Nothing staged is dropped: it is chained first, as a sealer would.
        op.execute("SELECT * FROM qbgw_audit_seal_pending(2147483647)")
        op.execute("DROP TRIGGER IF EXISTS audit_pending_no_update ON audit_pending")
        op.execute("DROP FUNCTION IF EXISTS qbgw_audit_pending_guard()")
        op.execute("DROP FUNCTION IF EXISTS qbgw_audit_seal_pending(integer)")
        op.execute("DROP FUNCTION IF EXISTS qbgw_audit_stage(jsonb)")
    op.drop_table("audit_pending")
