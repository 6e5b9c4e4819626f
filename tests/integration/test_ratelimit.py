"""The fleet rate limiter on real parts: Redis's script against the Python reference, budgets shared by
separate processes (Redis and the embedded file), and a job that waits for it, on both databases."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from qbgw import producer
from qbgw.emulator.server import Emulator
from qbgw.execution.tasks import Outcome, run_attempt
from qbgw.lifecycle import JobStatus, utcnow
from qbgw.queries import get_job, job_events
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from qbgw.upstream.ratelimit import COOLDOWN, RATE_LIMIT, Budget, FileLimiter, MemoryLimiter, RedisLimiter
from tests.conftest import ASSISTANT, ROOT
from tests.unit.test_ratelimit import Clock, worst_window


def test_the_redis_script_decides_as_the_python_reference(redis_url: str) -> None:
    redis_limiter = RedisLimiter(redis_url, f"test-{uuid.uuid4().hex}")
    clock, rng = Clock(1_764_000_000.0), random.Random(3)
    reference = MemoryLimiter(clock=clock)
    fleet, noisy = Budget("global", 40, 3), Budget("assistant:n", 7, 2)
    for step in range(400):
        clock.now += rng.choice([0.0, 0.001, 0.01, 0.05, 0.4])
        budgets = rng.choice([[fleet], [fleet, noisy], [noisy], []])
        if step % 37 == 20:
            retry_after, fresh = rng.choice([None, None, 0.5, 2.0]), rng.random() < 0.4
            assert redis_limiter.cool_down(retry_after, fresh=fresh, now=clock.now) == pytest.approx(
                reference.cool_down(retry_after, fresh=fresh), abs=1e-5
            )
        horizon, lead = rng.choice([0.05, 0.45, 5.0]), rng.choice([0.0, 0.0, 0.02])
        got = redis_limiter.acquire(budgets, horizon=horizon, lead=lead, now=clock.now)
        want = reference.acquire(budgets, horizon=horizon, lead=lead)
        assert got.reserved == want.reserved, (step, got, want)
        if abs(want.wait - lead) > 1e-4:  # at a tie with the lead, rounding may name either reason
            assert got.reason == want.reason, (step, got, want)
        assert got.wait == pytest.approx(want.wait, abs=1e-5), step
        assert got.at == pytest.approx(want.at, abs=1e-5) or not budgets, step
        if budgets and rng.random() < 0.5:  # some callers log their call as sent
            assert redis_limiter.admit(budgets, now=clock.now) == pytest.approx(reference.admit(budgets), abs=1e-5)


def test_a_cooldown_set_by_one_worker_holds_another(redis_url: str) -> None:
    scope = f"test-{uuid.uuid4().hex}"
    one, other = RedisLimiter(redis_url, scope), RedisLimiter(redis_url, scope)
    until = one.cool_down(2.0)
    asked = time.time()
    held = other.acquire([Budget("global", 100)], horizon=10)
    answered = time.time()
    assert held.reason == COOLDOWN
    # the wait is counted from some moment between asking and the answer (a slow machine widens the two)
    assert until - answered - 0.01 <= held.wait <= until - asked + 0.01
    assert other.cooldown_until() == pytest.approx(until, abs=1e-5)


def test_without_redis_calls_go_ahead_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RedisLimiter("redis://127.0.0.1:1/0", "nowhere")
    grant = limiter.acquire([Budget("global", 1)], horizon=1)
    assert grant.reserved
    assert grant.wait == 0
    assert "cannot reach Redis" in caplog.text


_FLEET_MEMBER = """
import json, sys, time
from pathlib import Path
from qbgw.upstream.ratelimit import Budget, FileLimiter, RedisLimiter
kind, where, scope, start = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
limiter = RedisLimiter(where, scope) if kind == "redis" else FileLimiter(Path(where), scope)
time.sleep(max(0.0, start - time.time()))
slots = []
for _ in range(30):
    grant = limiter.acquire([Budget("global", 40, 2)], horizon=30)
    slots.append(grant.at)  # on the limiter's clock: not shifted by a pause of this process after the answer
print(json.dumps(slots))
"""


@pytest.mark.parametrize("kind", ["redis", "file"])
def test_four_processes_share_one_budget(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    where = request.getfixturevalue("redis_url") if kind == "redis" else str(tmp_path)
    scope, start = f"test-{uuid.uuid4().hex}", time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FLEET_MEMBER, kind, where, scope, repr(start)], stdout=subprocess.PIPE, cwd=ROOT
        )
        for _ in range(4)
    ]
    slots = [t for proc in procs for t in json.loads(proc.communicate(timeout=60)[0])]
    assert len(slots) == 120
    # Four processes at once, yet one budget: rate + burst - 1 on the limiter's clock, and one more at most
    # here, where each slot is read back on the caller's clock after a round trip of its own.
    assert worst_window(slots) <= 40 + 2
    assert max(slots) - min(slots) >= (120 - 2) / 40 - 0.05


def test_a_file_budget_survives_a_damaged_state_file(tmp_path: Path) -> None:
    limiter = FileLimiter(tmp_path, "s")
    (tmp_path / "ratelimit-s.json").write_text("{not json")
    assert limiter.acquire([Budget("global", 1)], horizon=2).wait == 0
    # the next slot, 1 s after the first: less the time between the two calls on a slow machine
    assert 0.0 < limiter.acquire([Budget("global", 1)], horizon=2).wait <= 1 + 1e-6


def _submit(settings: Settings, text: str) -> str:
    return producer.submit(ASSISTANT, [{"role": "user", "content": text}], settings=settings)


def test_a_job_over_the_budget_is_rescheduled_as_throttled_not_failed(settings: Settings, emu: Emulator) -> None:
    settings = settings.with_(rate_limit=1, rate_burst=1, rate_max_sleep=0.0, rate_scope=uuid.uuid4().hex)
    first, second = _submit(settings, "first"), _submit(settings, "second")
    first_started = time.time()
    assert run_attempt(runtime(settings), first) is Outcome.SUCCEEDED
    before = utcnow()
    assert run_attempt(runtime(settings), second) is Outcome.THROTTLED
    view = get_job(second, settings=settings)
    assert (view.status, view.attempts, view.throttled, view.error) == (JobStatus.QUEUED, 0, RATE_LIMIT, None)
    assert view.next_attempt_at is not None
    assert before < view.next_attempt_at < before + timedelta(seconds=1.6)
    throttled = [e for e in job_events(second, settings=settings) if e.action == "job.throttled"]
    assert len(throttled) == 1
    assert throttled[0].outcome == "throttled"
    assert throttled[0].detail["reason"] == RATE_LIMIT
    assert throttled[0].detail["slot"] == "reserved"
    # One interval (1 s) after the first job's place, which was taken after first_started and up to a lead
    # (<= 0.5 s) ahead of it; the second asked at `before` at the latest (a slow first attempt shortens the wait).
    assert 1000 * (first_started + 1 - before.timestamp()) - 50 <= throttled[0].detail["wait_ms"] <= 1550
    assert emu.stats()["requests"] == 1  # nothing was sent for it
    assert run_attempt(runtime(settings), second) is Outcome.SKIPPED  # not due: an early duplicate does nothing
    time.sleep(max(0.0, (view.next_attempt_at - utcnow()).total_seconds()) + 0.05)
    assert run_attempt(runtime(settings), second, slot_at=time.time()) is Outcome.SUCCEEDED  # its own slot
    done = get_job(second, settings=settings)
    assert (done.status, done.attempts, done.throttled) == (JobStatus.SUCCEEDED, 1, None)


def test_a_short_wait_is_slept_in_the_thread_and_noted_on_the_response(settings: Settings, emu: Emulator) -> None:
    # One call a second: an attempt (claim, audit, call, record) takes well under that even on a slow machine,
    # so each next job finds its slot ahead and sleeps for it (at 5 a second, two slow attempts slept nothing).
    settings = settings.with_(rate_limit=1, rate_burst=1, rate_max_sleep=1.0, rate_scope=uuid.uuid4().hex)
    jobs = [_submit(settings, f"job {i}") for i in range(3)]
    assert [run_attempt(runtime(settings), j) for j in jobs] == [Outcome.SUCCEEDED] * 3
    arrivals = emu.arrivals()
    assert arrivals[1] - arrivals[0] >= 0.95
    assert arrivals[2] - arrivals[1] >= 0.95
    waits = [
        e.detail.get("throttled_ms", 0)
        for j in jobs[1:]
        for e in job_events(j, settings=settings)
        if e.action == "attempt.response"
    ]
    assert any(waits), waits  # slept for in the thread, and said so
    assert all(w <= 1010 for w in waits), waits


def test_a_429_pauses_the_next_job_too(settings: Settings, emu: Emulator, caplog: pytest.LogCaptureFixture) -> None:
    settings = settings.with_(rate_scope=uuid.uuid4().hex)  # no limit set: the cooldown still holds
    hit = _submit(settings, "[[emulator:fail=429x1]] [[emulator:retry-after=3]]")
    with caplog.at_level("WARNING", logger="qbgw.worker"):
        assert run_attempt(runtime(settings), hit) is Outcome.RETRYING
    assert "the upstream answered 429: every worker pauses its calls for" in caplog.text  # the runbook's words
    other = _submit(settings, "an innocent bystander")
    time.sleep(0.06)  # past the cooldown cache of a worker that checks nothing else
    assert run_attempt(runtime(settings), other) is Outcome.THROTTLED
    view = get_job(other, settings=settings)
    assert view.throttled == COOLDOWN
    assert view.attempts == 0
    assert emu.stats()["requests"] == 1


def test_a_sub_limit_reads_the_assistant_first(settings: Settings, emu: Emulator) -> None:
    settings = settings.with_(rate_limit_per_assistant=1, rate_max_sleep=0.0, rate_scope=uuid.uuid4().hex)
    first, second = _submit(settings, "one"), _submit(settings, "two")
    assert run_attempt(runtime(settings), first) is Outcome.SUCCEEDED
    assert run_attempt(runtime(settings), first) is Outcome.SKIPPED  # finished: no slot taken for it
    assert run_attempt(runtime(settings), second) is Outcome.THROTTLED
    assert get_job(second, settings=settings).throttled == RATE_LIMIT


def test_the_sweeper_dispatches_a_throttled_job_when_due_not_before(settings: Settings) -> None:
    from qbgw.store import jobs as store

    settings = settings.with_(rate_scope=uuid.uuid4().hex)
    job_id, now = _submit(settings, "wait for it"), utcnow()
    grace = timedelta(seconds=settings.sweep_grace)
    with runtime(settings).transaction() as session:  # a long wait: no countdown, the sweeper's job
        moved = store.throttle(
            session=session,
            job_id=job_id,
            until=now + timedelta(seconds=600),
            reason=RATE_LIMIT,
            wait=600,
            reserved=False,
            announced=False,
            actor="t",
            now=now,
        )
        assert moved == (True, None)
    with runtime(settings).transaction() as session:
        assert store.due_for_dispatch(session=session, now=now + timedelta(seconds=599), grace=grace) == []
    with runtime(settings).transaction() as session:
        assert store.due_for_dispatch(session=session, now=now + timedelta(seconds=600), grace=grace) == [job_id]
    # Announced with a countdown, it is not taken for lost while its time has not come (plus the grace).
    later = now + timedelta(seconds=601)
    with runtime(settings).transaction() as session:
        moved = store.throttle(
            session=session,
            job_id=job_id,
            until=later + timedelta(seconds=30),
            reason=RATE_LIMIT,
            wait=30,
            reserved=True,
            announced=True,
            actor="t",
            now=later,
        )
        assert moved == (True, None)
    with runtime(settings).transaction() as session:
        early = later + timedelta(seconds=30) + grace - timedelta(seconds=1)
        assert store.due_for_dispatch(session=session, now=early, grace=grace) == []
    with runtime(settings).transaction() as session:
        late = later + timedelta(seconds=30) + grace + timedelta(seconds=1)
        assert store.due_for_dispatch(session=session, now=late, grace=grace) == [job_id]


def _app_session(settings: Settings) -> Settings:
    from qbgw.emulator.server import EmulatorConfig
    from qbgw.settings import Secret

    app = EmulatorConfig()
    return settings.with_(
        auth="application",
        token=Secret(""),
        application_id=app.application_id,
        auth_key=app.auth_key,
        auth_secret=Secret(app.auth_secret),
    )


def test_a_session_creation_takes_a_slot_in_the_budget(settings: Settings, emu: Emulator) -> None:
    # A lease margin with room for a 1 s wait for the send's slot (a send waits at most half of it).
    settings = _app_session(settings).with_(rate_limit=1, rate_burst=1, lease_margin=6.0, rate_scope=uuid.uuid4().hex)
    job_id = _submit(settings, "after a session")
    assert run_attempt(runtime(settings), job_id) is Outcome.SUCCEEDED
    assert emu.stats()["sessions_created"] == 1
    response = next(e for e in job_events(job_id, settings=settings) if e.action == "attempt.response")
    # The session took this second's call; the job waited for the next (how long depends on how long creating the
    # session and the attempt's own steps took, at most the second).
    assert 0 < response.detail["throttled_ms"] <= 1050


def test_a_429_to_a_session_creation_pauses_the_fleet(settings: Settings, emu: Emulator) -> None:
    import requests

    settings = _app_session(settings).with_(rate_scope=uuid.uuid4().hex)
    emu.reconfigure(rate_limit=1, rate_limit_retry_after=3)
    requests.get(emu.url + "/session.json", timeout=5)  # another client spends the plan's second
    job_id = _submit(settings, "no session to be had")
    before = time.time()
    # The claimed attempt finds the fleet cooling down before it can send: held back, its attempt given back.
    assert run_attempt(runtime(settings), job_id) is Outcome.THROTTLED
    assert runtime(settings).limiter.cooldown_until() == pytest.approx(before + 3, abs=0.5)
    assert emu.stats()["requests"] == 0
    assert emu.stats()["sessions_created"] == 0
    view = get_job(job_id, settings=settings)
    assert (view.status, view.throttled, view.attempts, view.max_attempts) == (
        JobStatus.RETRYING,
        COOLDOWN,
        1,
        settings.max_attempts + 1,
    )
    actions = [e.action for e in job_events(job_id, settings=settings)]
    assert actions[-2:] == ["attempt.request", "attempt.unsent"]


def test_a_429_after_answers_starts_a_new_streak_and_one_right_after_a_pause_doubles_it(
    settings: Settings, emu: Emulator
) -> None:
    from qbgw.execution import tasks

    settings = settings.with_(rate_scope=uuid.uuid4().hex, rate_cooldown=1.0, rate_cooldown_max=10.0)
    limiter = runtime(settings).limiter

    def pause_after_a_429() -> tuple[float, float]:
        """The pause's shortest and longest length: it began when the 429 came back, somewhere in the attempt
        (bounded by the attempt's start and end, not guessed from its start: a slow attempt took over 0.1 s)."""
        job = _submit(settings, f"[[emulator:fail=429x1]] {uuid.uuid4().hex}")
        started = time.time()
        assert run_attempt(runtime(settings), job) is Outcome.RETRYING
        after = time.time()
        until = limiter.cooldown_until()
        time.sleep(max(0.0, until - time.time()) + 0.05)  # the pause ends
        return until - after - 0.05, until - started + 0.05

    def lasted(pause: float, bounds: tuple[float, float]) -> bool:
        return bounds[0] <= pause <= bounds[1]

    tasks._ANSWERS.count = 0
    assert lasted(1.0, pause_after_a_429())
    assert lasted(2.0, pause_after_a_429())  # at once after the pause: the overload goes on
    for n in range(tasks._Answers.FRESH_AFTER):  # then the upstream answers again, many times
        assert run_attempt(runtime(settings), _submit(settings, f"fine {n}")) is Outcome.SUCCEEDED
    assert lasted(1.0, pause_after_a_429())  # a 429 now is news: a new streak, not 4 s
