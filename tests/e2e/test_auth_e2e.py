"""A real ``qbgw worker`` with ``QBGW_AUTH=application`` against the emulator: it makes its own session,
and when the gateway forgets that session mid-run, a job's attempt gets the 401, the worker renews the
session and the retry succeeds. On the embedded default and on PostgreSQL + Redis."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from qbgw import producer
from qbgw.emulator.server import Emulator, EmulatorConfig
from qbgw.lifecycle import JobStatus
from qbgw.queries import job_events, wait_for_job
from qbgw.settings import Secret, Settings
from tests.conftest import ASSISTANT

APP = EmulatorConfig()


@pytest.fixture
def app_stack(stack: Settings, emu: Emulator) -> Iterator[Settings]:
    yield stack.with_(
        auth="application",
        token=Secret(""),
        application_id=APP.application_id,
        auth_key=APP.auth_key,
        auth_secret=Secret(APP.auth_secret),
    )
    emu.reconfigure(session_idle_seconds=APP.session_idle_seconds)


def run(settings: Settings, text: str) -> tuple[Any, list[Any]]:
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": text}], settings=settings)
    return wait_for_job(job_id, timeout=60, settings=settings), job_events(job_id, settings=settings)


def test_a_worker_makes_one_session_and_renews_it_after_the_gateway_forgets_it(
    app_stack: Settings, emu: Emulator, worker_process: Callable[..., Any], tmp_path: Any
) -> None:
    worker_process(app_stack)
    first, first_events = run(app_stack, "first job")
    second, _ = run(app_stack, "second job")
    assert first.status is JobStatus.SUCCEEDED
    assert second.status is JobStatus.SUCCEEDED
    assert emu.stats()["sessions_created"] == 1

    # The session the worker holds is now forgotten when idle for 5 s (long enough that the retry after the 401,
    # through the broker and a new claim, finds the new session still alive on a slow machine).
    emu.reconfigure(session_idle_seconds=5.0)
    emu.advance(6.0)
    third, third_events = run(app_stack, "after the session expired")
    assert third.status is JobStatus.SUCCEEDED
    assert third.attempts == 2
    responses = [(e.attempt, e.http_status) for e in third_events if e.action == "attempt.response"]
    assert responses == [(1, 401), (2, 200)]
    assert emu.stats()["sessions_created"] == 2
    fingerprints = [e.token_fp for e in third_events if e.action == "attempt.request"]
    old = next(e.token_fp for e in first_events if e.action == "attempt.request")
    assert fingerprints[0] == old
    assert fingerprints[1] not in ("", old)
    assert APP.auth_secret not in (tmp_path / "worker-0.log").read_text()


@pytest.mark.parametrize("stack", ["redis+postgres"], indirect=True)
def test_two_hundred_jobs_on_two_workers_survive_two_expiries_with_a_few_sessions(
    app_stack: Settings, emu: Emulator, worker_process: Callable[..., Any]
) -> None:
    emu.reconfigure(latency=0.1)  # 200 jobs on 16 threads: about 1.3 s of calls
    job_ids = [
        producer.submit(ASSISTANT, [{"role": "user", "content": f"job {n}"}], settings=app_stack) for n in range(200)
    ]
    worker_process(app_stack, concurrency=8)
    worker_process(app_stack, concurrency=8)
    for calls in (70, 140):
        deadline = time.monotonic() + 60
        while int(emu.stats()["requests"]) < calls and time.monotonic() < deadline:  # type: ignore[call-overload]
            time.sleep(0.005)
        expired = emu.expire_sessions()
        assert expired >= 1, emu.stats()  # mid-run: every token the workers hold is now unknown
    views = [wait_for_job(job_id, timeout=120, settings=app_stack) for job_id in job_ids]
    assert [v.status for v in views].count(JobStatus.SUCCEEDED) == 200
    # Shared by both workers through Redis: one at the start and one per expiry (measured: 3, with
    # 26-30 requests answered 401 across the 16 threads), never one per job.
    assert 3 <= emu.stats()["sessions_created"] <= 4, emu.stats()
    emu.reconfigure(latency=0.0)


def test_every_process_follows_a_renewal_and_each_drop_costs_one_session(
    app_stack: Settings, emu: Emulator, worker_process: Callable[..., Any]
) -> None:
    # Two processes share one session. When the gateway drops it, the first process to meet the 401 renews;
    # the job's retry may then land in the other process, which must not send the dead token again as if the
    # renewal had failed (before: "the gateway rejected a freshly renewed session token", about half the time).
    worker_process(app_stack, concurrency=2)
    worker_process(app_stack, concurrency=2)
    warm = [
        producer.submit(ASSISTANT, [{"role": "user", "content": f"warm {n}"}], settings=app_stack) for n in range(6)
    ]
    assert all(wait_for_job(j, timeout=60, settings=app_stack).status is JobStatus.SUCCEEDED for j in warm)
    assert emu.stats()["sessions_created"] == 1
    drops = 6
    for drop in range(drops):
        assert emu.expire_sessions() == 1
        first, events = run(app_stack, f"first after drop {drop}")  # meets the 401, renews, retries
        assert first.status is JobStatus.SUCCEEDED, (drop, first.error, [(e.action, e.error_class) for e in events])
        more = [
            producer.submit(ASSISTANT, [{"role": "user", "content": f"drop {drop} job {n}"}], settings=app_stack)
            for n in range(4)
        ]
        views = [wait_for_job(j, timeout=60, settings=app_stack) for j in more]
        assert [v.status for v in views] == [JobStatus.SUCCEEDED] * 4, [(v.error_class, v.error) for v in views]
    assert emu.stats()["sessions_created"] == 1 + drops, emu.stats()
