"""Views: a batch as its submitter sees it (status, counts, timestamps, a one-line summary), read from its
row and its jobs' statuses; reading one settles the batch (completed once nothing is pending). No PHI.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from ..lifecycle import utcnow
from ..store import batches as batch_store
from ..store.batches import ENDED, BatchStatus, Counts
from ..store.models import Batch

__all__ = ["BatchView", "settled", "view_of"]


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


def settled(session: Session, batches: list[Batch]) -> list[BatchView]:
    """The batches as views, each settled first (completed once nothing is pending; in progress again after a
    replay)."""
    tally = batch_store.counts(session=session, batch_ids=[b.id for b in batches])
    now = utcnow()
    for batch in batches:
        batch_store.settle(session=session, batch=batch, counts=tally[batch.id], now=now)
    return [view_of(batch, tally[batch.id]) for batch in batches]


def view_of(batch: Batch, counts: Counts) -> BatchView:
    return BatchView(
        id=batch.id,
        status=BatchStatus(batch.status),
        actor=batch.actor,
        assistant_id=batch.assistant_id,
        total=batch.total,
        skipped=batch.skipped,
        succeeded=counts.succeeded,
        failed=counts.failed,
        cancelled=counts.cancelled,
        pending=counts.pending,
        created_at=batch.created_at,
        in_progress_at=batch.in_progress_at,
        completed_at=batch.completed_at,
        cancelled_at=batch.cancelled_at,
        expired_at=batch.expired_at,
        expires_at=batch.expires_at,
    )
