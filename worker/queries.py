"""Queries: the read side of the facade. A job's status and result, its audit trail, failed jobs, audit
queries, batches and their results, as frozen values; every read of PHI and every audit query is itself
audited with the reader's name. Each call resolves ``settings`` (the environment when None) into this
process's runtime.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from contextlib import nullcontext

from .audit.events import AuditRecord
from .batches import ending, export
from .batches.export import BatchResult
from .batches.views import BatchView, settled
from .errors import InvalidMessages
from .lifecycle import TERMINAL, JobStatus
from .messages import resolve_actor
from .runtime.context import Runtime
from .runtime.locator import runtime
from .runtime.waiter import Wake
from .settings import Settings
from .store import batches as batch_store
from .store import reads, webhooks
from .store.reads import Admit, AuditFilter, Expect, JobView
from .store.webhooks import Delivery

__all__ = [
    "JobView",
    "AuditFilter",
    "get_job",
    "job_status",
    "job_metadata",
    "wait_for_job",
    "job_events",
    "failed_jobs",
    "audit_query",
    "get_batch",
    "list_batches",
    "wait_for_batch",
    "batch_results",
    "failed_webhooks",
]


def _reader(rt: Runtime, reader: str | None) -> str:
    return resolve_actor(reader, rt.settings.actor, "reader", "reader")


def get_job(job_id: str, *, reader: str | None = None, settings: Settings | None = None) -> JobView:
    """The job's current state, its answer or error included (that read is audited).

    Raises:
        JobNotFound: no job has this id (never reported as "pending").
        StoreUnavailable: the database cannot be reached.
        DecryptionFailed: a stored value was moved or altered, or its key is gone.
    """
    return read_admitted(job_id, None, reader=reader, settings=settings)


def read_admitted(
    job_id: str,
    admit: Admit | None,
    *,
    reader: str | None = None,
    settings: Settings | None = None,
    expect: Expect | None = None,
) -> JobView:
    """:func:`get_job`, after ``admit`` has seen the job without its PHI (and not refused by raising): one read
    where a check (whose job is it? has it ended?) would otherwise take a read of its own. ``expect``: what
    ``admit`` lets through, for PostgreSQL to check in the one statement that reads and audits."""
    rt = runtime(settings)
    hot = rt.hot_path  # PostgreSQL: one query, and the read's event sealed in one statement
    if hot is not None:
        return hot.read_job(job_id, _reader(rt, reader), admit, expect)
    with rt.transaction() as session:
        return reads.read_job(session, job_id, _reader(rt, reader), admit)


def job_metadata(job_id: str, *, settings: Settings | None = None) -> tuple[JobView, str | None]:
    """The job without its PHI (``answer`` and ``error`` are None, so the read is not audited), and the id of
    its batch (None when submitted alone).

    Raises:
        JobNotFound: no job has this id.
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    hot = rt.hot_path
    if hot is not None:
        return hot.job_metadata(job_id)
    with rt.transaction() as session:
        return reads.job_metadata(session, job_id)


def job_status(job_id: str, *, settings: Settings | None = None) -> JobStatus:
    """Only the status (no PHI, so not audited); for polling.

    Raises:
        JobNotFound: no job has this id.
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    hot = rt.hot_path
    if hot is not None:
        return hot.status_of(job_id)
    with rt.transaction() as session:
        return reads.status_of(session, job_id)


def wait_for_job(
    job_id: str,
    *,
    timeout: float | None = None,
    poll: float | None = None,
    reader: str | None = None,
    settings: Settings | None = None,
) -> JobView:
    """Block until the job is finished (or ``timeout`` seconds pass) and return its state. Blocks: never call
    it in a web request handler (use :mod:`qbgw.aio`).

    On PostgreSQL the wait is woken by the database when the job ends (``LISTEN/NOTIFY``: this process keeps one
    listening connection from its first wait on); elsewhere, or with ``poll`` given, the job is re-read every
    ``poll`` seconds (default 5 ms, growing by half each time up to 0.5 s).

    Raises:
        JobNotFound: no job has this id.
        TimeoutError: ``timeout`` passed first.
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    deadline = None if timeout is None else time.monotonic() + timeout
    waiter = rt.job_waiter if poll is None else None
    if waiter is not None and not waiter.notifies:
        waiter = None  # SQLite: nothing to listen to, the reads are the wait
    delay = poll if poll is not None else 0.005
    while True:
        with waiter.watch_sync(job_id) if waiter is not None else nullcontext(Wake()) as ended:
            status = job_status(job_id, settings=settings)
            if status in TERMINAL:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"job {job_id} is still {status} after {timeout:g}s")
            pause = waiter.interval(0) if waiter is not None and waiter.listening else delay
            ended.wait(pause if left is None else min(pause, left))  # set early only by the listener
        if ended.ended:  # the database said the job ended: read it at once
            view = get_job(job_id, reader=reader, settings=settings)
            if view.done:  # (else it was replayed meanwhile: wait on)
                return view
        delay = min(delay * 1.5, 0.5)
    return get_job(job_id, reader=reader, settings=settings)


def failed_jobs(*, limit: int = 100, reader: str | None = None, settings: Settings | None = None) -> list[JobView]:
    """Failed jobs, most recent first, with their reasons (the dead-letter view; each read is audited).

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    with rt.transaction() as session:
        return reads.failed(session, limit=limit, reader=_reader(rt, reader))


def audit_query(
    query: AuditFilter | None = None,
    *,
    export: bool = False,
    reader: str | None = None,
    settings: Settings | None = None,
) -> list[AuditRecord]:
    """Audit events matching ``query`` (None: every event, up to the filter's default limit), oldest first.
    The query is itself audited (``audit.exported`` when ``export``), after the events it returns.

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    rt.chain_staged()  # events staged for the block sealer are chained first, in a transaction of their own
    with rt.transaction() as session:
        return reads.query_audit(session, query or AuditFilter(), export=export, reader=_reader(rt, reader))


def job_events(
    job_id: str, *, include_reads: bool = False, reader: str | None = None, settings: Settings | None = None
) -> list[AuditRecord]:
    """The job's audit trail, oldest first: what happened to it (and, with ``include_reads``, who read it).
    The query is audited.

    Raises:
        JobNotFound: no job has this id.
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    rt.chain_staged()  # events staged for the block sealer are chained first, in a transaction of their own
    with rt.transaction() as session:
        return reads.job_trail(session, job_id, reader=_reader(rt, reader), include_reads=include_reads)


def get_batch(batch_id: str, *, settings: Settings | None = None) -> BatchView:
    """The batch's status and counts (no PHI is read). A batch past its window is expired now.

    Raises:
        BatchNotFound: no batch has this id.
        StoreUnavailable: the database cannot be reached.
    """
    return ending.current(runtime(settings), batch_id)


def list_batches(*, limit: int = 50, settings: Settings | None = None) -> list[BatchView]:
    """The most recent batches first, with their counts.

    Raises:
        InvalidMessages: ``limit`` is not a whole number from 1 to 100,000.
        StoreUnavailable: the database cannot be reached.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100_000:
        raise InvalidMessages(f"limit: must be a whole number of batches from 1 to 100000; got {str(limit)[:40]}")
    with runtime(settings).transaction() as session:
        return settled(session, batch_store.recent(session=session, limit=limit))


def wait_for_batch(
    batch_id: str,
    *,
    timeout: float | None = None,
    poll: float = 0.5,
    on_progress: Callable[[BatchView], None] | None = None,
    settings: Settings | None = None,
) -> BatchView:
    """Block until the batch is done (``timeout`` seconds at most); ``on_progress`` is called with each view
    polled.

    Raises:
        BatchNotFound: no batch has this id.
        TimeoutError: ``timeout`` passed first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        view = get_batch(batch_id, settings=settings)
        if on_progress is not None:
            on_progress(view)
        if view.done:
            return view
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"batch {batch_id} is still {view.summary} after {timeout:g}s")
        time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))


def batch_results(
    batch_id: str,
    *,
    failed_only: bool = False,
    statuses: Collection[JobStatus] | None = None,
    reader: str | None = None,
    settings: Settings | None = None,
) -> list[BatchResult]:
    """Every job of the batch sorted by custom_id, finished or not (partial results of a running, cancelled or
    expired batch included); with ``failed_only``, the failed and cancelled jobs with their messages; with
    ``statuses``, only the jobs in those statuses (only those reads are audited). The read is audited: one
    ``result.read`` per job read, one ``batch.exported``.

    Raises:
        BatchNotFound: no batch has this id.
        StoreUnavailable: the database cannot be reached.
        DecryptionFailed: a stored value was moved or altered, or its key is gone.
    """
    rt = runtime(settings)
    with rt.transaction() as session:
        return export.results(session, batch_id, failed_only=failed_only, reader=_reader(rt, reader), statuses=statuses)


def failed_webhooks(*, limit: int = 100, settings: Settings | None = None) -> list[Delivery]:
    """Webhook deliveries that failed (refused, or no 2xx within QBGW_WEBHOOK_RETRY_WINDOW), newest first; no
    URL or body (no PHI is read).

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    with runtime(settings).transaction() as session:
        return webhooks.failed(session, limit=limit)
