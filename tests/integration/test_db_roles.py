"""Least privilege on PostgreSQL: the application role that ``qbgw db roles`` grants can run everything workers,
producers and readers do, and is refused every change to the audit log and the schema by its grants alone; the
owner-only commands say so; the command is idempotent and exact."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import Connection, create_engine, func, select, text, update
from sqlalchemy.exc import DBAPIError

from qbgw import admin, producer
from qbgw.admin import drop_audit_before, purge_phi, rotate_keys, sweep
from qbgw.audit import anchors as integrity
from qbgw.audit.crypto import Keyring
from qbgw.cli.main import EXIT, cli
from qbgw.control import cancel, cancel_batch, replay
from qbgw.errors import ConfigError
from qbgw.execution.tasks import run_attempt
from qbgw.lifecycle import JobStatus, utcnow
from qbgw.producer import submit_batch
from qbgw.queries import AuditFilter, audit_query, batch_results, get_job, job_events
from qbgw.runtime.locator import runtime
from qbgw.settings import Secret, Settings
from qbgw.store import roles
from qbgw.store.models import AuditEvent, Job
from tests.conftest import APP_ROLE, ASSISTANT, OWNER_ROLE, PgDatabase

#: The tests that take ``settings``: on PostgreSQL, where roles exist.
on_postgres = pytest.mark.parametrize("backend", ["postgres"])

#: What the application role must never do: each is refused by its grants (not by the append-only triggers).
REFUSED = {
    "update an event": "UPDATE audit_events SET actor = 'x'",
    "delete an event": "DELETE FROM audit_events",
    "truncate the log": "TRUNCATE audit_events",
    "disable the log's triggers": "ALTER TABLE audit_events DISABLE TRIGGER USER",
    "disable one trigger": "ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete",
    "drop a trigger": "DROP TRIGGER audit_events_no_update_delete ON audit_events",
    "drop the log": "DROP TABLE audit_events",
    "alter the log": "ALTER TABLE audit_events ADD COLUMN forged text",
    "rename the log": "ALTER TABLE audit_events RENAME TO old_events",
    "delete a job": "DELETE FROM jobs",
    "truncate jobs": "TRUNCATE jobs",
    "drop jobs": "DROP TABLE jobs",
    "alter jobs": "ALTER TABLE jobs ADD COLUMN x int",
    "replace the seal": "CREATE OR REPLACE FUNCTION qbgw_audit_seal(events jsonb) RETURNS TABLE "
    "(first_seq bigint, last_seq bigint, last_hash text) AS 'SELECT 1, 1, ''''' LANGUAGE sql",
    "drop the seal": "DROP FUNCTION qbgw_audit_seal(jsonb)",
    "create a table": "CREATE TABLE public.shadow_events (id int)",
    "move the schema's revision": "UPDATE alembic_version SET version_num = 'x'",
    "insert a chain head": "INSERT INTO audit_chain_head (id, seq, row_hash) VALUES (2, 0, 'x')",
}


#: "permission denied for table ..." or "must be owner of table ...".
INSUFFICIENT_PRIVILEGE = "42501"


@pytest.fixture
def app_db(settings: Settings) -> Iterator[Connection]:
    """A connection as the application role (the settings' own URL)."""
    engine = create_engine(settings.effective_database_url)
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def run_job(settings: Settings, content: str = "Hi") -> str:
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": content}], actor="clinic-app", settings=settings)
    run_attempt(runtime(settings), job_id)
    return job_id


@pytest.mark.parametrize("statement", list(REFUSED.values()), ids=list(REFUSED))
@on_postgres
def test_the_app_role_is_refused_by_its_grants(settings: Settings, app_db: Connection, statement: str) -> None:
    run_job(settings)
    with pytest.raises(DBAPIError) as refused:
        app_db.execute(text(statement))
    app_db.rollback()
    assert getattr(refused.value.orig, "sqlstate", None) == INSUFFICIENT_PRIVILEGE
    assert "append-only" not in str(refused.value)  # refused before any trigger could run
    assert admin.verify_log(settings=settings).ok


@on_postgres
def test_the_app_role_holds_exactly_its_grants(pg: PgDatabase, app_db: Connection) -> None:
    assert roles.privileges(app_db, APP_ROLE) == {table: set(allowed) for table, allowed in roles.TABLES.items()}
    superuser, creates, seals = app_db.execute(
        text(
            "SELECT rolsuper, has_schema_privilege(current_user, 'public', 'CREATE'), "
            "has_function_privilege(current_user, 'qbgw_audit_seal(jsonb)', 'EXECUTE') FROM pg_roles "
            "WHERE rolname = current_user"
        )
    ).one()
    assert (superuser, creates, seals) == (False, False, True)


@on_postgres
def test_a_whole_jobs_life_works_as_the_app_role(settings: Settings) -> None:
    assert settings.database_url.startswith(f"postgresql+psycopg://{APP_ROLE}@")
    done = run_job(settings)  # submit, claim, call, record: the hot path's seal on the app role's grants
    assert get_job(done, reader="nurse", settings=settings).answer
    waiting = producer.submit(ASSISTANT, [{"role": "user", "content": "later"}], settings=settings)
    assert cancel(waiting, actor="operator", settings=settings) is JobStatus.CANCELLED
    failed = run_job(settings, "[[emulator:fail=400]]")
    assert get_job(failed, settings=settings).status is JobStatus.FAILED
    assert replay(failed, actor="operator", settings=settings) == 2
    batch = submit_batch(
        [f'{{"custom_id": "r{i}", "messages": [{{"role": "user", "content": "q{i}"}}]}}' for i in range(3)],
        assistant_id=ASSISTANT,
        settings=settings,
    )
    with runtime(settings).transaction() as session:
        first = session.scalars(select(Job.id).where(Job.batch_id == batch.id).order_by(Job.custom_id)).first()
        assert first is not None
    run_attempt(runtime(settings), first)
    assert cancel_batch(batch.id, actor="operator", settings=settings).status == "cancelled"
    assert len(batch_results(batch.id, reader="auditor", settings=settings)) == 3
    sweep(settings=settings, grace=0)
    with runtime(settings).transaction() as session:
        session.execute(update(Job).where(Job.id == done).values(finished_at=utcnow() - timedelta(days=40)))
    assert purge_phi(older_than=timedelta(days=30), actor="retention-job", settings=settings) == 1
    on_file = settings.with_(encryption_keys=Secret(""))
    Keyring.from_spec(settings.encryption_keys.reveal()).save(on_file.keyring_path)
    assert rotate_keys(actor="security-officer", settings=on_file).values_reencrypted >= 1
    assert audit_query(AuditFilter(job_id=done), reader="auditor", settings=on_file)
    assert [e.action for e in job_events(done, settings=on_file)][-1] == "job.purged"
    admin.anchor_now(settings=on_file)
    assert admin.verify_log(reader="auditor", settings=on_file).ok


@on_postgres
def test_audit_drop_as_the_app_role_names_the_owner_and_writes_nothing(settings: Settings) -> None:
    run_job(settings)
    short = settings.with_(audit_retention_days=0)
    with pytest.raises(ConfigError, match=f"needs the owner of audit_events \\({OWNER_ROLE}\\)"):
        drop_audit_before(before=utcnow(), settings=short)
    assert all(anchor.kind != "base" for anchor in integrity.read_anchors(short.anchor_path))
    result = CliRunner().invoke(cli, ["audit", "drop", "--before", utcnow().isoformat(), "--yes"], env=short.to_env())
    assert result.exit_code == EXIT["config"]
    assert "run it with the owner's URL" in result.stderr
    with runtime(settings).transaction() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 4


@on_postgres
def test_roles_again_changes_nothing_and_takes_back_what_it_did_not_grant(pg: PgDatabase, app_db: Connection) -> None:
    owner = create_engine(pg.owner)
    try:
        with owner.begin() as db:
            db.execute(text(f"GRANT DELETE, TRUNCATE ON audit_events TO {APP_ROLE}"))
            db.execute(text(f"GRANT ALL ON jobs, audit_chain_head TO {APP_ROLE}"))
    finally:
        owner.dispose()
    assert "DELETE" in roles.privileges(app_db, APP_ROLE)["audit_events"]
    app_db.rollback()
    planned = roles.plan(pg.owner, APP_ROLE)
    applied = roles.apply(pg.owner, APP_ROLE)
    assert applied.statements == planned.statements
    assert not applied.created
    assert applied.warnings == ()
    assert roles.privileges(app_db, APP_ROLE) == {table: set(allowed) for table, allowed in roles.TABLES.items()}
    assert roles.apply(pg.owner, APP_ROLE).statements == applied.statements


def test_roles_refuses_a_role_that_could_alter_the_log_anyway(pg: PgDatabase) -> None:
    with pytest.raises(ConfigError, match="owner of qbgw's tables"):
        roles.apply(pg.owner, OWNER_ROLE)
    with pytest.raises(ConfigError, match="a superuser"):
        roles.apply(pg.owner, "postgres")


def test_roles_run_as_the_app_role_is_refused_naming_the_owner(pg: PgDatabase) -> None:
    with pytest.raises(ConfigError, match=f"belong to {OWNER_ROLE}; run this with the URL of {OWNER_ROLE}"):
        roles.apply(pg.app, APP_ROLE)


def test_create_role_needs_createrole_and_never_shows_the_password(pg: PgDatabase) -> None:
    role, password = f"qbgw_test_app_{uuid.uuid4().hex[:8]}", "pw-never-shown-5a1f"
    env = {"QBGW_DATABASE_URL": pg.owner, "QBGW_APP_ROLE_PASSWORD": password}
    runner = CliRunner()
    missing = runner.invoke(cli, ["db", "roles", "--app-role", role], env=env)
    assert missing.exit_code == EXIT["config"]
    assert "--create-role" in missing.stderr
    denied = runner.invoke(cli, ["db", "roles", "--app-role", role, "--create-role"], env=env)
    assert denied.exit_code == EXIT["config"]
    assert "lacks CREATEROLE" in denied.stderr
    printed = runner.invoke(cli, ["db", "roles", "--app-role", role, "--create-role", "--print"], env=env)
    assert printed.exit_code == 0
    assert f"CREATE ROLE {role} LOGIN;" in printed.stdout
    admin = create_engine(pg.admin, isolation_level="AUTOCOMMIT")
    try:
        made = runner.invoke(
            cli, ["db", "roles", "--app-role", role, "--create-role"], env={**env, "QBGW_DATABASE_URL": pg.admin}
        )  # a DBA with CREATEROLE
        assert made.exit_code == 0, made.output
        assert f"role {role} created, and granted" in made.stdout
        for output in (missing, denied, printed, made):
            assert password not in output.output
        with admin.connect() as db:
            login, stored = db.execute(
                text("SELECT rolcanlogin, rolpassword FROM pg_authid WHERE rolname = :r"), {"r": role}
            ).one()
            assert login
            assert stored.startswith("SCRAM-SHA-256$")
            assert password not in stored
            assert roles.privileges(db, role) == {table: set(allowed) for table, allowed in roles.TABLES.items()}
        assert "created without a password" not in made.stderr
        bare = f"{role}_bare"
        unset = runner.invoke(
            cli,
            ["db", "roles", "--app-role", bare, "--create-role"],
            env={**env, "QBGW_DATABASE_URL": pg.admin, "QBGW_APP_ROLE_PASSWORD": ""},
        )
        assert unset.exit_code == 0, unset.output
        assert f"role {bare} was created without a password" in unset.stderr
    finally:
        with admin.connect() as db:
            for name in (role, f"{role}_bare"):
                if db.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": name}).first():
                    db.execute(text(f"DROP OWNED BY {name}"))
                    db.execute(text(f"DROP ROLE {name}"))
        admin.dispose()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_roles_on_sqlite_say_roles_do_not_apply(settings: Settings) -> None:
    env = {**settings.to_env(), "QBGW_DATABASE_URL": settings.effective_database_url}
    result = CliRunner().invoke(cli, ["db", "roles", "--app-role", "anyone"], env=env)
    assert result.exit_code == EXIT["config"]
    assert "PostgreSQL only" in result.stderr
