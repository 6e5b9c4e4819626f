"""The server's intake (worker/api/intake.py): concurrent jobs stored and published in groups, each with its
own row and event, all of a group or none of it, and no POST left waiting."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import func, select

from qbgw import producer
from qbgw.api.intake import Intake
from qbgw.audit import anchors as integrity
from qbgw.errors import StoreUnavailable
from qbgw.queries import job_events
from qbgw.runtime.locator import runtime
from qbgw.settings import Secret, Settings
from qbgw.store import chain
from qbgw.store import jobs as store
from qbgw.store.models import Job
from tests.conftest import ASSISTANT

THREADS = 24


def new_jobs(settings: Settings, count: int, **fields: Any) -> list[store.NewJob]:
    rt = runtime(settings)
    return [
        producer.new_job(
            rt,
            ASSISTANT,
            [{"role": "user", "content": f"question {n}"}],
            custom_id=f"c-{n}",
            idempotency_key=None,
            actor="key:web",
            subject=fields.get("subject"),
        )
        for n in range(count)
    ]


def together(intake: Intake, jobs: list[store.NewJob]) -> list[bool | BaseException]:
    """Each job handed to ``intake`` from a thread of its own, all released at once; what each got back."""
    results: list[bool | BaseException] = [False] * len(jobs)
    start = threading.Barrier(len(jobs))

    def post(n: int) -> None:
        start.wait()
        try:
            results[n] = intake.submit(jobs[n])
        except Exception as exc:
            results[n] = exc

    threads = [threading.Thread(target=post, args=(n,)) for n in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a POST was left waiting"
    return results


def stored(settings: Settings) -> int:
    with runtime(settings).transaction() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def test_concurrent_jobs_are_stored_in_groups_each_with_its_row_and_event(settings: Settings) -> None:
    keyed = settings.with_(subject_key=Secret("s" * 40))
    jobs = new_jobs(keyed, THREADS, subject="MRN-7")
    intake = Intake(runtime(keyed))
    assert together(intake, jobs) == [True] * THREADS
    assert intake.jobs == THREADS
    assert intake.groups < THREADS, "concurrent jobs share a group"
    assert stored(keyed) == THREADS
    with runtime(keyed).transaction() as session:
        for job in jobs:
            row = session.get(Job, job.id)
            assert row is not None
            assert row.custom_id == job.custom_id
            assert row.actor == "key:web"
            assert store.open_text(session, "payload", job.id, row.payload) == job.payload
            assert store.open_text(session, "subject", job.id, row.subject) == "MRN-7"
            assert row.subject_index == job.subject_index
    for job in jobs:
        (submitted,) = [e for e in job_events(job.id, settings=keyed) if e.action == "job.submitted"]
        assert submitted.actor == "key:web"
        assert submitted.subject_index == job.subject_index
    runtime(keyed).chain_staged()
    with runtime(keyed).transaction() as session:
        report = chain.verify(session, integrity.read_anchors(keyed.anchor_path), integrity.anchor_key(keyed))
    assert report.ok, report
    assert report.events == 2 * THREADS  # each job's job.submitted, and each job_events query above


def test_every_job_of_a_group_is_published(production_settings: Settings) -> None:
    intake = Intake(runtime(production_settings))
    assert together(intake, new_jobs(production_settings, THREADS)) == [True] * THREADS
    client = redis_lib.Redis.from_url(production_settings.broker_url)
    try:
        assert client.llen(production_settings.queue) == THREADS
    finally:
        client.close()


def test_a_group_the_broker_refuses_is_stored_and_left_for_the_sweeper(settings: Settings) -> None:
    down = settings.with_(broker_url="redis://127.0.0.1:1/0")
    jobs = new_jobs(down, 3)
    assert producer.store_together(runtime(down), jobs) is False
    with runtime(down).transaction() as session:
        unannounced = session.scalars(select(Job.id).where(Job.announced_at.is_(None))).all()
    assert sorted(unannounced) == sorted(job.id for job in jobs)


class _Unexpected(BaseException):
    """Not an Exception: what no except clause of the store path expects."""


@pytest.mark.parametrize(
    ("failure", "answer", "says"),
    [
        # The database is away: each POST of the group answers with the store's own error.
        (StoreUnavailable("database unavailable: the test's"), StoreUnavailable, "the test's"),
        # The storer itself fails unexpectedly: each POST still gets one answer, and the storer goes on.
        (_Unexpected(), RuntimeError, "failed to store"),
    ],
)
def test_a_group_that_cannot_be_stored_fails_each_of_its_jobs_and_the_next_ones_go_on(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, failure: BaseException, answer: type, says: str
) -> None:
    intake = Intake(runtime(settings))
    real: Callable[..., bool] = producer.store_together
    failing = threading.Event()
    failing.set()

    def flaky(rt: Any, jobs: list[store.NewJob]) -> bool:
        if failing.is_set():
            raise failure
        return real(rt, jobs)

    monkeypatch.setattr(producer, "store_together", flaky)
    results = together(intake, new_jobs(settings, THREADS))
    assert all(isinstance(r, answer) and says in str(r) for r in results), results
    # Each POST raised an error of its own: one instance raised in every waiter would carry all their frames.
    assert len({id(r) for r in results}) == THREADS
    assert all(isinstance(r, BaseException) and r.__traceback__ is not None for r in results)
    tracebacks = [len(traceback.extract_tb(r.__traceback__)) for r in results if isinstance(r, BaseException)]
    assert max(tracebacks) == min(tracebacks), tracebacks
    assert stored(settings) == 0
    assert (intake.groups, intake.jobs) == (0, 0), "a group that failed was counted as stored"
    failing.clear()  # the database is back: the intake was not left thinking a group is being stored
    assert together(intake, new_jobs(settings, 3)) == [True] * 3
    assert stored(settings) == 3
    assert intake.jobs == 3


def test_jobs_with_an_idempotency_key_are_not_stored_together(settings: Settings) -> None:
    rt = runtime(settings)
    keyed = producer.new_job(
        rt,
        ASSISTANT,
        [{"role": "user", "content": "x"}],
        custom_id=None,
        idempotency_key="k-1",
        actor="a",
        subject=None,
    )
    with pytest.raises(ValueError, match="idempotency key"):
        producer.store_together(rt, [keyed])
    assert stored(settings) == 0


def test_large_jobs_are_stored_in_groups_of_bounded_size(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from qbgw.api import intake as intake_module

    monkeypatch.setattr(intake_module, "MAX_GROUP_BYTES", 1)  # every job is over it: a group each
    sizes: list[int] = []
    real: Callable[..., bool] = producer.store_together

    def counting(rt: Any, jobs: list[store.NewJob]) -> bool:
        sizes.append(len(jobs))
        return real(rt, jobs)

    monkeypatch.setattr(producer, "store_together", counting)
    intake = Intake(runtime(settings))
    assert together(intake, new_jobs(settings, 8)) == [True] * 8
    assert sizes == [1] * 8
    assert stored(settings) == 8


def test_coroutines_wait_on_their_loop_and_are_stored_in_groups(settings: Settings) -> None:
    """``submit_async`` (what ``POST /v1/jobs`` awaits): many coroutines of one event loop, each its own answer,
    stored in fewer groups than jobs by the storer thread, the loop free meanwhile."""
    import asyncio

    intake = Intake(runtime(settings))
    jobs = new_jobs(settings, THREADS)
    ticks = 0

    async def ticking() -> None:  # runs only while the loop is free
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async def main() -> list[bool]:
        ticker = asyncio.create_task(ticking())
        try:
            return await asyncio.gather(*(intake.submit_async(job) for job in jobs))
        finally:
            ticker.cancel()

    assert asyncio.run(main()) == [True] * THREADS
    assert intake.jobs == THREADS
    assert intake.groups < THREADS
    assert ticks > 100, f"the loop was blocked while the jobs were stored ({ticks} turns)"
    assert stored(settings) == THREADS


def test_a_coroutine_that_goes_away_still_has_its_job_stored_and_the_others_are_answered(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    intake = Intake(runtime(settings))
    real: Callable[..., bool] = producer.store_together
    storing = threading.Event()
    release = threading.Event()

    def slow(rt: Any, jobs: list[store.NewJob]) -> bool:
        storing.set()
        release.wait(10)
        return real(rt, jobs)

    monkeypatch.setattr(producer, "store_together", slow)
    first, gone, kept = new_jobs(settings, 3)

    async def main() -> tuple[bool, bool]:
        leading = asyncio.create_task(intake.submit_async(first))
        await asyncio.to_thread(storing.wait, 10)  # the first group is being stored; the next two wait
        leaving = asyncio.create_task(intake.submit_async(gone))
        staying = asyncio.create_task(intake.submit_async(kept))
        await asyncio.sleep(0)
        leaving.cancel()  # its client went away
        release.set()
        return await leading, await staying

    assert asyncio.run(main()) == (True, True)
    assert stored(settings) == 3  # the one that went away had been handed over: it is stored


def test_a_closed_intake_stores_what_it_holds_then_its_storer_ends(settings: Settings) -> None:
    intake = Intake(runtime(settings))
    assert together(intake, new_jobs(settings, 3)) == [True] * 3
    storer = intake._storer
    assert storer is not None
    assert storer.is_alive()
    intake.close()
    storer.join(timeout=10)
    assert not storer.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        intake.submit(new_jobs(settings, 1)[0])
    assert stored(settings) == 3
