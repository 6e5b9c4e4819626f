"""Producer: validate, store, then announce. The job row (and its audit event) is committed
before a message carrying only the job id is published; nothing is stored for bad input.
"""

from __future__ import annotations

import uuid
from typing import Any

from worker import images, store
from worker.celery_app import publish
from worker.errors import BrokerUnavailable, NotAnnounced, StoreUnavailable
from worker.messages import validate_assistant_id, validate_key, validate_messages
from worker.models import utcnow
from worker.runtime import Runtime, runtime
from worker.settings import Settings

__all__ = ["submit", "check_broker"]


def submit(
    assistant_id: str,
    messages: list[dict[str, Any]],
    *,
    custom_id: str | None = None,
    idempotency_key: str | None = None,
    actor: str | None = None,
    require_broker: bool = False,
    settings: Settings | None = None,
) -> str:
    """Store a gateway job and queue it; returns its id.

    A repeated ``idempotency_key`` with the same assistant and messages returns the first
    job's id and creates nothing. If the broker cannot take the message, the job stays stored
    and a sweeper dispatches it (``NotAnnounced`` tells the caller so); with ``require_broker``
    the broker is checked first and nothing is stored when it is down.

    Raises:
        InvalidMessages: the assistant id, messages, custom id or key are malformed, a string is not
            encodable as UTF-8, or the messages are over QBGW_MAX_REQUEST_BYTES.
        InvalidImage: an image reference is refused, or an inline image is not the jpeg/png it declares.
        IdempotencyConflict: the key already names a different job.
        StoreUnavailable: the database cannot be reached (nothing was stored).
        BrokerUnavailable: with ``require_broker``, the broker cannot be reached (nothing was stored).
        NotAnnounced: the job was stored but its message could not be published (its id is in
            ``.job_id``; a sweeper dispatches it).
    """
    rt = runtime(settings)
    new = store.NewJob(
        id=str(uuid.uuid4()),
        assistant_id=validate_assistant_id(assistant_id),
        messages=validate_messages(messages, images.policy(rt.settings)),
        custom_id=_optional_key("custom_id", custom_id),
        idempotency_key=_optional_key("idempotency_key", idempotency_key),
        actor=actor or rt.settings.actor or "producer",
        max_attempts=rt.settings.max_attempts,
    )
    if require_broker:
        check_broker(rt)
    job_id, created = _store(rt, new)
    if created or _still_queued(rt, job_id):
        failure = announce(rt, job_id)
        if failure is not None:
            raise NotAnnounced(job_id, failure)
    return job_id


def announce(rt: Runtime, job_id: str, *, countdown: float | None = None, slot_at: float | None = None,
             batch_id: str | None = None) -> str | None:  # fmt: skip
    """Publish the job's message; if the broker fails, mark the job for the sweeper instead.

    Returns None when published, else the broker error's class name (the job is safe: the next
    sweep publishes it, or the sweep grace does if the database is away too).
    """
    try:
        queue = rt.settings.queue_for(in_batch=batch_id is not None)
        publish(rt.celery, job_id, countdown=countdown, slot_at=slot_at, queue=queue)
        return None
    except Exception as exc:  # kombu's errors differ per transport
        failure = type(exc).__name__
    try:
        with rt.transaction() as session:
            store.mark_unannounced(session=session, job_ids=[job_id])
    except StoreUnavailable:
        pass
    return failure


def _store(rt: Runtime, new: store.NewJob) -> tuple[str, bool]:
    for _ in range(3):
        try:
            with rt.transaction() as session:
                return store.create_job(session=session, new=new, now=utcnow())
        except store.KeyRace:
            continue  # the other insert has committed: the next look-up finds it
    raise StoreUnavailable("idempotency key contended by three concurrent submissions; try again")


def _still_queued(rt: Runtime, job_id: str) -> bool:
    from worker.queries import job_status

    # A replayed key re-rings the doorbell for a job still waiting: harmless if the first
    # message is alive (the claim makes duplicates no-ops), and it recovers a lost one.
    return job_status(job_id, settings=rt.settings) == "queued"


def check_broker(rt: Runtime) -> None:
    """Raises BrokerUnavailable unless a message could be published right now."""
    if rt.settings.is_embedded_broker:
        folder = rt.settings.broker_dir / "queue"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise BrokerUnavailable(f"embedded broker folder {folder} is not writable: {exc.strerror}") from exc
        return
    try:
        with rt.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=rt.settings.connect_timeout)
    except Exception as exc:  # kombu raises OperationalError, transports their own
        raise BrokerUnavailable(f"broker {_describe(rt.settings.effective_broker_url)} unreachable: {exc}") from exc


def _optional_key(name: str, value: object) -> str | None:
    return None if value is None else validate_key(name, value)


def _describe(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))
