"""Tasks: the thin Celery task. Claim the job, call the gateway, record the outcome.

Decisions (retry or not, how long to wait) come from ``lifecycle``; writes from ``store`` and
``audit``; HTTP from ``gateway``. The attempt's request is audited and committed before the
call, so a crash mid-call still leaves a trace (and the sweeper audits it as interrupted).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from celery import Celery, Task

from worker import audit, images, lifecycle, metrics, store
from worker.errors import GatewayError, QbgwError, ResolutionFailed, StoreUnavailable, TransientGatewayError
from worker.gateway import Exchange, encode_request
from worker.lifecycle import Decision, JobStatus, Step
from worker.models import utcnow
from worker.runtime import Runtime, runtime

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["Outcome", "register", "run_attempt"]

log = logging.getLogger("qbgw.worker")

#: How long a message waits before it is tried again when the database is unreachable.
STORE_RETRY_SECONDS = 5.0


class Outcome(StrEnum):
    SKIPPED = "skipped"  # not claimable: a duplicate delivery, not due, or already finished
    SUCCEEDED = "succeeded"
    RETRYING = "retrying"
    FAILED = "failed"
    CANCELLED = "cancelled"  # a cancel arrived while the attempt ran
    LOST = "lost"  # another worker took the job over while this attempt ran


_OUTCOME = {
    JobStatus.SUCCEEDED: Outcome.SUCCEEDED,
    JobStatus.RETRYING: Outcome.RETRYING,
    JobStatus.FAILED: Outcome.FAILED,
    JobStatus.CANCELLED: Outcome.CANCELLED,
    None: Outcome.LOST,
}


def register(app: Celery) -> None:
    """Register the qbgw task on ``app``."""
    from worker.celery_app import TASK_NAME

    @app.task(name=TASK_NAME, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
    def run_job(self: Task[Any, Any], job_id: str) -> str:
        try:
            return str(run_attempt(runtime(self.app.qbgw_settings), job_id))
        except StoreUnavailable as exc:
            # The database is the source of truth and it is not there: keep the job's message
            # alive (a new one, later) rather than drop it. Nothing was sent upstream yet.
            log.warning("job %s: database unavailable, retrying in %.0fs", job_id, STORE_RETRY_SECONDS,
                        extra={"job_id": job_id, "delay_s": STORE_RETRY_SECONDS})  # fmt: skip
            metrics.store_unavailable()
            raise self.retry(exc=exc, countdown=STORE_RETRY_SECONDS) from None
        except QbgwError as exc:  # a lost key (DecryptionFailed), a bug: Celery logs it; count it first
            metrics.task_error(type(exc).__name__)
            raise


def run_attempt(rt: Runtime, job_id: str) -> Outcome:
    """One attempt at ``job_id``: claim, resolve references, call, record. Raises
    StoreUnavailable before the call."""
    lease = timedelta(seconds=rt.settings.lease_seconds)
    with rt.transaction() as session:
        claim = store.claim(session=session, job_id=job_id, worker=rt.identity, lease=lease, now=utcnow())
        if claim is None:
            log.debug("job %s: nothing to do (duplicate delivery, not due, or finished)", job_id,
                      extra={"job_id": job_id, "outcome": Outcome.SKIPPED.value})  # fmt: skip
            metrics.attempt(Outcome.SKIPPED)
            return Outcome.SKIPPED
        resolve = images.needs_resolution(claim.messages, rt.settings)
        if not resolve:  # the common case: one transaction claims and audits the request
            body: bytes | images.StreamingBody = encode_request(claim.assistant_id, claim.messages)
            _audit_request(session, rt, claim, body)
    if resolve:
        try:
            body = images.build_body(claim.assistant_id, claim.messages, rt.settings)
        except ResolutionFailed as error:
            return _finish_unresolved(rt, claim, error)
        with rt.transaction() as session:
            _audit_request(session, rt, claim, body)
    exchange = rt.gateway.send(body)
    decision = _decide(rt, claim, exchange)
    outcome = _record(rt, claim, exchange, decision)
    error_class = type(exchange.error).__name__ if exchange.error is not None else None
    metrics.attempt(outcome, exchange.status, exchange.latency_ms, error_class)
    log.info("job %s attempt %d: %s (HTTP %s, %d ms)", job_id, claim.attempt, outcome,
             exchange.status or "-", exchange.latency_ms,
             extra={"job_id": job_id, "attempt": claim.attempt, "outcome": outcome.value,
                    "http_status": exchange.status, "latency_ms": exchange.latency_ms, "error_class": error_class,
                    "worker": rt.identity})  # fmt: skip
    if outcome is Outcome.RETRYING and decision.delay <= rt.settings.countdown_limit:
        _publish_retry(rt, job_id, decision.delay)
    return outcome


def _audit_request(session: Session, rt: Runtime, claim: store.Claim, body: bytes | images.StreamingBody) -> None:
    digest = audit.digest(body) if isinstance(body, bytes) else body.digest()
    audit.record(session=session, action=audit.Action.ATTEMPT_REQUEST, job_id=claim.job_id, actor=rt.identity,
                 attempt=claim.attempt, request=(digest, len(body)), assistant_id=claim.assistant_id,
                 token_fp=_token_fp(rt))  # fmt: skip


def _finish_unresolved(rt: Runtime, claim: store.Claim, error: ResolutionFailed) -> Outcome:
    """A reference could not be resolved: the job fails with that reason, nothing was sent."""
    exchange = Exchange(None, error, None, 0, None, None)
    outcome = _record(rt, claim, exchange, Decision(Step.FAIL, reason=str(error)))
    metrics.attempt(outcome)  # nothing was sent: no status, no latency
    log.info("job %s attempt %d: %s (an image reference could not be resolved)", claim.job_id, claim.attempt, outcome,
             extra={"job_id": claim.job_id, "attempt": claim.attempt, "outcome": outcome.value,
                    "error_class": "ResolutionFailed", "worker": rt.identity})  # fmt: skip
    return outcome


def _decide(rt: Runtime, claim: store.Claim, exchange: Exchange) -> Decision:
    decision = lifecycle.decide(
        exchange.error,
        attempt=claim.attempt,
        max_attempts=claim.max_attempts,
        elapsed=(utcnow() - claim.created_at).total_seconds(),
        policy=rt.settings.retry_policy,
        can_reauthenticate=rt.gateway.tokens.can_renew,
        reauthenticated=claim.previous_error == "AuthenticationFailed",
    )
    if decision.step is Step.REAUTHENTICATE:
        _renew_session(rt, claim)
        return Decision(Step.RETRY, delay=0.0)
    return decision


def _renew_session(rt: Runtime, claim: store.Claim) -> None:
    """Renew the session after a 401 and audit the switch. A failed renewal is not raised: the
    retry's own call then ends with that error and is decided like any other."""
    # Not tokens.current() first: it would note a token another thread already renewed as the
    # one this thread sent, and renew() would then replace that good session too (a stampede).
    # The rejected token's fingerprint is on this attempt's request event.
    try:
        rt.gateway.tokens.renew()
    except GatewayError as exc:
        kind = type(exc).__name__
        log.warning("job %s: session renewal failed (%s)", claim.job_id, kind,
                    extra={"job_id": claim.job_id, "attempt": claim.attempt, "error_class": kind})  # fmt: skip
        outcome, detail = "failed", {"error_class": type(exc).__name__}
    else:
        outcome, detail = "renewed", {}
    with rt.transaction() as session:
        audit.record(session=session, action=audit.Action.SESSION_RENEWED, job_id=claim.job_id, actor=rt.identity,
                     attempt=claim.attempt, assistant_id=claim.assistant_id, outcome=outcome,
                     token_fp=_token_fp(rt), detail=detail)  # fmt: skip


def _token_fp(rt: Runtime) -> str:
    try:
        return audit.fingerprint(rt.gateway.tokens.current().reveal())
    except GatewayError:  # no session could be had: the attempt itself will say why
        return ""


def _record(rt: Runtime, claim: store.Claim, exchange: Exchange, decision: Decision) -> Outcome:
    for tries_left in (2, 1, 0):  # the answer is paid for: try hard to keep it
        try:
            with rt.transaction() as session:
                return _record_in(session, rt, claim, exchange, decision)
        except StoreUnavailable:
            if not tries_left:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def _record_in(session: Session, rt: Runtime, claim: store.Claim, exchange: Exchange, decision: Decision) -> Outcome:
    """Audit the exchange and move the job on, in the caller's transaction."""
    now = utcnow()
    _audit_exchange(session, rt.identity, claim, exchange, now)
    worker = rt.identity
    if decision.step is Step.SUCCEED:
        assert exchange.answer is not None
        status = store.record_success(session=session, claim=claim, worker=worker, answer=exchange.answer, now=now)
        return _OUTCOME[status]
    assert exchange.error is not None
    retrying = decision.step is Step.RETRY
    status = store.record_failure(
        session=session, claim=claim, worker=worker, error=exchange.error,
        reason=_reason(exchange, decision), retry_at=now + timedelta(seconds=decision.delay) if retrying else None,
        announced=decision.delay <= rt.settings.countdown_limit, now=now,
    )  # fmt: skip
    return _OUTCOME[status]


def _reason(exchange: Exchange, decision: Decision) -> str:
    error = exchange.error
    assert error is not None
    text = decision.reason or str(error)
    if error.reasons and not decision.reason.startswith("the gateway rejected"):
        text = f"{text}: {'; '.join(error.reasons)}"
    return text


def _audit_exchange(session: Session, actor: str, claim: store.Claim, exchange: Exchange, now: datetime) -> None:
    error = exchange.error
    kind = "answer" if error is None else ("transient" if isinstance(error, TransientGatewayError) else "permanent")
    audit.record(
        session=session,
        action=audit.Action.ATTEMPT_RESPONSE if exchange.status is not None else audit.Action.ATTEMPT_ERROR,
        job_id=claim.job_id,
        actor=actor,
        attempt=claim.attempt,
        assistant_id=claim.assistant_id,
        outcome=kind,
        http_status=exchange.status,
        error_class=type(error).__name__ if error else None,
        latency_ms=exchange.latency_ms,
        response=None if exchange.response_digest is None else (exchange.response_digest, exchange.response_bytes or 0),
        detail={"retry_after": retry_after}
        if (retry_after := getattr(error, "retry_after", None)) is not None
        else None,
        at=now,
    )


def _publish_retry(rt: Runtime, job_id: str, delay: float) -> None:
    from worker.producer import announce

    failure = announce(rt, job_id, countdown=delay)
    if failure is not None:
        log.warning("job %s: could not publish its retry (%s); the sweeper will", job_id, failure,
                    extra={"job_id": job_id})  # fmt: skip
