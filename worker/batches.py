"""Batches: thousands of jobs submitted together, followed and ended together. Every line is
validated before any is stored; jobs are inserted in chunks (one transaction each) and announced
through one broker connection. Counts come from the jobs; reading them needs no PHI.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from worker import batch_input, batch_store, images, store
from worker.batch_store import ENDED, BatchStatus, Counts
from worker.celery_app import publish_many
from worker.errors import InvalidMessages
from worker.models import Batch, utcnow
from worker.runtime import Runtime, runtime
from worker.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["BatchView", "BatchStatus", "submit_batch", "get_batch", "list_batches", "wait_for_batch", "cancel_batch",
           "expire_overdue", "DEFAULT_WINDOW", "CHUNK"]  # fmt: skip

log = logging.getLogger("qbgw.batches")

DEFAULT_WINDOW = timedelta(hours=24)
#: Jobs per transaction (and per round of publishing) when a batch is stored.
CHUNK = 500
Source = str | os.PathLike[str] | Iterable[str | dict[str, Any]]


@dataclass(frozen=True)
class BatchView:
    """A batch as its submitter sees it: status, counts, timestamps. ``problems`` (line number,
    reason) are the invalid lines skipped at submit, on the view ``submit_batch`` returns only."""

    id: str
    status: BatchStatus
    actor: str
    assistant_id: str | None
    total: int
    skipped: int
    succeeded: int
    failed: int
    cancelled: int
    pending: int
    created_at: datetime
    in_progress_at: datetime | None
    completed_at: datetime | None
    cancelled_at: datetime | None
    expired_at: datetime | None
    expires_at: datetime
    problems: tuple[tuple[int, str], ...] = ()

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @property
    def done(self) -> bool:
        """True once the batch has ended and none of its jobs is still running."""
        return self.status in ENDED and self.pending == 0

    @property
    def all_succeeded(self) -> bool:
        return self.done and self.succeeded == self.total

    @property
    def summary(self) -> str:
        """One line: ``completed with 3 failures (47 succeeded)``, ``in_progress: 20 of 50 done``..."""
        if self.status is BatchStatus.COMPLETED:
            if self.succeeded == self.total:
                return f"completed: all {self.total} succeeded"
            lost = [f"{self.failed} failure{'s' if self.failed != 1 else ''}"] if self.failed else []
            lost += [f"{self.cancelled} cancelled"] if self.cancelled else []
            return f"completed with {' and '.join(lost)} ({self.succeeded} succeeded)"
        counts = f"{self.succeeded} succeeded, {self.failed} failed, {self.cancelled} cancelled"
        if self.status in (BatchStatus.CANCELLED, BatchStatus.EXPIRED):
            still = f", {self.pending} still finishing" if self.pending else ""
            return f"{self.status}: {counts}{still}"
        return f"{self.status}: {self.finished} of {self.total} done ({counts}), {self.pending} pending"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("problems")
        data.update({k: v.isoformat() for k, v in data.items() if isinstance(v, datetime)})
        data.update(status=str(self.status), summary=self.summary)
        return data


def submit_batch(
    source: Source,
    *,
    assistant_id: str | None = None,
    window: timedelta | float = DEFAULT_WINDOW,
    skip_invalid: bool = False,
    actor: str | None = None,
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
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    span = window if isinstance(window, timedelta) else timedelta(seconds=window)
    if span <= timedelta(0):
        raise InvalidMessages("window: must be positive")
    default = assistant_id or rt.settings.assistant_id or None
    raw = batch_input.read_lines(source) if isinstance(source, str | os.PathLike) else source
    parsed = batch_input.parse_lines(raw, default_assistant=default, policy=images.policy(rt.settings),
                                     skip_invalid=skip_invalid)  # fmt: skip
    batch_id, who = str(uuid.uuid4()), actor or rt.settings.actor or "producer"
    with rt.transaction() as session:
        batch_store.create_batch(session=session, batch_id=batch_id, actor=who, assistant_id=default,
                                 total=len(parsed.lines), skipped=len(parsed.problems), window=span,
                                 now=utcnow())  # fmt: skip
    _store_jobs(rt, batch_id, parsed.lines, who)
    with rt.transaction() as session:
        batch_store.start(session=session, batch_id=batch_id, now=utcnow())
    view = get_batch(batch_id, settings=rt.settings)
    return BatchView(**{**view.__dict__, "problems": tuple(parsed.problems)})


def _store_jobs(rt: Runtime, batch_id: str, lines: Sequence[batch_input.BatchLine], actor: str) -> None:
    with ExitStack() as stack:
        producer = _producer(rt, stack)
        for start in range(0, len(lines), CHUNK):
            jobs = [_new_job(rt, batch_id, line, actor) for line in lines[start : start + CHUNK]]
            with rt.transaction() as session:
                batch_store.insert_jobs(session=session, jobs=jobs, announced=producer is not None, now=utcnow())
            if producer is not None and not _publish(rt, producer, [job.id for job in jobs]):
                producer = None  # the broker failed: store the rest unannounced, for the sweeper


def _new_job(rt: Runtime, batch_id: str, line: batch_input.BatchLine, actor: str) -> store.NewJob:
    return store.NewJob(id=str(uuid.uuid4()), assistant_id=line.assistant_id, messages=line.messages,
                        custom_id=line.custom_id, idempotency_key=None, actor=actor,
                        max_attempts=rt.settings.max_attempts, batch_id=batch_id)  # fmt: skip


def _producer(rt: Runtime, stack: ExitStack) -> Any:
    try:
        return stack.enter_context(rt.celery.producer_or_acquire())
    except Exception as exc:  # kombu's errors differ per transport; the sweeper publishes instead
        log.warning(
            "broker unavailable (%s): the batch's jobs are stored for the sweeper to publish", type(exc).__name__
        )
        return None


def _publish(rt: Runtime, producer: Any, job_ids: list[str]) -> bool:
    try:
        publish_many(rt.celery, job_ids, producer, queue=rt.settings.effective_batch_queue)
        return True
    except Exception as exc:  # kombu's errors differ per transport
        log.warning("broker failed (%s): %d job(s) left for the sweeper to publish", type(exc).__name__, len(job_ids))
        with rt.transaction() as session:
            store.mark_unannounced(session=session, job_ids=job_ids)
        return False


def get_batch(batch_id: str, *, settings: Settings | None = None) -> BatchView:
    """The batch's status and counts (no PHI is read). A batch past its window is expired now.

    Raises:
        BatchNotFound: no batch has this id.
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    with rt.transaction() as session:
        batch = batch_store.get(session=session, batch_id=batch_id)
        overdue = batch.status not in ENDED and batch.expires_at <= utcnow()
    if overdue:
        _end(rt, batch_id, BatchStatus.EXPIRED, batch_store.EXPIRY_ACTOR)
    with rt.transaction() as session:
        batch = batch_store.get(session=session, batch_id=batch_id)
        return _settled(session, [batch])[0]


def list_batches(*, limit: int = 50, settings: Settings | None = None) -> list[BatchView]:
    """The most recent batches first, with their counts.

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    with runtime(settings).transaction() as session:
        return _settled(session, batch_store.recent(session=session, limit=limit))


def _settled(session: Session, batches: list[Batch]) -> list[BatchView]:
    tally = batch_store.counts(session=session, batch_ids=[b.id for b in batches])
    now = utcnow()
    for batch in batches:
        batch_store.settle(session=session, batch=batch, counts=tally[batch.id], now=now)
    return [_view(batch, tally[batch.id]) for batch in batches]


def wait_for_batch(
    batch_id: str,
    *,
    timeout: float | None = None,
    poll: float = 0.5,
    on_progress: Callable[[BatchView], None] | None = None,
    settings: Settings | None = None,
) -> BatchView:
    """Block until the batch is done (``timeout`` seconds at most); ``on_progress`` is called
    with each view polled.

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


def cancel_batch(batch_id: str, *, actor: str | None = None, settings: Settings | None = None) -> BatchView:
    """Cancel every job of the batch not finished yet (running ones when their attempt ends);
    finished jobs keep their results. A batch that has ended is left as it is.

    Raises:
        BatchNotFound: no batch has this id.
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    _end(rt, batch_id, BatchStatus.CANCELLED, actor or rt.settings.actor or "operator")
    return get_batch(batch_id, settings=rt.settings)


def expire_overdue(*, settings: Settings | None = None) -> list[str]:
    """Expire every batch past its completion window (the sweeper calls this); returns their ids. Also
    finishes cancelling the jobs of a batch whose end was decided by a run that did not get that far."""
    rt = runtime(settings)
    with rt.transaction() as session:
        overdue = batch_store.overdue(session=session, now=utcnow())
        unswept = batch_store.unswept(session=session)
    for batch_id, status in unswept:
        _cancel_unfinished(rt, batch_id, batch_store.EXPIRY_ACTOR if status == BatchStatus.EXPIRED else "operator",
                           expired=status == BatchStatus.EXPIRED)  # fmt: skip
    return [batch_id for batch_id in overdue if _end(rt, batch_id, BatchStatus.EXPIRED, batch_store.EXPIRY_ACTOR)]


def _end(rt: Runtime, batch_id: str, status: BatchStatus, actor: str) -> bool:
    """End the batch ``status`` (cancelled or expired), then cancel its unfinished jobs chunk by chunk.
    False: it had ended already (an end decided before is finished, should its run have stopped short).

    The end is decided first, in one transaction (see ``batch_store.end``): however many sweepers and
    readers race, an expired batch stays expired, a completed one completed."""
    with rt.transaction() as session:
        batch = batch_store.get(session=session, batch_id=batch_id, lock=True)
        counts = batch_store.counts(session=session, batch_ids=[batch_id])[batch_id]
        # It may have completed unnoticed (only reads settle it): then it is not cancelled or expired.
        batch_store.settle(session=session, batch=batch, counts=counts, now=utcnow())
        decided = batch.status not in ENDED and batch_store.end(
            session=session, batch=batch, status=status, actor=actor, pending=counts.pending, now=utcnow()
        )
        ended = BatchStatus(batch.status)
    if ended in (BatchStatus.CANCELLED, BatchStatus.EXPIRED):
        _cancel_unfinished(rt, batch_id, actor, expired=ended is BatchStatus.EXPIRED)
    return decided


def _cancel_unfinished(rt: Runtime, batch_id: str, actor: str, *, expired: bool) -> int:
    """Cancel the batch's jobs that are not finished (a running one when its attempt ends), a chunk per
    transaction; returns how many."""
    cancelled = 0
    while True:
        with rt.transaction() as session:
            ids = batch_store.unfinished_jobs(session=session, batch_id=batch_id, limit=CHUNK)
            if not ids:
                return cancelled
            cancelled += batch_store.cancel_jobs(session=session, job_ids=ids, actor=actor, expired=expired,
                                                 now=utcnow())  # fmt: skip


def _view(batch: Batch, counts: Counts) -> BatchView:
    return BatchView(
        id=batch.id, status=BatchStatus(batch.status), actor=batch.actor, assistant_id=batch.assistant_id,
        total=batch.total, skipped=batch.skipped, succeeded=counts.succeeded, failed=counts.failed,
        cancelled=counts.cancelled, pending=counts.pending, created_at=batch.created_at,
        in_progress_at=batch.in_progress_at, completed_at=batch.completed_at, cancelled_at=batch.cancelled_at,
        expired_at=batch.expired_at, expires_at=batch.expires_at,
    )  # fmt: skip
