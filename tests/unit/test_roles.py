"""The application role's grants as data: every table has a decision, and the log is insert-only."""

from __future__ import annotations

from sqlalchemy.dialects import postgresql

from qbgw.store import roles
from qbgw.store.models import Base


def test_every_table_of_the_schema_has_a_grant_decision() -> None:
    # A migration that adds a table must say here what the application may do on it (or workers fail on it).
    assert set(roles.TABLES) == set(Base.metadata.tables) | {"alembic_version"}


def test_nothing_may_delete_truncate_or_alter_and_the_log_is_insert_only() -> None:
    assert roles.TABLES["audit_events"] == ("SELECT", "INSERT")
    granted = {p for allowed in roles.TABLES.values() for p in allowed}
    assert granted <= {"SELECT", "INSERT", "UPDATE"}


def test_the_statements_revoke_each_object_before_granting_it_so_a_rerun_is_exact() -> None:
    statements = roles.grant_statements(
        "qbgw app",
        database="qbgw",
        schema="public",
        sequences=["public.audit_events_id_seq"],
        dialect=postgresql.dialect(),
    )
    grants = [s for s in statements if s.startswith("GRANT")]
    revokes = [s for s in statements if s.startswith("REVOKE ALL")]
    assert len(grants) == len(revokes) == len(statements) // 2
    for revoke, grant in zip(statements[::2], statements[1::2], strict=True):
        assert revoke.startswith("REVOKE ALL ON ")
        assert grant.startswith("GRANT ")
        assert revoke.split(" FROM ")[0].split(" ON ")[1] == grant.split(" TO ")[0].split(" ON ")[1]
    assert 'GRANT SELECT, INSERT ON TABLE public.audit_events TO "qbgw app"' in statements
    assert 'GRANT EXECUTE ON FUNCTION public.qbgw_audit_seal(jsonb) TO "qbgw app"' in statements
    assert 'GRANT USAGE ON SEQUENCE public.audit_events_id_seq TO "qbgw app"' in statements
    assert not any("ALL PRIVILEGES" in s or "WITH GRANT OPTION" in s for s in statements)
