from __future__ import annotations

import random

import pytest

from worker import errors
from worker.lifecycle import (
    ALLOWED,
    TERMINAL,
    JobStatus,
    Step,
    backoff_delay,
    check_transition,
    next_step,
    retry_delay,
)

S = JobStatus
ALL_PAIRS = [(a, b) for a in JobStatus for b in JobStatus]
LEGAL = {
    (S.QUEUED, S.RUNNING),
    (S.QUEUED, S.CANCELLED),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.RETRYING),
    (S.RETRYING, S.RUNNING),
    (S.RETRYING, S.CANCELLED),
}


@pytest.mark.parametrize(("current", "new"), ALL_PAIRS)
def test_only_the_table_s_transitions_are_allowed(current: JobStatus, new: JobStatus) -> None:
    if (current, new) in LEGAL:
        check_transition(current, new)
    else:
        with pytest.raises(errors.InvalidTransition):
            check_transition(current, new)


def test_terminal_statuses_go_nowhere() -> None:
    assert TERMINAL == {S.SUCCEEDED, S.FAILED, S.CANCELLED}
    assert all(not ALLOWED[s] for s in TERMINAL)


@pytest.mark.parametrize(
    ("attempt", "base", "cap", "ceiling"),
    [(1, 1.0, 60.0, 1.0), (2, 1.0, 60.0, 2.0), (3, 1.0, 60.0, 4.0), (7, 1.0, 60.0, 60.0), (100, 0.5, 30.0, 30.0)],
)
def test_backoff_is_full_jitter_under_the_exponential_ceiling(
    attempt: int, base: float, cap: float, ceiling: float
) -> None:
    rng = random.Random(7)
    waits = [backoff_delay(attempt, base=base, cap=cap, rng=rng) for _ in range(2000)]
    assert all(0.0 <= w <= ceiling for w in waits)
    # Full jitter spreads over the whole range, not just near the ceiling.
    assert min(waits) < 0.1 * ceiling and max(waits) > 0.9 * ceiling


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError):
        backoff_delay(0, base=1, cap=1)


E503 = errors.UpstreamServerError("503", 503)
E405 = errors.FeatureDisabled("405", 405)


@pytest.mark.parametrize(
    ("error", "attempt", "max_attempts", "step"),
    [
        (None, 1, 3, Step.SUCCEED),
        (None, 3, 3, Step.SUCCEED),
        (E503, 1, 3, Step.RETRY),
        (E503, 2, 3, Step.RETRY),
        (E503, 3, 3, Step.FAIL),
        (errors.UpstreamTimeout("t"), 1, 3, Step.RETRY),
        (errors.UpstreamUnavailable("c"), 1, 3, Step.RETRY),
        (errors.RateLimited("429"), 1, 3, Step.RETRY),
        (E405, 1, 3, Step.FAIL),
        (errors.UpstreamRejected("400", 400), 1, 3, Step.FAIL),
        (errors.AuthenticationFailed("401", 401), 1, 3, Step.FAIL),
        (errors.MalformedResponse("bad", 200), 1, 3, Step.FAIL),
        (E503, 1, 1, Step.FAIL),
    ],
)
def test_next_step(error: errors.GatewayError | None, attempt: int, max_attempts: int, step: Step) -> None:
    assert next_step(error, attempt=attempt, max_attempts=max_attempts) is step


def test_retry_delay_never_undercuts_retry_after() -> None:
    error = errors.RateLimited("429", 429, (), 7.0)
    rng = random.Random(1)
    assert all(retry_delay(error, attempt=1, base=0.1, cap=1.0, rng=rng) >= 7.0 for _ in range(100))
