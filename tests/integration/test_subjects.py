"""Subjects and the access report, on SQLite and PostgreSQL: a subject is stored encrypted with a keyed blind
index, never in clear (in any table, the logs or the broker); its events carry the index, hashed into the chain;
the access report finds the subject's jobs, attempts, reads, cancellations and purges, and is itself audited."""

from __future__ import annotations

import io
import json
import logging
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, select, text

import qbgw
from qbgw import admin, control, errors, messages, producer, queries, reports
from qbgw.audit import anchors as integrity
from qbgw.audit.events import Action
from qbgw.cli.main import cli
from qbgw.execution.tasks import run_attempt
from qbgw.lifecycle import utcnow
from qbgw.runtime.locator import runtime
from qbgw.settings import Secret, Settings
from qbgw.store import chain
from qbgw.store.models import AuditEvent, Job
from tests.conftest import ASSISTANT, as_owner

SUBJECT = "MRN-7731-QZX"
KEY = "k" * 40
MESSAGES = [{"role": "user", "content": "Summarise the visit note."}]


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    return settings.with_(subject_key=Secret(KEY))


def _index(settings: Settings, subject: str = SUBJECT) -> str:
    return runtime(settings).subject_key.index(subject)


def _story(settings: Settings) -> dict[str, str]:
    """Four jobs about the subject (run and read; cancelled; purged) and one about someone else."""
    ran = producer.submit(ASSISTANT, MESSAGES, subject=f"  {SUBJECT}\t", actor="key:intake", settings=settings)
    run_attempt(runtime(settings), ran)
    queries.get_job(ran, reader="key:nurse", settings=settings)
    cancelled = producer.submit(ASSISTANT, MESSAGES, subject=SUBJECT, actor="key:intake", settings=settings)
    control.cancel(cancelled, actor="key:intake", settings=settings)
    other = producer.submit(ASSISTANT, MESSAGES, subject="MRN-0000-OTHER", settings=settings)
    run_attempt(runtime(settings), other)
    batch = producer.submit_batch(
        [{"custom_id": "b1", "smart_chat_assistant_id": ASSISTANT, "messages": MESSAGES, "subject": SUBJECT}],
        actor="key:batcher",
        settings=settings,
    )
    with runtime(settings).transaction() as session:
        in_batch = session.scalars(select(Job.id).where(Job.batch_id == batch.id)).one()
    run_attempt(runtime(settings), in_batch)
    queries.batch_results(batch.id, reader="key:exporter", settings=settings)
    admin.purge_phi(older_than=timedelta(0), actor="operator", settings=settings)
    return {"ran": ran, "cancelled": cancelled, "other": other, "in_batch": in_batch}


def test_a_subject_is_stored_encrypted_with_its_index_and_purged_with_the_payload(keyed: Settings) -> None:
    job_id = producer.submit(ASSISTANT, MESSAGES, subject=SUBJECT, settings=keyed)
    with runtime(keyed).transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.subject is not None
        assert job.subject.startswith("v1:")
        assert SUBJECT not in job.subject
        assert job.subject_index == _index(keyed)
        submitted = session.scalars(select(AuditEvent).where(AuditEvent.job_id == job_id)).one()
        assert submitted.subject_index == _index(keyed)
    run_attempt(runtime(keyed), job_id)
    with runtime(keyed).transaction() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.job_id == job_id)).all()
        assert {e.action for e in events} >= {"attempt.request", "attempt.response", "job.succeeded"}
        assert all(e.subject_index == _index(keyed) for e in events), [(e.action, e.subject_index) for e in events]
    admin.purge_phi(older_than=timedelta(0), settings=keyed)
    with runtime(keyed).transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.subject is None
        assert job.payload is None
        assert job.subject_index == _index(keyed)  # still found by the report after a purge


def test_the_index_is_keyed_normalised_and_not_the_phi_key(keyed: Settings) -> None:
    key = runtime(keyed).subject_key
    assert key.index(messages.validate_subject(f" {SUBJECT}\n")) == key.index(SUBJECT)
    assert key.index(SUBJECT.lower()) != key.index(SUBJECT)  # case is kept
    other = keyed.with_(subject_key=Secret("z" * 40))
    assert runtime(other).subject_key.index(SUBJECT) != key.index(SUBJECT)
    assert SUBJECT not in repr(key)
    assert KEY not in repr(key)


@pytest.mark.parametrize(
    ("subject", "says"),
    [
        ("", "got an empty one"),
        ("   \t ", "got an empty one"),
        ("M" * 256, "got 256 characters"),
        ("MRN\x0042", "U+0000"),
        ("MRN\x1b42", "U+001B"),
        ("MRN\x8542", "U+0085"),
        (42, "got int"),
    ],
)
def test_a_bad_subject_is_refused_naming_the_field_and_nothing_is_stored(
    keyed: Settings, subject: object, says: str
) -> None:
    with pytest.raises(errors.InvalidMessages) as caught:
        producer.submit(ASSISTANT, MESSAGES, subject=subject, settings=keyed)  # type: ignore[arg-type]
    assert str(caught.value).startswith("subject: must be a non-empty string of at most 255 characters")
    assert says in str(caught.value)
    with runtime(keyed).transaction() as session:
        assert session.scalar(select(Job.id)) is None
    with pytest.raises(errors.InvalidBatch) as batch:
        producer.submit_batch(
            [{"custom_id": "a", "smart_chat_assistant_id": ASSISTANT, "messages": MESSAGES, "subject": subject}],
            settings=keyed,
        )
    assert "subject: must be" in str(batch.value.problems)


def test_postgres_without_a_subject_key_refuses_a_subject_and_stores_nothing(settings: Settings, backend: str) -> None:
    if backend == "sqlite":  # the embedded default makes its key
        producer.submit(ASSISTANT, MESSAGES, subject=SUBJECT, settings=settings)
        assert (settings.data_dir / "subject.key").stat().st_mode & 0o777 == 0o600
        return
    with pytest.raises(errors.SubjectKeyMissing, match="QBGW_SUBJECT_KEY"):
        producer.submit(ASSISTANT, MESSAGES, subject=SUBJECT, settings=settings)
    with pytest.raises(errors.SubjectKeyMissing):
        producer.submit_batch(
            [{"custom_id": "a", "smart_chat_assistant_id": ASSISTANT, "messages": MESSAGES, "subject": SUBJECT}],
            settings=settings,
        )
    with pytest.raises(errors.SubjectKeyMissing):
        reports.access_report(SUBJECT, settings=settings)
    producer.submit(ASSISTANT, MESSAGES, settings=settings)  # no subject: no key needed
    with runtime(settings).transaction() as session:
        assert session.scalars(select(Job.subject_index)).all() == [None]


def test_the_access_report_tells_everything_done_with_the_subjects_jobs(keyed: Settings) -> None:
    jobs = _story(keyed)
    report = qbgw.access_report(SUBJECT, actor="key:privacy", settings=keyed)
    assert report.subject_index == _index(keyed)
    assert [j.job_id for j in report.jobs] == [jobs["ran"], jobs["cancelled"], jobs["in_batch"]]
    assert report.chain_ok, report.chain_detail
    ran = report.jobs[0]
    assert ran.submitted_by == "key:intake"
    assert ran.disclosures == 1
    assert ran.readers == ("key:nurse",)
    assert report.jobs[1].status == "cancelled"
    assert report.jobs[1].disclosures == 0
    assert all(j.purged for j in report.jobs if j.status != "cancelled") or report.jobs[0].purged
    rows = report.rows()
    assert set(rows[0]) == {"time", "job_id", "kind", "actor", "detail"}
    kinds = {(r["job_id"], r["kind"]) for r in rows}
    assert {
        (jobs["ran"], "job.submitted"),
        (jobs["ran"], "attempt.request"),
        (jobs["ran"], "attempt.response"),
        (jobs["ran"], "result.read"),
        (jobs["ran"], "job.purged"),
        (jobs["cancelled"], "job.cancelled"),
        (jobs["in_batch"], "attempt.request"),
        (jobs["in_batch"], "result.read"),
        ("", "batch.exported"),
    } <= kinds
    assert not any(r["job_id"] == jobs["other"] for r in rows)
    response = next(r for r in rows if r["job_id"] == jobs["ran"] and r["kind"] == "attempt.response")
    assert "http 200" in response["detail"]
    assert f"assistant {ASSISTANT}" in response["detail"]
    with runtime(keyed).transaction() as session:
        ran_event = session.scalars(select(AuditEvent).where(AuditEvent.action == Action.ACCESS_REPORTED)).one()
    assert ran_event.actor == "key:privacy"
    assert ran_event.subject_index == _index(keyed)
    assert ran_event.job_id is None
    assert SUBJECT not in (ran_event.detail or "")
    again = qbgw.access_report(SUBJECT, settings=keyed)  # the first report is in the second
    assert any(r["kind"] == "audit.access_report" and r["actor"] == "key:privacy" for r in again.rows())


def test_the_period_bounds_the_events_and_the_verification(keyed: Settings) -> None:
    _story(keyed)
    later = utcnow() + timedelta(hours=1)
    empty = qbgw.access_report(SUBJECT, start=later, settings=keyed)
    assert empty.jobs == ()
    assert empty.rows() == []
    assert empty.chain_ok
    earlier = utcnow() - timedelta(hours=1)
    within = qbgw.access_report(SUBJECT, start=earlier, end=later, settings=keyed)
    assert len(within.jobs) == 3
    assert "recomputed and linked" in within.chain_detail
    with pytest.raises(errors.InvalidMessages, match="from: must be before to"):
        qbgw.access_report(SUBJECT, start=later, end=earlier, settings=keyed)


def test_renderings_are_complete_and_escaped(keyed: Settings) -> None:
    job_id = producer.submit(ASSISTANT, MESSAGES, subject=SUBJECT, actor="<script>x</script>", settings=keyed)
    report = qbgw.access_report(SUBJECT, settings=keyed)
    page = qbgw.render_html(report)
    assert "<script>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page
    assert "http://" not in page
    assert "https://" not in page
    assert "src=" not in page
    assert job_id in page
    assert report.subject_index in page
    assert SUBJECT not in page
    lines = qbgw.render_jsonl(report).splitlines()
    assert '"chain_ok": true' in lines[0]
    assert job_id in lines[1]
    csv_text = qbgw.render_csv(report)
    assert csv_text.splitlines()[0] == "time,job_id,kind,actor,detail"
    assert job_id in csv_text
    assert job_id in qbgw.render_table(report)


def test_every_rendering_but_csv_gives_each_job_s_disclosures_and_readers(keyed: Settings) -> None:
    job_id = producer.submit(ASSISTANT, MESSAGES, subject=SUBJECT, actor="front-desk", settings=keyed)
    run_attempt(runtime(keyed), job_id)
    qbgw.get_job(job_id, reader="dr-a", settings=keyed)
    qbgw.get_job(job_id, reader="dr-b", settings=keyed)
    report = qbgw.access_report(SUBJECT, settings=keyed)
    (summary,) = json.loads(qbgw.render_jsonl(report).splitlines()[0])["report"]["job_summaries"]
    assert summary["job_id"] == job_id
    assert (summary["submitted_by"], summary["status"], summary["purged"]) == ("front-desk", "succeeded", False)
    assert (summary["disclosures"], summary["reads"], summary["readers"]) == (1, 2, ["dr-a", "dr-b"])
    assert f"job {job_id}: submitted " in qbgw.render_table(report)
    assert "by front-desk, succeeded, sent 1 time(s), read 2 time(s) by dr-a, dr-b" in qbgw.render_table(report)


def test_a_changed_subject_index_is_caught_by_verify_and_by_the_report(keyed: Settings, owner_url: str) -> None:
    job_id = producer.submit(ASSISTANT, MESSAGES, subject=SUBJECT, settings=keyed)
    run_attempt(runtime(keyed), job_id)
    with runtime(keyed).transaction() as session:
        integrity.write_anchor(keyed, *chain.head(session))
        seq = session.scalar(
            select(AuditEvent.seq).where(AuditEvent.job_id == job_id, AuditEvent.action == "attempt.request")
        )
    assert admin.verify_log(settings=keyed).ok
    with as_owner(owner_url) as db:
        if db.dialect.name == "postgresql":
            db.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
        db.execute(
            text("UPDATE audit_events SET subject_index = :other WHERE seq = :seq"), {"other": "0" * 64, "seq": seq}
        )
        if db.dialect.name == "postgresql":
            db.execute(text("ALTER TABLE audit_events ENABLE TRIGGER USER"))
    problem = admin.verify_log(settings=keyed).problem
    assert problem is not None
    assert problem.seq == seq
    assert "altered" in problem.message
    report = qbgw.access_report(SUBJECT, settings=keyed)
    assert not report.chain_ok
    assert f"event seq {seq} was altered" in report.chain_detail


def test_the_report_finds_a_deleted_event_of_another_subject_and_a_failed_full_verification(
    keyed: Settings, owner_url: str
) -> None:
    _story(keyed)
    with runtime(keyed).transaction() as session:
        other = session.scalars(
            select(AuditEvent.seq).where(AuditEvent.subject_index == _index(keyed, "MRN-0000-OTHER"))
        ).first()
    assert qbgw.access_report(SUBJECT, settings=keyed).chain_ok
    with as_owner(owner_url) as db:
        if db.dialect.name == "postgresql":
            db.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
        db.execute(text("DELETE FROM audit_events WHERE seq = :seq"), {"seq": other})
        if db.dialect.name == "postgresql":
            db.execute(text("ALTER TABLE audit_events ENABLE TRIGGER USER"))
    report = qbgw.access_report(SUBJECT, settings=keyed)
    assert not report.chain_ok
    assert "1 event(s) between seq 1 and" in report.chain_detail
    assert not admin.verify_log(settings=keyed).ok  # the full walk, recorded: later reports say so
    assert (
        "last full verification (qbgw audit verify): tampered"
        in qbgw.access_report(SUBJECT, settings=keyed).chain_detail
    )
    told = CliRunner().invoke(cli, ["audit", "access-report", "--subject", SUBJECT], env=keyed.to_env())
    assert told.exit_code == 9
    assert told.stderr.startswith("TAMPERED: ")
    assert told.stderr.count("TAMPERED") == 1


def test_the_subject_never_appears_in_clear_in_the_database_the_logs_or_the_broker(
    keyed: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    producer.submit(ASSISTANT, MESSAGES, subject=SUBJECT, settings=keyed)  # its message waits in the broker
    broker = [p.read_bytes() for p in Path(keyed.broker_dir).rglob("*") if p.is_file()]
    assert broker
    assert not any(SUBJECT.encode() in b for b in broker)
    _story(keyed)
    qbgw.access_report(SUBJECT, settings=keyed)
    assert SUBJECT not in caplog.text
    engine = create_engine(keyed.effective_database_url)
    try:
        with engine.connect() as db:
            tables = inspect(db).get_table_names()
            assert {"jobs", "audit_events", "batches"} <= set(tables)
            for table in tables:
                for row in db.execute(text(f'SELECT * FROM "{table}"')):
                    assert SUBJECT not in repr(tuple(row)), table
                    assert SUBJECT.lower() not in repr(tuple(row)).lower(), table
    finally:
        engine.dispose()


def test_the_cli_submits_a_subject_and_prints_its_access_report(keyed: Settings, tmp_path: Path) -> None:
    env = keyed.to_env()
    runner = CliRunner()
    submitted = runner.invoke(
        cli, ["submit", "--text", "Hello", "--subject", SUBJECT, "--assistant", ASSISTANT], env=env
    )
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.strip().splitlines()[-1]
    bad = runner.invoke(cli, ["submit", "--text", "Hello", "--subject", " ", "--assistant", ASSISTANT], env=env)
    assert bad.exit_code != 0
    assert "subject: must be a non-empty string" in bad.output
    for fmt in ("table", "csv", "jsonl", "html"):
        out = tmp_path / f"report.{fmt}"
        ran = runner.invoke(
            cli,
            ["audit", "access-report", "--subject", "-", "--format", fmt, "--output", str(out), "--actor", "cli-aud"],
            input=SUBJECT + "\n",
            env=env,
        )
        assert ran.exit_code == 0, ran.output
        assert job_id in out.read_text(encoding="utf-8")
    shown = runner.invoke(cli, ["audit", "access-report", "--subject", SUBJECT, "--from", "2020-01-01"], env=env)
    assert shown.exit_code == 0
    assert job_id in shown.output
    assert "chain_ok: True" in shown.output


def test_a_failed_jobs_line_to_submit_again_keeps_its_subject(keyed: Settings) -> None:
    from qbgw.batches import export as batch_export
    from qbgw.queries import batch_results

    line = {"custom_id": "x", "subject": SUBJECT, "messages": [{"role": "user", "content": "no [[emulator:fail=400]]"}]}
    batch = producer.submit_batch([line], assistant_id=ASSISTANT, settings=keyed)
    job_id = batch_results(batch.id, settings=keyed)[0].job_id
    run_attempt(runtime(keyed), job_id)
    failed = batch_results(batch.id, failed_only=True, settings=keyed)
    out = io.StringIO()
    assert batch_export.write_inputs(failed, out) == 1
    again = json.loads(out.getvalue())
    assert again["subject"] == SUBJECT
    assert producer.submit_batch([again], assistant_id=ASSISTANT, settings=keyed).total == 1
