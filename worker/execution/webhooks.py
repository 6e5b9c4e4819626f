"""Webhook delivery: at least once, signed per Standard Webhooks, with backoff for up to a day.

A job's end makes its waiting delivery pending (:func:`promote`: right after the attempt that ended it, and
in every sweep for ends the worker did not see: a cancel, an expiry, a batch). An attempt leases the
delivery, signs the body with every unexpired secret of its principal (``webhook-signature`` holds one
``v1,<base64>`` per secret while a rotation overlaps), POSTs it through the same guard as image fetching
(https only, public addresses only, the address pinned against DNS rebinding, no redirects), and records
the answer: a 2xx delivers; anything else waits ``QBGW_WEBHOOK_BACKOFF`` seconds doubled per attempt (at
most an hour) and is tried again until ``QBGW_WEBHOOK_RETRY_WINDOW`` has passed since the event, then
fails (``qbgw webhooks failed``, ``qbgw webhooks redeliver``). Every attempt is an audit event
(``webhook.attempt``). The body carries no PHI: the event type, the job's (or batch's) id, status,
custom_id and batch id; the receiver fetches the result with its key.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import requests
from celery import Celery
from standardwebhooks import Webhook

from ..audit.events import Action, record
from ..batches.ending import current
from ..errors import ResolutionFailed
from ..images.remote import pinned_session, resolve
from ..lifecycle import utcnow
from ..runtime.context import Runtime
from ..store import webhooks as store
from ..store.batches import ENDED

__all__ = ["WEBHOOK_TASK", "register", "promote", "deliver", "publish", "retry_delay", "USER_AGENT"]

log = logging.getLogger("qbgw.webhooks")

WEBHOOK_TASK = "qbgw.deliver_webhook"
USER_AGENT = "qbgw-webhooks/1"
#: How long an attempt holds a delivery (longer than its timeouts): a worker that died mid-POST releases it.
LEASE = timedelta(seconds=60)
CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 15.0
#: Retries sooner than this are published with a countdown; later ones are left to the sweeper.
COUNTDOWN_MAX = 60.0


def register(app: Celery) -> None:
    """Register the delivery task on a worker's ``app``."""
    from ..runtime.locator import runtime  # a process's entry point: the task finds its runtime

    @app.task(name=WEBHOOK_TASK, max_retries=None)  # type: ignore[untyped-decorator]
    def deliver_webhook(delivery_id: str) -> str:
        return deliver(runtime(app.qbgw_settings), delivery_id)


def publish(rt: Runtime, delivery_id: str, *, countdown: float | None = None) -> None:
    rt.celery.send_task(WEBHOOK_TASK, args=[delivery_id], countdown=countdown, queue=rt.settings.queue)


def promote(rt: Runtime, *, job_ids: list[str] | None = None, publish_due: bool = True) -> list[str]:
    """Make the deliveries of ended jobs (those of ``job_ids``, or all) and ended batches pending, then publish
    what is due. Returns the deliveries published."""
    now = utcnow()
    with rt.transaction() as session:
        fresh = store.promote(session, now=now, job_ids=job_ids)
        batches = store.waiting_batches(session) if job_ids is None else []
    for batch_id in batches:
        view = current(rt, batch_id)  # settles a batch whose jobs have all ended
        if view.status in ENDED:
            with rt.transaction() as session:
                fresh += store.promote_batch(session, batch_id=batch_id, status=str(view.status), now=utcnow())
    due = list(fresh)
    if publish_due and job_ids is None:
        with rt.transaction() as session:
            # A delivery pending for a while that no attempt took: its message was lost, or it was never sent.
            due += [d for d in store.due(session, now=utcnow() - timedelta(seconds=rt.settings.sweep_grace))]
    published = []
    for delivery_id in dict.fromkeys(due):
        try:
            publish(rt, delivery_id)
            published.append(delivery_id)
        except Exception as exc:  # the broker is away: the next sweep publishes it
            log.warning("webhook %s: could not publish (%s)", delivery_id, type(exc).__name__)
    return published


#: How long "no delivery waits" is believed before the database is asked again.
WAITING_RECHECK = 1.0
_waiting_seen: dict[int, tuple[float, bool]] = {}


def any_waiting(rt: Runtime) -> bool:
    """Whether any delivery waits for its job's end, read at most once a second per runtime: a worker that
    runs jobs without webhooks pays nothing per job. A job with a webhook that ends within that second of a
    "no" has it sent by the next sweep instead."""
    now = time.monotonic()
    seen = _waiting_seen.get(id(rt))
    if seen is not None and now - seen[0] < WAITING_RECHECK:
        return seen[1]
    with rt.transaction() as session:
        waiting = store.any_waiting(session)
    _waiting_seen[id(rt)] = (now, waiting)
    return waiting


def retry_delay(attempts: int, base: float) -> float:
    """Seconds before attempt ``attempts + 1``: ``base`` doubled per attempt made, at most an hour."""
    return float(min(3600.0, base * (2 ** min(max(attempts - 1, 0), 20))))


def deliver(rt: Runtime, delivery_id: str) -> str:
    """One attempt at a delivery; returns its status after it ("skipped": not due, or another attempt holds it)."""
    now = utcnow()
    with rt.transaction() as session:
        leased = store.lease(session, delivery_id, now=now, hold=LEASE)
        if leased is None:
            return "skipped"
        delivery, url = leased
        secrets = store.signing_secrets(session, delivery.principal, now)
        if not secrets:  # a principal without a secret yet gets one; `qbgw webhooks secret` shows it
            secrets = [store.add_secret(session, principal=delivery.principal, now=now, overlap=None)]
    started = time.monotonic()
    status, error = _post(rt, delivery, url, secrets, now)
    latency = int((time.monotonic() - started) * 1000)
    done = status is not None and 200 <= status < 300
    finished = utcnow()
    retry_at = None
    if not done and error is not None and not error.startswith("refused:"):
        delay = retry_delay(delivery.attempts, rt.settings.webhook_backoff)
        window_ends = (delivery.pending_since or delivery.created_at) + timedelta(
            seconds=rt.settings.webhook_retry_window
        )
        if finished + timedelta(seconds=delay) <= window_ends:
            retry_at = finished + timedelta(seconds=delay)
    with rt.transaction() as session:
        new = store.finish(
            session, delivery_id, now=finished, delivered=done, status=status, error=error, retry_at=retry_at
        )
        record(
            session=session,
            action=Action.WEBHOOK_ATTEMPT,
            job_id=delivery.job_id,
            batch_id=delivery.batch_id,
            actor="webhooks",
            attempt=delivery.attempts,
            outcome=new,
            http_status=status,
            latency_ms=latency,
            error_class=None if done else (error or "")[:64].split(":")[0] or None,
            detail={"delivery_id": delivery_id, "event": delivery.event, "host": urlsplit(url).hostname},
        )
    if retry_at is not None:
        wait = (retry_at - utcnow()).total_seconds()
        if wait <= COUNTDOWN_MAX:
            try:
                publish(rt, delivery_id, countdown=max(0.0, wait))
            except Exception as exc:  # the sweeper publishes it when due
                log.warning("webhook %s: could not publish the retry (%s)", delivery_id, type(exc).__name__)
    log.info(
        "webhook %s (%s): attempt %d %s",
        delivery_id,
        delivery.event,
        delivery.attempts,
        new,
        extra={"http_status": status, "latency_ms": latency},
    )
    return new


def _post(
    rt: Runtime, delivery: store.Delivery, url: str, secrets: list[str], now: datetime
) -> tuple[int | None, str | None]:
    """POST the signed body: (the HTTP status, None) or (None or status, why it did not deliver). An error
    starting "refused:" will not get better by retrying (a URL the guard refuses)."""
    body = (delivery.body or "").encode()
    signature = " ".join(Webhook(secret).sign(delivery.id, now, body) for secret in secrets)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": delivery.id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }
    parts = urlsplit(url)
    try:
        if rt.settings.webhooks_development:
            session = requests.Session()
            session.trust_env = False
            target = url
        else:
            if parts.scheme != "https":
                return None, "refused: only https:// webhook URLs are called (QBGW_WEBHOOKS_DEVELOPMENT is off)"
            address = resolve(parts.hostname or "", parts.port or 443)[0]
            netloc = f"[{address}]" if ":" in address else address
            target = urlunsplit(parts._replace(netloc=netloc + (f":{parts.port}" if parts.port else "")))
            headers["Host"] = parts.netloc
            session = pinned_session(parts.hostname or "")
    except ResolutionFailed as exc:
        return None, f"refused: {exc}"
    try:
        with session:
            answer = session.post(
                target, data=body, headers=headers, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), allow_redirects=False
            )
            answer.close()
    except requests.RequestException as exc:
        return None, f"{type(exc).__name__}: the receiver could not be reached"
    if 200 <= answer.status_code < 300:
        return answer.status_code, None
    return answer.status_code, f"HTTP {answer.status_code}"
