"""audit chain v3: an event's time is given at the seal, under the chain head's lock, and linked

Before, an event's ``occurred_at`` was the time its writer noted, maybe long before it committed (a 500-job
cancel took its time when its transaction began), and each host's own clock: events could sort before
others that committed earlier. From ``v3_from`` on, the seal stamps every event of a commit with one time
taken under the head's lock, never earlier than the last seal's (``last_at``), so ``occurred_at`` follows
``seq``; the time is in the link hash (the content hash, computed before the lock, leaves it out). On
PostgreSQL the time is the database server's clock (``clock_timestamp()``): one clock for the whole fleet.

Revision ID: a3c1d5e7f920
Revises: 4f2e8c1a9d07
Create Date: 2026-12-04 23:45:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a3c1d5e7f920"
down_revision: str | None = "4f2e8c1a9d07"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Each element of ``events``: the event's columns (no time), "i" its position, "c" its content hash (v3).
# The time is spelled as Python's datetime.isoformat(timespec="microseconds") of a UTC time.
PG_SEAL_V3 = """
CREATE OR REPLACE FUNCTION qbgw_audit_seal(events jsonb)
RETURNS TABLE (first_seq bigint, last_seq bigint, last_hash text) AS $$
DECLARE
    s bigint;
    h text;
    f bigint;
    t timestamptz;
    last timestamptz;
    spelled text;
    n integer := jsonb_array_length(events);
    prevs text[] := '{}';
    hashes text[] := '{}';
BEGIN
    SELECT seq, row_hash, last_at INTO s, h, last FROM audit_chain_head WHERE id = 1 FOR UPDATE;
    t := clock_timestamp();
    IF last IS NOT NULL AND last > t THEN
        t := last;
    END IF;
    spelled := to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '+00:00';
    f := s + 1;
    FOR i IN 0 .. n - 1 LOOP
        prevs := prevs || h;
        s := s + 1;
        h := encode(sha256(convert_to('qbgw-audit-v3|' || h || '|' || s::text || '|' || spelled || '|'
                                      || (events -> i ->> 'c'), 'UTF8')), 'hex');
        hashes := hashes || h;
    END LOOP;
    INSERT INTO audit_events (seq, prev_hash, row_hash, occurred_at, action, job_id, batch_id, assistant_id,
                              attempt, actor, token_fp, outcome, http_status, error_class, latency_ms,
                              request_digest, request_bytes, response_digest, response_bytes, detail)
    SELECT f + e.i, prevs[e.i + 1], hashes[e.i + 1], t, e.action, e.job_id, e.batch_id,
           e.assistant_id, e.attempt, e.actor, e.token_fp, e.outcome, e.http_status, e.error_class, e.latency_ms,
           e.request_digest, e.request_bytes, e.response_digest, e.response_bytes, e.detail
    FROM jsonb_to_recordset(events) AS e(i integer, action text, job_id text,
                                         batch_id text, assistant_id text, attempt integer, actor text,
                                         token_fp text, outcome text, http_status integer, error_class text,
                                         latency_ms integer, request_digest text, request_bytes integer,
                                         response_digest text, response_bytes integer, detail text)
    ORDER BY e.i;
    UPDATE audit_chain_head SET seq = s, row_hash = h, last_at = t WHERE id = 1;
    RETURN QUERY SELECT f, s, h;
END;
$$ LANGUAGE plpgsql
"""


def _v2_seal() -> str:
    """The v2 function, from the revision that made it (a downgrade puts it back)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("20261126_1000_audit_chain_v2_one_round_trip_seal_9b4e7d2a1c60.py")
    spec = importlib.util.spec_from_file_location("qbgw_migration_v2_seal", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.PG_SEAL)


def upgrade() -> None:
    with op.batch_alter_table("audit_chain_head") as batch:
        batch.add_column(sa.Column("v3_from", sa.BigInteger(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("last_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE audit_chain_head SET v3_from = seq + 1, last_at = (SELECT max(occurred_at) FROM audit_events)")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_SEAL_V3)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_v2_seal())
    with op.batch_alter_table("audit_chain_head") as batch:
        batch.drop_column("last_at")
        batch.drop_column("v3_from")
