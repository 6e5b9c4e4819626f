"""Nothing lost, nothing run into two results: real worker processes, killed and starved, on the
embedded default, on PostgreSQL + Redis and on PostgreSQL + RabbitMQ (+ Redis for the shared state)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from qbgw import control, producer
from qbgw.emulator.server import Emulator
from qbgw.lifecycle import JobStatus
from qbgw.queries import get_job, job_events, wait_for_job
from qbgw.runtime.app import backlog
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from tests.conftest import ASSISTANT, wait_until
from tests.e2e.conftest import all_stacks


def submit(settings: Settings, text: str) -> str:
    return producer.submit(ASSISTANT, [{"role": "user", "content": text}], settings=settings)


def times(settings: Settings, job_id: str, action: str) -> list[float]:
    return [e.occurred_at.timestamp() for e in job_events(job_id, settings=settings) if e.action == action]


@all_stacks
def test_no_retry_is_sent_before_retry_after(stack: Settings, worker_process: Callable[..., Any]) -> None:
    worker_process(stack)
    job_id = submit(stack, "slow down [[emulator:fail=429x1]] [[emulator:retry-after=2]]")
    view = wait_for_job(job_id, timeout=60, settings=stack)
    assert view.status is JobStatus.SUCCEEDED
    assert view.attempts == 2
    first_response, second_request = (
        times(stack, job_id, "attempt.response")[0],
        times(stack, job_id, "attempt.request")[1],
    )
    assert second_request - first_response >= 2.0


@all_stacks
def test_a_wait_longer_than_a_countdown_is_kept_in_the_database(
    stack: Settings, worker_process: Callable[..., Any]
) -> None:
    assert stack.countdown_limit == 5.0
    worker_process(stack)
    job_id = submit(stack, "come back later [[emulator:fail=429x1]] [[emulator:retry-after=6]]")
    wait_until(lambda: get_job(job_id, settings=stack).status is JobStatus.RETRYING, timeout=30)
    waiting = get_job(job_id, settings=stack)
    assert waiting.next_attempt_at is not None
    assert waiting.error_class == "RateLimited"
    view = wait_for_job(job_id, timeout=60, settings=stack)
    assert view.status is JobStatus.SUCCEEDED
    events = job_events(job_id, settings=stack)
    scheduled = next(e for e in events if e.action == "job.retry_scheduled")
    assert scheduled.detail["by"] == "sweeper"
    assert "job.redispatched" in [e.action for e in events]
    assert times(stack, job_id, "attempt.request")[1] - times(stack, job_id, "attempt.response")[0] >= 6.0


@all_stacks
def test_a_worker_killed_mid_call_loses_nothing(
    stack: Settings, worker_process: Callable[..., Any], emu: Emulator
) -> None:
    victim = worker_process(stack)
    job_id = submit(stack, "kill my worker [[emulator:sleep=3x1]]")
    wait_until(lambda: len(emu.arrivals()) == 1, timeout=30)  # the request has reached the upstream
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    worker_process(stack)  # a survivor; its sweeper takes the job back when the lease runs out
    view = wait_for_job(job_id, timeout=60, settings=stack)
    assert view.status is JobStatus.SUCCEEDED
    assert view.attempts == 2
    actions = [(e.action, e.attempt) for e in job_events(job_id, settings=stack)]
    assert ("attempt.interrupted", 1) in actions
    assert ("attempt.response", 2) in actions
    assert actions.count(("job.succeeded", 2)) == 1
    assert len([a for a in actions if a[0] == "attempt.request"]) == emu.stats()["requests"] == 2


@all_stacks
def test_a_cancelled_job_is_never_called_or_answered(
    stack: Settings, worker_process: Callable[..., Any], emu: Emulator
) -> None:
    waiting = submit(stack, "cancel me before any worker")
    assert control.cancel(waiting, actor="nurse-7", settings=stack) is JobStatus.CANCELLED
    running = submit(stack, "cancel me mid-call [[emulator:sleep=4]]")  # long enough to be seen running, cancelled
    worker_process(stack)
    wait_until(lambda: get_job(running, settings=stack).status is JobStatus.RUNNING, timeout=30)
    assert control.cancel(running, actor="nurse-7", settings=stack) is JobStatus.RUNNING
    view = wait_for_job(running, timeout=30, settings=stack)
    assert view.status is JobStatus.CANCELLED
    assert view.answer is None
    # The waiting job's message is delivered too (the broker's queues are emptied), and it does nothing.
    wait_until(lambda: all(backlog(runtime(stack).celery, q, unknown_queue=0) == 0 for q in stack.queues), timeout=30)
    assert get_job(waiting, settings=stack).status is JobStatus.CANCELLED
    assert emu.stats()["requests"] == 1
    cancels = [e for e in job_events(running, settings=stack) if e.action.startswith("job.cancel")]
    assert [e.action for e in cancels] == ["job.cancel_requested", "job.cancelled"]
    assert cancels[0].actor == "nurse-7"


@all_stacks
def test_a_failed_job_replayed_succeeds_on_a_new_attempt(stack: Settings, worker_process: Callable[..., Any]) -> None:
    worker_process(stack)
    job_id = submit(stack, "bad the first time [[emulator:fail=400x1]]")
    assert wait_for_job(job_id, timeout=30, settings=stack).status is JobStatus.FAILED
    assert control.replay(job_id, actor="ops", settings=stack) == 2
    view = wait_for_job(job_id, timeout=30, settings=stack)
    assert view.status is JobStatus.SUCCEEDED
    assert view.attempts == 2
    actions = [e.action for e in job_events(job_id, settings=stack)]
    assert actions.index("job.failed") < actions.index("job.replayed") < actions.index("job.succeeded")


def test_a_worker_that_loses_its_database_keeps_the_message_and_finishes_later(
    production_settings: Settings, worker_process: Callable[..., Any], tmp_path: Any
) -> None:
    from sqlalchemy.engine import make_url

    from tests.proxy import Proxy

    url = make_url(production_settings.database_url)
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    try:
        through_proxy = production_settings.with_(database_url=url.set(port=proxy.port).render_as_string(False))
        worker_process(through_proxy.with_(sweep_interval=0))
        started = submit(production_settings, "the worker is up")  # and it reached the database through the proxy
        assert wait_for_job(started, timeout=60, settings=production_settings).status is JobStatus.SUCCEEDED
        proxy.cut()
        job_id = submit(production_settings, "the database went away")  # the producer still reaches it
        wait_until(lambda: "database unavailable" in (tmp_path / "worker-0.log").read_text(), timeout=30)
        assert get_job(job_id, settings=production_settings).status is JobStatus.QUEUED
        proxy.restore()
        view = wait_for_job(job_id, timeout=60, settings=production_settings)
        assert view.status is JobStatus.SUCCEEDED
        assert view.attempts == 1
    finally:
        proxy.close()


@all_stacks
def test_an_idle_worker_still_signs_anchors_every_t_seconds(
    stack: Settings, worker_process: Callable[..., Any]
) -> None:
    from qbgw.audit.anchors import read_anchors

    settings = stack.with_(audit_anchor_seconds=1.0)
    worker_process(settings)
    wait_until(lambda: len(read_anchors(settings.anchor_path)) >= 3, timeout=30)
    anchors = read_anchors(settings.anchor_path)
    # Nothing happened, yet the head keeps being signed: silence is provable, a cut tail is not hidden.
    assert {a.seq for a in anchors} == {0}
    assert len({a.at for a in anchors}) == len(anchors)
