"""Queries: the read side. Jobs and their audit events as frozen values, never ORM rows."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from worker import audit
from worker.errors import JobNotFound
from worker.lifecycle import TERMINAL, JobStatus
from worker.models import Job
from worker.runtime import runtime
from worker.settings import Settings

__all__ = ["JobView", "get_job", "wait_for_job", "job_events", "failed_jobs"]


@dataclass(frozen=True)
class JobView:
    """A job as a producer sees it."""

    id: str
    status: JobStatus
    assistant_id: str
    custom_id: str | None
    idempotency_key: str | None
    actor: str
    attempts: int
    max_attempts: int
    answer: str | None
    error: str | None
    error_class: str | None
    http_status: int | None
    created_at: datetime
    started_at: datetime | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    finished_at: datetime | None

    @property
    def done(self) -> bool:
        """True once the job is succeeded, failed or cancelled: nothing will change it."""
        return self.status in TERMINAL

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, datetime):
                data[key] = value.isoformat()
        data["status"] = str(self.status)
        return data

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, ensure_ascii=False)


def get_job(job_id: str, *, settings: Settings | None = None) -> JobView:
    """The job's current state.

    Raises:
        JobNotFound: no job has this id (never reported as "pending").
        StoreUnavailable: the database cannot be reached.
    """
    with runtime(settings).transaction() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        return _view(job)


def wait_for_job(
    job_id: str, *, timeout: float | None = None, poll: float = 0.05, settings: Settings | None = None
) -> JobView:
    """Block until the job is finished (or ``timeout`` seconds pass) and return its state.

    Raises:
        JobNotFound: no job has this id.
        TimeoutError: ``timeout`` passed first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = poll
    while True:
        view = get_job(job_id, settings=settings)
        if view.done:
            return view
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} is still {view.status} after {timeout:g}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def failed_jobs(*, limit: int = 100, settings: Settings | None = None) -> list[JobView]:
    """Failed jobs, most recent first, with their reasons (the dead-letter view)."""
    with runtime(settings).transaction() as session:
        rows = session.scalars(
            select(Job).where(Job.status == JobStatus.FAILED).order_by(Job.finished_at.desc()).limit(limit)
        )
        return [_view(job) for job in rows]


def job_events(job_id: str, *, settings: Settings | None = None) -> list[audit.AuditRecord]:
    """The job's audit events, oldest first.

    Raises:
        JobNotFound: no job has this id.
    """
    with runtime(settings).transaction() as session:
        if session.get(Job, job_id) is None:
            raise JobNotFound(job_id)
        return audit.events_for_job(session=session, job_id=job_id)


def _view(job: Job) -> JobView:
    return JobView(
        id=job.id,
        status=JobStatus(job.status),
        assistant_id=job.assistant_id,
        custom_id=job.custom_id,
        idempotency_key=job.idempotency_key,
        actor=job.actor,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        answer=job.answer,
        error=job.error,
        error_class=job.error_class,
        http_status=job.http_status,
        created_at=job.created_at,
        started_at=job.started_at,
        last_attempt_at=job.last_attempt_at,
        next_attempt_at=job.next_attempt_at,
        finished_at=job.finished_at,
    )
