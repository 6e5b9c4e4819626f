"""Submission: a validated batch stored and announced. Jobs are inserted in chunks (one transaction each,
``store.batches.CHUNK``) and their messages published through one broker connection as each chunk commits,
so workers start on the first chunk while the rest is stored; if the broker fails, the rest is stored
unannounced for the sweeper.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from ..lifecycle import utcnow
from ..runtime.context import Runtime
from ..runtime.dispatch import announce_many
from ..store import batches as batch_store
from ..store import jobs as store
from ..store import webhooks
from ..store.batches import BatchStatus
from .input import BatchLine, ParsedBatch

__all__ = ["DEFAULT_WINDOW", "store_batch"]

log = logging.getLogger("qbgw.batches")


DEFAULT_WINDOW = timedelta(hours=24)


def _store_jobs(rt: Runtime, batch_id: str, lines: Sequence[BatchLine], actor: str) -> None:
    ended: tuple[str, bool] | None = None  # (who ended the batch, whether it expired): an end is for good
    unannounced = 0
    with ExitStack() as stack:
        producer = _producer(rt, stack)
        for start in range(0, len(lines), batch_store.CHUNK):
            jobs = [_new_job(rt, batch_id, line, actor) for line in lines[start : start + batch_store.CHUNK]]
            if ended is None:
                ended = _store_queued(rt, batch_id, jobs, announced=producer is not None, actor=actor)
            if ended is not None:
                by, expired = ended
                with rt.transaction() as session:
                    batch_store.insert_jobs(session=session, jobs=jobs, announced=False, now=utcnow())
                    batch_store.cancel_jobs(
                        session=session, job_ids=[j.id for j in jobs], actor=by, expired=expired, now=utcnow()
                    )
                continue
            if producer is None:
                unannounced += len(jobs)
            elif not announce_many(
                rt, [job.id for job in jobs], queue=rt.settings.effective_batch_queue, producer=producer, warn=False
            ):
                producer = None  # the broker failed: store the rest unannounced, for the sweeper
                unannounced += len(jobs)
    if unannounced:  # one warning, with the whole count (not the chunk's)
        log.warning(
            "broker failed: %d of the batch's %d job(s) stored for the sweeper to publish", unannounced, len(lines)
        )


def _store_queued(
    rt: Runtime, batch_id: str, jobs: Sequence[store.NewJob], *, announced: bool, actor: str
) -> tuple[str, bool] | None:
    """Store ``jobs`` queued, unless the batch has ended (cancelled or expired, for good): then store nothing and
    return who ended it (``actor`` if its event says nobody) and whether it expired."""
    with rt.transaction() as session:
        # Locked: a cancel (or expiry) decided while the batch is still being stored is seen here, and
        # the rest of its jobs are stored cancelled by the same actor, never queued to run.
        batch = batch_store.get(session=session, batch_id=batch_id, lock=True)
        if batch.status not in (BatchStatus.CANCELLED, BatchStatus.EXPIRED):
            batch_store.insert_jobs(session=session, jobs=jobs, announced=announced, now=utcnow())
            return None
        expired = batch.status == BatchStatus.EXPIRED
    # Who ended it is in the end's event, which block sealing may hold staged: chained first, apart, so that
    # neither the batch's lock nor the storing of jobs is ever held with the chain head's.
    rt.chain_staged()
    with rt.transaction() as session:
        return batch_store.ended_by(session=session, batch_id=batch_id) or actor, expired


def _new_job(rt: Runtime, batch_id: str, line: BatchLine, actor: str) -> store.NewJob:
    return store.NewJob(
        id=str(uuid.uuid4()),
        assistant_id=line.assistant_id,
        messages=line.messages,
        custom_id=line.custom_id,
        idempotency_key=None,
        actor=actor,
        max_attempts=rt.settings.max_attempts,
        batch_id=batch_id,
        subject=line.subject,
        subject_index=None if line.subject is None else rt.subject_key.index(line.subject),
    )


def _producer(rt: Runtime, stack: ExitStack) -> Any:
    try:
        return stack.enter_context(rt.celery.producer_or_acquire())
    except Exception as exc:  # kombu's errors differ per transport; the sweeper publishes instead
        log.warning(
            "broker unavailable (%s): the batch's jobs are stored for the sweeper to publish", type(exc).__name__
        )
        return None


def store_batch(
    rt: Runtime,
    parsed: ParsedBatch,
    *,
    assistant_id: str | None,
    window: timedelta,
    actor: str,
    webhook_url: str | None = None,
    with_batch: Callable[[Session, str], None] | None = None,
) -> str:
    """Store the batch of ``parsed`` lines (validated) and announce its jobs; returns its id. ``with_batch``: called
    with the session and the batch's id in the transaction that creates the batch (rows that belong to it).

    Raises:
        StoreUnavailable: the database cannot be reached (a batch left ``validating`` has the jobs stored so far).
    """
    batch_id = str(uuid.uuid4())
    with rt.transaction() as session:
        batch_store.create_batch(
            session=session,
            batch_id=batch_id,
            actor=actor,
            assistant_id=assistant_id,
            total=len(parsed.lines),
            skipped=len(parsed.problems),
            window=window,
            now=utcnow(),
        )
        if webhook_url is not None:  # with the batch: it never ends without its webhook
            webhooks.add_waiting(session, url=webhook_url, principal=actor, now=utcnow(), batch_id=batch_id)
        if with_batch is not None:
            with_batch(session, batch_id)
    _store_jobs(rt, batch_id, parsed.lines, actor)
    with rt.transaction() as session:
        batch_store.start(session=session, batch_id=batch_id, now=utcnow())
    return batch_id
