"""Events the database makes in the statement that claims or reads (PostgreSQL).

A claim seals its own request event: the body a text-only job will send is digested at submit
(``jobs.request_digest``), and a worker's claim has the database make the ``attempt.request`` event from the row,
in the claim's one statement. A read of an answer seals its ``result.read`` event the same way. Each event must be
the one this process would make, byte for byte of its canonical form (the chain's verify recomputes every content
hash); a job without a digest, or with one that does not match what is sent, still has the request it sends on
the record before it is sent."""

from __future__ import annotations

import json
import logging
import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text

from qbgw import producer
from qbgw.audit import anchors as integrity
from qbgw.audit import events as audit
from qbgw.emulator.server import Emulator
from qbgw.errors import DecryptionFailed, JobNotFound
from qbgw.execution import tasks
from qbgw.execution.tasks import Outcome, run_attempt
from qbgw.lifecycle import TERMINAL, JobStatus, utcnow
from qbgw.queries import get_job, job_events
from qbgw.runtime.locator import reset, runtime
from qbgw.settings import Secret, Settings
from qbgw.store import chain, hotpath, maintenance, reads
from qbgw.store import jobs as store
from qbgw.store.models import AuditEvent, Job
from qbgw.upstream.gateway import encode_request
from tests.conftest import ASSISTANT
from tests.integration.test_faults import deliver_until_done, tamper_payload

BOTH_SEALS = pytest.mark.parametrize("backend", ["postgres", "postgres-block"])
POSTGRES = pytest.mark.parametrize("backend", ["postgres"])
LEASE_SECONDS = 60

#: Text a worker identity or message may hold that JSON spells otherwise than it is (quotes, a backslash, a
#: control character, accents, a character beyond the BMP).
AWKWARD = 'w"1\\ é\t☃ 𝄞'
#: The same without its control character: a reader (or any actor a caller names) may hold none.
AWKWARD_READER = AWKWARD.replace("\t", "")


def text_job(settings: Settings, content: str = "What is a normal resting heart rate?", **kw: Any) -> str:
    return producer.submit(ASSISTANT, [{"role": "user", "content": content}], settings=settings, **kw)


def stored_request(settings: Settings, job_id: str) -> tuple[str | None, int | None]:
    with runtime(settings).transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.request_digest, job.request_bytes


def set_request(settings: Settings, job_id: str, digest: str | None, size: int | None) -> None:
    with runtime(settings).transaction() as session:
        session.execute(
            text("UPDATE jobs SET request_digest = :d, request_bytes = :b WHERE id = :id"),
            {"d": digest, "b": size, "id": job_id},
        )


def verified(settings: Settings) -> integrity.VerifyReport:
    runtime(settings).chain_staged()
    with runtime(settings).transaction() as session:
        return chain.verify(session, integrity.read_anchors(settings.anchor_path), integrity.anchor_key(settings))


def requests_of(settings: Settings, job_id: str) -> list[audit.AuditRecord]:
    runtime(settings).chain_staged()
    return [e for e in job_events(job_id, settings=settings) if e.action == "attempt.request"]


def claim(settings: Settings, job_id: str, worker: str = "w1", token_fp: str = "ab12") -> Any:  # noqa: S107
    hot = runtime(settings).hot_path
    assert hot is not None
    now = utcnow()
    lease_until = now + timedelta(seconds=LEASE_SECONDS)
    return hot.claim_requested(job_id=job_id, worker=worker, lease_until=lease_until, now=now, token_fp=token_fp)


def the_body(settings: Settings, job_id: str) -> bytes:
    """The body a worker builds for the job, from its payload as stored."""
    with runtime(settings).transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        payload = store.open_text(session, "payload", job_id, job.payload)
    return encode_request(ASSISTANT, json.loads(payload)["messages"])


@BOTH_SEALS
@pytest.mark.parametrize("subject", [None, "MRN-7"])
@pytest.mark.parametrize("worker", ["worker-1@host", AWKWARD])
def test_the_claim_seals_the_request_event_this_process_would_seal(
    settings: Settings, subject: str | None, worker: str
) -> None:
    settings = settings.with_(subject_key=Secret("k" * 40))
    job_id = text_job(settings, f"a question from {AWKWARD}", subject=subject)
    body = the_body(settings, job_id)
    assert stored_request(settings, job_id) == (audit.digest(body), len(body))

    claimed = claim(settings, job_id, worker=worker, token_fp="")
    assert claimed is not None
    found, sealed = claimed
    assert sealed == (audit.digest(body), len(body))
    assert found.attempt == 1
    assert runtime(settings).hot_path.events_in_statements  # type: ignore[union-attr]  # the hashes agreed

    [request] = requests_of(settings, job_id)
    expected = hotpath.request_event(found, worker, "", sealed)
    assert {k: getattr(request, k) for k in expected if k != "detail"} == {
        k: v for k, v in expected.items() if k != "detail"
    }
    assert (request.subject_index is None) == (subject is None)
    report = verified(settings)
    assert report.ok, report
    reset()


@POSTGRES
def test_a_second_attempt_seals_its_own_attempt_number(settings: Settings) -> None:
    job_id = text_job(settings)
    assert claim(settings, job_id) is not None
    with runtime(settings).transaction() as session:  # the first attempt's call failed: the job is due again
        session.execute(
            text("UPDATE jobs SET status = 'retrying', next_attempt_at = NULL WHERE id = :id"), {"id": job_id}
        )
    claimed = claim(settings, job_id)
    assert claimed is not None
    assert claimed[0].attempt == 2
    assert [e.attempt for e in requests_of(settings, job_id)] == [1, 2]
    assert verified(settings).ok
    reset()


@POSTGRES
def test_a_job_without_a_digest_is_not_claimed_by_the_one_statement_but_as_before(settings: Settings) -> None:
    """A job submitted before the column, or too large to digest: the one-statement claim writes nothing (not
    even a lock on the chain's head), and the claim of old takes it, its request sealed with it."""
    job_id = text_job(settings)
    set_request(settings, job_id, None, None)
    with runtime(settings).transaction() as session:
        before = session.scalar(select(func.count()).select_from(AuditEvent))
        head = session.execute(text("SELECT seq FROM audit_chain_head")).scalar()
    assert claim(settings, job_id) is None
    with runtime(settings).transaction() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == before
        assert session.execute(text("SELECT seq FROM audit_chain_head")).scalar() == head
        assert session.execute(text("SELECT status, attempts FROM jobs WHERE id = :id"), {"id": job_id}).one() == (
            "queued",
            0,
        )
    assert run_attempt(runtime(settings), job_id) is Outcome.SUCCEEDED
    body = the_body(settings, job_id)
    [request] = requests_of(settings, job_id)
    assert (request.request_digest, request.request_bytes) == (audit.digest(body), len(body))
    actions = [e.action for e in job_events(job_id, settings=settings)]
    assert actions == ["job.submitted", "attempt.request", "attempt.response", "job.succeeded"]
    assert verified(settings).ok
    reset()


@POSTGRES
def test_a_body_that_differs_from_its_digest_is_recorded_as_sent(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A submitter of another version might build the body otherwise: what is sent is on the record too."""
    job_id = text_job(settings)
    set_request(settings, job_id, "0" * 64, 3)
    with caplog.at_level(logging.WARNING, logger="qbgw.execution.tasks"):
        assert run_attempt(runtime(settings), job_id) is Outcome.SUCCEEDED
    body = the_body(settings, job_id)
    digests = [(e.attempt, e.request_digest, e.request_bytes) for e in requests_of(settings, job_id)]
    assert digests == [(1, "0" * 64, 3), (1, audit.digest(body), len(body))]
    assert "differs from the one digested at submit" in caplog.text
    assert verified(settings).ok
    reset()


@POSTGRES
def test_a_content_hash_the_database_made_otherwise_turns_the_one_statement_claim_off(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The check that guards the chain: had the database's canonical JSON differed from this process's, the
    process says so and seals its request events itself from then on."""
    monkeypatch.setattr(hotpath, "content_hash", lambda _event: "not the database's")
    job_id = text_job(settings)
    with caplog.at_level(logging.ERROR, logger="qbgw.store.hotpath"):
        assert claim(settings, job_id) is not None
    hot = runtime(settings).hot_path
    assert hot is not None
    assert not hot.events_in_statements
    assert "the attempt.request event sealed by the database has content hash" in caplog.text
    monkeypatch.undo()
    later = text_job(settings, "later")
    assert run_attempt(runtime(settings), later) is Outcome.SUCCEEDED  # through the two-statement claim
    assert len(requests_of(settings, later)) == 1
    assert verified(settings).ok
    reset()


@POSTGRES
def test_only_a_body_no_setting_can_change_is_digested_at_submit(settings: Settings) -> None:
    png = (
        "data:image/png;base64,"
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )

    def with_image(url: str) -> str:
        content = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}]
        return producer.submit(ASSISTANT, [{"role": "user", "content": content}], settings=settings)

    inline = with_image(png)
    assert stored_request(settings, inline) == (
        audit.digest(the_body(settings, inline)),
        len(the_body(settings, inline)),
    )
    assert stored_request(settings, with_image("https://images.example.org/scan.png")) == (None, None)
    large = text_job(settings, "x" * (store.REQUEST_AT_SUBMIT_BYTES + 1))
    assert stored_request(settings, large) == (None, None)
    assert run_attempt(runtime(settings), large) is Outcome.SUCCEEDED
    assert len(requests_of(settings, large)) == 1
    reset()


@POSTGRES
def test_a_payload_that_no_longer_decrypts_after_its_claim_ends_the_attempt_as_a_fault(
    settings: Settings, emu: Emulator
) -> None:
    """The one-statement claim commits before the payload is read: a payload that no longer decrypts (a lost
    key, a damaged row) is then the fault of a claimed attempt. Each attempt's request and its fault are on the
    record, nothing is sent, and the job ends failed with the reason a person can act on."""
    job_id = text_job(settings)
    tamper_payload(settings, job_id)
    deliver_until_done(settings, job_id)
    view = get_job(job_id, settings=settings)
    assert view.status is JobStatus.FAILED
    assert view.error_class == "DecryptionFailed"
    actions = [(e.action, e.attempt) for e in job_events(job_id, settings=settings)]
    tries = settings.max_faults
    each = [[("attempt.request", n), ("attempt.error", n), ("job.retry_scheduled", n)] for n in range(1, tries + 1)]
    each[-1][-1] = ("job.failed", tries)
    assert actions == [("job.submitted", None), *[pair for attempt in each for pair in attempt]]
    assert emu.stats()["requests"] == 0
    assert verified(settings).ok
    reset()


def finished(settings: Settings, subject: str | None = None) -> str:
    job_id = text_job(settings, subject=subject)
    assert run_attempt(runtime(settings), job_id) is Outcome.SUCCEEDED
    return job_id


def reads_of(settings: Settings, job_id: str) -> list[audit.AuditRecord]:
    runtime(settings).chain_staged()
    return [e for e in job_events(job_id, include_reads=True, settings=settings) if e.action == "result.read"]


@BOTH_SEALS
@pytest.mark.parametrize("subject", [None, "MRN-7"])
def test_a_read_seals_the_read_event_this_process_would_seal(settings: Settings, subject: str | None) -> None:
    settings = settings.with_(subject_key=Secret("k" * 40))
    job_id = finished(settings, subject)
    view = get_job(job_id, reader=AWKWARD_READER, settings=settings)
    assert view.answer
    [read] = reads_of(settings, job_id)
    expected = reads.result_read_event(job_id, AWKWARD_READER, ASSISTANT, "succeeded", read.subject_index)
    assert {k: getattr(read, k) for k in expected if k != "detail"} == {
        k: v for k, v in expected.items() if k != "detail"
    }
    assert (read.subject_index is None) == (subject is None)
    hot = runtime(settings).hot_path
    assert hot is not None
    assert hot.events_in_statements
    assert verified(settings).ok
    reset()


@POSTGRES
def test_a_read_of_a_job_without_an_answer_records_nothing_and_locks_nothing(settings: Settings) -> None:
    job_id = text_job(settings)
    with runtime(settings).transaction() as session:
        head = session.execute(text("SELECT seq FROM audit_chain_head")).scalar()
    view = get_job(job_id, reader="alice", settings=settings)
    assert (view.answer, view.error) == (None, None)
    with runtime(settings).transaction() as session:
        assert session.execute(text("SELECT seq FROM audit_chain_head")).scalar() == head
    assert reads_of(settings, job_id) == []
    reset()


@POSTGRES
def test_an_answer_that_no_longer_decrypts_is_not_given_and_its_read_is_on_the_record(settings: Settings) -> None:
    """The read is sealed in the statement that reads, before anything is decrypted: a damaged answer is refused
    (DecryptionFailed), and the attempt to read it stays on the record."""
    job_id = finished(settings)
    with runtime(settings).transaction() as session:
        stored = session.execute(text("SELECT answer FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()
        flipped = stored[:-3] + ("A" if stored[-3] != "A" else "B") + stored[-2:]
        session.execute(text("UPDATE jobs SET answer = :a WHERE id = :id"), {"a": flipped, "id": job_id})
    with pytest.raises(DecryptionFailed):
        get_job(job_id, reader="alice", settings=settings)
    assert [(e.actor, e.outcome) for e in reads_of(settings, job_id)] == [("alice", "succeeded")]
    reset()


@POSTGRES
def test_a_read_s_content_hash_made_otherwise_turns_the_one_statement_events_off(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = finished(settings)
    monkeypatch.setattr(hotpath, "content_hash", lambda _event: "not the database's")
    with caplog.at_level(logging.ERROR, logger="qbgw.store.hotpath"):
        assert get_job(job_id, reader="alice", settings=settings).answer
    hot = runtime(settings).hot_path
    assert hot is not None
    assert not hot.events_in_statements
    assert "the result.read event sealed by the database has content hash" in caplog.text
    monkeypatch.undo()
    assert get_job(job_id, reader="bob", settings=settings).answer  # made by this process now
    assert [e.actor for e in reads_of(settings, job_id)] == ["alice", "bob"]
    assert verified(settings).ok
    reset()


@POSTGRES
def test_a_purged_job_is_not_claimed_by_the_one_statement_and_purging_erases_its_digest(settings: Settings) -> None:
    """A purge erases the messages and the digest made from them; and a job whose payload is gone (replayed
    after a purge, say) is never claimed with a request event for a body that cannot be built."""
    done = finished(settings)
    with runtime(settings).transaction() as session:
        session.execute(
            text("UPDATE jobs SET finished_at = finished_at - interval '400 days' WHERE id = :id"), {"id": done}
        )
        assert maintenance.purge_chunk(session, cutoff=utcnow() - timedelta(days=1), actor="retention") == 1
    assert stored_request(settings, done) == (None, None)

    queued = text_job(settings)
    body = the_body(settings, queued)
    with runtime(settings).transaction() as session:  # its payload gone, its digest (still) there
        session.execute(text("UPDATE jobs SET payload = NULL WHERE id = :id"), {"id": queued})
    assert stored_request(settings, queued) == (audit.digest(body), len(body))
    assert claim(settings, queued) is None
    assert requests_of(settings, queued) == []
    reset()


@POSTGRES
def test_an_error_after_the_one_statement_claim_is_the_attempt_s_fault(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not left running until its lease runs out: the attempt ends at once, its fault on the record."""
    job_id = text_job(settings)

    def broken(*_args: Any) -> bytes:
        raise ValueError("a bug")

    monkeypatch.setattr(tasks, "encode_request", broken)
    assert run_attempt(runtime(settings), job_id) == "retrying"
    monkeypatch.undo()
    events = [(e.action, e.attempt, e.error_class) for e in job_events(job_id, settings=settings)]
    assert events[:3] == [
        ("job.submitted", None, None),
        ("attempt.request", 1, None),
        ("attempt.error", 1, "InternalError"),
    ]
    with runtime(settings).transaction() as session:
        row = session.execute(text("SELECT status, claimed_by FROM jobs WHERE id = :id"), {"id": job_id}).one()
    assert row == ("retrying", None)
    assert verified(settings).ok
    reset()


@POSTGRES
def test_two_workers_claiming_one_job_at_once_record_one_request(settings: Settings) -> None:
    """Two deliveries of one job, claimed by two threads on two connections at the same moment: one claim, one
    request event, its chain intact."""

    def race(job_id: str, worker: str, start: threading.Barrier, found: list[Any]) -> None:
        start.wait()
        found.append(claim(settings, job_id, worker=worker))

    for n in range(5):
        job_id = text_job(settings, f"raced {n}")
        start, found = threading.Barrier(2), []
        threads = [threading.Thread(target=race, args=(job_id, f"w{i}", start, found)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(result is None for result in found) == [False, True]
        [request] = requests_of(settings, job_id)
        assert request.attempt == 1
        with runtime(settings).transaction() as session:
            claimed_by = session.execute(text("SELECT claimed_by FROM jobs WHERE id = :id"), {"id": job_id}).scalar()
        assert request.actor == claimed_by
    assert verified(settings).ok
    reset()


class NotEnded(Exception):
    pass


def owned_by(owner: str) -> reads.Admit:
    """GET /result's admit: the owner's job, ended (else it raises)."""

    def admit(view: reads.JobView) -> None:
        if view.actor != owner:
            raise JobNotFound(view.id)
        if view.status not in TERMINAL:
            raise NotEnded(view.status)

    return admit


def statements_during(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement a psycopg cursor executes from now on (the hot path's)."""
    import psycopg

    seen: list[str] = []
    real = psycopg.Cursor.execute

    def execute(self: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(str(query))
        return real(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", execute)
    return seen


@BOTH_SEALS
def test_a_read_its_admit_lets_through_is_one_statement_and_one_refused_records_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GET /result states what its admit lets through (reads.Expect): PostgreSQL checks it in the statement that
    # reads and audits. A job it refuses (another's, not ended) is neither read out nor on the record, and the
    # admit raises its own error.
    from qbgw.queries import read_admitted

    ended = producer.submit(ASSISTANT, [{"role": "user", "content": "q"}], actor="key:alice", settings=settings)
    assert run_attempt(runtime(settings), ended) is Outcome.SUCCEEDED
    queued = producer.submit(ASSISTANT, [{"role": "user", "content": "q"}], actor="key:alice", settings=settings)
    as_alice, as_bob = reads.Expect(owner="key:alice", ended=True), reads.Expect(owner="key:bob", ended=True)
    seen = statements_during(monkeypatch)
    with pytest.raises(JobNotFound):
        read_admitted(ended, owned_by("key:bob"), reader="key:bob", settings=settings, expect=as_bob)
    with pytest.raises(NotEnded):
        read_admitted(queued, owned_by("key:alice"), reader="key:alice", settings=settings, expect=as_alice)
    assert len(seen) == 2  # one statement each
    assert reads_of(settings, ended) == []
    assert reads_of(settings, queued) == []
    seen.clear()
    view = read_admitted(ended, owned_by("key:alice"), reader="key:alice", settings=settings, expect=as_alice)
    assert view.answer
    assert len(seen) == 1  # read, audited, in one statement
    assert [e.actor for e in reads_of(settings, ended)] == ["key:alice"]
    # An admit that lets through what its Expect did not (they disagree): read the long way, with the admit.
    seen.clear()
    view = read_admitted(ended, lambda _view: None, reader="key:carol", settings=settings, expect=as_bob)
    assert view.answer
    assert len(seen) == 3  # the refused statement, then the read and the seal
    assert [e.actor for e in reads_of(settings, ended)] == ["key:alice", "key:carol"]
    # An Expect states what an admit lets through: without an admit there is nothing to check.
    assert read_admitted(ended, None, reader="key:dave", settings=settings, expect=as_bob).answer
    assert [e.actor for e in reads_of(settings, ended)] == ["key:alice", "key:carol", "key:dave"]
    assert verified(settings).ok
    reset()
