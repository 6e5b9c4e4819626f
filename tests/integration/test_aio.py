"""``qbgw.aio``, the Python API for async web apps, on both database backends (the embedded broker): submit then
wait returns the answered job, a wait's timeout never blocks the event loop, an unknown id is JobNotFound, and
on PostgreSQL a job ended by another transaction wakes a waiter by NOTIFY, not at its recheck.

No worker process runs: a job's attempt is made in a thread of this process (``run_attempt``, as a worker and
``qbgw.testing``'s drain do), on another database connection, so its end is another transaction's commit.
Each test drives its own event loop with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text

import qbgw
from qbgw import aio, producer
from qbgw.errors import JobNotFound
from qbgw.execution.tasks import run_attempt
from qbgw.lifecycle import JobStatus
from qbgw.runtime.locator import runtime
from qbgw.runtime.waiter import CHANNEL, RECHECK, JobWaiter
from qbgw.settings import Settings
from tests.conftest import ASSISTANT, PG_ADMIN_URL

LISTENER = "qbgw-job-listener"  # the name of JobWaiter's listener thread


def messages(text: str = "What is a normal resting heart rate?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def listener_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == LISTENER and t.is_alive()}


@pytest.fixture(autouse=True)
def _stop_listeners() -> Iterator[None]:
    """Stop the listener threads this test's event loops started, so none outlives the test (and its database)."""
    before = listener_threads()
    yield
    for per_loop in list(aio._waiters.values()):
        for waiter in per_loop.values():
            waiter.stop()
    aio._waiters.clear()
    for thread in listener_threads() - before:
        thread.join(timeout=5)


def test_submit_then_wait_returns_the_answered_job(settings: Settings) -> None:
    async def scenario() -> tuple[str, qbgw.JobView, qbgw.JobView]:
        job_id = await aio.submit(ASSISTANT, messages(), custom_id="visit-9", actor="app:clinic", settings=settings)
        queued = await aio.status(job_id, settings=settings)
        waiting = asyncio.create_task(aio.wait(job_id, timeout=30, reader="app:nurse", settings=settings))
        await asyncio.to_thread(run_attempt, runtime(settings), job_id)  # a worker's attempt, in another thread
        return job_id, queued, await waiting

    job_id, queued, view = asyncio.run(scenario())
    assert queued.status is JobStatus.QUEUED
    assert queued.answer is None  # the status carries no PHI
    assert view.id == job_id
    assert view.status is JobStatus.SUCCEEDED
    assert view.done
    assert view.custom_id == "visit-9"
    assert view.actor == "app:clinic"
    assert "normal resting heart rate" in (view.answer or "")
    assert view.error is None
    reads = [e for e in qbgw.job_events(job_id, include_reads=True, settings=settings) if e.action == "result.read"]
    assert [e.actor for e in reads] == ["app:nurse"]  # wait's get is one audited read, by the reader named


def test_wait_on_a_job_that_has_ended_returns_at_once(settings: Settings) -> None:
    job_id = producer.submit(ASSISTANT, messages("[[emulator:fail=400]] hi"), settings=settings)
    run_attempt(runtime(settings), job_id)

    async def scenario() -> tuple[float, qbgw.JobView]:
        started = time.monotonic()
        view = await aio.wait(job_id, timeout=10, settings=settings)
        return time.monotonic() - started, view

    took, view = asyncio.run(scenario())
    assert view.status is JobStatus.FAILED
    assert view.http_status == 400
    assert view.error
    assert took < 2.0


def test_a_wait_that_times_out_raises_timeout_error_and_never_blocks_the_event_loop(settings: Settings) -> None:
    """The job never runs (no worker). While wait() waits 1.5 s, a task on the same loop ticks every 10 ms: if
    wait() blocked the loop (a database read, or a sleep, on the loop's thread), the ticks would stop for that
    long. They keep coming: many ticks, and no gap between two of them longer than a fraction of the wait."""
    timeout = 1.5

    async def scenario() -> tuple[BaseException | None, float, list[float]]:
        job_id = await aio.submit(ASSISTANT, messages(), settings=settings)
        ticks: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        started = time.monotonic()
        raised: BaseException | None = None
        try:
            await aio.wait(job_id, timeout=timeout, settings=settings)
        except TimeoutError as exc:
            raised = exc
        took = time.monotonic() - started
        stop.set()
        await ticking
        assert (await aio.status(job_id, settings=settings)).status is JobStatus.QUEUED  # a wait changes nothing
        return raised, took, [t for t in ticks if started <= t <= started + took]

    raised, took, ticks = asyncio.run(scenario())
    assert isinstance(raised, TimeoutError), "wait() past its timeout must raise TimeoutError"
    assert "still queued after 1.5s" in str(raised)
    assert timeout - 0.05 <= took < timeout + 1.0
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert len(ticks) >= 50, f"only {len(ticks)} ticks in {took:.2f} s: the loop was blocked"
    # One long gap may be the machine's (a collection, a preemption); a wait that blocked its loop makes several.
    second_longest = sorted(gaps)[-2]
    assert second_longest < 0.25, f"the loop stalled twice, for {second_longest:.3f} s or more, during wait()"


def test_wait_on_an_unknown_id_raises_job_not_found(settings: Settings) -> None:
    async def scenario() -> None:
        with pytest.raises(JobNotFound):
            await aio.wait("no-such-job", timeout=5, settings=settings)
        with pytest.raises(JobNotFound):
            await aio.wait("no-such-job", settings=settings)  # nor without a timeout: it does not wait for one
        with pytest.raises(JobNotFound):
            await aio.get("no-such-job", settings=settings)

    asyncio.run(asyncio.wait_for(scenario(), timeout=10))


@pytest.mark.parametrize("backend", ["postgres"])
def test_on_postgresql_a_job_ended_by_another_transaction_wakes_the_waiter(settings: Settings) -> None:
    """NOTIFY is the mechanism, not the recheck. Once the waiter's listener is connected, a waiter re-reads the
    job only every RECHECK (5 s). The job is then cancelled by another transaction (``qbgw.cancel`` in another
    thread, on another connection); the trigger NOTIFYs at its commit. The wait returns in well under 3 s after
    the cancel: had the notification not woken it, it would have slept until its 5 s recheck."""
    assert RECHECK == 5.0

    async def scenario() -> tuple[float, qbgw.JobView, int, JobWaiter]:
        job_id = await aio.submit(ASSISTANT, messages(), settings=settings)
        waiter = aio._waiter(settings)  # this loop's waiter (private): the test must know it listens
        waiting = asyncio.create_task(aio.wait(job_id, timeout=30, settings=settings))
        deadline = time.monotonic() + 10
        while not waiter.listening:
            assert time.monotonic() < deadline, "the listener did not connect within 10 s"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # the waiter has re-read the job since and sleeps on the 5 s recheck now
        assert not waiting.done()
        assert waiter.interval(0) == RECHECK
        woken = waiter.woken
        started = time.monotonic()
        status = await asyncio.to_thread(qbgw.cancel, job_id, actor="another-process", settings=settings)
        assert status is JobStatus.CANCELLED
        view = await waiting
        return time.monotonic() - started, view, waiter.woken - woken, waiter

    took, view, notifications, waiter = asyncio.run(scenario())
    assert view.status is JobStatus.CANCELLED
    assert notifications >= 1, "no NOTIFY reached the listener"
    assert took < 3.0, f"the waiter woke {took:.2f} s after the cancel: at its recheck, not by NOTIFY"
    assert waiter.notifies


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_job_nobody_in_the_loop_waits_for_does_not_wake_the_loop(settings: Settings) -> None:
    """Every job's end is notified to every listening process. A loop is handed only the ends its coroutines wait
    for: a job nobody waits for is counted by the listener (``woken``) but costs the loop nothing
    (``loop_wakes``); a job a coroutine waits for still wakes it at once."""

    async def scenario() -> tuple[int, int, int, int, qbgw.JobView]:
        unwatched = await aio.submit(ASSISTANT, messages(), settings=settings)
        watched = await aio.submit(ASSISTANT, messages(), settings=settings)
        waiter = aio._waiter(settings)
        deadline = time.monotonic() + 10
        while not waiter.listening:
            assert time.monotonic() < deadline, "the listener did not connect within 10 s"
            await asyncio.sleep(0.02)
        woken, loop_wakes = waiter.woken, waiter.loop_wakes
        await asyncio.to_thread(qbgw.cancel, unwatched, actor="another-process", settings=settings)
        while waiter.woken == woken:
            assert time.monotonic() < deadline, "the cancel's NOTIFY did not reach the listener"
            await asyncio.sleep(0.01)
        after_unwatched = (waiter.woken - woken, waiter.loop_wakes - loop_wakes)
        waiting = asyncio.create_task(aio.wait(watched, timeout=30, settings=settings))
        await asyncio.sleep(0.2)  # the wait has registered and read the job: it sleeps on the recheck now
        started = time.monotonic()
        await asyncio.to_thread(qbgw.cancel, watched, actor="another-process", settings=settings)
        view = await waiting
        assert time.monotonic() - started < 3.0, "the watched job's end did not wake its waiter"
        return *after_unwatched, waiter.woken - woken, waiter.loop_wakes - loop_wakes, view

    notes, loop_wakes, notes_after, loop_wakes_after, view = asyncio.run(scenario())
    assert (notes, loop_wakes) == (1, 0), "a job nobody in the loop waits for was handed to the loop"
    assert notes_after == 2
    assert loop_wakes_after == 1
    assert view.status is JobStatus.CANCELLED


@pytest.mark.parametrize("backend", ["postgres"])
def test_an_event_loop_that_has_closed_leaves_no_listener_nor_connection_behind(settings: Settings) -> None:
    """A sync program that calls ``asyncio.run(qbgw.aio.wait(...))`` now and then (a script, a Celery task, a
    test suite with a loop per test) runs one event loop after another. Each loop gets a JobWaiter with a
    listener thread holding a PostgreSQL connection; once the loop has closed nothing can use it, so it must
    not stay behind, else every asyncio.run costs one more connection until max_connections is spent."""
    job_id = producer.submit(ASSISTANT, messages(), settings=settings)
    qbgw.cancel(job_id, settings=settings)
    before = listener_threads()
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def once() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        waiter = aio._waiter(settings)
        deadline = time.monotonic() + 10
        while not waiter.listening and time.monotonic() < deadline:  # the listener connected: a connection held
            await asyncio.sleep(0.02)
        assert (await aio.wait(job_id, timeout=5, settings=settings)).status is JobStatus.CANCELLED

    for _ in range(3):
        asyncio.run(once())

    def leftovers() -> tuple[int, int, int]:
        gc.collect()
        return len(listener_threads() - before), _listening_connections(settings), sum(r() is not None for r in loops)

    deadline = time.monotonic() + 10  # a listener checks for its stop every second, then closes its connection
    while leftovers() != (0, 0, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    left, connections, alive = leftovers()
    assert (left, connections, alive) == (0, 0, 0), (
        f"after 3 asyncio.run(qbgw.aio.wait(...)) that have returned: {left} listener thread(s) still run, "
        f"{connections} connection(s) still LISTEN {CHANNEL}, {alive} closed event loop(s) still referenced "
        "(qbgw/aio.py _waiter: a JobWaiter per loop is started and never stopped; the WeakKeyDictionary's value "
        "holds its loop, so the entry never goes)"
    )


def _listening_connections(settings: Settings) -> int:
    """Connections to this database that LISTEN (their last statement), seen by a superuser."""
    database = settings.effective_database_url.rsplit("/", 1)[1]
    engine = create_engine(PG_ADMIN_URL)
    try:
        with engine.connect() as connection:
            found = connection.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d AND query = :q"),
                {"d": database, "q": f"LISTEN {CHANNEL}"},
            )
            return int(found or 0)
    finally:
        engine.dispose()


def _await_listening(waiter: JobWaiter) -> None:
    deadline = time.monotonic() + 10
    while not waiter.listening:
        assert time.monotonic() < deadline, "the listener did not connect within 10 s"
        time.sleep(0.02)


@pytest.mark.parametrize("backend", ["postgres"])
def test_the_listener_reads_the_ended_job_for_the_waiting_coroutine_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coroutine waiting for a job gives the listener its read: as the end's NOTIFY arrives, a reader thread of
    the waiter reads the job, and the loop is woken once, with the answer (not once for the end and again for
    a read it would start itself). One read, one ``result.read`` event."""
    real_get = qbgw.queries.get_job
    threads: list[str] = []

    def get_job(*args: Any, **kwargs: Any) -> qbgw.JobView:
        threads.append(threading.current_thread().name)
        return real_get(*args, **kwargs)

    monkeypatch.setattr(qbgw.queries, "get_job", get_job)

    async def scenario() -> tuple[str, qbgw.JobView, int]:
        job_id = await aio.submit(ASSISTANT, messages(), settings=settings)
        waiter = aio._waiter(settings)
        await asyncio.to_thread(_await_listening, waiter)
        waiting = asyncio.create_task(aio.wait(job_id, timeout=30, reader="app:nurse", settings=settings))
        await asyncio.sleep(0.3)  # it has read the job's status, and waits
        loop_wakes = waiter.loop_wakes
        await asyncio.to_thread(run_attempt, runtime(settings), job_id)
        return job_id, await waiting, waiter.loop_wakes - loop_wakes

    job_id, view, loop_wakes = asyncio.run(scenario())
    assert view.status is JobStatus.SUCCEEDED
    assert view.answer
    assert len(threads) == 1, threads
    assert threads[0].startswith("qbgw-ended-read"), threads
    assert loop_wakes == 1
    reads = [e for e in qbgw.job_events(job_id, include_reads=True, settings=settings) if e.action == "result.read"]
    assert [e.actor for e in reads] == ["app:nurse"]


@pytest.mark.parametrize("backend", ["postgres"])
def test_what_the_listeners_read_raises_reaches_the_waiting_coroutine(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def get_job(*_: Any, **__: Any) -> qbgw.JobView:
        raise JobNotFound("purged meanwhile")

    async def scenario() -> None:
        job_id = await aio.submit(ASSISTANT, messages(), settings=settings)
        await asyncio.to_thread(_await_listening, aio._waiter(settings))
        monkeypatch.setattr(qbgw.queries, "get_job", get_job)  # (the wait reads the status, then waits)
        waiting = asyncio.create_task(aio.wait(job_id, timeout=30, settings=settings))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(qbgw.cancel, job_id, actor="another-process", settings=settings)
        with pytest.raises(JobNotFound, match="purged meanwhile"):
            await asyncio.wait_for(waiting, timeout=3)  # (at once: not at the 5 s recheck)

    asyncio.run(scenario())


def test_a_wakes_end_is_claimed_once_by_the_listener_or_by_its_coroutine() -> None:
    """The listener starts a coroutine's read only if the coroutine is not done waiting (its timeout), and a
    coroutine done waiting reads only if the listener has not started it: one of the two, never both."""
    from concurrent.futures import Future

    from qbgw.runtime.waiter import AsyncWake

    async def scenario() -> None:
        first = AsyncWake()
        read: Future[Any] = Future()
        assert first.claim(read)  # the listener
        assert not first.claim()  # the coroutine, done waiting: the listener's read is there
        assert first.read is read
        second = AsyncWake()
        assert second.claim()  # the coroutine first
        assert not second.claim(Future())  # the listener starts nothing
        assert second.read is None

    asyncio.run(scenario())


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_coroutine_whose_wait_times_out_as_the_listener_reads_gets_that_read(settings: Settings) -> None:
    """The listener has claimed the end and its read is still being made when the coroutine's wait times out:
    the coroutine waits for that read (it does not make a second one), without blocking its loop."""
    from concurrent.futures import Future

    async def scenario() -> None:
        waiter = aio._waiter(settings)
        await asyncio.to_thread(_await_listening, waiter)
        with waiter.watch("job-1") as ended:
            slow: Future[Any] = Future()
            calls: list[str] = []

            def on_end() -> str:
                calls.append("read")
                return "the coroutine's own read"

            async def listener_claims() -> None:
                await asyncio.sleep(0.05)
                assert ended.claim(slow)  # the listener's claim
                assert slow.set_running_or_notify_cancel()  # a reader thread has started it, not made it yet
                await asyncio.sleep(0.3)
                slow.set_result("the listener's read")

            claiming = asyncio.create_task(listener_claims())
            read = await waiter.wait_end(ended, 0.1, on_end)
            await claiming
        assert read is slow
        assert read.result() == "the listener's read"
        assert calls == []

    asyncio.run(scenario())


def test_a_wait_that_times_out_with_the_listeners_read_still_queued_reads_by_itself() -> None:
    """A burst of ends fills the reader threads: the listener claimed this coroutine's end, but its read waits in
    the queue when the coroutine's wait times out. The coroutine takes the read back and is told the job ended
    (it reads by itself, at once), instead of overrunning its wait by the queue of other jobs' reads."""
    from concurrent.futures import Future

    waiter = JobWaiter("sqlite:///unused.db")
    waiter.listening = True

    async def scenario() -> tuple[Any, bool, float, Future[Any]]:
        with waiter.watch("job-1") as ended:
            queued: Future[Any] = Future()

            async def listener_claims() -> None:
                await asyncio.sleep(0.05)
                ended.ended = True
                assert ended.claim(queued)  # claimed, and queued behind other reads: no reader has taken it

            claiming = asyncio.create_task(listener_claims())
            started = time.monotonic()
            try:  # (bounded: a coroutine that waits for the queued read would wait for ever here)
                read = await asyncio.wait_for(waiter.wait_end(ended, 0.2, lambda: "read"), timeout=2)
            except TimeoutError:
                pytest.fail("the coroutine waited for a read still in the queue, past its own wait")
            took = time.monotonic() - started
            await claiming
        return read, ended.ended, took, queued

    read, ended, took, queued = asyncio.run(scenario())
    assert read is None, "the coroutine waited for a read still in the queue"
    assert ended, "the coroutine was not told the job ended"
    assert queued.cancelled(), "the queued read would still be made (a second read of the same end)"
    assert took < 1.0


def test_a_coroutine_cancelled_while_it_waits_leaves_the_listener_no_read_to_start() -> None:
    """A wait cancelled (its caller's own timeout, say) claims its end on the way out: a notification that
    arrives next starts no read for nobody (an audited read of an answer nobody receives)."""
    from concurrent.futures import Future

    waiter = JobWaiter("sqlite:///unused.db")
    waiter.listening = True  # (as if it listened: the read is given to the listener)

    async def scenario() -> None:
        with waiter.watch("job-1") as ended:
            waiting = asyncio.create_task(waiter.wait_end(ended, 30, lambda: "read"))
            await asyncio.sleep(0.05)
            assert ended.on_end is not None
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert not ended.claim(Future()), "the listener could still start a read"

    asyncio.run(scenario())


def test_a_stopped_waiter_wakes_its_coroutines_to_read_themselves() -> None:
    """Once the waiter is stopped its reader threads take no read: a job's end still wakes the coroutine, which
    then reads by itself."""
    waiter = JobWaiter("sqlite:///unused.db")
    waiter.listening = True

    async def scenario() -> None:
        waiter.start(asyncio.get_running_loop())
        waiter.stop()
        with waiter.watch("job-1") as ended:
            waiting = asyncio.create_task(waiter.wait_end(ended, 30, lambda: "read"))
            await asyncio.sleep(0.05)
            await asyncio.to_thread(waiter._notified, "job-1")
            read = await asyncio.wait_for(waiting, timeout=3)
        assert read is None
        assert ended.ended

    asyncio.run(scenario())


def test_a_cancelled_wait_takes_back_the_read_the_listener_has_not_started() -> None:
    """The listener claimed the end and queued its read, then the wait is cancelled: the read, not started yet,
    is cancelled too (an audited read nobody would receive)."""
    from concurrent.futures import Future

    waiter = JobWaiter("sqlite:///unused.db")
    waiter.listening = True

    async def scenario() -> Future[Any]:
        with waiter.watch("job-1") as ended:
            waiting = asyncio.create_task(waiter.wait_end(ended, 30, lambda: "read"))
            await asyncio.sleep(0.05)
            queued: Future[Any] = Future()
            assert ended.claim(queued)  # the listener's claim; no reader has taken the read yet
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        return queued

    assert asyncio.run(scenario()).cancelled()


class _Connected:
    """A request whose client is still there (what ``_long_poll`` asks of its request)."""

    async def is_disconnected(self) -> bool:
        return False


def test_a_long_poll_whose_listener_read_finds_the_job_going_on_reads_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener's read after an end finds the job not ended (replayed meanwhile): the long-poll goes on with a
    status read, not with a second read of the answer for the same end."""
    import types

    from qbgw.api import app as door

    waiter = JobWaiter("sqlite:///unused.db")
    monkeypatch.setattr(door, "_ctx", lambda _request: types.SimpleNamespace(waiter=waiter))
    calls: list[str] = []

    def attempt() -> tuple[bool, str]:
        calls.append("status")
        return False, "running"

    def read() -> tuple[bool, str]:
        calls.append("read")
        return False, "running (replayed)"

    async def scenario() -> str:
        waiter.start(asyncio.get_running_loop())
        waiter.listening = True
        try:
            ending = threading.Timer(0.2, waiter._notified, args=("job-1",))
            ending.start()
            return await door._long_poll(_Connected(), "job-1", 0.6, attempt, read)  # type: ignore[arg-type]
        finally:
            waiter.stop(wait=False)

    assert asyncio.run(scenario()) == "running"
    assert calls.count("read") == 1, calls


def test_a_read_the_listener_cannot_start_is_left_to_the_coroutine(monkeypatch: pytest.MonkeyPatch) -> None:
    """No reader thread can start (``can't start new thread``): the coroutine is woken, told the job ended, and
    makes the read itself, instead of answering with the listener's error."""
    from concurrent.futures import ThreadPoolExecutor

    def refuse(*_: Any, **__: Any) -> Any:
        raise RuntimeError("can't start new thread")

    waiter = JobWaiter("sqlite:///unused.db")
    waiter._readers = ThreadPoolExecutor(1)
    monkeypatch.setattr(waiter._readers, "submit", refuse)

    async def scenario() -> tuple[Any, bool]:
        waiter.start(asyncio.get_running_loop())
        waiter.listening = True
        try:
            with waiter.watch("job-1") as ended:
                waiting = asyncio.create_task(waiter.wait_end(ended, 30, lambda: "read"))
                await asyncio.sleep(0.05)
                await asyncio.to_thread(waiter._notified, "job-1")
                return await asyncio.wait_for(waiting, timeout=3), ended.ended
        finally:
            waiter.stop(wait=False)

    assert asyncio.run(scenario()) == (None, True)


def test_aio_submit_takes_the_arguments_of_submit() -> None:
    """``qbgw.aio.submit`` is ``qbgw.submit`` on the loop: the same parameters, with the same defaults."""
    import inspect

    assert inspect.signature(aio.submit).parameters.keys() == inspect.signature(qbgw.submit).parameters.keys()
    for name, parameter in inspect.signature(qbgw.submit).parameters.items():
        assert inspect.signature(aio.submit).parameters[name].default == parameter.default, name
