"""Faults: the guard where the task meets the job. An exception that is none of an attempt's expected
outcomes (a bug, a payload that no longer decrypts, stored input that cannot be encoded) becomes an
audited ``attempt.error`` with its class, and the job waits a backoff and is tried again, until the same
fault has met it ``QBGW_MAX_FAULTS`` times in a row: then it fails with a reason a person can act on.
Every job ends; no message loops on a traceback.

Neither the log line nor the audit event carries the exception's text (it may quote a payload): the class,
the stage and the code locations only. Writes go through ``store.record_fault``; decisions come from
``lifecycle.decide_fault``.
"""

from __future__ import annotations

import functools
import logging
import traceback
from dataclasses import dataclass
from pathlib import PurePath

from .. import lifecycle
from ..errors import DecryptionFailed, QbgwError
from ..lifecycle import JobStatus, Step, utcnow
from ..ops import metrics
from ..runtime.context import Runtime
from ..runtime.dispatch import announce
from ..store import jobs as store

__all__ = ["Progress", "describe", "record"]

log = logging.getLogger("qbgw.worker")

#: How many of the innermost frames the log line names.
_FRAMES = 4


@dataclass
class Progress:
    """How far a delivery got: its stage (for the reason and the log) and, once claimed, its claim."""

    stage: str = "admitting the job"
    claim: store.Claim | None = None


def describe(exc: BaseException) -> str:
    """The exception's class and where it was raised (innermost frames first), never its text."""
    frames = traceback.extract_tb(exc.__traceback__)[-_FRAMES:]
    where = " <- ".join(f"{PurePath(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(exc).__name__} at {where}" if where else type(exc).__name__


def fault_of(exc: Exception, stage: str) -> store.Fault:
    """The fault ``exc`` makes: a DecryptionFailed keeps its class and its (PHI-free) message, anything else
    is an InternalError named by its class and stage."""
    detail = {"exception": type(exc).__name__, "stage": stage}
    if isinstance(exc, DecryptionFailed):
        return store.Fault(
            "DecryptionFailed",
            f"DecryptionFailed: {exc}; restore the key it was encrypted with "
            "(see `qbgw keys status`), then `qbgw replay` the job",
            detail,
        )
    what = type(exc).__name__ if not isinstance(exc, QbgwError) else f"{type(exc).__name__} ({exc})"
    reason = (
        f"InternalError: unexpected {what} while {stage}: a bug, or stored input that cannot be sent; "
        "the worker's log names where"
    )
    return store.Fault("InternalError", reason, detail)


def record(rt: Runtime, job_id: str, exc: Exception, progress: Progress) -> str:
    """Record ``exc``, raised by a delivery of ``job_id`` at ``progress``, on the job; returns the outcome.

    Raises StoreUnavailable when the database cannot be reached (the task keeps the message).
    """
    fault = fault_of(exc, progress.stage)
    metrics.task_error(fault.error_class)
    settings = rt.settings
    rule = functools.partial(_decide, fault.reason, max_faults=settings.max_faults, policy=settings.retry_policy)
    with rt.transaction() as session:
        recorded = store.record_fault(
            session=session,
            job_id=job_id,
            claim=progress.claim,
            worker=rt.identity,
            fault=fault,
            rule=rule,
            now=utcnow(),
            announced=lambda delay: delay <= settings.countdown_limit,
        )
    if recorded is None:
        log.error(
            "job %s: unexpected %s while %s; the job had moved on, nothing recorded",
            job_id,
            describe(exc),
            progress.stage,
            extra={"job_id": job_id, "error_class": fault.error_class},
        )
        return "skipped"
    status, decision, batch_id = recorded
    log.error(
        "job %s: unexpected %s while %s: %s",
        job_id,
        describe(exc),
        progress.stage,
        f"{status} (in {decision.delay:.1f}s)" if decision.step is Step.RETRY else str(status),
        extra={"job_id": job_id, "outcome": str(status), "error_class": fault.error_class, "worker": rt.identity},
    )
    if decision.step is Step.RETRY and decision.delay <= settings.countdown_limit:
        failure = announce(rt, job_id, countdown=decision.delay, batch_id=batch_id)
        if failure is not None:
            log.warning(
                "job %s: could not publish its message (%s); the sweeper will",
                job_id,
                failure,
                extra={"job_id": job_id},
            )
    return "failed" if status is JobStatus.FAILED else str(status)


def _decide(
    reason: str,
    faults: int,
    attempt: int | None,
    max_attempts: int,
    elapsed: float,
    *,
    max_faults: int,
    policy: lifecycle.RetryPolicy,
) -> lifecycle.Decision:
    return lifecycle.decide_fault(
        reason,
        faults,
        max_faults=max_faults,
        attempt=attempt,
        max_attempts=max_attempts,
        elapsed=elapsed,
        policy=policy,
    )
