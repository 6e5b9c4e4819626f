"""The write side on SQLite and PostgreSQL: idempotency, atomic claims, compare-and-set finishes."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from worker import audit, store
from worker.errors import IdempotencyConflict, InvalidTransition, UpstreamServerError
from worker.lifecycle import JobStatus
from worker.models import Job, utcnow
from worker.runtime import runtime
from worker.settings import Settings

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
        assert job is not None and created
        assert (job.status, job.custom_id, job.attempts) == (JobStatus.QUEUED, "mine", 0)
        (event,) = audit.events_for_job(session=session, job_id=job_id)
    assert event.action == "job.submitted" and event.actor == "tester"
    assert event.request_digest and len(event.request_digest) == 64
    assert "Hi" not in str(event.as_dict())


def test_a_repeated_idempotency_key_returns_the_first_job(settings: Settings) -> None:
    first, created = create(settings, new_job(idempotency_key="k1"))
    again, created_again = create(settings, new_job(idempotency_key="k1"))
    assert created and not created_again and again == first


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
    assert first is not None and first.attempt == 1 and first.messages == [{"role": "user", "content": "Hi"}]
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
        assert store.record_failure(session=session, claim=first, worker="w1", error=error, retry_at=retry_at,
                                    now=utcnow())  # fmt: skip
    second = claim(settings, job_id, "w2", now_shift=1)
    assert second is not None and second.attempt == 2
    with runtime(settings).transaction() as session:
        # The first worker comes back late with an answer: it no longer holds the job.
        assert not store.record_success(session=session, claim=first, worker="w1", answer="late", now=utcnow())
        assert store.record_success(session=session, claim=second, worker="w2", answer="on time", now=utcnow())
        assert not store.record_success(session=session, claim=second, worker="w2", answer="twice", now=utcnow())
    with runtime(settings).transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.answer, job.attempts) == (JobStatus.SUCCEEDED, "on time", 2)
        actions = [e.action for e in audit.events_for_job(session=session, job_id=job_id)]
    assert actions == ["job.submitted", "job.retry_scheduled", "job.succeeded"]


def test_a_retrying_job_is_not_claimed_before_it_is_due(settings: Settings) -> None:
    job_id, _ = create(settings, new_job())
    first = claim(settings, job_id)
    assert first is not None
    with runtime(settings).transaction() as session:
        store.record_failure(session=session, claim=first, worker="w1", error=UpstreamServerError("x", 503),
                             retry_at=utcnow() + timedelta(seconds=30), now=utcnow())  # fmt: skip
    assert claim(settings, job_id) is None
    assert claim(settings, job_id, now_shift=31) is not None


def test_a_failed_job_keeps_the_upstream_reason(settings: Settings) -> None:
    job_id, _ = create(settings, new_job())
    first = claim(settings, job_id)
    assert first is not None
    error = UpstreamServerError("gateway answered HTTP 503", 503, ("Service Unavailable",))
    with runtime(settings).transaction() as session:
        store.record_failure(session=session, claim=first, worker="w1", error=error, retry_at=None, now=utcnow())
        job = session.get(Job, job_id)
        assert job is not None
        assert job.status == JobStatus.FAILED and job.finished_at is not None
        assert job.error == "gateway answered HTTP 503: Service Unavailable" and job.http_status == 503


def test_finishing_into_a_forbidden_status_is_a_bug(settings: Settings) -> None:
    job_id, _ = create(settings, new_job())
    first = claim(settings, job_id)
    assert first is not None
    with runtime(settings).transaction() as session, pytest.raises(InvalidTransition):
        store._finish(session, first, "w1", JobStatus.QUEUED, utcnow())


def test_stale_jobs_are_found_once_per_grace(settings: Settings) -> None:
    job_id, _ = create(settings, new_job())
    later = utcnow() + timedelta(seconds=120)
    with runtime(settings).transaction() as session:
        assert store.stale_jobs(session=session, now=utcnow(), grace=LEASE) == []
        assert store.stale_jobs(session=session, now=later, grace=LEASE) == [job_id]
        assert store.stale_jobs(session=session, now=later, grace=LEASE) == []
