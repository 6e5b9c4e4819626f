"""The write side on SQLite and PostgreSQL: idempotency, atomic claims, compare-and-set finishes."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from qbgw.errors import IdempotencyConflict, InvalidTransition, UpstreamServerError
from qbgw.lifecycle import JobStatus, utcnow
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from qbgw.store import chain
from qbgw.store import jobs as store
from qbgw.store.models import Job

LEASE = timedelta(seconds=60)


def new_job(**changes: object) -> store.NewJob:
    values: dict[str, object] = {
        "id": str(uuid.uuid4()),
        "assistant_id": "a1",
        "messages": [{"role": "user", "content": "Hi"}],
        "custom_id": None,
        "idempotency_key": None,
        "actor": "tester",
        "max_attempts": 3,
    }
    values.update(changes)
    return store.NewJob(**values)  # type: ignore[arg-type]


def create(settings: Settings, new: store.NewJob) -> tuple[str, bool]:
    with runtime(settings).transaction() as session:
        return store.create_job(session=session, new=new, now=utcnow())


def test_a_new_job_is_queued_with_a_submitted_event(settings: Settings) -> None:
    job_id, created = create(settings, new_job(custom_id="mine"))
    with runtime(settings).transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert created
        assert (job.status, job.custom_id, job.attempts) == (JobStatus.QUEUED, "mine", 0)
        (event,) = chain.events_for_job(session=session, job_id=job_id)
    assert event.action == "job.submitted"
    assert event.actor == "tester"
    assert event.request_digest
    assert len(event.request_digest) == 64
    assert "Hi" not in str(event.as_dict())


def test_a_repeated_idempotency_key_returns_the_first_job(settings: Settings) -> None:
    first, created = create(settings, new_job(idempotency_key="k1"))
    again, created_again = create(settings, new_job(idempotency_key="k1"))
    assert created
    assert not created_again
    assert again == first


def test_a_reused_key_with_other_messages_is_a_conflict(settings: Settings) -> None:
    create(settings, new_job(idempotency_key="k2"))
    with pytest.raises(IdempotencyConflict, match="k2"):
        create(settings, new_job(idempotency_key="k2", messages=[{"role": "user", "content": "Other"}]))


def claim(settings: Settings, job_id: str, worker: str = "w1", now_shift: float = 0) -> store.Claim | None:
    with runtime(settings).transaction() as session:
        return store.claim(
            session=session, job_id=job_id, worker=worker, lease=LEASE, now=utcnow() + timedelta(seconds=now_shift)
        )


def test_only_one_of_two_claims_wins(settings: Settings) -> None:
    job_id, _ = create(settings, new_job())
    first = claim(settings, job_id, "w1")
    assert first is not None
    assert first.attempt == 1
    assert first.messages == [{"role": "user", "content": "Hi"}]
    assert claim(settings, job_id, "w2") is None


def test_a_claim_of_an_unknown_job_does_nothing(settings: Settings) -> None:
    assert claim(settings, str(uuid.uuid4())) is None


def test_exactly_one_final_result_even_if_a_stale_worker_reports(settings: Settings) -> None:
    job_id, _ = create(settings, new_job())
    first = claim(settings, job_id, "w1")
    assert first is not None
    error = UpstreamServerError("gateway answered HTTP 503", 503, ("Service Unavailable",))
    with runtime(settings).transaction() as session:
        retry_at = utcnow() + timedelta(seconds=0.01)
        assert store.record_failure(
            session=session,
            claim=first,
            worker="w1",
            error=error,
            reason=str(error),
            retry_at=retry_at,
            announced=True,
            now=utcnow(),
        )
    second = claim(settings, job_id, "w2", now_shift=1)
    assert second is not None
    assert second.attempt == 2
    with runtime(settings).transaction() as session:
        # The first worker comes back late with an answer: it no longer holds the job.
        assert store.record_success(session=session, claim=first, worker="w1", answer="late", now=utcnow()) is None
        ok = store.record_success(session=session, claim=second, worker="w2", answer="on time", now=utcnow())
        assert ok is JobStatus.SUCCEEDED
        assert store.record_success(session=session, claim=second, worker="w2", answer="twice", now=utcnow()) is None
    with runtime(settings).transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        answer = store.open_text(session, "answer", job_id, job.answer)
        assert (job.status, answer, job.attempts) == (JobStatus.SUCCEEDED, "on time", 2)
        assert job.answer is not None
        assert "on time" not in job.answer
        actions = [e.action for e in chain.events_for_job(session=session, job_id=job_id)]
    assert actions == ["job.submitted", "job.retry_scheduled", "job.succeeded"]


def test_a_retrying_job_is_not_claimed_before_it_is_due(settings: Settings) -> None:
    job_id, _ = create(settings, new_job())
    first = claim(settings, job_id)
    assert first is not None
    with runtime(settings).transaction() as session:
        store.record_failure(
            session=session,
            claim=first,
            worker="w1",
            error=UpstreamServerError("x", 503),
            reason="x",
            retry_at=utcnow() + timedelta(seconds=30),
            announced=True,
            now=utcnow(),
        )
    assert claim(settings, job_id) is None
    assert claim(settings, job_id, now_shift=31) is not None


def test_a_failed_job_keeps_the_upstream_reason(settings: Settings) -> None:
    job_id, _ = create(settings, new_job())
    first = claim(settings, job_id)
    assert first is not None
    error = UpstreamServerError("gateway answered HTTP 503", 503, ("Service Unavailable",))
    with runtime(settings).transaction() as session:
        store.record_failure(
            session=session,
            claim=first,
            worker="w1",
            error=error,
            reason="gateway answered HTTP 503: Service Unavailable",
            retry_at=None,
            announced=False,
            now=utcnow(),
        )
        job = session.get(Job, job_id)
        assert job is not None
        assert job.status == JobStatus.FAILED
        assert job.finished_at is not None
        error = store.open_text(session, "error", job_id, job.error)
        assert error == "gateway answered HTTP 503: Service Unavailable"
        assert job.http_status == 503


def test_finishing_into_a_forbidden_status_is_a_bug(settings: Settings) -> None:
    job_id, _ = create(settings, new_job())
    first = claim(settings, job_id)
    assert first is not None
    with runtime(settings).transaction() as session, pytest.raises(InvalidTransition):
        store._finish(session, first, "w1", JobStatus.QUEUED, utcnow())


def test_a_lost_queued_job_is_dispatched_once_per_grace(settings: Settings) -> None:
    job_id, _ = create(settings, new_job())
    later = utcnow() + timedelta(seconds=120)
    with runtime(settings).transaction() as session:
        assert store.due_for_dispatch(session=session, now=utcnow(), grace=LEASE) == []
        assert store.due_for_dispatch(session=session, now=later, grace=LEASE) == [job_id]
        assert store.due_for_dispatch(session=session, now=later, grace=LEASE) == []


def test_a_queued_job_behind_a_broker_backlog_is_not_taken_for_lost(settings: Settings) -> None:
    job_id, _ = create(settings, new_job())
    later = utcnow() + timedelta(seconds=120)
    with runtime(settings).transaction() as session:
        assert store.due_for_dispatch(session=session, now=later, grace=LEASE, broker_backlog=1) == []
        assert store.due_for_dispatch(session=session, now=later, grace=LEASE, broker_backlog=0) == [job_id]


def test_a_retry_kept_in_the_database_is_dispatched_when_due(settings: Settings) -> None:
    job_id, _ = create(settings, new_job())
    first = claim(settings, job_id)
    assert first is not None
    due = utcnow() + timedelta(seconds=600)
    with runtime(settings).transaction() as session:
        store.record_failure(
            session=session,
            claim=first,
            worker="w1",
            error=UpstreamServerError("x", 429),
            reason="x",
            retry_at=due,
            announced=False,
            now=utcnow(),
        )
    with runtime(settings).transaction() as session:
        assert store.due_for_dispatch(session=session, now=due - timedelta(seconds=1), grace=LEASE) == []
        assert store.due_for_dispatch(session=session, now=due, grace=LEASE) == [job_id]
        actions = [e.action for e in chain.events_for_job(session=session, job_id=job_id)]
    assert actions[-2:] == ["job.retry_scheduled", "job.redispatched"]


def test_an_expired_lease_is_recovered_as_an_interrupted_attempt(settings: Settings) -> None:
    job_id, _ = create(settings, new_job())
    assert claim(settings, job_id, "dead-worker") is not None
    with runtime(settings).transaction() as session:
        assert store.recover_interrupted(session=session, now=utcnow()) == []  # the lease still runs
        after = utcnow() + LEASE + timedelta(seconds=1)
        assert store.recover_interrupted(session=session, now=after) == [job_id]
        assert store.recover_interrupted(session=session, now=after) == []
        job = session.get(Job, job_id)
        assert job is not None
        assert job.status == JobStatus.RETRYING
        assert job.announced_at is None
        error = store.open_text(session, "error", job_id, job.error)
        assert error is not None
        assert "attempt 1 interrupted: its worker dead-worker stopped" in error
        events = chain.events_for_job(session=session, job_id=job_id)
    assert [(e.action, e.attempt) for e in events][-2:] == [("attempt.interrupted", 1), ("job.retry_scheduled", 1)]
    again = claim(settings, job_id, "w2", now_shift=LEASE.total_seconds() + 2)
    assert again is not None
    assert again.attempt == 2


def test_cancel_waiting_running_and_finished_jobs(settings: Settings) -> None:
    from qbgw.errors import JobNotFound, JobStateConflict

    waiting, _ = create(settings, new_job())
    running, _ = create(settings, new_job())
    running_claim = claim(settings, running)
    assert running_claim is not None
    with runtime(settings).transaction() as session:
        assert store.cancel(session=session, job_id=waiting, actor="op", now=utcnow()) is JobStatus.CANCELLED
        assert store.cancel(session=session, job_id=running, actor="op", now=utcnow()) is JobStatus.RUNNING
    assert claim(settings, waiting) is None  # a cancelled job is never claimed
    with runtime(settings).transaction() as session:
        # The running attempt comes back with an answer: the job still ends cancelled.
        ended = store.record_success(session=session, claim=running_claim, worker="w1", answer="late", now=utcnow())
        assert ended is JobStatus.CANCELLED
        job = session.get(Job, running)
        assert job is not None
        assert job.status == JobStatus.CANCELLED
        assert job.answer is None
        with pytest.raises(JobStateConflict):
            store.cancel(session=session, job_id=_succeeded(settings, session), actor="op", now=utcnow())
        with pytest.raises(JobNotFound):
            store.cancel(session=session, job_id="nope", actor="op", now=utcnow())


def _succeeded(settings: Settings, session: object) -> str:
    job = Job(
        id=str(uuid.uuid4()),
        status=JobStatus.SUCCEEDED,
        assistant_id="a",
        payload="{}",
        payload_digest="x",
        actor="t",
        attempts=1,
        max_attempts=1,
        created_at=utcnow(),
        updated_at=utcnow(),
    )
    session.add(job)  # type: ignore[attr-defined]
    session.flush()  # type: ignore[attr-defined]
    return job.id


def test_replay_queues_a_failed_job_with_a_fresh_budget(settings: Settings) -> None:
    from qbgw.errors import JobStateConflict

    job_id, _ = create(settings, new_job())
    first = claim(settings, job_id)
    assert first is not None
    with runtime(settings).transaction() as session:
        store.record_failure(
            session=session,
            claim=first,
            worker="w1",
            error=UpstreamServerError("x", 503),
            reason="x",
            retry_at=None,
            announced=False,
            now=utcnow(),
        )
        assert store.replay(session=session, job_id=job_id, actor="op", extra_attempts=3, now=utcnow()) == 2
        with pytest.raises(JobStateConflict, match="only a failed job can be replayed"):
            store.replay(session=session, job_id=job_id, actor="op", extra_attempts=3, now=utcnow())
    again = claim(settings, job_id)
    assert again is not None
    assert again.attempt == 2
    assert again.max_attempts == 4


def test_an_attempt_held_back_before_sending_gives_the_job_its_attempt_back(settings: Settings) -> None:
    job_id, _ = create(settings, new_job())
    held = claim(settings, job_id)
    assert held is not None
    now = utcnow()
    with runtime(settings).transaction() as session:
        status = store.release_unsent(
            session=session,
            claim=held,
            worker="w1",
            until=now + timedelta(seconds=5),
            reason="cooldown",
            wait=5.0,
            announced=True,
            now=now,
        )
    assert status is JobStatus.RETRYING
    with runtime(settings).transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.claimed_by is None
        assert job.lease_expires_at is None
        assert (job.status, job.attempts, job.max_attempts, job.throttle_reason) == ("retrying", 1, 4, "cooldown")
        # A second finish of the same attempt changes nothing: the compare-and-set no longer matches.
        assert (
            store.release_unsent(
                session=session,
                claim=held,
                worker="w1",
                until=now,
                reason="cooldown",
                wait=0.0,
                announced=True,
                now=now,
            )
            is None
        )
