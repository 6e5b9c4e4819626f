"""The guard where the task meets the job (``worker.faults``): an exception that is no expected outcome of an
attempt becomes an audited ``attempt.error``, and a job that meets it QBGW_MAX_FAULTS times in a row ends
``failed`` with a reason, before or after its claim. In this process against a real database and the
emulator over a socket; tests/e2e/test_every_job_ends.py runs the same through real worker processes."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from qbgw import producer
from qbgw.emulator.server import Emulator
from qbgw.execution.tasks import run_attempt
from qbgw.images import resolve as images
from qbgw.lifecycle import TERMINAL, JobStatus, utcnow
from qbgw.queries import get_job, job_events
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from qbgw.store import jobs as store
from tests.conftest import ASSISTANT, PgDatabase


def store_unchecked(settings: Settings, messages: list[dict[str, Any]]) -> str:
    """A job stored without the producer's validation: as an older version, or a bug, could have stored it."""
    new = store.NewJob(
        id=str(uuid.uuid4()),
        assistant_id=ASSISTANT,
        messages=messages,
        custom_id=None,
        idempotency_key=None,
        actor="test",
        max_attempts=settings.max_attempts,
    )
    with runtime(settings).transaction() as session:
        store.create_job(session=session, new=new, now=utcnow())
    return new.id


def tamper_payload(settings: Settings, job_id: str) -> None:
    """Change one byte of the job's stored ciphertext (its GCM tag): it no longer decrypts."""
    with runtime(settings).transaction() as session:
        stored = session.execute(text("SELECT payload FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()
        flipped = stored[:-3] + ("A" if stored[-3] != "A" else "B") + stored[-2:]
        session.execute(text("UPDATE jobs SET payload = :p WHERE id = :id"), {"p": flipped, "id": job_id})


def deliver_until_done(settings: Settings, job_id: str, *, limit: int = 20) -> list[Any]:
    """Deliver the job's message again and again (as the sweeper would), each time it is due; the outcomes."""
    outcomes = []
    for _ in range(limit):
        view = get_job(job_id, settings=settings)
        if view.status in TERMINAL:
            return outcomes
        if view.next_attempt_at is not None:
            time.sleep(max(0.0, (view.next_attempt_at - utcnow()).total_seconds()) + 0.01)
        outcomes.append(run_attempt(runtime(settings), job_id))
    raise AssertionError(f"job {job_id} did not end after {limit} deliveries: {outcomes}")


def faults_of(settings: Settings, job_id: str) -> list[tuple[Any, ...]]:
    return [
        (e.action, e.attempt, e.error_class, e.detail.get("exception"), e.detail.get("claimed"))
        for e in job_events(job_id, settings=settings)
        if e.action in ("attempt.error", "job.failed")
    ]


def test_text_that_cannot_be_encoded_ends_failed_after_max_faults_without_a_call(
    settings: Settings, emu: Emulator
) -> None:
    job_id = store_unchecked(settings, [{"role": "user", "content": "a\ud800b"}])
    outcomes = deliver_until_done(settings, job_id)
    assert outcomes == ["queued", "queued", "failed"]  # max_faults = 3, no attempt was ever claimed
    view = get_job(job_id, settings=settings)
    assert view.status is JobStatus.FAILED
    assert view.attempts == 0
    assert view.error_class == "InternalError"
    assert view.error is not None
    assert view.error.startswith("InternalError: unexpected UnicodeEncodeError while claiming the job")
    assert "(met 3 times" in view.error
    assert "\ud800" not in view.error
    assert faults_of(settings, job_id) == [("attempt.error", 1, "InternalError", "UnicodeEncodeError", False)] * 3 + [
        ("job.failed", 1, "InternalError", None, None)
    ]
    assert emu.stats()["requests"] == 0


def test_a_payload_that_no_longer_decrypts_ends_failed_as_decryption_failed(settings: Settings) -> None:
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": "Hello"}], settings=settings)
    tamper_payload(settings, job_id)
    deliver_until_done(settings, job_id)
    view = get_job(job_id, settings=settings)
    assert view.status is JobStatus.FAILED
    assert view.error_class == "DecryptionFailed"
    assert view.error is not None
    assert view.error.startswith(
        f"DecryptionFailed: cannot decrypt jobs.payload of row {job_id}: authentication failed"
    )
    assert [a for a, *_ in faults_of(settings, job_id)] == ["attempt.error"] * 3 + ["job.failed"]


def test_a_fault_after_the_claim_is_the_attempt_s_outcome_and_is_retried(
    settings: Settings, emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug after the claim (here: resolving references raises what nothing expects) ends the attempt at once,
    # instead of leaving the job running until its lease runs out.
    calls = {"n": 0}
    real = images.build_body

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("a bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "build_body", flaky)
    fetching = settings.with_(fetch_remote_images=True)
    job_id = producer.submit(
        ASSISTANT,
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Hi"},
                    {"type": "image_url", "image_url": {"url": "https://192.0.2.1/x.png"}},
                ],
            }
        ],
        settings=fetching,
    )
    first = run_attempt(runtime(fetching), job_id)
    assert first == "retrying"
    view = get_job(job_id, settings=fetching)
    assert view.status is JobStatus.RETRYING
    assert view.attempts == 1
    assert view.error_class == "InternalError"
    assert "KeyError while resolving image references" in (view.error or "")
    assert faults_of(fetching, job_id) == [("attempt.error", 1, "InternalError", "KeyError", True)]
    assert [e.action for e in job_events(job_id, settings=fetching)][-1] == "job.retry_scheduled"
    # The next attempt resolves for real: the address is refused (TEST-NET), an expected, permanent outcome.
    deliver_until_done(fetching, job_id)
    view = get_job(job_id, settings=fetching)
    assert view.status is JobStatus.FAILED
    assert view.attempts == 2
    assert view.error_class == "ResolutionFailed"
    assert emu.stats()["requests"] == 0


def test_faults_count_in_a_row_and_an_ordinary_outcome_breaks_the_row(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": "Hi [[emulator:fail=503x1]]"}], settings=settings)
    with runtime(settings).transaction() as session:  # as if two faults had already met it
        session.execute(
            text("UPDATE jobs SET faults = 2, error_class = 'InternalError' WHERE id = :id"), {"id": job_id}
        )
    outcome = run_attempt(runtime(settings), job_id)  # a 503: an ordinary outcome, the row of faults is broken
    assert outcome == "retrying"
    assert get_job(job_id, settings=settings).error_class == "UpstreamServerError"
    deliver_until_done(settings, job_id)
    assert get_job(job_id, settings=settings).status is JobStatus.SUCCEEDED


def test_a_fault_on_a_job_that_moved_on_writes_nothing(settings: Settings) -> None:
    from qbgw.execution import faults

    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": "Hi"}], settings=settings)
    assert run_attempt(runtime(settings), job_id) == "succeeded"
    before = job_events(job_id, settings=settings)
    late = RuntimeError("late")
    assert faults.record(runtime(settings), job_id, late, faults.Progress()) == "skipped"
    assert job_events(job_id, settings=settings) == before
    assert get_job(job_id, settings=settings).status is JobStatus.SUCCEEDED


def test_a_read_only_database_is_unavailable_and_its_connection_is_dropped(
    production_settings: Settings, pg: PgDatabase
) -> None:
    """A server that takes no writes (a standby after a failover): StoreUnavailable, as for an outage, not a raw
    driver error (the worker would count it as the job's fault; the HTTP API would answer 500); and the pool
    drops that connection, so the next transaction, on a new one, works."""
    from qbgw.errors import StoreUnavailable

    settings = production_settings.with_(db_pool_size=1)
    rt = runtime(settings)
    with rt.transaction() as session:  # this pooled connection now refuses writes, as a standby's would
        session.execute(text("SET SESSION default_transaction_read_only = on"))
        # The server session, by its pid and start (a pid alone could be reused by another session by then).
        backend = tuple(
            session.execute(text("SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()")).one()
        )
    try:
        with pytest.raises(StoreUnavailable, match="read-only"):
            producer.submit(ASSISTANT, [{"role": "user", "content": "x"}], settings=settings)
        if not pg.pooled:  # our connection was the server's session, and closing it ended that session
            assert _backend_ends(pg.admin, backend)
    finally:
        # Through PgBouncer in transaction mode a SET SESSION outlives our connection: it stays on PgBouncer's
        # server connection, which would hand the read-only session to the next test. End that session.
        _terminate(pg.admin, backend)
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": "x"}], settings=settings)
    assert get_job(job_id, settings=settings).status == "queued"


#: Matches one server session by its pid and start time, given as a tuple ``backend`` (pid, backend_start).
_SESSION = "pid = :p AND backend_start = :s"


def _backend_ends(admin_url: str, backend: tuple[Any, ...], within: float = 5.0) -> bool:
    """Whether the server session ``backend`` (pid, start) ends within ``within`` seconds (a backend exits just
    after its client closes the connection)."""
    engine = create_engine(admin_url)
    try:
        deadline = time.monotonic() + within
        while True:
            with engine.connect() as connection:
                alive = connection.execute(
                    text(f"SELECT count(*) FROM pg_stat_activity WHERE {_SESSION}"), {"p": backend[0], "s": backend[1]}
                )
                if alive.scalar_one() == 0:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
    finally:
        engine.dispose()


def _terminate(admin_url: str, backend: tuple[Any, ...]) -> None:
    engine = create_engine(admin_url)
    try:
        with engine.connect() as connection:
            connection.execute(
                text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {_SESSION}"),
                {"p": backend[0], "s": backend[1]},
            )
    finally:
        engine.dispose()


def test_deliveries_that_come_before_the_jobs_time_do_not_count_its_fault_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: each early message (a duplicate, or a sweeper's) met the same fault before the claim and counted
    # it again, so QBGW_MAX_FAULTS was reached within seconds instead of over the backoffs.
    from qbgw.execution import tasks

    slow = settings.with_(backoff_base=3600.0, backoff_max=3600.0)

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("a bug before the claim")

    monkeypatch.setattr(tasks, "_admit", broken)
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": "Hi"}], settings=slow)
    for _ in range(3):
        run_attempt(runtime(slow), job_id)
    with runtime(slow).transaction() as session:
        faults, status = session.execute(text("SELECT faults, status FROM jobs WHERE id = :id"), {"id": job_id}).one()
    assert faults == 1
    assert status in ("queued", "retrying")
    errors = [e for e in job_events(job_id, settings=slow) if e.action == "attempt.error"]
    assert len(errors) == 1


def test_a_failed_job_whose_reason_cannot_be_read_does_not_hide_the_others(settings: Settings) -> None:
    from sqlalchemy import update

    from qbgw.queries import failed_jobs
    from qbgw.store.models import Job

    first, second = (
        producer.submit(ASSISTANT, [{"role": "user", "content": f"{n} [[emulator:fail=422]]"}], settings=settings)
        for n in ("one", "two")
    )
    for job_id in (first, second):
        run_attempt(runtime(settings), job_id)
    with runtime(settings).transaction() as session:  # the first's reason sealed for another row: unreadable
        moved = session.get(Job, second)
        assert moved is not None
        session.execute(update(Job).where(Job.id == first).values(error=moved.error))
    listed = {view.id: view for view in failed_jobs(reader="ops", settings=settings)}
    assert set(listed) == {first, second}
    assert (listed[first].error or "").startswith("(unreadable here: ")
    assert listed[first].error_class == "UpstreamRejected"
    assert "gateway answered HTTP 422" in (listed[second].error or "")
    reads = [e.job_id for e in job_events(second, include_reads=True, settings=settings) if e.action == "result.read"]
    assert reads == [second]
    assert not [e for e in job_events(first, include_reads=True, settings=settings) if e.action == "result.read"]
