"""Batch export: a batch's results as JSON Lines or CSV, one line per job keyed by custom_id, or its
failed jobs as input lines to submit again. Reading answers and messages is PHI: every job read
is a ``result.read`` event, and the export itself one ``batch.exported`` event, in one transaction.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from sqlalchemy.orm import Session

from ..audit import events as audit
from ..lifecycle import JobStatus
from ..store import batches as batch_store
from ..store.batches import BatchStatus
from ..store.jobs import open_text
from ..store.models import Job

__all__ = ["BatchResult", "results", "write_jsonl", "write_csv", "write_inputs", "CSV_COLUMNS", "NOT_ANSWERED"]

#: The statuses ``failed_only`` selects: every job that ended without an answer.
NOT_ANSWERED = (JobStatus.FAILED, JobStatus.CANCELLED)
CSV_COLUMNS = (
    "custom_id",
    "job_id",
    "status",
    "answer",
    "error_class",
    "http_status",
    "error",
    "attempts",
    "created_at",
    "finished_at",
    "seconds",
)


@dataclass(frozen=True)
class BatchResult:
    """One job of a batch: its answer or its error, attempts and timings. ``messages`` is read
    only for ``failed_only`` exports (None once purged)."""

    custom_id: str
    job_id: str
    status: JobStatus
    assistant_id: str
    answer: str | None
    error: str | None
    error_class: str | None
    http_status: int | None
    attempts: int
    created_at: datetime
    finished_at: datetime | None
    messages: list[dict[str, Any]] | None = None
    #: Whom the job is about, read with ``messages`` (PHI: for the line that submits it again), else None.
    subject: str | None = None
    #: Its PHI (messages, answer, error text) was erased by ``qbgw purge``.
    purged: bool = False

    @property
    def seconds(self) -> float | None:
        """Submission to finish, in seconds (None while it runs)."""
        return None if self.finished_at is None else round((self.finished_at - self.created_at).total_seconds(), 3)

    def as_dict(self) -> dict[str, Any]:
        error = None
        if self.error is not None or self.error_class is not None:
            error = {"class": self.error_class, "message": self.error, "http_status": self.http_status}
        return {
            "custom_id": self.custom_id,
            "job_id": self.job_id,
            "status": str(self.status),
            "answer": self.answer,
            "error": error,
            "attempts": self.attempts,
            "created_at": self.created_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "seconds": self.seconds,
        }

    def as_row(self) -> dict[str, Any]:
        data = self.as_dict()
        data.update(error_class=self.error_class, http_status=self.http_status, error=self.error)
        return {column: data[column] for column in CSV_COLUMNS}

    def as_input(self) -> dict[str, Any] | None:
        """The line that submits this job again (None if its messages were purged)."""
        if self.messages is None:
            return None
        line = {"custom_id": self.custom_id, "smart_chat_assistant_id": self.assistant_id, "messages": self.messages}
        return line if self.subject is None else {**line, "subject": self.subject}


def results(
    session: Session,
    batch_id: str,
    *,
    failed_only: bool,
    reader: str,
    statuses: Collection[JobStatus] | None = None,
) -> list[BatchResult]:
    """Every job of the batch sorted by custom_id, finished or not (partial results of a running,
    cancelled or expired batch included); with ``failed_only``, the failed and cancelled jobs
    with their messages; with ``statuses``, only the jobs in those (without their messages). The
    read is audited in ``session``: one ``result.read`` per job read, one ``batch.exported``.

    Raises:
        BatchNotFound: no batch has this id.
        DecryptionFailed: a stored value was moved or altered, or its key is gone.
    """
    expired = batch_store.get(session=session, batch_id=batch_id).status == BatchStatus.EXPIRED
    if failed_only:
        statuses = NOT_ANSWERED
    chosen = None if statuses is None else list(statuses)
    found = [
        _result(session, job, failed_only, expired)
        for job in batch_store.jobs_of(session=session, batch_id=batch_id, statuses=chosen)
    ]
    for result in found:
        if result.answer is not None or result.error is not None or result.messages is not None:
            audit.record(
                session=session,
                action=audit.Action.RESULT_READ,
                job_id=result.job_id,
                actor=reader,
                batch_id=batch_id,
                assistant_id=result.assistant_id,
                outcome=str(result.status),
                detail={"via": "batch export"},
            )
    audit.record(
        session=session,
        action=audit.Action.BATCH_EXPORTED,
        job_id=None,
        batch_id=batch_id,
        actor=reader,
        detail={"jobs": len(found), "failed_only": failed_only}
        | ({} if statuses is None or failed_only else {"statuses": sorted(str(status) for status in statuses)}),
    )
    return found


def _result(session: Session, job: Job, with_messages: bool, expired: bool) -> BatchResult:
    status = JobStatus(job.status)
    error, error_class = open_text(session, "error", job.id, job.error), job.error_class
    if status is JobStatus.CANCELLED and error_class is None:
        error_class = "Expired" if expired else "Cancelled"
        error = error or ("the batch's completion window ended" if expired else "cancelled")
    messages = subject = None
    if with_messages:
        payload = open_text(session, "payload", job.id, job.payload)
        messages = json.loads(payload)["messages"] if payload is not None else None
        subject = open_text(session, "subject", job.id, job.subject)  # so its resubmission stays in its reports
    return BatchResult(
        custom_id=job.custom_id or job.id,
        job_id=job.id,
        status=status,
        assistant_id=job.assistant_id,
        answer=open_text(session, "answer", job.id, job.answer),
        error=error,
        error_class=error_class,
        http_status=job.http_status,
        attempts=job.attempts,
        created_at=job.created_at,
        finished_at=job.finished_at,
        messages=messages,
        subject=subject,
        purged=job.purged_at is not None,
    )


def write_jsonl(results: list[BatchResult], out: IO[str]) -> int:
    """One JSON object per job; returns how many lines were written."""
    for result in results:
        out.write(json.dumps(result.as_dict(), ensure_ascii=False) + "\n")
    return len(results)


def spreadsheet_cell(value: object) -> object:
    """A CSV cell a spreadsheet will not run: text starting with = + - @ (or a tab or carriage return) is quoted
    with a leading ', as OWASP's advice on CSV injection says; other values as they are."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_csv(results: list[BatchResult], out: IO[str]) -> int:
    """A header and one row per job (text cells made safe for a spreadsheet); returns how many rows were written."""
    writer = csv.DictWriter(out, fieldnames=list(CSV_COLUMNS))
    writer.writeheader()
    for result in results:
        writer.writerow({k: spreadsheet_cell(v) for k, v in result.as_row().items()})
    return len(results)


def write_inputs(results: list[BatchResult], out: IO[str]) -> int:
    """Input lines (``qbgw batch submit`` accepts them) for jobs whose messages are still stored;
    returns how many were written."""
    written = 0
    for result in results:
        line = result.as_input()
        if line is not None:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            written += 1
    return written
