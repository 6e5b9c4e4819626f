"""Roles: least privilege on PostgreSQL. What the application role (workers, producers, readers) may do on
qbgw's schema, granted by the schema's owner after every migration (``qbgw db roles``), and the check that an
owner-only command runs as the owner. Touches the catalog, GRANT/REVOKE and CREATE ROLE, nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from ..errors import ConfigError
from ..settings import Secret
from ..store import schema
from .db import describe_url, make_engine

__all__ = ["TABLES", "FUNCTIONS", "Grants", "grant_statements", "plan", "apply", "privileges", "require_owner"]

#: What the application role may do on each table, and why. No DELETE and no TRUNCATE anywhere: no statement
#: qbgw runs as the application needs them (a purge erases columns, never rows).
TABLES: dict[str, tuple[str, ...]] = {
    # Producers insert jobs; workers, the sweeper, cancel, replay, purge and key rotation update them, and
    # lock one with SELECT ... FOR UPDATE, which PostgreSQL allows only with UPDATE.
    "jobs": ("SELECT", "INSERT", "UPDATE"),
    # A batch is inserted, then its status moves (cancel, expiry, completion), under FOR UPDATE too.
    "batches": ("SELECT", "INSERT", "UPDATE"),
    # Append-only: events are inserted (by the seal) and read (queries, verify), never changed.
    "audit_events": ("SELECT", "INSERT"),
    # The seal locks the one head row (FOR UPDATE) and moves it; the migration made the row.
    "audit_chain_head": ("SELECT", "UPDATE"),
    # Block sealing (QBGW_AUDIT_SEAL=block) stages a transaction's events here; only qbgw_audit_seal_pending
    # (SECURITY DEFINER) deletes a staged row, in the transaction that chains it.
    "audit_pending": ("SELECT", "INSERT"),
    # qbgw serve reads keys; `qbgw api-keys` creates them and revokes or expires them (never deletes).
    "api_keys": ("SELECT", "INSERT", "UPDATE"),
    # Signing secrets are added and expired (rotation), deliveries made, leased and finished; never deleted.
    "webhook_secrets": ("SELECT", "INSERT", "UPDATE"),
    "webhook_deliveries": ("SELECT", "INSERT", "UPDATE"),
    # Console users are created, disabled and given new passwords (`qbgw users`), their failures counted;
    # sessions are started, touched and ended. Never deleted: a name stays taken, an ended session ended.
    "console_users": ("SELECT", "INSERT", "UPDATE"),
    "console_sessions": ("SELECT", "INSERT", "UPDATE"),
    # OpenAI-compatible files are uploaded, read, and erased by a delete or a purge (content set to NULL, the row
    # kept); an OpenAI batch's row is inserted with its batch and read. Key rotation re-encrypts both (UPDATE).
    "files": ("SELECT", "INSERT", "UPDATE"),
    "openai_batches": ("SELECT", "INSERT", "UPDATE"),
    # Every process checks the schema's revision before it starts.
    "alembic_version": ("SELECT",),
}

#: Functions the application calls: the seal and the stage, SECURITY INVOKER, so they run with the table grants
#: above; the block sealer, SECURITY DEFINER, as the one way a staged row leaves audit_pending (chained).
FUNCTIONS = ("qbgw_audit_seal(jsonb)", "qbgw_audit_stage(jsonb)", "qbgw_audit_seal_pending(integer)")

#: Every privilege a table can carry (``has_table_privilege`` names), for the check after granting.
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")

#: Who is connected, who owns table ``:t``, and whether the one may act as the other (a member, or a superuser).
OWNER_SQL = (
    "SELECT current_user, pg_get_userbyid(relowner), pg_has_role(relowner, 'USAGE') FROM pg_class "
    "WHERE oid = CAST(:t AS regclass)"
)


@dataclass(frozen=True)
class Grants:
    """What ``qbgw db roles`` did (or would do): the SQL, and what the role can do that it should not."""

    role: str
    statements: tuple[str, ...]
    created: bool
    warnings: tuple[str, ...] = ()

    @property
    def sql(self) -> str:
        """The statements as a script a DBA can read and run (``psql -f``)."""
        return "\n".join(["BEGIN;", *(f"{s};" for s in self.statements), "COMMIT;"])


def grant_statements(role: str, *, database: str, schema: str, sequences: Sequence[str], dialect: Dialect) -> list[str]:
    """The statements that leave ``role`` with exactly :data:`TABLES` and :data:`FUNCTIONS` on qbgw's objects,
    whatever it had before (each object's grants are revoked first), so running them again changes nothing."""
    quote = dialect.identifier_preparer.quote
    who = quote(role)
    statements = [
        f"REVOKE ALL ON DATABASE {quote(database)} FROM {who}",
        f"GRANT CONNECT ON DATABASE {quote(database)} TO {who}",
        f"REVOKE ALL ON SCHEMA {quote(schema)} FROM {who}",
        f"GRANT USAGE ON SCHEMA {quote(schema)} TO {who}",
    ]
    for table, allowed in TABLES.items():
        name = f"{quote(schema)}.{quote(table)}"
        statements += [f"REVOKE ALL ON TABLE {name} FROM {who}", f"GRANT {', '.join(allowed)} ON TABLE {name} TO {who}"]
    for sequence in sequences:  # the serial columns' sequences of the tables it inserts into: nextval only
        statements += [f"REVOKE ALL ON SEQUENCE {sequence} FROM {who}", f"GRANT USAGE ON SEQUENCE {sequence} TO {who}"]
    for function in FUNCTIONS:
        name = f"{quote(schema)}.{function}"
        statements += [f"REVOKE ALL ON FUNCTION {name} FROM {who}", f"GRANT EXECUTE ON FUNCTION {name} TO {who}"]
    return statements


def plan(url: str, role: str, *, create: bool = False) -> Grants:
    """What :func:`apply` would run on ``url`` for ``role``, without changing anything (``--print``).

    Raises:
        ConfigError: not PostgreSQL, the schema is not at the code's head, the connected role does not own it,
            the role is missing (and ``create`` is false), or it is a superuser or the schema's owner.
    """
    engine = _engine(url)
    try:
        with engine.connect() as connection:
            exists = _check(connection, role, url, create=create)
            statements = _statements(connection, role)
    finally:
        engine.dispose()
    creation = () if exists else (f"CREATE ROLE {engine.dialect.identifier_preparer.quote(role)} LOGIN",)
    return Grants(role, creation + tuple(statements), created=not exists)


def apply(url: str, role: str, *, create: bool = False, password: Secret | None = None) -> Grants:
    """Grant ``role`` exactly what workers, producers and readers need on ``url``'s schema (:data:`TABLES`,
    :data:`FUNCTIONS`, the sequences they insert through, CONNECT, schema USAGE), in one transaction; run by
    the schema's owner after every ``qbgw db upgrade``. With ``create``, a missing role is made (LOGIN, and
    ``password`` if given: hashed here, so the server never sees nor logs it).

    Raises:
        ConfigError: as :func:`plan`, or the connected role may not create roles.
    """
    engine = _engine(url)
    try:
        with engine.connect() as connection:
            exists = _check(connection, role, url, create=create)
            if not exists:
                _create_role(connection, role, password)
            statements = _statements(connection, role)
            for statement in statements:
                connection.execute(text(statement))
            connection.commit()
            warnings = _excess(connection, role)
    finally:
        engine.dispose()
    if exists and password:
        warnings.insert(0, "the role exists: its password was left as it is (ALTER ROLE ... PASSWORD changes it)")
    return Grants(role, tuple(statements), created=not exists, warnings=tuple(warnings))


def privileges(connection: Connection, role: str) -> dict[str, set[str]]:
    """What ``role`` can do on each of qbgw's tables, however it got it (directly, through PUBLIC or a role it
    belongs to, or as an owner or superuser)."""
    held: dict[str, set[str]] = {}
    for table in TABLES:
        rows = connection.execute(
            text(
                "SELECT p FROM unnest(CAST(:ps AS text[])) AS p "
                "WHERE has_table_privilege(CAST(:r AS name), CAST(:t AS text), p)"
            ),
            {"ps": list(TABLE_PRIVILEGES), "r": role, "t": table},
        )
        held[table] = {str(p) for (p,) in rows}
    return held


def require_owner(session: Session, *, table: str, command: str) -> None:
    """Refuse, before anything is written, a command that needs ``table``'s owner (only the owner, a member
    of it, or a superuser may disable its triggers). Nothing to check where there are no roles (SQLite).

    Raises:
        ConfigError: the session's role does not own ``table``.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    me, owner, owns = session.execute(text(OWNER_SQL), {"t": table}).one()
    if not owns:
        raise ConfigError(
            f"{command} needs the owner of {table} ({owner}): only the owner can lift its "
            f"append-only triggers. QBGW_DATABASE_URL connects as {me}, an application role; "
            "run it with the owner's URL"
        )


def _engine(url: str) -> Engine:
    engine = make_engine(url)
    if engine.dialect.name != "postgresql":
        engine.dispose()
        raise ConfigError(
            f"database roles apply to PostgreSQL only; {describe_url(url)} has none (on SQLite, "
            "the file's permissions decide who can read and write it)"
        )
    return engine


def _check(connection: Connection, role: str, url: str, *, create: bool) -> bool:
    """Whether ``role`` exists. Refuses a schema not at the code's head (the grants name its tables), a connected
    role that cannot grant on it, and a role whose grants would mean nothing (a superuser, the owner)."""
    current, head = schema.current_revision_of(connection), schema.head_revision(url)
    if current != head:
        raise ConfigError(
            f"the database is at revision {current or 'none'}, not {head}: run `qbgw db upgrade` "
            "first (the grants name the tables of the code's schema)"
        )
    me, owner, owns = connection.execute(text(OWNER_SQL), {"t": "audit_events"}).one()
    if not owns:  # PostgreSQL would only warn "no privileges were granted", and grant nothing
        raise ConfigError(
            f"{me} cannot grant on qbgw's tables: they belong to {owner}; run this with the URL of "
            f"{owner} (the role that ran `qbgw db upgrade`)"
        )
    found = connection.execute(
        text(
            "SELECT rolsuper, pg_has_role(oid, (SELECT relowner FROM pg_class WHERE oid = 'audit_events'::regclass),"
            " 'MEMBER') FROM pg_roles WHERE rolname = :r"
        ),
        {"r": role},
    ).first()
    connection.rollback()
    if found is None:
        if not create:
            raise ConfigError(f"no role {role}: create it (CREATE ROLE {role} LOGIN), or pass --create-role")
        return False
    superuser, member = found
    if superuser or member:
        what = "a superuser" if superuser else f"{owner}, the owner of qbgw's tables, or a member of it"
        raise ConfigError(
            f"{role} is {what}: it could alter the audit log whatever it is granted; give workers "
            "and producers a role of their own"
        )
    return True


def _create_role(connection: Connection, role: str, password: Secret | None) -> None:
    from psycopg import errors, sql

    raw: Any = connection.connection.dbapi_connection
    statement = sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role))
    if password:
        # libpq hashes it (SCRAM, as the server asks): the statement carries a verifier, never the password.
        verifier = raw.pgconn.encrypt_password(password.reveal().encode(), role.encode(), None)
        statement = sql.SQL("{} PASSWORD {}").format(statement, sql.Literal(verifier.decode()))
    try:
        with raw.cursor() as cursor:
            cursor.execute(statement)
        raw.commit()
    except (errors.DuplicateObject, errors.UniqueViolation):
        raw.rollback()  # made meanwhile by someone else: it exists, which is all this wanted
    except errors.InsufficientPrivilege:
        raw.rollback()
        raise ConfigError(
            f"cannot create role {role}: the connected role lacks CREATEROLE; have a superuser run "
            f"CREATE ROLE {role} LOGIN, then run this without --create-role"
        ) from None


def _statements(connection: Connection, role: str) -> list[str]:
    database, namespace = connection.execute(
        text(
            "SELECT current_database(), n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = 'audit_events'::regclass"
        )
    ).one()
    inserted = [table for table, allowed in TABLES.items() if "INSERT" in allowed]
    sequences = (
        connection.execute(
            text(
                "SELECT DISTINCT pg_get_serial_sequence(CAST(CAST(a.attrelid AS regclass) AS text), a.attname) AS s "
                "FROM pg_attribute a WHERE a.attrelid = ANY(CAST(:ts AS regclass[])) AND a.attnum > 0 "
                "AND NOT a.attisdropped AND pg_get_serial_sequence(CAST(CAST(a.attrelid AS regclass) AS text), "
                "a.attname) IS NOT NULL ORDER BY s"
            ),
            {"ts": inserted},
        )
        .scalars()
        .all()
    )
    connection.rollback()
    return grant_statements(
        role, database=database, schema=namespace, sequences=list(sequences), dialect=connection.dialect
    )


def _excess(connection: Connection, role: str) -> list[str]:
    """What ``role`` can still do beyond its grants (through PUBLIC or a role it belongs to)."""
    warnings = []
    for table, held in privileges(connection, role).items():
        extra = sorted(held - set(TABLES[table]))
        if extra:
            warnings.append(
                f"{role} can also {', '.join(extra)} on {table} (granted to PUBLIC or to a role it "
                "belongs to): revoke it there"
            )
    creates = connection.execute(
        text(
            "SELECT has_schema_privilege(:r, n.oid, 'CREATE') FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = 'audit_events'::regclass"
        ),
        {"r": role},
    ).scalar_one()
    if creates:
        warnings.append(
            f"{role} can create tables in qbgw's schema (PostgreSQL 14 and older grant that to PUBLIC): "
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC"
        )
    connection.rollback()
    return warnings
