"""The audit trail as an auditor uses it: complete events, audited reads, queries and exports,
encrypted PHI bound to its row, key rotation and retention, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text, update

from qbgw import admin, producer, queries
from qbgw.admin import count_by_key, purge_phi, rotate_keys
from qbgw.audit import anchors as integrity
from qbgw.audit import events as audit
from qbgw.audit.crypto import Keyring
from qbgw.cli.main import EXIT, cli
from qbgw.errors import DecryptionFailed
from qbgw.execution.tasks import run_attempt
from qbgw.lifecycle import utcnow
from qbgw.queries import AuditFilter, audit_query, get_job, job_events
from qbgw.runtime.locator import reset as reset_runtimes
from qbgw.runtime.locator import runtime
from qbgw.settings import Secret, Settings
from qbgw.store import chain
from qbgw.store.models import Job
from tests.conftest import ASSISTANT, TOKEN, as_owner

PHI = "Patient Quorra Vantablack-Essien reports chest pain"


def run_job(settings: Settings, content: str = PHI, actor: str = "clinic-app") -> str:
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": content}], actor=actor, settings=settings)
    run_attempt(runtime(settings), job_id)
    return job_id


def test_events_say_who_what_when_and_carry_no_content(settings: Settings) -> None:
    job_id = run_job(settings)
    events = job_events(job_id, settings=settings)
    submitted, request, response, succeeded = events
    assert submitted.action == "job.submitted"
    assert submitted.actor == "clinic-app"
    assert request.actor == response.actor == succeeded.actor
    assert ":" in request.actor
    assert request.assistant_id == ASSISTANT
    assert request.token_fp == audit.fingerprint(TOKEN)
    assert request.request_digest
    assert request.request_bytes
    assert response.response_digest
    assert response.latency_ms >= 0
    assert response.http_status == 200
    assert response.outcome == "answer"
    assert succeeded.attempt == 1
    dumped = json.dumps([e.as_dict() for e in events])
    assert "Quorra" not in dumped
    assert TOKEN not in dumped


def test_phi_columns_are_ciphertext_and_a_moved_ciphertext_fails(settings: Settings) -> None:
    first, second = run_job(settings), run_job(settings, "another patient")
    with runtime(settings).transaction() as session:
        row = session.get(Job, first)
        assert row is not None
        assert row.payload is not None
        assert row.answer is not None
        assert "Quorra" not in row.payload + row.answer
        assert row.payload.startswith("v1:ktest:")
        session.execute(update(Job).where(Job.id == second).values(answer=row.answer))  # moved to another row
    with pytest.raises(DecryptionFailed, match=f"jobs.answer of row {second}: authentication failed"):
        get_job(second, settings=settings)
    assert get_job(first, settings=settings).answer is not None


def test_reading_a_result_is_audited_with_the_reader(settings: Settings) -> None:
    job_id = run_job(settings)
    get_job(job_id, reader="dr-okafor", settings=settings)
    reads = [e for e in job_events(job_id, include_reads=True, settings=settings) if e.action == "result.read"]
    assert [(e.actor, e.outcome) for e in reads] == [("dr-okafor", "succeeded")]
    queries.job_status(job_id, settings=settings)  # a status poll carries no PHI and is not a read
    assert len([e for e in job_events(job_id, include_reads=True, settings=settings) if e.action == "result.read"]) == 1


def test_audit_queries_filter_and_are_themselves_audited(settings: Settings) -> None:
    job_id = run_job(settings, actor="app-a")
    run_job(settings, "other", actor="app-b")
    mine = audit_query(AuditFilter(job_id=job_id), reader="auditor-1", settings=settings)
    assert {e.job_id for e in mine} == {job_id}
    assert len(mine) == 4
    by_actor = audit_query(AuditFilter(actor="app-b", action="job.submitted"), settings=settings)
    assert len(by_actor) == 1
    since = audit_query(AuditFilter(since=utcnow() + timedelta(hours=1)), settings=settings)
    assert since == []
    logged = audit_query(AuditFilter(action="audit.queried", actor="auditor-1"), settings=settings)
    assert logged[0].detail["filter"] == {"job_id": job_id, "limit": 1000}
    assert logged[0].detail["events"] == 4


def test_the_cli_exports_json_lines_and_csv_and_verifies(settings: Settings) -> None:
    job_id = run_job(settings)
    env = {**settings.to_env(), "QBGW_ACTOR": "auditor-2"}
    runner = CliRunner()
    reset_runtimes()
    lines = runner.invoke(cli, ["audit", "--job", job_id, "--format", "jsonl"], env=env).stdout.splitlines()
    assert [json.loads(line)["action"] for line in lines] == [
        "job.submitted",
        "attempt.request",
        "attempt.response",
        "job.succeeded",
    ]
    rows = list(
        csv.DictReader(io.StringIO(runner.invoke(cli, ["audit", "--job", job_id, "--format", "csv"], env=env).stdout))
    )
    assert len(rows) == 4
    assert rows[0]["action"] == "job.submitted"
    whole = runner.invoke(cli, ["audit", "--job", job_id, "--format", "jsonl"], env=env)
    assert "there may be more" not in whole.stderr
    cut = runner.invoke(cli, ["audit", "--job", job_id, "--format", "jsonl", "--limit", "2"], env=env)
    assert len(cut.stdout.splitlines()) == 2
    assert "qbgw: 2 events shown, the --limit; there may be more" in cut.stderr
    table = runner.invoke(cli, ["audit", "--action", "audit.exported"], env=env).stdout
    assert table.count("audit.exported") == 4
    assert "auditor-2" in table
    verified = runner.invoke(cli, ["audit", "verify"], env=env)
    assert verified.exit_code == 0
    assert verified.stdout.startswith("ok: ")
    assert runner.invoke(cli, ["audit", "--since", "yesterday"], env=env).exit_code == 2


def test_verify_exits_9_naming_the_tampered_event(settings: Settings, owner_url: str) -> None:
    run_job(settings)
    with as_owner(owner_url) as db:
        db.execute(text("UPDATE audit_events SET actor = 'nobody' WHERE seq = 2"))
    reset_runtimes()
    result = CliRunner().invoke(cli, ["audit", "verify"], env=settings.to_env())
    assert result.exit_code == EXIT["tampered"]
    assert "event seq 2 was altered" in result.stderr


def test_a_value_encrypted_before_the_switch_and_committed_seconds_later_is_reencrypted(settings: Settings) -> None:
    """A transaction that encrypted with the old key before its process switched (a chunk of a large batch) and
    committed 2 s after the new key was saved: the rotation, still looking, re-encrypts it (it looked for half a
    second after every process had switched, and left the value under the old key)."""
    import threading
    import time

    from qbgw.audit.crypto import aad_for

    on_file = settings.with_(encryption_keys=Secret(""))
    Keyring({"k0": b"\x01" * 32}, "k0").save(on_file.keyring_path)
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": PHI}], settings=on_file)
    before_switch = Keyring.load(on_file.keyring_path)  # what a process held before it followed the new key
    late = before_switch.encrypt('{"messages":[]}', aad=aad_for("jobs", "payload", job_id))

    def commit_late() -> None:
        deadline = time.monotonic() + 30
        while Keyring.load(on_file.keyring_path).primary == "k0" and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(2.0)
        with runtime(on_file).transaction() as session:
            session.execute(update(Job).where(Job.id == job_id).values(payload=late))

    committer = threading.Thread(target=commit_late)
    committer.start()
    rotation = rotate_keys(actor="security-officer", settings=on_file)
    committer.join(30)
    assert set(count_by_key(settings=on_file)) == {rotation.new_primary}


def test_keys_rotate_while_jobs_keep_running(settings: Settings) -> None:
    on_file = settings.with_(encryption_keys=Secret(""), database_url=settings.database_url)
    if on_file.database_url:  # PostgreSQL needs a keyring file given; make one like an operator would
        Keyring({"k0": b"\x01" * 32}, "k0").save(on_file.keyring_path)
    before = run_job(on_file)
    old = runtime(on_file).keyring.primary
    # A second process (an operator's `qbgw keys rotate`) rotates while this one keeps working.
    rotation = rotate_keys(actor="security-officer", settings=on_file)
    assert rotation.old_primary == old
    assert rotation.values_reencrypted >= 2
    after = run_job(on_file, "after the rotation")
    assert set(count_by_key(settings=on_file)) == {rotation.new_primary}
    assert get_job(before, settings=on_file).answer
    assert get_job(after, settings=on_file).answer
    rotated = audit_query(AuditFilter(action="key.rotated"), settings=on_file)
    assert rotated[0].actor == "security-officer"
    assert rotated[0].detail["new_primary"] == rotation.new_primary


def test_key_rotation_reencrypts_webhook_urls_and_signing_secrets(settings: Settings) -> None:
    from qbgw import access, producer
    from qbgw.store.models import ApiKey, WebhookDelivery, WebhookSecret

    on_file = settings.with_(encryption_keys=Secret(""), webhooks_development=True)
    if on_file.database_url:
        Keyring({"k0": b"\x01" * 32}, "k0").save(on_file.keyring_path)
    _, key = access.create_key("web", "submitter", webhook_url="https://hooks.example/a?t=1", settings=on_file)
    secret = access.webhook_secret("web", settings=on_file)
    producer.submit(
        ASSISTANT,
        [{"role": "user", "content": "x"}],
        webhook_url="http://127.0.0.1:9/h",
        actor="key:web",
        settings=on_file,
    )
    rotation = rotate_keys(actor="security-officer", settings=on_file)
    prefix = f"v1:{rotation.new_primary}:"
    with runtime(on_file).transaction() as session:
        stored = [
            *session.scalars(select(ApiKey.webhook_url)),
            *session.scalars(select(WebhookSecret.secret)),
            *session.scalars(select(WebhookDelivery.url)),
        ]
    assert len(stored) == 3
    assert all(value.startswith(prefix) for value in stored), stored
    assert access.webhook_secret("web", settings=on_file) == secret  # still readable, under the new key
    principal = access.authenticate(key, settings=on_file)
    assert principal.webhook_url == "https://hooks.example/a?t=1"  # decrypted under the new key


def test_purge_erases_phi_and_keeps_the_chain_verifiable(settings: Settings) -> None:
    old, recent = run_job(settings), run_job(settings, "recent")
    with runtime(settings).transaction() as session:
        session.execute(update(Job).where(Job.id == old).values(finished_at=utcnow() - timedelta(days=40)))
    assert purge_phi(older_than=timedelta(days=30), actor="retention-job", settings=settings) == 1
    gone, kept = get_job(old, settings=settings), get_job(recent, settings=settings)
    assert gone.answer is None
    assert gone.status == "succeeded"
    assert kept.answer is not None
    with runtime(settings).transaction() as session:
        row = session.get(Job, old)
        assert row is not None
        assert row.payload is None
        assert row.purged_at is not None
    assert [e.action for e in job_events(old, settings=settings)][-1] == "job.purged"
    with runtime(settings).transaction() as session:
        integrity.write_anchor(settings, *chain.head(session))
    assert admin.verify_log(settings=settings).ok


def test_dropping_old_events_is_explicit_refused_within_retention_and_keeps_the_chain(
    owner_settings: Settings, owner_url: str
) -> None:
    from qbgw.admin import drop_audit_before
    from qbgw.errors import JobStateConflict

    with pytest.raises(JobStateConflict, match="younger than 2190 days"):
        drop_audit_before(before=utcnow(), settings=owner_settings)
    short = owner_settings.with_(audit_retention_days=0)  # only the owner can drop events
    first = run_job(short)
    cutoff = utcnow()
    second = run_job(short, "kept")
    nothing = CliRunner().invoke(cli, ["audit", "drop", "--before", "2020-01-01", "--yes"], env=short.to_env())
    assert nothing.exit_code == 0, nothing.output
    assert nothing.stdout.startswith("nothing to drop: no event occurred before 2020-01-01")
    dropped = drop_audit_before(before=cutoff, actor="records-officer", settings=short)
    assert dropped.events == 4
    assert dropped.through_seq == 4
    assert job_events(first, settings=short) == []  # the job stays; its old events are gone
    assert len(job_events(second, settings=short)) == 4
    report = admin.verify_log(settings=short)
    assert report.ok, report.problem
    # The base is signed: deleting the next event is still caught.
    with as_owner(owner_url) as db:
        db.execute(text("DELETE FROM audit_events WHERE seq = 5"))
    problem = admin.verify_log(settings=short).problem
    assert problem is not None
    assert problem.seq == 5
    assert "missing" in problem.message


@pytest.mark.parametrize("backend", ["postgres"])
def test_an_event_that_cannot_be_written_takes_its_change_down_with_it(
    settings: Settings, owner_settings: Settings
) -> None:
    # The audit event and the status change are one transaction: make the event's INSERT fail
    # and the job must not have moved either (no change without its event, no event in the background).
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": "Hi"}], settings=settings)
    owner = runtime(owner_settings)  # only the owner can add a trigger
    with owner.transaction() as session:
        session.execute(
            text(
                "CREATE FUNCTION qbgw_test_refuse() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'audit store down'; END; $$ LANGUAGE plpgsql"
            )
        )
        session.execute(
            text(
                "CREATE TRIGGER qbgw_test_refuse BEFORE INSERT ON audit_events "
                "FOR EACH ROW EXECUTE FUNCTION qbgw_test_refuse()"
            )
        )
    try:
        with pytest.raises(Exception, match="audit store down"):
            run_attempt(runtime(settings), job_id)
        assert queries.job_status(job_id, settings=settings) == "queued"
        with runtime(settings).transaction() as session:
            row = session.get(Job, job_id)
            assert row is not None
            assert row.attempts == 0
            assert row.claimed_by is None
    finally:
        with owner.transaction() as session:
            session.execute(text("DROP TRIGGER qbgw_test_refuse ON audit_events"))
            session.execute(text("DROP FUNCTION qbgw_test_refuse()"))
    assert run_attempt(runtime(settings), job_id).value == "succeeded"
    assert [e.action for e in job_events(job_id, settings=settings)] == [
        "job.submitted",
        "attempt.request",
        "attempt.response",
        "job.succeeded",
    ]
