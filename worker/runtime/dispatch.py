"""Dispatch: ring the broker's doorbell for a stored job, or, when the broker will not take it, mark the job
for the sweeper. The message carries the job id only; the database is the source of truth.
"""

from __future__ import annotations

from kombu.utils.url import maybe_sanitize_url

from ..errors import BrokerUnavailable, StoreUnavailable
from ..store import jobs as store
from .app import publish
from .context import Runtime

__all__ = ["announce", "check_broker"]


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
