"""Tasks: the thin Celery task. Claim the job, call the gateway, record the outcome.

Decisions (retry or not, how long to wait) come from ``lifecycle``; writes from ``store`` and
``audit`` (on PostgreSQL the claim and a success go through ``hotpath``: the same statements and
events in half the round trips); HTTP from ``gateway``. The attempt's request is audited and committed before the
call, so a crash mid-call still leaves a trace (and the sweeper audits it as interrupted).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from celery import Celery, Task

from .. import lifecycle
from ..audit import events as audit
from ..errors import (
    AuthenticationFailed,
    GatewayError,
    RateLimited,
    ResolutionFailed,
    StaleSession,
    StoreUnavailable,
    TransientGatewayError,
)
from ..images import resolve as images
from ..lifecycle import Decision, JobStatus, Step, utcnow
from ..ops import metrics
from ..runtime.app import TASK_NAME
from ..runtime.context import Runtime
from ..runtime.dispatch import announce
from ..runtime.locator import runtime
from ..store import jobs as store
from ..store.hotpath import HotPath, Unsendable, request_event
from ..upstream.gateway import Exchange, encode_request
from ..upstream.ratelimit import RATE_LIMIT, Budget, Grant, budgets_for, planned, take_slot
from . import faults, webhooks

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["Outcome", "register", "run_attempt"]

log = logging.getLogger("qbgw.worker")

#: How long a message waits before it is tried again when the database is unreachable ...
STORE_RETRY_SECONDS = 5.0
#: ... and how many times (10 minutes); then the sweeper takes over (the job is in the database).
STORE_RETRY_LIMIT = 120


class Outcome(StrEnum):
    SKIPPED = "skipped"  # not claimable: a duplicate delivery, not due, or already finished
    SUCCEEDED = "succeeded"
    RETRYING = "retrying"
    FAILED = "failed"
    CANCELLED = "cancelled"  # a cancel arrived while the attempt ran
    LOST = "lost"  # another worker took the job over while this attempt ran
    THROTTLED = "throttled"  # the fleet's rate limit (or a 429 cooldown) rescheduled it; no attempt spent


_OUTCOME = {
    JobStatus.SUCCEEDED: Outcome.SUCCEEDED,
    JobStatus.RETRYING: Outcome.RETRYING,
    JobStatus.FAILED: Outcome.FAILED,
    JobStatus.CANCELLED: Outcome.CANCELLED,
    None: Outcome.LOST,
}


def register(app: Celery) -> None:
    """Register the qbgw task on ``app``."""

    webhooks.register(app)

    @app.task(name=TASK_NAME, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
    def run_job(self: Task[Any, Any], job_id: str, slot_at: float | None = None) -> str:
        try:
            rt = runtime(self.app.qbgw_settings)
            outcome = run_attempt(rt, job_id, slot_at=slot_at)
            if outcome in _ENDED:
                _announce_end(rt, job_id)
            return str(outcome)
        except StoreUnavailable as exc:
            # The database is the source of truth and it is not there: keep the job's message alive (a new
            # one, later) rather than drop it. Nothing was sent upstream yet. Bounded: after
            # STORE_RETRY_LIMIT tries the message goes, and the sweeper publishes the job again once the
            # database is back (the job is still in it), so no message loops forever.
            metrics.store_unavailable()
            if self.request.retries >= STORE_RETRY_LIMIT:
                log.warning(
                    "job %s: database unavailable for %d tries; its message is dropped and the sweeper "
                    "will publish the job again",
                    job_id,
                    self.request.retries + 1,
                    extra={"job_id": job_id},
                )
                return "store-unavailable"
            log.warning(
                "job %s: database unavailable, retrying in %.0fs",
                job_id,
                STORE_RETRY_SECONDS,
                extra={"job_id": job_id, "delay_s": STORE_RETRY_SECONDS},
            )
            raise self.retry(exc=exc, countdown=STORE_RETRY_SECONDS) from None


_ENDED = frozenset({Outcome.SUCCEEDED, Outcome.FAILED, Outcome.CANCELLED})


def _announce_end(rt: Runtime, job_id: str) -> None:
    """The job ended: its webhook, if it has one, goes now rather than at the next sweep (which would send it).
    Costs a transaction only while some delivery waits (:func:`webhooks.any_waiting`, read once a second)."""
    try:
        if not webhooks.any_waiting(rt):
            return
        webhooks.promote(rt, job_ids=[job_id])
    except Exception as exc:  # the sweeper promotes it; never fail a finished job over its webhook
        log.warning("job %s: webhook not queued yet (%s)", job_id, type(exc).__name__, extra={"job_id": job_id})


def run_attempt(rt: Runtime, job_id: str, *, slot_at: float | None = None) -> Outcome | str:
    """One attempt at ``job_id``: a place in the fleet's rate-limit plan, claim, resolve references, a slot
    to send in, call, record. ``slot_at``: the place the plan gave the job when it rescheduled it.

    Any exception that is not an expected outcome is recorded on the job as a fault (``qbgw.execution.faults``):
    the job waits and is tried again, and fails after QBGW_MAX_FAULTS in a row. Raises StoreUnavailable
    when the database cannot be reached."""
    progress = faults.Progress()
    try:
        return _attempt(rt, job_id, slot_at, progress)
    except StoreUnavailable:
        raise
    except Exception as exc:  # the guard: whatever it is, the job must still end
        return faults.record(rt, job_id, exc, progress)


def _attempt(rt: Runtime, job_id: str, slot_at: float | None, progress: faults.Progress) -> Outcome:
    admitted = _admit(rt, job_id, slot_at)
    if admitted is not None:
        return admitted
    started = time.monotonic()
    progress.stage = "claiming the job"
    try:
        claimed = _claim(rt, job_id)
    except Unsendable as unsendable:  # claimed, its request on the record: the fault ends this attempt
        progress.claim = unsendable.claim
        raise unsendable.error from None
    if claimed is None:
        log.debug(
            "job %s: nothing to do (duplicate delivery, not due, or finished)",
            job_id,
            extra={"job_id": job_id, "outcome": Outcome.SKIPPED.value},
        )
        metrics.attempt(Outcome.SKIPPED)
        return Outcome.SKIPPED
    claim, body = claimed
    progress.claim = claim
    if body is None:  # images to fetch first: the claim is committed, the request is audited once built
        progress.stage = "resolving image references"
        try:
            body = images.build_body(claim.assistant_id, claim.messages, rt.settings, claim.files)
        except ResolutionFailed as error:
            return _finish_unresolved(rt, claim, error)
        with rt.transaction() as session:
            audit.add(session, _request_event(rt, claim, body))
    _LEAD.observe(time.monotonic() - started)
    progress.stage = "calling the gateway"
    sent = _send_in_slot(rt, claim, body)
    if isinstance(sent, Grant):
        return _release_unsent(rt, claim, sent)
    exchange = sent
    if exchange.status == 429 and isinstance(exchange.error, RateLimited):  # the whole fleet pauses
        until = rt.limiter.cool_down(exchange.error.retry_after, fresh=_ANSWERS.rate_limited())
        log.warning("the upstream answered 429: every worker pauses its calls for %.1f s", until - time.time())
    elif exchange.status is not None:
        _ANSWERS.answered()
    progress.stage = "recording the outcome"
    exchange = _stale_or_not(rt, exchange)
    decision = _decide(rt, claim, exchange)
    outcome = _record(rt, claim, exchange, decision)
    progress.stage = "after recording the outcome"  # the claim stays: a fault now finds the job moved on
    error_class = type(exchange.error).__name__ if exchange.error is not None else None
    metrics.attempt(outcome, exchange.status, exchange.latency_ms, error_class)
    log.info(
        "job %s attempt %d: %s (HTTP %s, %d ms)",
        job_id,
        claim.attempt,
        outcome,
        exchange.status or "-",
        exchange.latency_ms,
        extra={
            "job_id": job_id,
            "attempt": claim.attempt,
            "outcome": outcome.value,
            "http_status": exchange.status,
            "latency_ms": exchange.latency_ms,
            "error_class": error_class,
            "worker": rt.identity,
        },
    )
    if outcome is Outcome.RETRYING and decision.delay <= rt.settings.countdown_limit:
        _announce_later(rt, job_id, decision.delay, batch_id=claim.batch_id)
    return outcome


class _Lead:
    """How long an attempt takes from its place in the plan to being ready to send (claim, audit): a job
    rescheduled for a later place comes back that much earlier. Twice a moving average, per process,
    between 5 ms and 0.5 s."""

    def __init__(self) -> None:
        self.seconds = 0.05

    def observe(self, prepared: float) -> None:
        self.seconds = min(0.5, max(0.005, 0.8 * self.seconds + 0.2 * 2 * prepared))


_LEAD = _Lead()


class _Answers:
    """Calls this process saw the upstream answer (with anything but a 429) since its last 429. A 429 after
    at least FRESH_AFTER of them is news, not the same overload going on: it starts a new cooldown streak
    instead of doubling the pause (an occasional 429 among hundreds of answers paused the whole fleet for up
    to QBGW_RATE_COOLDOWN_MAX, 60 s, each time: bench.chaos took 7 minutes instead of half of one)."""

    FRESH_AFTER = 10

    def __init__(self) -> None:
        self.count = 0

    def answered(self) -> None:
        self.count += 1  # threads may lose an increment: that only delays a fresh streak

    def rate_limited(self) -> bool:
        fresh, self.count = self.count >= self.FRESH_AFTER, 0
        return fresh


_ANSWERS = _Answers()


def _admit(rt: Runtime, job_id: str, slot_at: float | None) -> Outcome | None:
    """A place in the fleet's plan of calls, before the job is claimed: None to go on, or THROTTLED (the
    job was rescheduled for a later place, reserved for it when the wait is within a countdown) or SKIPPED.

    The plan only spreads the work: each call still takes its slot in the send budget just before it
    goes (:func:`_send_in_slot`), so a claim that was slow cannot push it into a later call's second.
    """
    settings, now = rt.settings, time.time()
    budgets: list[Budget] = []
    if slot_at is None:  # a job that comes back for its place has it already; only a cooldown holds it
        assistant_id = None
        if settings.rate_limit_per_assistant or settings.rate_limit_assistants:
            with rt.transaction() as session:  # one read, only when assistants have budgets of their own
                assistant_id = store.claimable_assistant(session=session, job_id=job_id, now=utcnow())
            if assistant_id is None:
                metrics.attempt(Outcome.SKIPPED)
                return Outcome.SKIPPED
        budgets = planned(budgets_for(settings, assistant_id))
    lead = _LEAD.seconds if budgets else 0.0
    grant = rt.limiter.acquire(budgets, horizon=settings.countdown_limit, lead=lead)
    if grant.reserved and grant.wait <= settings.rate_max_sleep + lead + 1e-3:  # (now + lead) - now != lead
        return None
    # With no budgets nothing was reserved: such a job takes its chances again when it comes back.
    return _reschedule(rt, job_id, grant, slot_at=now + grant.wait if grant.reserved and budgets else None)


def _reschedule(rt: Runtime, job_id: str, grant: Grant, *, slot_at: float | None) -> Outcome:
    """The job must wait longer than a thread should sleep: give the thread back, come back for the place."""
    # Back a little before a reserved place, to be ready to send at it; without one, spread out.
    now, reason = utcnow(), grant.reason or RATE_LIMIT
    countdown, until, announced = _come_back(rt, grant, now, lead=_LEAD.seconds if slot_at is not None else None)
    with rt.transaction() as session:
        moved, batch_id = store.throttle(
            session=session,
            job_id=job_id,
            until=until,
            reason=reason,
            wait=grant.wait,
            reserved=slot_at is not None,
            announced=announced,
            actor=rt.identity,
            now=now,
        )
    if not moved:
        metrics.attempt(Outcome.SKIPPED)
        return Outcome.SKIPPED
    metrics.throttled(grant.wait)
    metrics.attempt(Outcome.THROTTLED)
    log.info("job %s: throttled (%s) for %.2fs", job_id, reason, grant.wait)
    if announced:
        _announce_later(rt, job_id, countdown, batch_id=batch_id, slot_at=slot_at)
    return Outcome.THROTTLED


def _come_back(rt: Runtime, grant: Grant, now: datetime, *, lead: float | None) -> tuple[float, datetime, bool]:
    """When a waiting job's message comes back (a countdown: ``lead`` before a reserved place, else spread
    out after the wait), when the job is due in the database (a little before, so a message that comes a
    hair early still finds it due), and whether a countdown can carry it (else the sweeper publishes it)."""
    if lead is not None:
        countdown = max(0.0, grant.wait - lead)
    else:
        countdown = grant.wait + random.uniform(0.0, min(1.0, grant.wait / 4))  # noqa: S311 - spreading, not a secret
    until = now + timedelta(seconds=max(0.0, countdown - _EARLY))
    return countdown, until, countdown <= rt.settings.countdown_limit


#: A rescheduled job is due this many seconds before its message comes (see _come_back).
_EARLY = 0.25


def _announce_later(
    rt: Runtime, job_id: str, countdown: float, *, batch_id: str | None, slot_at: float | None = None
) -> None:
    """Publish the job's message for ``countdown`` seconds from now; if the broker fails, the sweeper will."""
    failure = announce(rt, job_id, countdown=countdown, slot_at=slot_at, batch_id=batch_id)
    if failure is not None:
        log.warning(
            "job %s: could not publish its message (%s); the sweeper will", job_id, failure, extra={"job_id": job_id}
        )


def _send_in_slot(rt: Runtime, claim: store.Claim, body: bytes | images.StreamingBody) -> Exchange | Grant:
    """Take a slot in the send budget, wait for it, send. The plan has spread the calls, so the wait is
    short; one longer than half the lease margin (a 429 cooldown began after the claim) is not waited
    for: the grant comes back instead of an exchange, and nothing is sent."""
    settings = rt.settings
    grant = take_slot(rt.limiter, budgets_for(settings, claim.assistant_id), give_up=settings.lease_margin / 2)
    if not grant.reserved:
        return grant
    if grant.wait >= 0.001:
        metrics.throttled(grant.wait)
    exchange = rt.gateway.send(body)
    return dataclasses.replace(exchange, throttled=grant.wait) if grant.wait else exchange


def _release_unsent(rt: Runtime, claim: store.Claim, grant: Grant) -> Outcome:
    """The attempt was held back before sending: the job waits out the pause without losing an attempt."""
    now, reason = utcnow(), grant.reason or RATE_LIMIT
    countdown, until, announced = _come_back(rt, grant, now, lead=None)
    with rt.transaction() as session:
        status = store.release_unsent(
            session=session,
            claim=claim,
            worker=rt.identity,
            until=until,
            reason=reason,
            wait=grant.wait,
            announced=announced,
            now=now,
        )
    log.info("job %s attempt %d: held back, not sent (%s for %.1fs)", claim.job_id, claim.attempt, reason, grant.wait)
    metrics.throttled(grant.wait)
    if status is not JobStatus.RETRYING:
        metrics.attempt(_OUTCOME[status])
        return _OUTCOME[status]
    metrics.attempt(Outcome.THROTTLED)
    if announced:
        _announce_later(rt, claim.job_id, countdown, batch_id=claim.batch_id)
    return Outcome.THROTTLED


def _claim(rt: Runtime, job_id: str) -> tuple[store.Claim, bytes | images.StreamingBody | None] | None:
    """Claim the job and audit the request it will send, both committed before it is sent: (claim, body), or
    (claim, None) when images must be fetched first (the claim is then committed alone). None: nothing
    to do. On PostgreSQL through ``qbgw.store.hotpath`` (:func:`_claim_requested`), elsewhere through
    ``qbgw.store.jobs``, in one transaction."""
    now = utcnow()
    bodies: list[bytes] = []

    def request_events(claim: store.Claim) -> list[dict[str, Any]]:
        if images.needs_resolution(claim.messages, rt.settings):
            return []
        bodies.append(encode_request(claim.assistant_id, claim.messages))
        return [_request_event(rt, claim, bodies[0])]

    hot = rt.hot_path
    if hot is not None:
        lease_until = now + timedelta(seconds=rt.settings.lease_seconds)
        claimed = _claim_requested(rt, hot, job_id, lease_until, now) if hot.events_in_statements else None
        if claimed is not None:
            return claimed
        claim = hot.claim(job_id=job_id, worker=rt.identity, lease_until=lease_until, now=now, events=request_events)
    else:
        with rt.transaction() as session:
            lease = timedelta(seconds=rt.settings.lease_seconds)
            claim = store.claim(session=session, job_id=job_id, worker=rt.identity, lease=lease, now=now)
            for event in request_events(claim) if claim is not None else ():
                audit.add(session, event)
    if claim is None:
        return None
    return claim, bodies[0] if bodies else None


def _claim_requested(
    rt: Runtime, hot: HotPath, job_id: str, lease_until: datetime, now: datetime
) -> tuple[store.Claim, bytes] | None:
    """:func:`_claim` in one round trip, for a job whose body was digested at submit: the claim seals its request
    event. None: nothing was written (no digest, or not claimable). Raises Unsendable (see HotPath)."""
    claimed = hot.claim_requested(
        job_id=job_id, worker=rt.identity, lease_until=lease_until, now=now, token_fp=_token_fp(rt)
    )
    if claimed is None:
        return None
    claim, sealed = claimed
    try:
        body = encode_request(claim.assistant_id, claim.messages)  # (digested at submit: no setting changes it)
        if sealed != (audit.digest(body), len(body)):  # a submitter that built it otherwise (another version?)
            log.warning(
                "job %s attempt %d: the body differs from the one digested at submit; its request is recorded again",
                job_id,
                claim.attempt,
                extra={"job_id": job_id, "attempt": claim.attempt},
            )
            hot.seal([_request_event(rt, claim, body)])
    except StoreUnavailable:
        raise  # (the lease runs out, and the sweeper takes the job back)
    except Exception as exc:  # the claim is committed: the fault is this attempt's
        raise Unsendable(claim, exc) from exc
    return claim, body


def _request_event(rt: Runtime, claim: store.Claim, body: bytes | images.StreamingBody) -> dict[str, Any]:
    digest = audit.digest(body) if isinstance(body, bytes) else body.digest()
    return request_event(claim, rt.identity, _token_fp(rt), (digest, len(body)))


def _finish_unresolved(rt: Runtime, claim: store.Claim, error: ResolutionFailed) -> Outcome:
    """A reference could not be resolved: the job fails with that reason, nothing was sent."""
    exchange = Exchange(None, error, None, 0, None, None)
    outcome = _record(rt, claim, exchange, Decision(Step.FAIL, reason=str(error)))
    metrics.attempt(outcome)  # nothing was sent: no status, no latency
    log.info(
        "job %s attempt %d: %s (an image reference could not be resolved)",
        claim.job_id,
        claim.attempt,
        outcome,
        extra={
            "job_id": claim.job_id,
            "attempt": claim.attempt,
            "outcome": outcome.value,
            "error_class": "ResolutionFailed",
            "worker": rt.identity,
        },
    )
    return outcome


def _stale_or_not(rt: Runtime, exchange: Exchange) -> Exchange:
    """A 401 "Required session does not exist" for a token another worker has replaced already is no verdict
    on the job's session: it becomes StaleSession, retried at once with the shared session, and the job keeps
    its one renewal (a second process that still held the old token would otherwise fail the job)."""
    error = exchange.error
    if not (isinstance(error, AuthenticationFailed) and lifecycle.SESSION_GONE in error.reasons):
        return exchange
    tokens = rt.gateway.tokens
    if not tokens.can_renew or not tokens.superseded():
        return exchange
    stale = StaleSession(
        f"{error.message} for a session token already replaced by another worker; retried with the shared session",
        error.status,
        error.reasons,
    )
    return dataclasses.replace(exchange, error=stale)


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
        log.warning(
            "job %s: session renewal failed (%s)",
            claim.job_id,
            kind,
            extra={"job_id": claim.job_id, "attempt": claim.attempt, "error_class": kind},
        )
        outcome, detail = "failed", {"error_class": type(exc).__name__}
    else:
        outcome, detail = "renewed", {}
    with rt.transaction() as session:
        audit.record(
            session=session,
            action=audit.Action.SESSION_RENEWED,
            job_id=claim.job_id,
            actor=rt.identity,
            attempt=claim.attempt,
            assistant_id=claim.assistant_id,
            subject_index=claim.subject_index,
            outcome=outcome,
            token_fp=_token_fp(rt),
            detail=detail,
        )


def _token_fp(rt: Runtime) -> str:
    try:
        return audit.fingerprint(rt.gateway.tokens.current().reveal())
    except GatewayError:  # no session could be had: the attempt itself will say why
        return ""


def _record(rt: Runtime, claim: store.Claim, exchange: Exchange, decision: Decision) -> Outcome:
    for tries_left in (2, 1, 0):  # the answer is paid for: try hard to keep it
        try:
            if decision.step is Step.SUCCEED and (hot := rt.hot_path) is not None:  # the common case, PostgreSQL
                now = utcnow()
                if hot.succeed(
                    claim=claim,
                    worker=rt.identity,
                    answer=exchange.answer_text(),
                    now=now,
                    response_event=_exchange_event(rt.identity, claim, exchange),
                ):
                    return Outcome.SUCCEEDED
                # It wrote nothing (a cancel arrived, or the lease was taken over): store tells which.
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
    audit.add(session, _exchange_event(rt.identity, claim, exchange))
    worker = rt.identity
    if decision.step is Step.SUCCEED:
        answer = exchange.answer_text()
        status = store.record_success(session=session, claim=claim, worker=worker, answer=answer, now=now)
        return _OUTCOME[status]
    retrying = decision.step is Step.RETRY
    status = store.record_failure(
        session=session,
        claim=claim,
        worker=worker,
        error=exchange.failure(),
        reason=_reason(exchange, decision),
        retry_at=now + timedelta(seconds=decision.delay) if retrying else None,
        announced=decision.delay <= rt.settings.countdown_limit,
        now=now,
    )
    return _OUTCOME[status]


def _reason(exchange: Exchange, decision: Decision) -> str:
    error = exchange.failure()
    text = decision.reason or str(error)
    if error.reasons and not decision.reason.startswith("the gateway rejected"):
        text = f"{text}: {'; '.join(error.reasons)}"
    return text


def _exchange_event(actor: str, claim: store.Claim, exchange: Exchange) -> dict[str, Any]:
    error = exchange.error
    kind = "answer" if error is None else ("transient" if isinstance(error, TransientGatewayError) else "permanent")
    return audit.event(
        action=audit.Action.ATTEMPT_RESPONSE if exchange.status is not None else audit.Action.ATTEMPT_ERROR,
        job_id=claim.job_id,
        actor=actor,
        attempt=claim.attempt,
        assistant_id=claim.assistant_id,
        subject_index=claim.subject_index,
        outcome=kind,
        http_status=exchange.status,
        error_class=type(error).__name__ if error else None,
        latency_ms=exchange.latency_ms,
        response=None if exchange.response_digest is None else (exchange.response_digest, exchange.response_bytes or 0),
        detail=_exchange_detail(exchange),
    )


def _exchange_detail(exchange: Exchange) -> dict[str, Any] | None:
    detail: dict[str, Any] = {}
    if (retry_after := getattr(exchange.error, "retry_after", None)) is not None:
        detail["retry_after"] = retry_after
    if exchange.throttled >= 0.001:  # waited for a slot in the fleet's rate limit before sending
        detail["throttled_ms"] = round(exchange.throttled * 1000)
    return detail or None
