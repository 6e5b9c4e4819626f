"""One attempt at a time, in this process, against a real database and the emulator: the task
body without Celery (the full path through a worker process is in tests/e2e)."""

from __future__ import annotations

import time

import pytest

from qbgw import producer
from qbgw.emulator.server import Emulator
from qbgw.execution.tasks import Outcome, run_attempt
from qbgw.lifecycle import JobStatus
from qbgw.queries import get_job, job_events
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from tests.conftest import ASSISTANT


def submit(settings: Settings, text: str) -> str:
    return producer.submit(ASSISTANT, [{"role": "user", "content": text}], settings=settings)


def attempt_when_due(settings: Settings, job_id: str) -> Outcome:
    deadline = time.monotonic() + 5
    while (outcome := run_attempt(runtime(settings), job_id)) is Outcome.SKIPPED and time.monotonic() < deadline:
        time.sleep(0.02)
    return outcome


def test_an_answer_is_stored_with_request_and_response_audited(settings: Settings) -> None:
    job_id = submit(settings, "How are you?")
    assert run_attempt(runtime(settings), job_id) is Outcome.SUCCEEDED
    view = get_job(job_id, settings=settings)
    assert view.status is JobStatus.SUCCEEDED
    assert view.attempts == 1
    assert view.finished_at is not None
    assert view.answer is not None
    assert "How are you?" in view.answer
    actions = [(e.action, e.attempt, e.http_status) for e in job_events(job_id, settings=settings)]
    assert actions == [
        ("job.submitted", None, None),
        ("attempt.request", 1, None),
        ("attempt.response", 1, 200),
        ("job.succeeded", 1, 200),
    ]


def test_a_second_delivery_after_success_does_nothing(settings: Settings, emu: Emulator) -> None:
    job_id = submit(settings, "once")
    assert run_attempt(runtime(settings), job_id) is Outcome.SUCCEEDED
    assert run_attempt(runtime(settings), job_id) is Outcome.SKIPPED
    assert emu.stats()["requests"] == 1


def test_two_503s_then_an_answer_is_three_audited_attempts(settings: Settings) -> None:
    job_id = submit(settings, "retry me [[emulator:fail=503x2]]")
    outcomes = [attempt_when_due(settings, job_id) for _ in range(3)]
    assert outcomes == [Outcome.RETRYING, Outcome.RETRYING, Outcome.SUCCEEDED]
    events = job_events(job_id, settings=settings)
    pairs = [(e.attempt, e.http_status) for e in events if e.action in ("attempt.request", "attempt.response")]
    assert pairs == [(1, None), (1, 503), (2, None), (2, 503), (3, None), (3, 200)]
    assert [e.action for e in events].count("job.retry_scheduled") == 2
    assert get_job(job_id, settings=settings).attempts == 3


def test_a_405_fails_at_once_with_the_upstream_reason(settings: Settings, emu: Emulator) -> None:
    emu.reconfigure(feature_enabled=False)
    job_id = submit(settings, "Hi")
    assert run_attempt(runtime(settings), job_id) is Outcome.FAILED
    view = get_job(job_id, settings=settings)
    assert view.status is JobStatus.FAILED
    assert view.attempts == 1
    assert view.http_status == 405
    assert view.error is not None
    assert "HTTP 405" in view.error
    assert "not enabled" in view.error
    assert view.error_class == "FeatureDisabled"


def test_attempts_run_out_into_a_failure(settings: Settings) -> None:
    job_id = submit(settings, "never [[emulator:fail=503]]")
    outcomes = [attempt_when_due(settings, job_id) for _ in range(settings.max_attempts)]
    assert outcomes[-1] is Outcome.FAILED
    assert set(outcomes[:-1]) == {Outcome.RETRYING}
    assert get_job(job_id, settings=settings).attempts == settings.max_attempts


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_read_timeout_is_retried_and_audited_as_an_error(settings: Settings) -> None:
    # The first call outlasts the read timeout by far; the retry's must be answered within it on a slow machine too.
    fast = settings.with_(read_timeout=2.0)
    job_id = submit(fast, "slow [[emulator:sleep=5x1]]")
    assert run_attempt(runtime(fast), job_id) is Outcome.RETRYING
    assert attempt_when_due(fast, job_id) is Outcome.SUCCEEDED
    first_error = [e for e in job_events(job_id, settings=fast) if e.action == "attempt.error"]
    assert len(first_error) == 1
    assert first_error[0].error_class == "UpstreamTimeout"
