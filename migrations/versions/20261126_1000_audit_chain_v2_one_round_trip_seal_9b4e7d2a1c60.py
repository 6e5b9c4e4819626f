"""audit chain format v2: content hashed before the lock; a server-side seal on PostgreSQL

Revision ID: 9b4e7d2a1c60
Revises: 6035c243a244
Create Date: 2026-11-26 10:00:00+00:00

Format v1 hashed each event's canonical JSON together with its seq and the previous hash, so all
of it had to be done while the chain head was locked. Format v2 splits it: the content hash (the
canonical JSON without seq) is computed before the lock, and the chain link is
``sha256("qbgw-audit-v2|" prev_hash "|" seq "|" content_hash)``, cheap enough for PostgreSQL's own
``sha256()``. ``audit_chain_head.v2_from`` records the first seq in format v2 (existing events
keep v1). On PostgreSQL, ``qbgw_audit_seal(events jsonb)`` locks the head, links and inserts the
events and moves the head in one statement, which the worker sends together with its COMMIT.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9b4e7d2a1c60"
down_revision: str | None = "6035c243a244"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Each element of ``events``: the event's columns, "c" its content hash; in chain order.
PG_SEAL = """
CREATE OR REPLACE FUNCTION qbgw_audit_seal(events jsonb)
RETURNS TABLE (first_seq bigint, last_seq bigint, last_hash text) AS $$
DECLARE
    s bigint;
    h text;
    f bigint;
    n integer := jsonb_array_length(events);
    prevs text[] := '{}';
    hashes text[] := '{}';
BEGIN
    SELECT seq, row_hash INTO s, h FROM audit_chain_head WHERE id = 1 FOR UPDATE;
    f := s + 1;
    FOR i IN 0 .. n - 1 LOOP
        prevs := prevs || h;
        s := s + 1;
        h := encode(sha256(convert_to('qbgw-audit-v2|' || h || '|' || s::text || '|' || (events -> i ->> 'c'),
                                      'UTF8')), 'hex');
        hashes := hashes || h;
    END LOOP;
    INSERT INTO audit_events (seq, prev_hash, row_hash, occurred_at, action, job_id, batch_id, assistant_id,
                              attempt, actor, token_fp, outcome, http_status, error_class, latency_ms,
                              request_digest, request_bytes, response_digest, response_bytes, detail)
    SELECT f + e.i, prevs[e.i + 1], hashes[e.i + 1], e.occurred_at, e.action, e.job_id, e.batch_id,
           e.assistant_id, e.attempt, e.actor, e.token_fp, e.outcome, e.http_status, e.error_class, e.latency_ms,
           e.request_digest, e.request_bytes, e.response_digest, e.response_bytes, e.detail
    FROM jsonb_to_recordset(events) AS e(i integer, occurred_at timestamptz, action text, job_id text,
                                         batch_id text, assistant_id text, attempt integer, actor text,
                                         token_fp text, outcome text, http_status integer, error_class text,
                                         latency_ms integer, request_digest text, request_bytes integer,
                                         response_digest text, response_bytes integer, detail text)
    ORDER BY e.i;
    UPDATE audit_chain_head SET seq = s, row_hash = h WHERE id = 1;
    RETURN QUERY SELECT f, s, h;
END;
$$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    with op.batch_alter_table("audit_chain_head") as batch:
        batch.add_column(sa.Column("v2_from", sa.BigInteger(), nullable=False, server_default="1"))
    op.execute("UPDATE audit_chain_head SET v2_from = seq + 1")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_SEAL)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS qbgw_audit_seal(jsonb)")
    with op.batch_alter_table("audit_chain_head") as batch:
        batch.drop_column("v2_from")
