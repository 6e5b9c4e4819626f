from __future__ import annotations

import random

import pytest

from qbgw import errors
from qbgw.lifecycle import (
    ALLOWED,
    CLAIMABLE,
    SESSION_GONE,
    TERMINAL,
    Decision,
    JobStatus,
    RetryPolicy,
    Step,
    backoff_delay,
    check_transition,
    decide,
    decide_fault,
)

S = JobStatus
ALL_PAIRS = [(a, b) for a in JobStatus for b in JobStatus]
LEGAL = {
    (S.QUEUED, S.RUNNING),
    (S.QUEUED, S.CANCELLED),
    (S.QUEUED, S.FAILED),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.RETRYING),
    (S.RUNNING, S.CANCELLED),
    (S.RETRYING, S.RUNNING),
    (S.RETRYING, S.CANCELLED),
    (S.RETRYING, S.FAILED),
    (S.FAILED, S.QUEUED),
}


@pytest.mark.parametrize(("current", "new"), ALL_PAIRS)
def test_only_the_table_s_transitions_are_allowed(current: JobStatus, new: JobStatus) -> None:
    if (current, new) in LEGAL:
        check_transition(current, new)
    else:
        with pytest.raises(errors.InvalidTransition):
            check_transition(current, new)


def test_success_and_cancellation_are_forever_and_only_replay_leaves_failed() -> None:
    assert TERMINAL == {S.SUCCEEDED, S.FAILED, S.CANCELLED}
    assert not ALLOWED[S.SUCCEEDED]
    assert not ALLOWED[S.CANCELLED]
    assert ALLOWED[S.FAILED] == {S.QUEUED}
    assert CLAIMABLE == {S.QUEUED, S.RETRYING}


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
    assert min(waits) < 0.1 * ceiling
    assert max(waits) > 0.9 * ceiling


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="attempt numbers start at 1"):
        backoff_delay(0, base=1, cap=1)


POLICY = RetryPolicy(max_attempts=3, base=1.0, cap=8.0, deadline=100.0)


def err(status: int, *reasons: str) -> errors.GatewayError:
    from qbgw.upstream.gateway import interpret

    body = ('{"errors": ' + str(list(reasons)).replace("'", '"') + "}").encode()
    return interpret(status, body, {})[1]  # type: ignore[return-value]


E503 = err(503)
SESSION = errors.AuthenticationFailed("gateway answered HTTP 401", 401, (SESSION_GONE,))


@pytest.mark.parametrize(
    ("error", "attempt", "elapsed", "step"),
    [
        (None, 1, 0, Step.SUCCEED),
        (None, 3, 99, Step.SUCCEED),
        (E503, 1, 0, Step.RETRY),
        (E503, 2, 0, Step.RETRY),
        (E503, 3, 0, Step.FAIL),  # attempts spent
        (err(500), 1, 0, Step.RETRY),
        (err(502), 1, 0, Step.RETRY),
        (err(504), 1, 0, Step.RETRY),
        (err(408), 1, 0, Step.RETRY),
        (err(429), 1, 0, Step.RETRY),
        (errors.UpstreamTimeout("read timeout"), 1, 0, Step.RETRY),
        (errors.UpstreamUnavailable("reset"), 1, 0, Step.RETRY),
        (err(400), 1, 0, Step.FAIL),
        (err(401, "Unauthorized"), 1, 0, Step.FAIL),
        (err(403), 1, 0, Step.FAIL),
        (err(404), 1, 0, Step.FAIL),
        (err(405), 1, 0, Step.FAIL),
        (err(409), 1, 0, Step.FAIL),
        (err(413), 1, 0, Step.FAIL),
        (err(422), 1, 0, Step.FAIL),
        (err(451), 1, 0, Step.FAIL),
        (errors.MalformedResponse("no answer", 200), 1, 0, Step.FAIL),
    ],
)
def test_the_decision_table(error: errors.GatewayError | None, attempt: int, elapsed: float, step: Step) -> None:
    rng = random.Random(3)
    decision = decide(error, attempt=attempt, max_attempts=3, elapsed=elapsed, policy=POLICY, rng=rng)
    assert decision.step is step
    if step is Step.FAIL:
        assert decision.reason
    if step is Step.RETRY:
        assert 0 <= decision.delay <= POLICY.cap


def test_no_other_4xx_than_408_and_429_is_ever_retried() -> None:
    for status in range(400, 500):
        decision = decide(err(status, "x"), attempt=1, max_attempts=9, elapsed=0, policy=POLICY)
        assert (decision.step is Step.RETRY) == (status in (408, 429)), status


@pytest.mark.parametrize("retry_after", [0.5, 7.0, 30.0])
def test_a_retry_never_comes_before_retry_after(retry_after: float) -> None:
    error = errors.RateLimited("429", 429, (), retry_after)
    rng = random.Random(1)
    for _ in range(200):
        decision = decide(error, attempt=1, max_attempts=3, elapsed=0, policy=POLICY, rng=rng)
        assert decision.step is Step.RETRY
        assert decision.delay >= retry_after


def test_a_retry_after_past_the_deadline_fails_the_job_with_the_reason() -> None:
    error = errors.RateLimited("gateway answered HTTP 429", 429, (), 60.0)
    decision = decide(error, attempt=1, max_attempts=3, elapsed=50.0, policy=POLICY)
    assert decision.step is Step.FAIL
    assert "deadline of 100s" in decision.reason


def test_spent_attempts_say_how_many_in_the_reason() -> None:
    decision = decide(E503, attempt=3, max_attempts=3, elapsed=0, policy=POLICY)
    assert decision.reason.startswith("gave up after 3 attempts; the last: gateway answered HTTP 503")


@pytest.mark.parametrize(
    ("can_renew", "renewed_before", "step", "reason"),
    [
        (True, False, Step.REAUTHENTICATE, ""),
        (True, True, Step.FAIL, "freshly renewed session token"),
        (False, False, Step.FAIL, "a static token cannot be renewed: set a fresh QBGW_TOKEN"),
    ],
)
def test_an_expired_session_is_renewed_once(can_renew: bool, renewed_before: bool, step: Step, reason: str) -> None:
    decision = decide(
        SESSION,
        attempt=1,
        max_attempts=3,
        elapsed=0,
        policy=POLICY,
        can_reauthenticate=can_renew,
        reauthenticated=renewed_before,
    )
    assert decision.step is step
    assert reason in decision.reason


def test_a_token_another_worker_replaced_is_retried_at_once_without_spending_the_renewal() -> None:
    stale = errors.StaleSession("gateway answered HTTP 401", 401, (SESSION_GONE,))
    for renewed_before in (False, True):  # even right after this job's own renewal
        decision = decide(
            stale,
            attempt=2,
            max_attempts=3,
            elapsed=0,
            policy=POLICY,
            can_reauthenticate=True,
            reauthenticated=renewed_before,
        )
        assert decision == Decision(Step.RETRY, delay=0.0)
    spent = decide(stale, attempt=3, max_attempts=3, elapsed=0, policy=POLICY, can_reauthenticate=True)
    assert spent.step is Step.FAIL
    assert spent.reason.startswith("gave up after 3 attempts")


FAULT = "InternalError: unexpected UnicodeEncodeError while claiming the job"


@pytest.mark.parametrize(
    ("faults", "attempt", "elapsed", "step", "reason"),
    [
        (1, None, 0, Step.RETRY, ""),  # before any claim: no attempt spent
        (2, None, 0, Step.RETRY, ""),
        (3, None, 0, Step.FAIL, FAULT + " (met 3 times in a row)"),  # max_faults = 3
        (1, 1, 0, Step.RETRY, ""),  # it interrupted attempt 1 of 3
        (1, 3, 0, Step.FAIL, "gave up after 3 attempts; the last: " + FAULT),
        (4, 2, 0, Step.FAIL, FAULT + " (met 4 times in a row)"),
        (1, None, 99.9, Step.FAIL, "gave up: the job's deadline of 100s passed; last: " + FAULT),
    ],
)
def test_the_fault_table(faults: int, attempt: int | None, elapsed: float, step: Step, reason: str) -> None:
    decision = decide_fault(
        FAULT,
        faults,
        max_faults=3,
        attempt=attempt,
        max_attempts=3,
        elapsed=elapsed,
        policy=RetryPolicy(max_attempts=3, base=1.0, cap=1.0, deadline=100.0),
        rng=random.Random(5),
    )
    assert decision.step is step
    assert decision.reason == reason
    if step is Step.RETRY:
        assert 0 <= decision.delay <= 1.0


def test_a_fault_waits_longer_the_more_it_repeats() -> None:
    policy = RetryPolicy(base=1.0, cap=60.0)
    rng = random.Random(7)
    ceilings = [
        max(
            decide_fault(FAULT, n, max_faults=9, attempt=None, max_attempts=5, elapsed=0, policy=policy, rng=rng).delay
            for _ in range(300)
        )
        for n in (1, 2, 3)
    ]
    assert ceilings[0] <= 1.0 < ceilings[1] <= 2.0 < ceilings[2] <= 4.0
