"""Lifecycle: the pure rules of a job. Status table, retry decision, backoff. No I/O.

queued ──claim──▶ running ──answer───────────────────────────▶ succeeded
  ▲  ▲             │  │  └──permanent error / attempts or deadline spent──▶ failed ──replay──┐
  │  │             │  └──cancel requested during the call──▶ cancelled                       │
  │  │             ▼                                                                          │
  │  └─ due ─── retrying (next_attempt_at)  ◀── lease expired (worker died): interrupted      │
  └───────────────────────────────────────────────────────────────────────────────────────────┘
queued | retrying ──cancel──▶ cancelled
queued | retrying ──the same unexpected failure QBGW_MAX_FAULTS times, before any claim──▶ failed
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from .errors import AuthenticationFailed, GatewayError, InvalidTransition, StaleSession, TransientGatewayError

__all__ = [
    "JobStatus",
    "ALLOWED",
    "TERMINAL",
    "CLAIMABLE",
    "check_transition",
    "backoff_delay",
    "RetryPolicy",
    "Step",
    "Decision",
    "decide",
    "decide_fault",
    "SESSION_GONE",
    "utcnow",
]


class JobStatus(StrEnum):
    #: Stored and announced to the broker; waiting for a worker.
    QUEUED = "queued"
    #: A worker holds it (under a lease) and is calling the gateway.
    RUNNING = "running"
    #: The last attempt failed transiently; ``next_attempt_at`` says when the next one is due.
    RETRYING = "retrying"
    #: Final: the gateway answered; the answer is stored.
    SUCCEEDED = "succeeded"
    #: Final (unless an operator replays it): a permanent error, or attempts or time ran out.
    FAILED = "failed"
    #: Final: cancelled before it finished; never becomes a success afterwards.
    CANCELLED = "cancelled"


#: Every status change that may happen; anything else raises InvalidTransition.
ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    # queued/retrying -> failed: the job cannot even be claimed (its payload cannot be read or sent), met
    # QBGW_MAX_FAULTS times in a row: every job ends.
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.RETRYING, JobStatus.CANCELLED}),
    JobStatus.RETRYING: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED}),  # only by an explicit, audited replay
    JobStatus.CANCELLED: frozenset(),
}

#: Statuses nothing changes without an operator: a job here is done.
TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

#: Statuses from which a worker may claim a job.
CLAIMABLE = frozenset({JobStatus.QUEUED, JobStatus.RETRYING})

#: The upstream's words for an expired or unknown session token.
SESSION_GONE = "Required session does not exist"


def utcnow() -> datetime:
    """Now, aware and in UTC: every time qbgw stores is one of these."""
    return datetime.now(UTC)


def check_transition(current: JobStatus, new: JobStatus) -> None:
    """Raises InvalidTransition unless the table allows ``current`` → ``new``."""
    if new not in ALLOWED[current]:
        raise InvalidTransition(f"job status cannot go from {current} to {new}")


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): full jitter.

    The wait is uniform in [0, min(cap, base * 2 ** (attempt - 1))], so a fleet that failed
    together does not come back together (AWS "Exponential Backoff And Jitter").
    """
    if attempt < 1:
        raise ValueError("attempt numbers start at 1")
    ceiling = min(cap, base * 2 ** min(attempt - 1, 62))
    return (rng or random).uniform(0.0, ceiling)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a job is tried: attempts, backoff, and a deadline on its whole life."""

    max_attempts: int = 5
    #: First backoff ceiling, doubled per attempt, never above ``cap`` (seconds).
    base: float = 1.0
    cap: float = 60.0
    #: No attempt starts later than this many seconds after the job was submitted.
    deadline: float = 3600.0


class Step(StrEnum):
    """What the worker does after an attempt."""

    SUCCEED = "succeed"
    RETRY = "retry"
    #: Renew the session token, then retry at once (a 401 "Required session does not exist").
    REAUTHENTICATE = "reauthenticate"
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    step: Step
    #: Seconds until the next attempt (RETRY), never less than a Retry-After.
    delay: float = 0.0
    #: Why the job fails (FAIL), in words a person can act on; empty otherwise.
    reason: str = ""


def decide(
    error: GatewayError | None,
    *,
    attempt: int,
    max_attempts: int,
    elapsed: float,
    policy: RetryPolicy,
    can_reauthenticate: bool = False,
    reauthenticated: bool = False,
    rng: random.Random | None = None,
) -> Decision:
    """What follows attempt number ``attempt`` that ended with ``error`` (None: an answer).

    ``elapsed`` is the job's age in seconds; ``reauthenticated`` says the previous attempt
    already ended in a session renewal (so a second 401 in a row fails the job).
    """
    if error is None:
        return Decision(Step.SUCCEED)
    if isinstance(error, AuthenticationFailed) and SESSION_GONE in error.reasons:
        return _session_gone(can_reauthenticate=can_reauthenticate, reauthenticated=reauthenticated)
    if not isinstance(error, TransientGatewayError):
        return Decision(Step.FAIL, reason=str(error))
    if attempt >= max_attempts:
        return Decision(Step.FAIL, reason=f"gave up after {attempt} attempts; the last: {error}")
    if isinstance(error, StaleSession):  # another worker renewed the session already: use it at once
        return Decision(Step.RETRY, delay=0.0)
    delay = backoff_delay(attempt, base=policy.base, cap=policy.cap, rng=rng)
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        delay = max(delay, float(retry_after))
    if elapsed + delay > policy.deadline:
        return Decision(
            Step.FAIL,
            reason=f"gave up: the next attempt (in {delay:.1f}s) would start after the job's deadline of "
            f"{policy.deadline:g}s; the last: {error}",
        )
    return Decision(Step.RETRY, delay=delay)


def _session_gone(*, can_reauthenticate: bool, reauthenticated: bool) -> Decision:
    if not can_reauthenticate:
        return Decision(
            Step.FAIL,
            reason="the gateway rejected the QB-Token (session expired or unknown) and a static token cannot be "
            "renewed: set a fresh QBGW_TOKEN",
        )
    if reauthenticated:
        return Decision(Step.FAIL, reason="the gateway rejected a freshly renewed session token")
    return Decision(Step.REAUTHENTICATE)


def decide_fault(
    fault: str,
    faults: int,
    *,
    max_faults: int,
    attempt: int | None,
    max_attempts: int,
    elapsed: float,
    policy: RetryPolicy,
    rng: random.Random | None = None,
) -> Decision:
    """What follows an unexpected failure in the worker (``fault``: its class and text, e.g.
    ``"DecryptionFailed: cannot decrypt ..."``), the ``faults``-th of that class in a row for the job.

    ``attempt`` is the attempt it interrupted (None: it came before any claim, so no attempt was spent).
    The job waits a backoff and is tried again, until ``max_faults`` in a row (or the attempts or the
    deadline run out): then it fails with ``fault`` as its reason.
    """
    if faults >= max_faults:
        return Decision(Step.FAIL, reason=f"{fault} (met {faults} time{'s' if faults != 1 else ''} in a row)")
    if attempt is not None and attempt >= max_attempts:
        return Decision(Step.FAIL, reason=f"gave up after {attempt} attempts; the last: {fault}")
    delay = backoff_delay(faults, base=policy.base, cap=policy.cap, rng=rng)
    if elapsed + delay > policy.deadline:
        return Decision(Step.FAIL, reason=f"gave up: the job's deadline of {policy.deadline:g}s passed; last: {fault}")
    return Decision(Step.RETRY, delay=delay)
