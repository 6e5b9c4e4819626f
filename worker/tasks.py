"""Tasks: the thin Celery task. Claim the job, call the gateway, record the outcome.

Decisions (retry or not, how long to wait) come from ``lifecycle``; writes from ``store`` and
``audit``; HTTP from ``gateway``. The attempt's request is audited and committed before the
call, so a crash mid-call still leaves a trace.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from celery import Celery, Task

from worker import audit, lifecycle, store
from worker.errors import StoreUnavailable, TransientGatewayError
from worker.gateway import Exchange, encode_request
from worker.models import utcnow
from worker.runtime import Runtime, runtime

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["Outcome", "register", "run_attempt"]

log = logging.getLogger("qbgw.worker")

#: How long a message waits before it is tried again when the database is unreachable.
STORE_RETRY_SECONDS = 5.0


class Outcome(StrEnum):
    SKIPPED = "skipped"  # not claimable: a duplicate delivery, or already finished
    SUCCEEDED = "succeeded"
    RETRYING = "retrying"
    FAILED = "failed"
    LOST = "lost"  # another worker took the job over while this attempt ran


def register(app: Celery) -> None:
    """Register the qbgw task on ``app``."""
    from worker.celery_app import TASK_NAME

    @app.task(name=TASK_NAME, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
    def run_job(self: Task[Any, Any], job_id: str) -> str:
        try:
            return str(run_attempt(runtime(self.app.qbgw_settings), job_id))
        except StoreUnavailable as exc:
            # Keep the job's doorbell ringing: the database is the source of truth, and it is
            # not there to tell us the job's state. Nothing has been called upstream yet.
            log.warning("job %s: database unavailable, retrying in %.0fs", job_id, STORE_RETRY_SECONDS)
            raise self.retry(exc=exc, countdown=STORE_RETRY_SECONDS) from None


def run_attempt(rt: Runtime, job_id: str) -> Outcome:
    """One attempt at ``job_id``: claim, call, record. Raises StoreUnavailable before the call."""
    settings = rt.settings
    lease = timedelta(seconds=settings.connect_timeout + settings.read_timeout + 30)
    with rt.transaction() as session:
        claim = store.claim(session=session, job_id=job_id, worker=rt.identity, lease=lease, now=utcnow())
        if claim is None:
            log.debug("job %s: nothing to do (duplicate delivery or not due)", job_id)
            return Outcome.SKIPPED
        body = encode_request(claim.assistant_id, claim.messages)
        audit.record(session=session, action=audit.Action.ATTEMPT_REQUEST, job_id=job_id, actor=rt.identity,
                     attempt=claim.attempt, request=(audit.digest(body), len(body)))  # fmt: skip
    exchange = rt.gateway.send(body)
    outcome, delay = _record(rt, claim, exchange)
    log.info("job %s attempt %d: %s (HTTP %s, %d ms)", job_id, claim.attempt, outcome,
             exchange.status or "-", exchange.latency_ms)  # fmt: skip
    if outcome is Outcome.RETRYING:
        _publish_retry(rt, job_id, delay)
    return outcome


def _record(rt: Runtime, claim: store.Claim, exchange: Exchange) -> tuple[Outcome, float]:
    for tries_left in (2, 1, 0):  # the answer is paid for: try hard to keep it
        try:
            with rt.transaction() as session:
                return _record_in(session, rt, claim, exchange)
        except StoreUnavailable:
            if not tries_left:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def _record_in(session: Session, rt: Runtime, claim: store.Claim, exchange: Exchange) -> tuple[Outcome, float]:
    """Audit the exchange and move the job on, in the caller's transaction."""
    now = utcnow()
    _audit_exchange(session, rt.identity, claim, exchange, now)
    if exchange.error is None:
        assert exchange.answer is not None
        kept = store.record_success(session=session, claim=claim, worker=rt.identity, answer=exchange.answer, now=now)
        return (Outcome.SUCCEEDED if kept else Outcome.LOST), 0.0
    settings = rt.settings
    delay: float | None = None
    step = lifecycle.next_step(exchange.error, attempt=claim.attempt, max_attempts=claim.max_attempts)
    if step is lifecycle.Step.RETRY:
        delay = lifecycle.retry_delay(
            exchange.error, attempt=claim.attempt, base=settings.backoff_base, cap=settings.backoff_max
        )
    retry_at = None if delay is None else now + timedelta(seconds=delay)
    kept = store.record_failure(
        session=session, claim=claim, worker=rt.identity, error=exchange.error, retry_at=retry_at, now=now
    )
    if not kept:
        return Outcome.LOST, 0.0
    return (Outcome.FAILED, 0.0) if delay is None else (Outcome.RETRYING, delay)


def _audit_exchange(session: Session, actor: str, claim: store.Claim, exchange: Exchange, now: datetime) -> None:
    error = exchange.error
    kind = "answer" if error is None else ("transient" if isinstance(error, TransientGatewayError) else "permanent")
    audit.record(
        session=session,
        action=audit.Action.ATTEMPT_RESPONSE if exchange.status is not None else audit.Action.ATTEMPT_ERROR,
        job_id=claim.job_id,
        actor=actor,
        attempt=claim.attempt,
        outcome=kind,
        http_status=exchange.status,
        error_class=type(error).__name__ if error else None,
        latency_ms=exchange.latency_ms,
        response=None if exchange.response_digest is None else (exchange.response_digest, exchange.response_bytes or 0),
        at=now,
    )


def _publish_retry(rt: Runtime, job_id: str, delay: float) -> None:
    from worker.celery_app import publish

    try:
        publish(rt.celery, job_id, countdown=delay)
    except Exception:  # the broker's errors vary by transport; the job is safe in the database
        log.exception("job %s: could not publish its retry; `qbgw sweep` will re-dispatch it", job_id)
