"""Producer: the facade's way in. Validate, store, then announce: a job row (and its audit event) is committed
before a message carrying only the job id is published; nothing is stored for bad input. A batch is every
line validated first, then stored in chunks.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterable
from dataclasses import replace
from datetime import timedelta
from typing import Any

from .batches import input as batch_input
from .batches.ending import current
from .batches.submission import DEFAULT_WINDOW, store_batch
from .batches.views import BatchView
from .errors import InvalidMessages, NotAnnounced, StoreUnavailable
from .images.resolve import policy
from .lifecycle import utcnow
from .messages import (
    resolve_actor,
    validate_assistant_id,
    validate_key,
    validate_messages,
    validate_subject,
    validate_webhook_url,
)
from .runtime.context import Runtime
from .runtime.dispatch import announce, announce_many, check_broker
from .runtime.locator import runtime
from .settings import Settings
from .store import jobs as store
from .store import keys as key_store
from .store import webhooks
from .store.reads import status_of

__all__ = ["submit", "submit_batch", "check_broker", "Source"]

#: What ``submit_batch`` takes: a JSON Lines file's path ('-': stdin), or lines (JSON texts or parsed objects).
Source = str | os.PathLike[str] | Iterable[str | dict[str, Any]]


def submit(
    assistant_id: str,
    messages: list[dict[str, Any]],
    *,
    custom_id: str | None = None,
    idempotency_key: str | None = None,
    actor: str | None = None,
    require_broker: bool = False,
    webhook_url: str | None = None,
    subject: str | None = None,
    settings: Settings | None = None,
) -> str:
    """Store a gateway job and queue it; returns its id.

    A repeated ``idempotency_key`` with the same assistant and messages returns the first
    job's id and creates nothing. If the broker cannot take the message, the job stays stored
    and a sweeper dispatches it (``NotAnnounced`` tells the caller so); with ``require_broker``
    the broker is checked first and nothing is stored when it is down. ``subject`` says whom the job is
    about (a patient's record number, ...): stored encrypted, with its blind index (see ``qbgw.access_report``).

    Raises:
        InvalidMessages: the assistant id, messages, custom id, key or subject are malformed, a string is not
            encodable as UTF-8, or the messages are over QBGW_MAX_REQUEST_BYTES.
        ConfigError: a subject is given and no subject key is configured (QBGW_SUBJECT_KEY).
        InvalidImage: an image reference is refused, or an inline image is not the jpeg/png it declares.
        IdempotencyConflict: the key already names a different job.
        StoreUnavailable: the database cannot be reached (nothing was stored).
        BrokerUnavailable: with ``require_broker``, the broker cannot be reached (nothing was stored).
        NotAnnounced: the job was stored but its message could not be published (its id is in
            ``.job_id``; a sweeper dispatches it).
    """
    rt = runtime(settings)
    new = new_job(
        rt,
        assistant_id,
        messages,
        custom_id=custom_id,
        idempotency_key=idempotency_key,
        actor=resolve_actor(actor, rt.settings.actor, "producer"),
        subject=subject,
    )
    hook = _webhook(rt, webhook_url, new.actor)
    if require_broker:
        check_broker(rt)
    job_id, created = _store(rt, new, hook)
    if created or _still_queued(rt, job_id):
        failure = announce(rt, job_id)
        if failure is not None:
            raise NotAnnounced(job_id, failure)
    return job_id


def new_job(
    rt: Runtime,
    assistant_id: str,
    messages: list[dict[str, Any]],
    *,
    custom_id: str | None,
    idempotency_key: str | None,
    actor: str,
    subject: str | None,
) -> store.NewJob:
    """A new job, validated as :func:`submit` validates it (its errors), not stored yet."""
    about = None if subject is None else validate_subject(subject)
    return store.NewJob(
        id=str(uuid.uuid4()),
        assistant_id=validate_assistant_id(assistant_id),
        messages=validate_messages(messages, policy(rt.settings)),
        custom_id=_optional_key("custom_id", custom_id),
        idempotency_key=_optional_key("idempotency_key", idempotency_key),
        actor=actor,
        max_attempts=rt.settings.max_attempts,
        subject=about,
        subject_index=None if about is None else rt.subject_key.index(about),
    )


def store_together(rt: Runtime, news: list[store.NewJob]) -> bool:
    """Store jobs made by :func:`new_job` without an idempotency key, all or none (one statement on PostgreSQL,
    one transaction elsewhere), then publish their messages together; returns whether they were published (if
    not, the jobs are marked for the sweeper, which publishes them). What ``qbgw serve`` does with the POSTs
    that arrive while it stores the previous ones (``qbgw.api.intake``).

    Raises:
        StoreUnavailable: the database cannot be reached (nothing was stored).
    """
    if any(new.idempotency_key is not None for new in news):
        raise ValueError("store_together: jobs with an idempotency key go through submit()")
    now, hot = utcnow(), rt.hot_path
    if hot is not None and len(news) == 1:
        hot.create_job(news[0], now)  # its values as parameters, not inside one JSON text
    elif hot is not None:
        hot.create_jobs(news, now)
    else:
        with rt.transaction() as session:
            for new in news:
                store.create_job(session=session, new=new, now=now)
    ids = [new.id for new in news]
    if len(ids) == 1:
        return announce(rt, ids[0]) is None
    return announce_many(rt, ids, queue=rt.settings.queue_for(in_batch=False))


def _webhook(rt: Runtime, url: str | None, actor: str) -> str | None:
    """The checked webhook URL; its deliveries are signed with the secrets of principal ``actor``, which must be
    a key's (``key:<name>``): `qbgw api-keys webhook-secret --name <name>` shows them."""
    if url is None:
        return None
    if not actor.startswith("key:") or len(actor) <= len("key:"):
        raise InvalidMessages(
            f"webhook_url: needs actor='key:<name>' (the principal whose signing secret signs it), got {actor!r}"
        )
    checked = validate_webhook_url(url, development=rt.settings.webhooks_development)
    with rt.transaction() as session:  # a secret nobody was given would sign the deliveries
        if not key_store.by_name(session, actor[len("key:") :]):
            raise InvalidMessages(
                f"webhook_url: actor {actor!r} names no key (qbgw api-keys list): its deliveries would be signed with "
                "a secret no receiver has"
            )
    return checked


def _store(rt: Runtime, new: store.NewJob, webhook_url: str | None = None) -> tuple[str, bool]:
    hot = rt.hot_path  # PostgreSQL: a job without a key or webhook is one statement (no look-up, no race)
    if hot is not None and new.idempotency_key is None and webhook_url is None:
        return hot.create_job(new, utcnow()), True
    for _ in range(3):
        try:
            with rt.transaction() as session:
                now = utcnow()
                job_id, created = store.create_job(session=session, new=new, now=now)
                if created and webhook_url is not None:  # in the job's transaction: it never ends without it
                    webhooks.add_waiting(session, url=webhook_url, principal=new.actor, now=now, job_id=job_id)
                return job_id, created
        except store.KeyRace:
            continue  # the other insert has committed: the next look-up finds it
    raise StoreUnavailable("idempotency key contended by three concurrent submissions; try again")


def _still_queued(rt: Runtime, job_id: str) -> bool:
    # A replayed key re-rings the doorbell for a job still waiting: harmless if the first
    # message is alive (the claim makes duplicates no-ops), and it recovers a lost one.
    with rt.transaction() as session:
        return status_of(session, job_id) == "queued"


#: The longest batch window accepted.
MAX_WINDOW = timedelta(days=365)


def batch_window(window: object) -> timedelta:
    """A batch's window, a timedelta or a number of seconds: positive, finite, at most MAX_WINDOW.

    Raises:
        InvalidMessages: naming ``window`` and what is accepted.
    """
    most = f"must be positive and at most {MAX_WINDOW.days} days ({MAX_WINDOW.total_seconds():.0f} seconds)"
    if isinstance(window, int | float) and not isinstance(window, bool) and math.isfinite(window):
        if not 0 < window <= MAX_WINDOW.total_seconds():
            raise InvalidMessages(f"window: {most}; got {window:g} seconds")
        return timedelta(seconds=window)
    if isinstance(window, timedelta):
        if not timedelta(0) < window <= MAX_WINDOW:
            raise InvalidMessages(f"window: {most}; got {window}")
        return window
    shown = repr(window)[:40] if isinstance(window, float) else type(window).__name__
    raise InvalidMessages(f"window: must be a timedelta or a finite number of seconds; got {shown}")


def submit_batch(
    source: Source,
    *,
    assistant_id: str | None = None,
    window: timedelta | float = DEFAULT_WINDOW,
    skip_invalid: bool = False,
    actor: str | None = None,
    webhook_url: str | None = None,
    settings: Settings | None = None,
) -> BatchView:
    """Validate every line, store the batch's jobs and queue them; returns the batch.

    ``source`` is a JSON Lines file's path ('-': stdin), or lines (JSON texts or parsed objects).
    A line without an assistant id uses ``assistant_id`` (default QBGW_ASSISTANT_ID). The batch
    expires ``window`` (a timedelta or seconds) after submission. Jobs whose messages could not
    be published are stored anyway; the sweeper publishes them.

    Raises:
        InvalidBatch: a line is invalid (unless ``skip_invalid``: then it is skipped and named in
            ``problems``), or no line is valid; nothing was stored.
        InvalidMessages: ``window`` is not positive.
        ConfigError: a line has a subject and no subject key is configured (QBGW_SUBJECT_KEY); nothing was stored.
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    span = batch_window(window)
    who = resolve_actor(actor, rt.settings.actor, "producer")
    hook = _webhook(rt, webhook_url, who)
    default = assistant_id or rt.settings.assistant_id or None
    raw = batch_input.read_lines(source) if isinstance(source, str | os.PathLike) else source
    parsed = batch_input.parse_lines(
        raw, default_assistant=default, policy=policy(rt.settings), skip_invalid=skip_invalid
    )
    if any(line.subject is not None for line in parsed.lines):
        rt.subject_key  # noqa: B018 - a missing key is refused before anything is stored
    batch_id = store_batch(
        rt,
        parsed,
        assistant_id=default,
        window=span,
        actor=who,
        webhook_url=hook,
    )
    return replace(current(rt, batch_id), problems=tuple(parsed.problems))


def _optional_key(name: str, value: object) -> str | None:
    return None if value is None else validate_key(name, value)
