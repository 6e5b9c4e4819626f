"""Lifecycle: the pure rules of a job. Status table, retry decision, backoff. No I/O.

queued ──claim──▶ running ──answer──────────▶ succeeded
  ▲                │  │
  │                │  └──permanent error / out of attempts──▶ failed
  │                ▼
  └──── due ──── retrying (next_attempt_at set)
queued | retrying ──cancel──▶ cancelled
"""

from __future__ import annotations

import random
from enum import StrEnum

from worker.errors import GatewayError, InvalidTransition, TransientGatewayError

__all__ = [
    "JobStatus",
    "ALLOWED",
    "TERMINAL",
    "check_transition",
    "backoff_delay",
    "next_step",
    "Step",
]


class JobStatus(StrEnum):
    #: Stored and announced to the broker; waiting for a worker.
    QUEUED = "queued"
    #: A worker holds it and is calling the gateway.
    RUNNING = "running"
    #: The last attempt failed transiently; ``next_attempt_at`` says when the next one is due.
    RETRYING = "retrying"
    #: Final: the gateway answered; the answer is stored.
    SUCCEEDED = "succeeded"
    #: Final: a permanent error, or the attempts ran out; the reason is stored.
    FAILED = "failed"
    #: Final: cancelled before it finished.
    CANCELLED = "cancelled"


#: Every status change that may happen; anything else raises InvalidTransition.
ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.RETRYING}),
    JobStatus.RETRYING: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}

TERMINAL = frozenset(s for s, nxt in ALLOWED.items() if not nxt)

#: Statuses from which a worker may claim a job.
CLAIMABLE = frozenset(s for s, nxt in ALLOWED.items() if JobStatus.RUNNING in nxt)


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


class Step(StrEnum):
    """What the worker does after an attempt."""

    SUCCEED = "succeed"
    RETRY = "retry"
    FAIL = "fail"


def next_step(error: GatewayError | None, *, attempt: int, max_attempts: int) -> Step:
    """Decide what follows attempt number ``attempt`` that ended with ``error`` (None: answered)."""
    if error is None:
        return Step.SUCCEED
    if isinstance(error, TransientGatewayError) and attempt < max_attempts:
        return Step.RETRY
    return Step.FAIL


def retry_delay(
    error: GatewayError, *, attempt: int, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """The wait before the next attempt: the backoff, but never less than a Retry-After."""
    delay = backoff_delay(attempt, base=base, cap=cap, rng=rng)
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        delay = max(delay, float(retry_after))
    return delay
