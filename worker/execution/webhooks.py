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

import contextlib
import http.client
import logging
import socket
import ssl
import threading
import time
from datetime import datetime, timedelta
from urllib.parse import SplitResult, urlsplit

from celery import Celery
from standardwebhooks import Webhook

from ..audit.events import Action, record
from ..batches.ending import current
from ..errors import ResolutionFailed
from ..images.remote import resolve
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
#: The longest one attempt may take, all of it (well under LEASE, so no second attempt starts beside it).
TOTAL_TIMEOUT = 20.0
#: Retries sooner than this are published with a countdown; later ones are left to the sweeper.
COUNTDOWN_MAX = 60.0
#: How long a delivery that found its process's delivery slots all taken waits before it is tried again.
DEFERRED = 5.0
_slots: dict[int, threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


def delivery_slots(concurrency: int) -> int:
    """How many deliveries one worker process attempts at once: half its threads (at least one), so that slow
    receivers, each holding a thread for up to TOTAL_TIMEOUT, leave the other half to jobs."""
    return max(1, concurrency // 2)


def _slots_of(rt: Runtime) -> threading.BoundedSemaphore:
    with _slots_lock:
        found = _slots.get(id(rt))
        if found is None:
            threads = rt.settings.concurrency if rt.settings.pool == "threads" else 1  # a prefork child runs one
            found = _slots[id(rt)] = threading.BoundedSemaphore(delivery_slots(threads))
        return found


def register(app: Celery) -> None:
    """Register the delivery task on a worker's ``app``."""
    from ..runtime.locator import runtime  # a process's entry point: the task finds its runtime

    @app.task(name=WEBHOOK_TASK, max_retries=None)  # type: ignore[untyped-decorator]
    def deliver_webhook(delivery_id: str) -> str:
        return deliver(runtime(app.qbgw_settings), delivery_id)


def publish(rt: Runtime, delivery_id: str, *, countdown: float | None = None) -> None:
    # Behind interactive jobs (workers read their queue first): receivers, slow or not, never hold jobs back.
    rt.celery.send_task(WEBHOOK_TASK, args=[delivery_id], countdown=countdown, queue=rt.settings.effective_batch_queue)


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
            grace = timedelta(seconds=rt.settings.sweep_grace)
            due += [d for d in store.due(session, now=utcnow(), grace=grace)]
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
    """One attempt at a delivery; returns its status after it ("skipped": not due, or another attempt holds it;
    "deferred": this process already attempts :func:`delivery_slots` deliveries, so it is published again to be
    tried in DEFERRED seconds, no attempt spent)."""
    slots = _slots_of(rt)
    if not slots.acquire(blocking=False):
        try:
            publish(rt, delivery_id, countdown=DEFERRED)
        except Exception as exc:  # the broker is away: the sweeper publishes it when due
            log.warning("webhook %s: could not publish it again (%s)", delivery_id, type(exc).__name__)
        return "deferred"
    try:
        return _attempt(rt, delivery_id)
    finally:
        slots.release()


def _attempt(rt: Runtime, delivery_id: str) -> str:
    now = utcnow()
    with rt.transaction() as session:
        leased = store.lease(session, delivery_id, now=now, hold=LEASE)
        if leased is None:
            return "skipped"
        delivery, url = leased
        secrets = store.signing_secrets(session, delivery.principal, now)
        if not secrets:  # a principal without a secret yet gets one; `qbgw api-keys webhook-secret` shows it
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
        if finished < window_ends:  # the last try is at the window's end, not a backoff before it
            retry_at = min(finished + timedelta(seconds=delay), window_ends)
    with rt.transaction() as session:
        new = store.finish(
            session,
            delivery_id,
            attempt=delivery.attempts,
            now=finished,
            delivered=done,
            status=status,
            error=error,
            retry_at=retry_at,
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
    if retry_at is not None and new == store.PENDING:
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
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    try:
        if rt.settings.webhooks_development:
            address = parts.hostname or ""
        elif not https:
            return None, "refused: only https:// webhook URLs are called (QBGW_WEBHOOKS_DEVELOPMENT is off)"
        else:
            address = resolve(parts.hostname or "", port)[0]  # every address checked; this one is used
    except ResolutionFailed as exc:
        if "cannot resolve" in str(exc) or "resolves to no address" in str(exc):
            return None, f"DNS: {exc}"  # a resolver's bad moment: tried again later
        return None, "refused: " + str(exc).replace("refused to fetch from", "refused to call")
    try:
        status = _send(parts, address, port, body, headers)
    except _TooLong:
        return None, f"Timeout: the attempt took over {TOTAL_TIMEOUT:g} s"
    except TimeoutError:  # a connect or a read that waited out its own timeout
        return None, f"Timeout: no answer within {CONNECT_TIMEOUT:g} s to connect or {READ_TIMEOUT:g} s to a read"
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{type(exc).__name__}: the receiver could not be reached"
    if 200 <= status < 300:
        return status, None
    return status, f"HTTP {status}"


class _TooLong(TimeoutError):
    """The watchdog ended an attempt at TOTAL_TIMEOUT (not a single read at its READ_TIMEOUT)."""


def _send(parts: SplitResult, address: str, port: int, body: bytes, headers: dict[str, str]) -> int:
    """POST on a connection of our own to ``address`` (TLS verifying the URL's host name); returns the status.

    requests' timeouts bound each socket read, not the call: a receiver that sends a byte every few seconds
    would hold the thread (and, past the lease, a second one) for ever. A watchdog shuts the socket down at
    TOTAL_TIMEOUT, which ends any read at once; no proxy is used (it would undo the address check).
    """
    sock = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT)
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(TOTAL_TIMEOUT, stop)
    watchdog.daemon = True
    watchdog.start()
    connection = http.client.HTTPConnection(parts.hostname or address, port, timeout=READ_TIMEOUT)
    try:
        if parts.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        sock.settimeout(READ_TIMEOUT)
        connection.sock = sock
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", path, body=body, headers=headers)
        answer = connection.getresponse()
        return int(answer.status)  # the body is not read: the status says it all
    except (OSError, http.client.HTTPException):
        if timed_out.is_set():
            raise _TooLong from None
        raise
    finally:
        watchdog.cancel()
        connection.close()
        with contextlib.suppress(OSError):
            sock.close()
