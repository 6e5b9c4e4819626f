"""The PostgreSQL hot path (worker/hotpath.py) against a real PostgreSQL: it writes what the store path
writes, writes nothing when its compare-and-set misses, and leaves a job untouched when it fails."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text

from qbgw import producer
from qbgw.audit import anchors as integrity
from qbgw.audit import events as audit
from qbgw.errors import StoreUnavailable
from qbgw.execution.tasks import Outcome, run_attempt
from qbgw.lifecycle import JobStatus, utcnow
from qbgw.queries import get_job, job_events
from qbgw.runtime.locator import reset, runtime
from qbgw.settings import Secret, Settings
from qbgw.store import chain, hotpath
from qbgw.store import jobs as store
from qbgw.store.models import AuditEvent, Job
from tests.conftest import ASSISTANT

pytestmark = pytest.mark.parametrize("backend", ["postgres"])

LEASE = timedelta(seconds=60)


def submit(settings: Settings, content: str) -> str:
    return producer.submit(ASSISTANT, [{"role": "user", "content": content}], settings=settings)


@pytest.fixture
def hot(settings: Settings) -> Iterator[hotpath.HotPath]:
    found = runtime(settings).hot_path
    assert found is not None, "a migrated PostgreSQL runtime has the hot path"
    yield found
    reset()


def audit_count(settings: Settings) -> int:
    with runtime(settings).transaction() as session:
        return int(session.scalar(select(func.count()).select_from(AuditEvent)) or 0)


def verified(settings: Settings) -> integrity.VerifyReport:
    with runtime(settings).transaction() as session:
        return chain.verify(session, integrity.read_anchors(settings.anchor_path), integrity.anchor_key(settings))


def job_row(settings: Settings, job_id: str) -> dict[str, Any]:
    columns = (
        "status",
        "attempts",
        "http_status",
        "error",
        "error_class",
        "claimed_by",
        "lease_expires_at",
        "next_attempt_at",
        "throttle_reason",
        "cancel_requested_at",
    )
    with runtime(settings).transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        row = {name: getattr(job, name) for name in columns}
        row["has"] = {name: getattr(job, name) is not None for name in ("answer", "finished_at", "started_at")}
        return row


def comparable(settings: Settings, job_id: str) -> list[tuple[Any, ...]]:
    return [
        (
            e.action,
            e.attempt,
            e.actor,
            e.assistant_id,
            e.outcome,
            e.http_status,
            e.error_class,
            e.request_digest,
            e.request_bytes,
            e.response_bytes is not None,
            e.token_fp,
            e.detail,
        )
        for e in job_events(job_id, settings=settings)
    ]


def test_the_hot_path_writes_the_rows_and_events_the_store_path_writes(
    settings: Settings, hot: hotpath.HotPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = submit(settings, "the same question")
    assert run_attempt(runtime(settings), fast) is Outcome.SUCCEEDED
    fast_view = get_job(fast, reader="alice", settings=settings)  # the read, hot too
    reset()
    monkeypatch.setattr(hotpath, "hot_path_for", lambda *_args: None)  # the same worker, through worker.store
    assert runtime(settings).hot_path is None
    slow = submit(settings, "the same question")
    assert run_attempt(runtime(settings), slow) is Outcome.SUCCEEDED
    slow_view = get_job(slow, reader="alice", settings=settings)

    assert job_row(settings, fast) == job_row(settings, slow)
    assert comparable(settings, fast) == comparable(settings, slow)
    assert [e[0] for e in comparable(settings, fast)] == [
        "job.submitted",
        "attempt.request",
        "attempt.response",
        "job.succeeded",
    ]
    assert fast_view.answer == slow_view.answer
    assert view_fields(fast_view) == view_fields(slow_view)
    assert fast_view.created_at.tzinfo is not None
    assert fast_view.created_at.utcoffset() == timedelta(0)
    reads = [
        (e.action, e.actor, e.assistant_id, e.outcome)
        for job in (fast, slow)
        for e in job_events(job, include_reads=True, settings=settings)
        if e.action == "result.read"
    ]
    assert reads == [("result.read", "alice", ASSISTANT, "succeeded")] * 2
    report = verified(settings)
    assert report.ok
    assert report.events >= 10


def view_fields(view: Any) -> dict[str, Any]:
    """A view without what differs between two jobs (id, times)."""
    data = view.as_dict()
    return {k: v for k, v in data.items() if k != "id" and not k.endswith("_at")}


def new_job_row(settings: Settings, job_id: str) -> dict[str, Any]:
    """Every column of a new job's row but its id and times; the sealed columns decrypted."""
    with runtime(settings).transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        row = {c.name: getattr(job, c.name) for c in Job.__table__.c if c.name != "id" and not c.name.endswith("_at")}
        for column in ("payload", "subject"):
            row[column] = store.open_text(session, column, job_id, row[column])
        row["times"] = (job.created_at == job.updated_at == job.announced_at, job.finished_at)
        return row


def test_a_new_job_is_inserted_as_the_store_path_inserts_it(
    settings: Settings, hot: hotpath.HotPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submit's one statement (a job without an idempotency key) writes the row and event the ORM writes."""
    settings = settings.with_(subject_key=Secret("k" * 40))
    messages = [{"role": "user", "content": "about a patient"}]
    fast = producer.submit(ASSISTANT, messages, custom_id="c-1", subject="MRN-1", actor="key:web", settings=settings)
    reset()
    monkeypatch.setattr(hotpath, "hot_path_for", lambda *_args: None)
    slow = producer.submit(ASSISTANT, messages, custom_id="c-1", subject="MRN-1", actor="key:web", settings=settings)
    fast_row = new_job_row(settings, fast)
    assert fast_row == new_job_row(settings, slow)
    assert fast_row["subject"] == "MRN-1"
    assert fast_row["subject_index"]
    assert fast_row["times"] == (True, None)
    assert comparable(settings, fast) == comparable(settings, slow)
    submitted = [e for e in job_events(fast, settings=settings) if e.action == "job.submitted"]
    assert len(submitted) == 1
    assert submitted[0].subject_index == fast_row["subject_index"]
    assert verified(settings).ok


def test_the_hot_reads_say_what_the_store_reads_say(settings: Settings, hot: hotpath.HotPath) -> None:
    from qbgw.errors import JobNotFound
    from qbgw.queries import job_metadata, job_status

    job_id = submit(settings, "not run yet")
    events = audit_count(settings)
    assert hot.status_of(job_id) is JobStatus.QUEUED
    assert job_status(job_id, settings=settings) is JobStatus.QUEUED
    view, batch_id = job_metadata(job_id, settings=settings)
    assert view.status is JobStatus.QUEUED
    assert view.answer is None
    assert batch_id is None
    assert get_job(job_id, settings=settings).answer is None
    assert audit_count(settings) == events, "nothing was disclosed: no read event"
    for read in (hot.status_of, hot.job_metadata, lambda j: hot.read_job(j, "alice")):
        with pytest.raises(JobNotFound):
            read("00000000-0000-0000-0000-000000000000")
    assert audit_count(settings) == events


def test_a_success_that_misses_its_compare_and_set_writes_nothing(settings: Settings, hot: hotpath.HotPath) -> None:
    job_id = submit(settings, "taken over")
    claim = hot.claim(job_id=job_id, worker="w1", lease_until=utcnow() + LEASE, now=utcnow(), events=lambda _c: [])
    assert claim is not None
    assert claim.attempt == 1
    with runtime(settings).transaction() as session:  # another worker took the job over (its lease ran out)
        session.execute(text("UPDATE jobs SET claimed_by = 'w2', attempts = 2 WHERE id = :id"), {"id": job_id})
    before, row_before = audit_count(settings), job_row(settings, job_id)

    now = utcnow()
    response = store._event_of(audit.Action.ATTEMPT_RESPONSE, claim, "w1", outcome="answer", http_status=200)
    assert hot.succeed(claim=claim, worker="w1", answer="late", response_event=response, now=now) is None

    assert audit_count(settings) == before  # no response event, no job.succeeded: the caller goes through store
    assert job_row(settings, job_id) == row_before
    assert verified(settings).ok


def test_a_cancel_during_the_call_ends_the_job_cancelled_through_the_store(
    settings: Settings, hot: hotpath.HotPath
) -> None:
    job_id = submit(settings, "cancel me [[emulator:sleep=4x1]]")  # long enough to be seen running and cancelled
    outcome: list[Outcome] = []
    attempt = threading.Thread(target=lambda: outcome.append(run_attempt(runtime(settings), job_id)))
    attempt.start()
    deadline = time.monotonic() + 5
    while get_job(job_id, settings=settings).status is not JobStatus.RUNNING and time.monotonic() < deadline:
        time.sleep(0.01)
    with runtime(settings).transaction() as session:
        assert store.cancel(session=session, job_id=job_id, actor="op", now=utcnow()) is JobStatus.RUNNING
    attempt.join(10)

    assert outcome == [Outcome.CANCELLED]
    view = get_job(job_id, settings=settings)
    assert view.status is JobStatus.CANCELLED
    assert view.answer is None
    actions = [e.action for e in job_events(job_id, settings=settings)]
    assert actions == ["job.submitted", "attempt.request", "job.cancel_requested", "attempt.response", "job.cancelled"]
    assert verified(settings).ok


def test_a_claim_whose_request_cannot_be_built_changes_nothing(settings: Settings, hot: hotpath.HotPath) -> None:
    job_id = submit(settings, "unbuildable")
    before = audit_count(settings)

    def broken(_claim: store.Claim) -> list[dict[str, Any]]:
        raise ValueError("cannot build the request")

    for _ in range(3):  # and the connection goes back to the pool usable, each time
        with pytest.raises(ValueError, match="cannot build"):
            hot.claim(job_id=job_id, worker="w1", lease_until=utcnow() + LEASE, now=utcnow(), events=broken)
    row = job_row(settings, job_id)
    assert row["status"] == JobStatus.QUEUED
    assert row["attempts"] == 0
    assert row["claimed_by"] is None
    assert audit_count(settings) == before
    assert run_attempt(runtime(settings), job_id) is Outcome.SUCCEEDED


def test_a_duplicate_delivery_is_skipped_without_a_trace(settings: Settings, hot: hotpath.HotPath) -> None:
    job_id = submit(settings, "once")
    assert run_attempt(runtime(settings), job_id) is Outcome.SUCCEEDED
    before = audit_count(settings)
    assert (
        hot.claim(
            job_id=job_id,
            worker="w1",
            lease_until=utcnow() + LEASE,
            now=utcnow(),
            events=lambda _c: pytest.fail("a job that is not claimable has no request"),
        )
        is None
    )
    assert audit_count(settings) == before


def test_the_hot_path_anchors_the_chain_head_every_n_events(settings: Settings) -> None:
    every_two = settings.with_(audit_anchor_events=2)
    for n in range(3):
        assert run_attempt(runtime(every_two), submit(every_two, f"job {n}")) is Outcome.SUCCEEDED
    assert runtime(every_two).hot_path is not None
    anchors = integrity.read_anchors(every_two.anchor_path)
    # 3 jobs x 4 events: every commit that crossed an even seq anchored its last event.
    assert anchors
    assert max(a.seq for a in anchors) == 12
    assert verified(every_two).ok
    assert verified(every_two).anchors == len(anchors)
    reset()


def test_an_unreachable_database_is_store_unavailable(settings: Settings, hot: hotpath.HotPath) -> None:
    from sqlalchemy import create_engine

    dead = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none", pool_size=1)
    chain.install_commit_seal(dead)
    try:
        path = hotpath.hot_path_for(dead, hot.keyring, settings)
        assert path is not None
        with pytest.raises(StoreUnavailable, match="database unavailable"):
            path.claim(job_id="x", worker="w1", lease_until=utcnow() + LEASE, now=utcnow(), events=lambda _c: [])
    finally:
        dead.dispose()


@pytest.mark.parametrize("path", ["hot", "store"])
def test_a_read_its_check_refuses_is_not_audited(
    settings: Settings, hot: hotpath.HotPath, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """``queries.read_admitted`` (GET /v1/jobs/{id}/result's one read): the check sees the job without its
    PHI, and a refusal leaves no ``result.read`` event; an admitted read is audited as any other."""
    from qbgw.errors import JobNotFound
    from qbgw.queries import read_admitted

    if path == "store":
        reset()
        monkeypatch.setattr(hotpath, "hot_path_for", lambda *_args: None)
    job_id = submit(settings, "whose is it")
    assert run_attempt(runtime(settings), job_id) is Outcome.SUCCEEDED
    events = audit_count(settings)
    seen: list[Any] = []

    def refuse(view: Any) -> None:
        seen.append((view.status, view.answer, view.actor))
        raise JobNotFound(job_id)

    with pytest.raises(JobNotFound):
        read_admitted(job_id, refuse, reader="mallory", settings=settings)
    assert seen == [(JobStatus.SUCCEEDED, None, "producer")]
    assert audit_count(settings) == events
    view = read_admitted(job_id, seen.append, reader="alice", settings=settings)
    assert view.answer
    assert audit_count(settings) == events + 1
    assert [
        e.actor for e in job_events(job_id, include_reads=True, settings=settings) if e.action == "result.read"
    ] == ["alice"]
