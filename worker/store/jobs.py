"""Store: the write side of the job table. Every function takes the caller's session and never
commits, so a status change and its audit events land in one transaction.

Claims and finishes are compare-and-set updates: a second delivery of a message, or a worker
whose lease was taken over, changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, cast

from sqlalchemy import Table, Update, bindparam, func, literal_column, select, update
from sqlalchemy import false as sql_false
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ClauseElement, ColumnElement

from ..audit import events as audit
from ..audit.crypto import Keyring, aad_for
from ..errors import GatewayError, IdempotencyConflict, JobNotFound, JobStateConflict
from ..images import refs
from ..lifecycle import CLAIMABLE, Decision, JobStatus, Step, check_transition
from ..upstream.gateway import encode_request
from .models import Batch, Job

__all__ = [
    "NewJob",
    "Claim",
    "KeyRace",
    "create_job",
    "claim",
    "record_success",
    "record_failure",
    "mark_unannounced",
    "throttle",
    "release_unsent",
    "Fault",
    "record_fault",
]

_CLAIMABLE = [str(s) for s in CLAIMABLE]

#: Where a session finds the keyring for PHI columns (put there by the runtime's session factory).
KEYRING = "qbgw_keyring"


def seal_text(session: Session, column: str, job_id: str, plaintext: str | None) -> str | None:
    """Encrypt a PHI column's value, bound to its row and column (None stays None)."""
    if plaintext is None:
        return None
    keyring: Keyring = session.info[KEYRING]
    return keyring.encrypt(plaintext, aad=aad_for("jobs", column, job_id))


def open_text(session: Session, column: str, job_id: str, stored: str | None) -> str | None:
    """Decrypt a PHI column's value. Raises DecryptionFailed if it was moved or altered."""
    if stored is None:
        return None
    keyring: Keyring = session.info[KEYRING]
    return keyring.decrypt(stored, aad=aad_for("jobs", column, job_id))


class KeyRace(Exception):
    """Two producers inserted the same idempotency key at once; run the transaction again."""


@dataclass(frozen=True)
class NewJob:
    """What a producer asks for, already validated."""

    id: str
    assistant_id: str
    messages: list[dict[str, Any]]
    custom_id: str | None
    idempotency_key: str | None
    actor: str
    max_attempts: int
    batch_id: str | None = None
    #: Whom the job is about (validated, normalised), and its blind index; both or neither.
    subject: str | None = None
    subject_index: str | None = None

    @cached_property
    def payload(self) -> str:
        return json.dumps({"messages": self.messages}, separators=(",", ":"), sort_keys=True)

    @cached_property
    def stored_payload(self) -> str:
        """The payload as stored: the messages and, when they name local files, each file's fingerprint taken now
        (just after the check), by which a worker refuses a file replaced or rewritten since. The digest (the
        idempotency key's comparison, the ``job.submitted`` event) stays the messages' own."""
        files = refs.fingerprints(self.messages)
        if not files:
            return self.payload
        return json.dumps({"files": files, "messages": self.messages}, separators=(",", ":"), sort_keys=True)

    def payload_digest(self) -> str:
        return audit.digest(f"{self.assistant_id}\n{self.payload}".encode())

    @cached_property
    def request(self) -> tuple[str, int] | None:
        """The digest and size of the body every attempt will send, when it is fixed now: no image reference a
        worker resolves (a file; an https URL it may fetch), and a payload of at most REQUEST_AT_SUBMIT_BYTES.
        Made as a worker makes it, from the payload as stored. None: the claim digests the body it builds."""
        if len(self.payload) > REQUEST_AT_SUBMIT_BYTES:
            return None
        if any(refs.kind_of(url) != refs.Kind.DATA for url in refs.image_urls(self.messages)):
            return None
        try:
            body = encode_request(self.assistant_id, json.loads(self.payload)["messages"])
        except UnicodeEncodeError:  # (stored unvalidated: a worker's claim meets the same error, as a fault)
            return None
        return audit.digest(body), len(body)

    def made(self) -> NewJob:
        """This job with what storing it derives from its messages made now (its canonical payload, its request
        digest): where the caller chooses (the server: in a thread when the body is large), not in the store."""
        _ = self.payload, self.request, self.stored_payload
        return self


#: The largest payload whose request body is digested at submit: a small job's attempts then claim and audit
#: their request in one round trip on PostgreSQL (``qbgw.store.hotpath``); a larger one's as before.
REQUEST_AT_SUBMIT_BYTES = 64 * 1024


@dataclass(frozen=True)
class Claim:
    """A job a worker now holds for one attempt."""

    job_id: str
    attempt: int
    assistant_id: str
    messages: list[dict[str, Any]]
    max_attempts: int
    actor: str
    created_at: datetime
    #: The class of the error that ended the previous attempt, if any.
    previous_error: str | None
    #: The batch the job belongs to (its messages go to the batch queue), if any.
    batch_id: str | None = None
    #: The blind index of the job's subject, if it has one (its events carry it).
    subject_index: str | None = None
    #: The fingerprint of each local file the messages name, as it was at submit (none: a job stored before
    #: fingerprints were, or without local files).
    files: dict[str, list[int]] | None = None


def create_job(*, session: Session, new: NewJob, now: datetime) -> tuple[str, bool]:
    """Insert ``new`` (status queued, announced now) with its ``job.submitted`` event.

    Returns (job id, created): with an idempotency key seen before, the first job's id and False.

    Raises:
        IdempotencyConflict: the key names a job with another assistant or other messages.
        KeyRace: another transaction inserted the same key first; retry in a new transaction.
    """
    payload, payload_digest = new.payload, new.payload_digest()
    if new.idempotency_key is not None:
        existing = session.scalar(select(Job).where(Job.idempotency_key == new.idempotency_key))
        if existing is not None:
            if existing.payload_digest != payload_digest:
                raise IdempotencyConflict(
                    f"idempotency key {new.idempotency_key!r} already names job {existing.id} "
                    "with a different assistant or messages"
                )
            return existing.id, False
    session.add(Job(**new_job_values(new, payload_digest, session.info[KEYRING], now)))
    try:
        session.flush()
    except IntegrityError as exc:
        raise KeyRace(new.idempotency_key) from exc
    audit_submitted(session, new, payload, payload_digest)
    return new.id, True


def audit_submitted(session: Session, new: NewJob, payload: str, payload_digest: str) -> None:
    """The ``job.submitted`` event of a job being inserted (one job, or a batch's bulk insert)."""
    audit.add(session, submitted_event(new, payload, payload_digest))


def submitted_event(new: NewJob, payload: str, payload_digest: str) -> dict[str, Any]:
    """The ``job.submitted`` event of ``new`` (its canonical ``payload`` and that payload's digest)."""
    return audit.event(
        action=audit.Action.SUBMITTED,
        job_id=new.id,
        actor=new.actor,
        assistant_id=new.assistant_id,
        batch_id=new.batch_id,
        request=(payload_digest, len(payload)),
        detail={"assistant_id": new.assistant_id, "custom_id": new.custom_id, "messages": len(new.messages)},
        subject_index=new.subject_index,
    )


def new_job_values(new: NewJob, payload_digest: str, keyring: Keyring, now: datetime) -> dict[str, Any]:
    """The row of a new job (status queued, announced now), its payload and subject encrypted with ``keyring``,
    as :func:`create_job` inserts it (``qbgw.store.hotpath`` inserts the same)."""
    subject = None if new.subject is None else keyring.encrypt(new.subject, aad=aad_for("jobs", "subject", new.id))
    return {
        "id": new.id,
        "status": JobStatus.QUEUED.value,
        "assistant_id": new.assistant_id,
        "payload": keyring.encrypt(new.stored_payload, aad=aad_for("jobs", "payload", new.id)),
        "payload_digest": payload_digest,
        "custom_id": new.custom_id,
        "idempotency_key": new.idempotency_key,
        "actor": new.actor,
        "attempts": 0,
        "faults": 0,
        "max_attempts": new.max_attempts,
        "created_at": now,
        "updated_at": now,
        "announced_at": now,  # the producer publishes right after the commit; on failure it clears this
        "batch_id": new.batch_id,
        "subject": subject,
        "subject_index": new.subject_index,
        "request_digest": None if new.request is None else new.request[0],
        "request_bytes": None if new.request is None else new.request[1],
    }


def seal_subject(session: Session, new: NewJob) -> str | None:
    """The job's subject encrypted like its payload (bound to its row), or None."""
    return None if new.subject is None else seal_text(session, "subject", new.id, new.subject)


#: The jobs table, for Core statements built once (below).
_JOBS = cast(Table, Job.__table__)


def _claim_statement() -> Update:
    jobs = _JOBS.c
    now = bindparam("b_now", type_=jobs.updated_at.type)
    return (
        update(_JOBS)
        # The statuses inline (our own constants), not an expanding parameter: qbgw.store.hotpath compiles this
        # statement to plain SQL once.
        .where(
            jobs.id == bindparam("b_id"),
            jobs.status.in_([literal_column(f"'{s}'") for s in _CLAIMABLE]),
            jobs.next_attempt_at.is_(None) | (jobs.next_attempt_at <= now),
        )
        .values(
            status=JobStatus.RUNNING.value,
            attempts=jobs.attempts + 1,
            claimed_by=bindparam("b_worker"),
            lease_expires_at=bindparam("b_lease_until", type_=jobs.updated_at.type),
            next_attempt_at=None,
            throttle_reason=None,
            last_attempt_at=now,
            updated_at=now,
            started_at=func.coalesce(jobs.started_at, now),
        )
        .returning(
            jobs.attempts,
            jobs.assistant_id,
            jobs.payload,
            jobs.max_attempts,
            jobs.actor,
            jobs.created_at,
            jobs.error_class,
            jobs.batch_id,
            jobs.subject_index,
            jobs.request_digest,
            jobs.request_bytes,
        )
    )


#: Built once: a Core statement on the table, not the ORM entity, so an execution skips the ORM's bulk-update
#: machinery and rebuilding the statement and its cache key (a third of the claim's CPU, measured).
_CLAIM = _claim_statement()


def claim(*, session: Session, job_id: str, worker: str, lease: timedelta, now: datetime) -> Claim | None:
    """Take the job for one attempt, if it is queued, or retrying and due. None: nothing to do."""
    # One round trip: the compare-and-set claim returns what the attempt needs (RETURNING runs
    # on PostgreSQL and on SQLite >= 3.35). The error class is the previous attempt's.
    job = session.execute(
        _CLAIM, {"b_id": job_id, "b_now": now, "b_worker": worker, "b_lease_until": now + lease}
    ).first()
    if job is None:
        return None
    return claim_from_row(job_id, job, session.info[KEYRING])


def claim_from_row(job_id: str, row: Any, keyring: Keyring) -> Claim:
    """The Claim of a row :data:`_CLAIM` returned (its payload decrypted with ``keyring``)."""
    payload = keyring.decrypt(row.payload, aad=aad_for("jobs", "payload", job_id)) if row.payload else "{}"
    stored = json.loads(payload)
    return unread_claim(job_id, row, stored["messages"], stored.get("files"))


def unread_claim(
    job_id: str, row: Any, messages: list[dict[str, Any]], files: dict[str, list[int]] | None = None
) -> Claim:
    """The Claim of a row :data:`_CLAIM` returned, with ``messages`` (none: its payload could not be read)."""
    return Claim(
        job_id=job_id,
        attempt=row.attempts,
        assistant_id=row.assistant_id,
        messages=messages,
        max_attempts=row.max_attempts,
        actor=row.actor,
        created_at=row.created_at.astimezone(UTC),
        previous_error=row.error_class,
        batch_id=row.batch_id,
        subject_index=row.subject_index,
        files=files,
    )


def record_success(*, session: Session, claim: Claim, worker: str, answer: str, now: datetime) -> JobStatus | None:
    """Store the answer and finish the job. Returns the status it ended in (cancelled if a
    cancel arrived during the call: the answer is then not kept), or None if this worker no
    longer holds the job."""
    if _finish(
        session,
        claim,
        worker,
        JobStatus.SUCCEEDED,
        now,
        **success_values(seal_text(session, "answer", claim.job_id, answer), now),
    ):
        audit.add(session, succeeded_event(claim, worker))
        return JobStatus.SUCCEEDED
    return _cancel_if_requested(session, claim, worker, now)


def success_values(sealed_answer: str | None, now: datetime) -> dict[str, Any]:
    """What a success writes besides the status (``qbgw.store.hotpath`` writes the same on PostgreSQL)."""
    return {"answer": sealed_answer, "error": None, "error_class": None, "http_status": 200, "finished_at": now}


def succeeded_event(claim: Claim, worker: str) -> dict[str, Any]:
    return _event_of(audit.Action.SUCCEEDED, claim, worker, outcome="succeeded", http_status=200)


def record_failure(
    *,
    session: Session,
    claim: Claim,
    worker: str,
    error: GatewayError,
    reason: str,
    retry_at: datetime | None,
    announced: bool,
    now: datetime,
) -> JobStatus | None:
    """Fail the job with ``reason``, or (``retry_at`` given) set it retrying. Returns the status
    it ended in (cancelled if a cancel arrived during the call), or None if this worker lost it.

    ``announced`` says a broker message for the retry will be published at once; otherwise the
    sweeper publishes one when the retry is due.
    """
    status = JobStatus.RETRYING if retry_at is not None else JobStatus.FAILED
    values: dict[str, Any] = {
        "error": seal_text(session, "error", claim.job_id, reason),
        "error_class": type(error).__name__,
        "http_status": error.status,
    }
    if retry_at is not None:
        values.update(next_attempt_at=retry_at, announced_at=now if announced else None)
    else:
        values.update(finished_at=now)
    if not _finish(session, claim, worker, status, now, **values):
        return _cancel_if_requested(session, claim, worker, now, **values)
    action = audit.Action.RETRY_SCHEDULED if retry_at else audit.Action.FAILED
    detail = {"next_attempt_at": retry_at.isoformat(), "by": "broker" if announced else "sweeper"} if retry_at else None
    _event(
        session,
        action,
        claim,
        worker,
        outcome=str(status),
        http_status=error.status,
        error_class=type(error).__name__,
        detail=detail,
    )
    return status


def claimable_assistant(*, session: Session, job_id: str, now: datetime) -> str | None:
    """The job's assistant id if a claim would take the job now (queued, or retrying and due), else None."""
    return session.scalar(
        select(Job.assistant_id).where(
            Job.id == job_id, Job.status.in_(_CLAIMABLE), (Job.next_attempt_at.is_(None)) | (Job.next_attempt_at <= now)
        )
    )


def throttle(
    *,
    session: Session,
    job_id: str,
    until: datetime,
    reason: str,
    wait: float,
    reserved: bool,
    announced: bool,
    actor: str,
    now: datetime,
) -> tuple[bool, str | None]:
    """The fleet's rate limit (or a 429 cooldown) makes the job wait until ``until``: it keeps its status
    (queued or retrying; no attempt is spent) with ``next_attempt_at`` and ``throttle_reason`` set, and
    the wait is audited as ``job.throttled``. Returns (moved, the job's batch id): not moved if the job
    was not waiting to be claimed (a duplicate delivery, or it finished): nothing changed.

    ``announced`` says a broker message for ``until`` is published at once; else the sweeper sends one.
    """
    taken = session.execute(
        update(Job)
        .where(
            Job.id == job_id, Job.status.in_(_CLAIMABLE), (Job.next_attempt_at.is_(None)) | (Job.next_attempt_at <= now)
        )
        .values(next_attempt_at=until, throttle_reason=reason, announced_at=now if announced else None, updated_at=now)
        .returning(Job.attempts, Job.assistant_id, Job.batch_id, Job.subject_index)
        .execution_options(synchronize_session=False)
    ).first()
    if taken is None:
        return False, None
    audit.record(
        session=session,
        action=audit.Action.THROTTLED,
        job_id=job_id,
        actor=actor,
        outcome="throttled",
        attempt=taken.attempts + 1,
        assistant_id=taken.assistant_id,
        batch_id=taken.batch_id,
        subject_index=taken.subject_index,
        detail={
            "reason": reason,
            "wait_ms": round(wait * 1000),
            "until": until.isoformat(),
            "slot": "reserved" if reserved else "not reserved",
        },
    )
    return True, taken.batch_id


def release_unsent(
    *,
    session: Session,
    claim: Claim,
    worker: str,
    until: datetime,
    reason: str,
    wait: float,
    announced: bool,
    now: datetime,
) -> JobStatus | None:
    """The attempt was held back before sending (a cooldown began after the claim): the job waits until
    ``until`` as retrying, throttled, and gets its attempt back (``max_attempts`` + 1; the attempt number
    is not reused, so the audit trail stays unambiguous). Returns the status it is in, or None if this
    worker lost it."""
    values: dict[str, Any] = {
        "next_attempt_at": until,
        "throttle_reason": reason,
        "max_attempts": Job.max_attempts + 1,
        "announced_at": now if announced else None,
    }
    if not _finish(session, claim, worker, JobStatus.RETRYING, now, **values):
        return _cancel_if_requested(session, claim, worker, now)
    _event(
        session,
        audit.Action.ATTEMPT_UNSENT,
        claim,
        worker,
        outcome="throttled",
        detail={"reason": reason, "wait_ms": round(wait * 1000), "until": until.isoformat()},
    )
    return JobStatus.RETRYING


@dataclass(frozen=True)
class Fault:
    """An unexpected failure met by a job in the worker, as the audit trail and the job keep it: its class
    (``InternalError``, ``DecryptionFailed``), the reason a person reads (no PHI), and facts for the event."""

    error_class: str
    reason: str
    detail: dict[str, Any]


#: Decides what follows a fault: (faults in a row, the attempt it interrupted or None, max attempts,
#: the job's age in seconds) -> Decision (``lifecycle.decide_fault`` with the policy bound).
FaultRule = Callable[[int, int | None, int, float], Decision]


def record_fault(
    *,
    session: Session,
    job_id: str,
    claim: Claim | None,
    worker: str,
    fault: Fault,
    rule: FaultRule,
    announced: Callable[[float], bool],
    now: datetime,
) -> tuple[JobStatus, Decision, str | None] | None:
    """Record ``fault`` on the job: as the outcome of this worker's attempt (``claim``), or, with no claim (it
    came before one), on the waiting job. Audited as ``attempt.error`` with the fault's class; the job then
    waits a backoff (``next_attempt_at``) or fails, as ``rule`` decides. ``announced(delay)`` says whether a
    broker message for the next try is published at once (else the sweeper publishes it when due).

    Returns the job's status, the decision and its batch id, or None if the job is not where the caller left it (it
    finished, another worker holds it, or it does not exist): then nothing was written.
    """
    row = session.execute(
        select(
            Job.status,
            Job.attempts,
            Job.max_attempts,
            Job.claimed_by,
            Job.faults,
            Job.error_class,
            Job.created_at,
            Job.cancel_requested_at,
            Job.assistant_id,
            Job.batch_id,
            Job.next_attempt_at,
            Job.subject_index,
        )
        .where(Job.id == job_id)
        .with_for_update()
    ).first()
    if row is None:
        return None
    held = claim is not None and (row.status, row.attempts, row.claimed_by) == ("running", claim.attempt, worker)
    if not held and (claim is not None or row.status not in _CLAIMABLE):
        return None
    if not held and row.next_attempt_at is not None and row.next_attempt_at.astimezone(UTC) > now:
        # A message that came before the job's time (a duplicate, or one published early): its fault is the
        # same one the job already waits out, not another in a row. The job's own try, when due, counts.
        return None
    faults = row.faults + 1 if row.error_class == fault.error_class else 1
    decision = rule(
        faults, row.attempts if held else None, row.max_attempts, (now - row.created_at.astimezone(UTC)).total_seconds()
    )
    retrying = decision.step is Step.RETRY
    values: dict[str, Any] = {
        "error": seal_text(session, "error", job_id, decision.reason or fault.reason),
        "error_class": fault.error_class,
        "http_status": None,
        "faults": faults,
    }
    if retrying:
        values.update(
            next_attempt_at=now + timedelta(seconds=decision.delay),
            announced_at=now if announced(decision.delay) else None,
        )
    else:
        values.update(finished_at=now)
    attempt = row.attempts if held else row.attempts + 1
    event = audit.event(
        action=audit.Action.ATTEMPT_ERROR,
        job_id=job_id,
        actor=worker,
        attempt=attempt,
        assistant_id=row.assistant_id,
        batch_id=row.batch_id,
        outcome="fault",
        error_class=fault.error_class,
        detail={**fault.detail, "faults": faults, "claimed": held},
        subject_index=row.subject_index,
    )
    if held and claim is not None:
        status = _fault_held(session, claim, worker, now, retrying, values)
    else:
        status = _fault_waiting(session, job_id, row, now, retrying, values)
    if status is None:
        return None
    audit.add(session, event)
    follow = {JobStatus.RETRYING: audit.Action.RETRY_SCHEDULED, JobStatus.FAILED: audit.Action.FAILED}.get(status)
    if follow is not None and (held or status is JobStatus.FAILED):
        detail = {"next_attempt_at": values["next_attempt_at"].isoformat()} if retrying else None
        audit.record(
            session=session,
            action=follow,
            job_id=job_id,
            actor=worker,
            attempt=attempt,
            assistant_id=row.assistant_id,
            batch_id=row.batch_id,
            outcome=str(status),
            error_class=fault.error_class,
            detail=detail,
            subject_index=row.subject_index,
        )
    return status, decision, row.batch_id


def _fault_held(
    session: Session, claim: Claim, worker: str, now: datetime, retrying: bool, values: dict[str, Any]
) -> JobStatus | None:
    status = JobStatus.RETRYING if retrying else JobStatus.FAILED
    if _finish(session, claim, worker, status, now, **values):
        return status
    kept = {k: values[k] for k in ("error", "error_class", "http_status", "faults")}
    if _finish(
        session, claim, worker, JobStatus.CANCELLED, now, cancelled=True, next_attempt_at=None, finished_at=now, **kept
    ):
        _event(session, audit.Action.CANCELLED, claim, worker, outcome="cancelled")
        return JobStatus.CANCELLED
    return None


def _fault_waiting(
    session: Session, job_id: str, row: Any, now: datetime, retrying: bool, values: dict[str, Any]
) -> JobStatus | None:
    current = JobStatus(row.status)
    status = current if retrying else JobStatus.FAILED
    if status is not current:
        check_transition(current, status)
    taken = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == current.value, Job.attempts == row.attempts)
        .values(status=status.value, throttle_reason=None, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    return status if taken.rowcount == 1 else None  # type: ignore[attr-defined]


def waiting_jobs(*, session: Session) -> list[tuple[str, datetime | None]]:
    """(id, when it is due: None for now) of every job waiting to be claimed (queued or retrying), oldest first."""
    query = select(Job.id, Job.next_attempt_at).where(Job.status.in_(_CLAIMABLE)).order_by(Job.created_at)
    rows = session.execute(query)
    return [(str(row.id), row.next_attempt_at) for row in rows]


def batch_members(*, session: Session, job_ids: Sequence[str]) -> set[str]:
    """Those of ``job_ids`` that belong to a batch (their messages go to the batch queue)."""
    if not job_ids:
        return set()
    return set(session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.batch_id.is_not(None))))


def mark_unannounced(*, session: Session, job_ids: Sequence[str]) -> None:
    """Publishing these jobs' messages failed: let the next sweep publish them."""
    session.execute(update(Job).where(Job.id.in_(job_ids)).values(announced_at=None))


def _finish_statement(cancelled: bool) -> Update:
    jobs = _JOBS.c
    asked = jobs.cancel_requested_at.is_not(None) if cancelled else jobs.cancel_requested_at.is_(None)
    return update(_JOBS).where(
        jobs.id == bindparam("b_id"),
        jobs.status == JobStatus.RUNNING.value,
        jobs.attempts == bindparam("b_attempt"),
        jobs.claimed_by == bindparam("b_worker"),
        asked,
    )


#: Built once, like _CLAIM; the SET clause comes from the execution's parameters (column names).
_FINISH = {cancelled: _finish_statement(cancelled) for cancelled in (False, True)}


def _finish(
    session: Session,
    claim: Claim,
    worker: str,
    status: JobStatus,
    now: datetime,
    *,
    cancelled: bool = False,
    **values: Any,
) -> bool:
    """Compare-and-set the job out of this worker's attempt; ``cancelled`` says which kind of job
    to match: one nobody asked to cancel (the usual), or one somebody did."""
    where, changes = finish_parameters(claim, worker, status, now, values)
    statement = _FINISH[cancelled]
    if any(isinstance(value, ClauseElement) for value in values.values()):  # e.g. max_attempts + 1: rare
        result = session.execute(statement.values(**changes), where)
    else:
        result = session.execute(statement, {**where, **changes})
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def finish_parameters(
    claim: Claim, worker: str, status: JobStatus, now: datetime, values: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The compare-and-set of a finish: which row (this worker's attempt, still running) and the changes."""
    check_transition(JobStatus.RUNNING, status)
    where = {"b_id": claim.job_id, "b_attempt": claim.attempt, "b_worker": worker}
    return where, {"status": status.value, "claimed_by": None, "lease_expires_at": None, "updated_at": now, **values}


def _cancel_if_requested(session: Session, claim: Claim, worker: str, now: datetime, **values: Any) -> JobStatus | None:
    kept = {k: v for k, v in values.items() if k in ("error", "error_class", "http_status")}
    if not _finish(
        session, claim, worker, JobStatus.CANCELLED, now, cancelled=True, next_attempt_at=None, finished_at=now, **kept
    ):
        return None
    _event(session, audit.Action.CANCELLED, claim, worker, outcome="cancelled")
    return JobStatus.CANCELLED


def _event(session: Session, action: audit.Action, claim: Claim, worker: str, **fields: Any) -> None:
    audit.add(session, _event_of(action, claim, worker, **fields))


def _event_of(action: audit.Action, claim: Claim, worker: str, **fields: Any) -> dict[str, Any]:
    return audit.event(
        action=action,
        job_id=claim.job_id,
        actor=worker,
        attempt=claim.attempt,
        assistant_id=claim.assistant_id,
        subject_index=claim.subject_index,
        **fields,
    )


def cancel(*, session: Session, job_id: str, actor: str, now: datetime) -> JobStatus:
    """Cancel the job: at once if it waits; at the end of its attempt if one runs.

    Returns the status it is in now (``running`` means: cancelled when the attempt ends).

    Raises:
        JobNotFound: no job has this id.
        JobStateConflict: the job already succeeded or failed.
    """
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise JobNotFound(job_id)
    status = JobStatus(job.status)
    if status is JobStatus.CANCELLED:
        return status
    if status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise JobStateConflict(f"job {job_id} already {status}; only a waiting or running job can be cancelled")
    if status is JobStatus.RUNNING:
        job.cancel_requested_at = job.updated_at = now
        audit.record(
            session=session,
            action=audit.Action.CANCEL_REQUESTED,
            job_id=job_id,
            actor=actor,
            attempt=job.attempts,
            batch_id=job.batch_id,
        )
        return status
    check_transition(status, JobStatus.CANCELLED)
    job.status, job.finished_at, job.next_attempt_at, job.updated_at = JobStatus.CANCELLED, now, None, now
    job.cancel_requested_at = now
    audit.record(
        session=session,
        action=audit.Action.CANCELLED,
        job_id=job_id,
        actor=actor,
        outcome="cancelled",
        batch_id=job.batch_id,
    )
    return JobStatus.CANCELLED


def replay(*, session: Session, job_id: str, actor: str, extra_attempts: int, now: datetime) -> int:
    """Queue a failed job again (a new attempt on the same job); returns its next attempt number.

    Raises:
        JobNotFound: no job has this id.
        JobStateConflict: the job has not failed.
    """
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise JobNotFound(job_id)
    if job.status != JobStatus.FAILED:
        raise JobStateConflict(f"job {job_id} is {job.status}; only a failed job can be replayed")
    check_transition(JobStatus.FAILED, JobStatus.QUEUED)
    audit.record(
        session=session,
        action=audit.Action.REPLAYED,
        job_id=job_id,
        actor=actor,
        attempt=job.attempts,
        detail={"previous_error_class": job.error_class, "previous_http_status": job.http_status},
    )
    job.status, job.max_attempts = JobStatus.QUEUED, job.attempts + extra_attempts
    job.finished_at = job.next_attempt_at = None
    job.announced_at = job.updated_at = now
    if job.batch_id is not None:  # its batch has a job pending again: in progress now, not when next read
        session.execute(
            update(Batch)
            .where(Batch.id == job.batch_id, Batch.status == "completed")
            .values(status="in_progress", completed_at=None, updated_at=now)
        )
    return job.attempts + 1


def recover_interrupted(*, session: Session, now: datetime, limit: int = 500) -> list[str]:
    """Take back running jobs whose lease ran out (their worker died mid-call): each attempt is
    audited as interrupted and the job is set retrying now (failed if its attempts are spent,
    cancelled if a cancel was asked for). Returns the ids set retrying."""
    rows = session.execute(
        select(Job.id, Job.attempts, Job.max_attempts, Job.claimed_by, Job.cancel_requested_at)
        .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at <= now)
        .limit(limit)
    ).all()
    retrying = []
    for row in rows:
        status = _interrupted_status(row.attempts, row.max_attempts, row.cancel_requested_at)
        values: dict[str, Any] = {"next_attempt_at": now, "announced_at": None}
        if status is not JobStatus.RETRYING:
            values = {"finished_at": now}
        reason = f"attempt {row.attempts} interrupted: its worker {row.claimed_by} stopped before recording an outcome"
        taken = session.execute(
            update(Job)
            .where(
                Job.id == row.id,
                Job.status == JobStatus.RUNNING,
                Job.attempts == row.attempts,
                Job.lease_expires_at <= now,
            )
            .values(
                status=status,
                claimed_by=None,
                lease_expires_at=None,
                updated_at=now,
                error=seal_text(session, "error", row.id, reason),
                error_class="Interrupted",
                http_status=None,
                **values,
            )
            .execution_options(synchronize_session=False)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            continue
        audit.record(
            session=session,
            action=audit.Action.ATTEMPT_INTERRUPTED,
            job_id=row.id,
            actor="sweeper",
            attempt=row.attempts,
            outcome="interrupted",
            detail={"worker": row.claimed_by},
        )
        follow = {JobStatus.RETRYING: audit.Action.RETRY_SCHEDULED, JobStatus.FAILED: audit.Action.FAILED}
        audit.record(
            session=session,
            action=follow.get(status, audit.Action.CANCELLED),
            job_id=row.id,
            actor="sweeper",
            attempt=row.attempts,
            outcome=str(status),
        )
        if status is JobStatus.RETRYING:
            retrying.append(row.id)
    return retrying


def _interrupted_status(attempts: int, max_attempts: int, cancel_requested_at: datetime | None) -> JobStatus:
    if cancel_requested_at is not None:
        return JobStatus.CANCELLED
    return JobStatus.RETRYING if attempts < max_attempts else JobStatus.FAILED


def due_for_dispatch(
    *, session: Session, now: datetime, grace: timedelta, broker_backlog: int | None = None, limit: int = 1000
) -> list[str]:
    """Jobs that need a broker message now, marked as announced (and audited as redispatched):
    retries kept in the database that are due, and jobs whose message looks lost (queued, or a
    retry overdue, for longer than ``grace``).

    ``broker_backlog`` is how many messages wait in the broker: while it covers every queued job
    that looks lost, they are only slow (a backlog), not lost, and are left alone.
    """
    unannounced = Job.announced_at.is_(None)
    lost = Job.announced_at <= now - grace
    # A queued job may wait for a time of its own: the fleet's rate limit made it (next_attempt_at).
    queued_due = (Job.status == JobStatus.QUEUED) & (Job.next_attempt_at.is_(None) | (Job.next_attempt_at <= now))
    queued_lost: ColumnElement[bool] = (
        (Job.status == JobStatus.QUEUED) & lost & (Job.next_attempt_at.is_(None) | (Job.next_attempt_at <= now - grace))
    )
    if broker_backlog is not None:
        stale = session.scalar(select(func.count()).select_from(Job).where(queued_lost)) or 0
        if broker_backlog >= stale:
            queued_lost = sql_false()
    rows = session.scalars(
        select(Job.id)
        .where(
            (queued_due & unannounced)
            | queued_lost
            | ((Job.status == JobStatus.RETRYING) & (Job.next_attempt_at <= now) & unannounced)
            | ((Job.status == JobStatus.RETRYING) & (Job.next_attempt_at <= now - grace) & lost)
        )
        .order_by(Job.created_at)
        .limit(limit)
    )
    ids = list(rows)
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(announced_at=now))
        for job_id in ids:
            audit.record(session=session, action=audit.Action.REDISPATCHED, job_id=job_id, actor="sweeper")
    return ids
