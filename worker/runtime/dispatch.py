"""Dispatch: ring the broker's doorbell for a stored job, or, when the broker will not take it, mark the job
for the sweeper. The message carries the job id only; the database is the source of truth.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.utils.url import maybe_sanitize_url

from ..errors import BrokerUnavailable, StoreUnavailable
from ..store import jobs as store
from .app import publish, publish_many
from .context import Runtime

__all__ = ["announce", "announce_many", "check_broker"]

log = logging.getLogger("qbgw.dispatch")


def announce(
    rt: Runtime,
    job_id: str,
    *,
    countdown: float | None = None,
    slot_at: float | None = None,
    batch_id: str | None = None,
) -> str | None:
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


def announce_many(
    rt: Runtime, job_ids: list[str], *, queue: str | None, producer: Any = None, warn: bool = True
) -> bool:
    """Publish the messages of many stored jobs on ``queue`` (``publish_many``), through ``producer`` if given
    (``app.producer_or_acquire()``), else one acquired for the call; if the broker fails, mark them all for the
    sweeper instead. Returns whether they were published (after a failure some may have been: a duplicate
    message is harmless, the claim makes it a no-op). ``warn``: log the failure (False: the caller counts)."""
    try:
        if producer is not None:
            publish_many(rt.celery, job_ids, producer, queue=queue)
        else:
            with rt.celery.producer_or_acquire() as acquired:
                publish_many(rt.celery, job_ids, acquired, queue=queue)
        return True
    except Exception as exc:  # kombu's errors differ per transport
        if warn:
            log.warning(
                "broker failed (%s): %d job(s) left for the sweeper to publish", type(exc).__name__, len(job_ids)
            )
        else:
            log.debug("broker failed (%s)", type(exc).__name__)
    try:
        with rt.transaction() as session:
            store.mark_unannounced(session=session, job_ids=job_ids)
    except StoreUnavailable:
        pass  # announced_at stays set: the sweep grace publishes them
    return False


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


def _describe(url: str) -> str:
    return str(maybe_sanitize_url(url))
