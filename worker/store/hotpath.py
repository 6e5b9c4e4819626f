"""Hot path: the two transactions of every attempt, on PostgreSQL, straight on the psycopg connection.

Every attempt runs two transactions: the claim with its ``attempt.request`` event (committed before the
call, so a crash mid-call leaves a trace), and the outcome with its events. Through the ORM on PostgreSQL
they cost six round trips (psycopg sends a BEGIN of its own before a transaction's first statement) and
about a third of a worker's Python CPU (the Session's machinery: py-spy). Here, on a pooled connection
switched to autocommit for the duration:

* the claim of a job whose request digest was stored at submit is one statement: the compare-and-set UPDATE
  in a CTE and the seal of its request event, made by the database from the row (below). Any other claim
  is one simple-protocol query, ``BEGIN; UPDATE ... RETURNING ...``, and the request event is sealed with
  the COMMIT (``SELECT ... qbgw_audit_seal(...); COMMIT``): two round trips;
* a success is one statement, atomic as every statement is: the compare-and-set UPDATE in a CTE, and
  ``qbgw_audit_seal`` of the ``attempt.response`` and ``job.succeeded`` events if, and only if, it matched
  a row. One round trip. When it matched nothing (a cancel arrived, the lease was taken over) it wrote
  nothing, and the caller records the outcome through ``qbgw.store.jobs`` as on any other database.

The statements are ``qbgw.store.jobs``'s own Core statements compiled for PostgreSQL once, and the events
and values come from the same functions, so the two paths write the same rows. Failures, retries and
everything else go through ``qbgw.store.jobs`` in a Session, as on SQLite.

The reads a waiting producer makes go here too: a job's status (one query), and the job with its answer (one
statement that, when the job holds PHI, also seals its ``result.read`` event: the read is on the record before
the answer leaves the database). Through a Session they cost 0.7 and 1.75 ms; here 0.15 and 0.5
(``bench.api``'s latency part reads both once per job).

Two events are made by the database in the statement that claims or reads (:meth:`HotPath.claim_requested`,
:meth:`HotPath.read_job`): this process makes the event's canonical JSON with holes for what only the row
knows, PostgreSQL fills them with ``to_json`` of the row's values and hashes it with the content hash's tag;
the process then checks that hash against its own (``_check``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, cast

import psycopg
from psycopg import sql
from psycopg.rows import namedtuple_row
from sqlalchemy import Engine, bindparam, insert, select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from ..audit.anchors import after_seal
from ..audit.crypto import Keyring, aad_for
from ..audit.events import CONTENT_TAG, Action, Sealed, canonical_content, content_hash, event
from ..errors import JobNotFound
from ..lifecycle import TERMINAL, JobStatus
from ..settings import Settings
from . import jobs as store
from .chain import COMMIT_SEALS, COMMIT_STAGES, SEAL_AND_COMMIT_SQL, STAGE_AND_COMMIT_SQL, seal_argument
from .db import READ_ONLY, unavailable
from .reads import Admit, Expect, JobView, read_event, result_read_event, view_of

__all__ = ["HotPath", "Unsendable", "hot_path_for", "request_event"]

log = logging.getLogger(__name__)

#: Events for the claim's transaction, made from the claim (none: commit the claim alone).
RequestEvents = Callable[[store.Claim], list[dict[str, Any]]]


def _compile(statement: ClauseElement, dialect: Dialect) -> tuple[str, dict[str, Any]]:
    """``statement`` as psycopg SQL (``%(name)s`` placeholders) and the values of its constant parameters."""
    compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
    sql = compiled.string
    constants = {
        name: bind.value for name, bind in compiled.binds.items() if not bind.required and f"%({name})s" in sql
    }
    return sql, constants


#: The success's changes, one parameter each (``store.finish_parameters`` and ``store.success_values``).
_SUCCESS_KEYS = (
    "status",
    "claimed_by",
    "lease_expires_at",
    "updated_at",
    "answer",
    "error",
    "error_class",
    "http_status",
    "finished_at",
)


#: What a view of the job does not need (the messages, up to QBGW_MAX_REQUEST_BYTES, and the sealed subject).
_NOT_VIEWED = frozenset({"payload", "subject"})


class Unsendable(Exception):
    """A claim committed with its request event, after which its request could not be made (``error``: the
    payload no longer decrypts, say): the attempt is ``claim``'s and ``error`` its fault; nothing was sent."""

    def __init__(self, claim: store.Claim, error: Exception) -> None:
        super().__init__(f"job {claim.job_id} attempt {claim.attempt}: its request cannot be made")
        self.claim, self.error = claim, error


class HotPath:
    """The claim and the success of an attempt on PostgreSQL (see the module's text). Thread-safe: each call
    checks a connection out of ``engine``'s pool."""

    def __init__(self, engine: Engine, keyring: Keyring, settings: Settings) -> None:
        self.engine, self.keyring, self.settings = engine, keyring, settings
        # Block sealing stages the events instead (the same argument and result columns, all NULL).
        block = getattr(engine.dialect, COMMIT_STAGES, False)
        self._seal_function = "qbgw_audit_stage" if block else "qbgw_audit_seal"
        self._seal_and_commit = STAGE_AND_COMMIT_SQL if block else SEAL_AND_COMMIT_SQL
        jobs = store._JOBS
        self._status_sql, _ = _compile(select(jobs.c.status).where(jobs.c.id == bindparam("b_id")), engine.dialect)
        viewed = [c for c in jobs.c if c.name not in _NOT_VIEWED]
        self._job_sql, _ = _compile(select(*viewed).where(jobs.c.id == bindparam("b_id")), engine.dialect)
        self._seal_sql = f"SELECT first_seq, last_seq, last_hash FROM {self._seal_function}(%(b_events)s::jsonb)"  # noqa: S608
        #: The two INSERTs of new jobs, made at the first one from the keys of ``store.new_job_values``.
        self._new_job_sql: tuple[tuple[str, ...], str, str] | None = None
        claim_sql, self._claim_constants = _compile(store._CLAIM, engine.dialect)
        self._claim_sql = "BEGIN; " + claim_sql
        digested = store._CLAIM.where(  # a job with its body digested and its messages still there (not purged)
            jobs.c.request_digest.is_not(None), jobs.c.request_bytes.is_not(None), jobs.c.payload.is_not(None)
        )
        self._claim_requested_sql = _claim_requested_sql(_compile(digested, engine.dialect)[0], self._seal_function)
        self._read_sql = _read_sql(self._job_sql, self._seal_function)
        #: Whether a claim's request event and a read's ``result.read`` event are made by the database in the
        #: statement that claims or reads (off after a content hash it made was not this process's: ``_check``).
        self.events_in_statements = True
        update = store._FINISH[False].values({key: bindparam(f"v_{key}") for key in _SUCCESS_KEYS})
        update_sql, self._succeed_constants = _compile(update, engine.dialect)
        # The UPDATE runs to completion whether or not the SELECT reads it (a data-modifying CTE), and the
        # seal's argument reads its RETURNING rows first: the events are sealed only if the row matched.
        self._succeed_sql = (  # our own compiled statement, no input in it: the values travel as parameters
            f"WITH u AS ({update_sql} RETURNING 1) "  # noqa: S608
            "SELECT (SELECT count(*) FROM u) AS matched, s.first_seq, s.last_seq, s.last_hash "
            f"FROM {self._seal_function}(CASE WHEN (SELECT count(*) FROM u) = 1 THEN %(b_events)s::jsonb "
            "ELSE '[]'::jsonb END) AS s"
        )

    def create_job(self, new: store.NewJob, now: datetime) -> str:
        """Insert ``new`` with its ``job.submitted`` event, in one statement (as ``store.create_job`` without an
        idempotency key: the caller sends a job with a key through ``store.create_job``)."""
        payload, digest = new.payload, new.payload_digest()
        values = store.new_job_values(new, digest, self.keyring, now)
        create_sql, _ = self._new_job_statements(tuple(values))
        params = {f"v_{key}": value for key, value in values.items()}
        params["b_events"] = seal_argument([store.submitted_event(new, payload, digest)])
        with self._connection() as connection, connection.cursor(row_factory=namedtuple_row) as cur:
            cur.execute(create_sql, params)  # one statement in autocommit: one round trip
            sealed = cur.fetchone()
        audit_sealed(self.settings, sealed)
        return new.id

    def create_jobs(self, news: list[store.NewJob], now: datetime) -> None:
        """Insert ``news`` with their ``job.submitted`` events, in one statement (as :meth:`create_job` for
        each, in one transaction: all or none)."""
        rows, events = [], []
        for new in news:
            payload, digest = new.payload, new.payload_digest()
            values = store.new_job_values(new, digest, self.keyring, now)
            rows.append({key: v.isoformat() if isinstance(v, datetime) else v for key, v in values.items()})
            events.append(store.submitted_event(new, payload, digest))
        _, create_many_sql = self._new_job_statements(tuple(rows[0]))
        params = {"b_rows": json.dumps(rows, separators=(",", ":")), "b_events": seal_argument(events)}
        with self._connection() as connection, connection.cursor(row_factory=namedtuple_row) as cur:
            cur.execute(create_many_sql, params)  # one statement in autocommit: one round trip
            sealed = cur.fetchone()
        audit_sealed(self.settings, sealed)

    def _new_job_statements(self, keys: tuple[str, ...]) -> tuple[str, str]:
        """The INSERT of one new job (its values as parameters) and of many (their rows as one JSON parameter),
        each with the seal of their events, for the columns ``keys``: compiled once."""
        made = self._new_job_sql
        if made is None or made[0] != keys:
            jobs = store._JOBS
            insert_sql, _ = _compile(
                insert(jobs).values({key: bindparam(f"v_{key}") for key in keys}), self.engine.dialect
            )
            columns = ", ".join(keys)
            typed = ", ".join(f"{key} {jobs.c[key].type.compile(dialect=self.engine.dialect)}" for key in keys)
            made = self._new_job_sql = (
                keys,
                # The INSERT runs whether or not the SELECT reads it (a data-modifying CTE); if it fails, nothing
                # is sealed.
                f"WITH i AS ({insert_sql}) {self._seal_sql}",
                # Our own column names and types: the rows travel as one parameter.
                f"WITH i AS (INSERT INTO jobs ({columns}) SELECT {columns} "  # noqa: S608
                f"FROM jsonb_to_recordset(%(b_rows)s::jsonb) AS r({typed})) {self._seal_sql}",
            )
        return made[1], made[2]

    def status_of(self, job_id: str) -> JobStatus:
        """Only the job's status (as ``reads.status_of``). Raises JobNotFound."""
        with self._connection() as connection, connection.cursor() as cur:
            cur.execute(self._status_sql, {"b_id": job_id})
            row = cur.fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return JobStatus(row[0])

    def job_metadata(self, job_id: str) -> tuple[JobView, str | None]:
        """The job without its PHI, and its batch id (as ``reads.job_metadata``). Raises JobNotFound."""
        with self._connection() as connection, connection.cursor(row_factory=namedtuple_row) as cur:
            cur.execute(self._job_sql, {"b_id": job_id})
            job: Any = cur.fetchone()
        if job is None:
            raise JobNotFound(job_id)
        return view_of(job, None), job.batch_id

    def read_job(self, job_id: str, reader: str, admit: Admit | None = None, expect: Expect | None = None) -> JobView:
        """The job with its answer or error (as ``reads.read_job``, ``admit`` too): when it holds either, the
        ``result.read`` event by ``reader`` is sealed (committed) before the view is returned. Without ``admit``,
        or with the ``expect`` that states what it lets through, in one statement that seals the event the
        database makes from the row (:func:`_read_sql`), then decrypts: a value that no longer decrypts has its
        read on the record too. Raises JobNotFound, DecryptionFailed, and what ``admit`` raises."""
        expect = expect if admit is not None else None  # (what an admit lets through: nothing to check without one)
        at_once = (admit is None or expect is not None) and self.events_in_statements
        holes = _read_template(job_id, reader) if at_once else None
        if holes is not None:
            view = self._read_at_once(job_id, reader, holes, admit, expect)
            if view is not None:
                return view
        with self._connection() as connection:
            with connection.cursor(row_factory=namedtuple_row) as cur:
                cur.execute(self._job_sql, {"b_id": job_id})
                job: Any = cur.fetchone()
            if job is None:
                raise JobNotFound(job_id)
            if admit is not None:
                admit(view_of(job, None))
            view = view_of(job, self.keyring)
            event = read_event(view, job, reader)
            if event is None:
                return view
            with connection.cursor(row_factory=namedtuple_row) as cur:  # one statement in autocommit: committed
                cur.execute(self._seal_sql, {"b_events": seal_argument([event])})
                sealed = cur.fetchone()
        audit_sealed(self.settings, sealed)
        return view

    def _read_at_once(
        self, job_id: str, reader: str, holes: dict[str, Any], admit: Admit | None, expect: Expect | None
    ) -> JobView | None:
        """:meth:`read_job` in one statement. A job that does not meet ``expect`` is neither sealed nor read out:
        ``admit`` sees it and raises its error; None if it lets it through after all (read it the long way)."""
        params = {
            **holes,
            "b_id": job_id,
            "e_actor": reader,
            "x_owner": expect.owner if expect is not None else None,
            "x_ended": [str(status) for status in TERMINAL] if expect is not None and expect.ended else None,
        }
        with self._connection() as connection, connection.cursor(row_factory=namedtuple_row) as cur:
            cur.execute(self._read_sql, params)
            job: Any = cur.fetchone()
        if job is None:
            raise JobNotFound(job_id)
        if not job.admitted:
            if admit is not None:
                admit(view_of(job, None))
            return None
        if job.content is None:
            return view_of(job, self.keyring)
        audit_sealed(self.settings, job)
        expected = content_hash(result_read_event(job_id, reader, job.assistant_id, str(job.status), job.subject_index))
        self._check(job_id, "result.read", job.content, expected)
        return view_of(job, self.keyring)

    def _check(self, job_id: str, action: str, made: str, expected: str) -> None:
        """The content hash the database made for an event against this process's own for it."""
        if made == expected:
            return
        self.events_in_statements = False  # never seen: a database whose JSON differs; the chain's verify will say
        log.error(
            "job %s: the %s event sealed by the database has content hash %s where this process makes %s; "
            "this process makes its events itself from now on",
            job_id,
            action,
            made,
            expected,
            extra={"job_id": job_id},
        )

    def claim(
        self, *, job_id: str, worker: str, lease_until: datetime, now: datetime, events: RequestEvents
    ) -> store.Claim | None:
        """Take the job for one attempt (as ``store.claim``) and commit it with ``events(claim)``. None: nothing
        to do (a duplicate delivery, not due, or finished). If ``events`` raises, nothing is changed."""
        params = {
            **self._claim_constants,
            "b_id": job_id,
            "b_worker": worker,
            "b_lease_until": lease_until,
            "b_now": now,
        }
        with self._connection() as connection, psycopg.ClientCursor(connection, row_factory=namedtuple_row) as cur:
            cur.execute(self._claim_sql, params)  # BEGIN, then the compare-and-set: one round trip
            cur.nextset()
            row = cur.fetchone()
            if row is None:
                cur.execute("ROLLBACK")
                return None
            claim = store.claim_from_row(job_id, row, self.keyring)
            pending = events(claim)
            if not pending:
                cur.execute("COMMIT")
                return claim
            cur.execute(self._seal_and_commit.format(sql.Literal(seal_argument(pending))))
            sealed = cur.fetchone()
        audit_sealed(self.settings, sealed)
        return claim

    def claim_requested(
        self, *, job_id: str, worker: str, lease_until: datetime, now: datetime, token_fp: str
    ) -> tuple[store.Claim, tuple[str, int]] | None:
        """Take the job for one attempt (as ``store.claim``) if it has a request digest stored at submit
        (``jobs.request_digest``), and in the same statement seal its ``attempt.request`` event, made by the
        database from the row: one round trip. Returns the claim and the (digest, size) its event records. None:
        nothing was written (the job is not claimable, or has no digest: images to resolve, a large payload, a
        job older than the column); :meth:`claim` then takes it, if it is claimable.

        The event is the one ``qbgw.execution.tasks`` makes, by ``worker`` with ``token_fp``: its canonical JSON
        is made here with holes for what only the row knows, filled by the database; the content hash the
        database computed is checked against this process's own for the same event.

        Raises Unsendable when the payload of the job it claimed cannot be read (it no longer decrypts): the
        claim and its request event are committed, nothing can be sent."""
        holes = _request_template(job_id, worker, token_fp)
        if holes is None:  # a value that could be mistaken for a hole: not through the template
            return None
        params = {
            **self._claim_constants,
            **holes,
            "b_id": job_id,
            "b_worker": worker,
            "b_lease_until": lease_until,
            "b_now": now,
            "e_token_fp": token_fp,
        }
        with self._connection() as connection, connection.cursor(row_factory=namedtuple_row) as cur:
            cur.execute(self._claim_requested_sql, params)  # one statement in autocommit: one round trip
            row: Any = cur.fetchone()
        if row is None:
            return None
        request = (str(row.request_digest), int(row.request_bytes))
        try:
            audit_sealed(self.settings, row)
            claim = store.claim_from_row(job_id, row, self.keyring)
        except Exception as exc:  # (DecryptionFailed): the attempt is claimed and can only end in a fault
            raise Unsendable(store.unread_claim(job_id, row, []), exc) from exc
        self._check(
            job_id, "attempt.request", row.content, content_hash(request_event(claim, worker, token_fp, request))
        )
        return claim, request

    def seal(self, events: list[dict[str, Any]]) -> None:
        """Seal ``events`` in a transaction of their own (one statement: one round trip)."""
        with self._connection() as connection, connection.cursor(row_factory=namedtuple_row) as cur:
            cur.execute(self._seal_sql, {"b_events": seal_argument(events)})
            sealed = cur.fetchone()
        audit_sealed(self.settings, sealed)

    def succeed(
        self, *, claim: store.Claim, worker: str, answer: str, response_event: dict[str, Any], now: datetime
    ) -> JobStatus | None:
        """Store the answer and finish the job with its events (as ``store.record_success``), if this worker
        still holds it and nobody asked to cancel it. None: nothing was written; record the outcome through
        ``qbgw.store.jobs``, which tells a cancel from a lost lease."""
        sealed_answer = self.keyring.encrypt(answer, aad=aad_for("jobs", "answer", claim.job_id))
        where, changes = store.finish_parameters(
            claim, worker, JobStatus.SUCCEEDED, now, store.success_values(sealed_answer, now)
        )
        events = [response_event, store.succeeded_event(claim, worker)]
        params = {
            **self._succeed_constants,
            **where,
            **{f"v_{key}": changes[key] for key in _SUCCESS_KEYS},
            "b_events": seal_argument(events),
        }
        with self._connection() as connection, connection.cursor(row_factory=namedtuple_row) as cur:
            cur.execute(self._succeed_sql, params)  # one statement in autocommit: one round trip
            row: Any = cur.fetchone()
        if row is None or row.matched != 1:
            return None
        audit_sealed(self.settings, row)
        return JobStatus.SUCCEEDED

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in autocommit mode (the statements say where transactions begin and end),
        given back idle and out of autocommit. Raises StoreUnavailable when the database cannot be reached
        or the connection broke; after any other error the transaction is rolled back."""
        try:
            pooled = self.engine.raw_connection()
        except (SQLAlchemyError, psycopg.OperationalError) as exc:  # the pool hands on the driver's own error
            raise unavailable(exc) from exc
        connection: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
        try:
            connection.autocommit = True
            yield connection
        except psycopg.OperationalError as exc:  # the connection broke, or the server is going away
            pooled.invalidate(exc)  # (and gives it back)
            raise unavailable(exc) from exc
        except psycopg.Error as exc:
            if exc.sqlstate != READ_ONLY:
                _give_back(pooled, connection)
                raise
            pooled.invalidate(exc)  # a server that takes no writes: as lost (``db._read_only_is_away``)
            raise unavailable(exc) from exc
        except BaseException:
            _give_back(pooled, connection)
            raise
        _give_back(pooled, connection)


#: The values of a request event only the claimed row knows, as holes in its canonical JSON: a string no
#: other value of the event holds (a control character, which JSON escapes), replaced by the database.
_HOLES = {
    name: "\x01" + mark
    for name, mark in (
        ("assistant", "A"),
        ("attempt", "N"),
        ("digest", "D"),
        ("bytes", "B"),
        ("outcome", "O"),
        ("subject", "S"),
    )
}


def request_event(claim: store.Claim, worker: str, token_fp: str, request: tuple[Any, Any]) -> dict[str, Any]:
    """The ``attempt.request`` event of ``claim``'s attempt by ``worker``, sending the body ``request`` (its
    digest and size); ``qbgw.execution.tasks`` records the same."""
    return event(
        action=Action.ATTEMPT_REQUEST,
        job_id=claim.job_id,
        actor=worker,
        attempt=claim.attempt,
        request=request,
        assistant_id=claim.assistant_id,
        subject_index=claim.subject_index,
        token_fp=token_fp,
    )


def _holed(
    build: Callable[[str | None], dict[str, Any]], fills: dict[str, str], action: str, known: tuple[str, ...]
) -> dict[str, Any] | None:
    """Parameters for a statement made by :func:`_sealing_ctes` that seals the event ``build(subject hole or
    None)`` makes, with holes (``fills``' names, of _HOLES) for what only the row knows: its canonical JSON
    without and with a subject (``e_plain``, ``e_subject``), each hole as it is spelled there (``h_*``), the
    hash's tag and the action. None if a ``known`` value holds a hole's marker (it would be filled too)."""
    if any("\x01" in value for value in known):
        return None
    spelled = {name: json.dumps(_HOLES[name]) for name in (*fills, "subject")}
    plain, subject = (canonical_content(build(s)) for s in (None, _HOLES["subject"]))
    for name, hole in spelled.items():
        if subject.count(hole) != 1 or plain.count(hole) != (name != "subject"):
            return None
    return {
        "e_tag": CONTENT_TAG,
        "e_plain": plain,
        "e_subject": subject,
        "e_action": action,
        **{f"h_{name}": hole for name, hole in spelled.items()},
    }


#: What fills each hole of the request event, from the claimed row ``c``: JSON as Python's ``json.dumps(...,
#: ensure_ascii=False)`` spells it (``to_json`` escapes the same characters; integers are their digits).
_REQUEST_FILLS = {
    "assistant": "to_json(c.assistant_id)::text",
    "attempt": "c.attempts::text",
    "digest": "to_json(c.request_digest)::text",
    "bytes": "c.request_bytes::text",
}
#: The same for the ``result.read`` event, from the read row ``j``.
_READ_FILLS = {"assistant": "to_json(j.assistant_id)::text", "outcome": "to_json(j.status)::text"}


def _request_template(job_id: str, worker: str, token_fp: str) -> dict[str, Any] | None:
    """:func:`_holed` for the request event of a claim of ``job_id`` by ``worker``."""
    return _for_job(_request_base(worker, token_fp), job_id)


@functools.lru_cache(maxsize=64)
def _request_base(worker: str, token_fp: str) -> dict[str, Any] | None:
    """:func:`_request_template` for any job (its id :data:`_JOB_MARK`): made once per worker and token."""

    def build(subject: str | None) -> dict[str, Any]:
        holed = store.Claim(
            job_id=_JOB_MARK,
            attempt=cast(int, _HOLES["attempt"]),
            assistant_id=_HOLES["assistant"],
            messages=[],
            max_attempts=0,
            actor="",
            created_at=datetime.min,
            previous_error=None,
            subject_index=subject,
        )
        return request_event(holed, worker, token_fp, (_HOLES["digest"], _HOLES["bytes"]))

    return _job_marked(_holed(build, _REQUEST_FILLS, str(Action.ATTEMPT_REQUEST), (worker, token_fp)))


def _read_template(job_id: str, reader: str) -> dict[str, Any] | None:
    """:func:`_holed` for the ``result.read`` event of ``job_id`` by ``reader``."""
    return _for_job(_read_base(reader), job_id)


@functools.lru_cache(maxsize=256)
def _read_base(reader: str) -> dict[str, Any] | None:
    """:func:`_read_template` for any job (its id :data:`_JOB_MARK`): made once per reader."""

    def build(subject: str | None) -> dict[str, Any]:
        return result_read_event(_JOB_MARK, reader, _HOLES["assistant"], _HOLES["outcome"], subject)

    return _job_marked(_holed(build, _READ_FILLS, str(Action.RESULT_READ), (reader,)))


#: The job id in a template made once for every job, and as its canonical JSON spells it.
_JOB_MARK = "\x01J"
_JOB_SPELLED = json.dumps(_JOB_MARK, ensure_ascii=False)


def _job_marked(holes: dict[str, Any] | None) -> dict[str, Any] | None:
    """``holes`` if the job's mark is in each of its two JSON texts exactly once (else None)."""
    if holes is None or any(holes[text].count(_JOB_SPELLED) != 1 for text in ("e_plain", "e_subject")):
        return None
    return holes


def _for_job(holes: dict[str, Any] | None, job_id: str) -> dict[str, Any] | None:
    """A template made for any job (:data:`_JOB_MARK`), for ``job_id``: the id put in its place in both JSON
    texts, spelled as the canonical JSON spells it. None if the id holds a hole's marker."""
    if holes is None or "\x01" in job_id:
        return None
    spelled = json.dumps(job_id, ensure_ascii=False)
    return {**holes, **{text: holes[text].replace(_JOB_SPELLED, spelled) for text in ("e_plain", "e_subject")}}


def _sealing_ctes(row: str, fills: dict[str, str], columns: str, seal_function: str, when: str = "true") -> str:
    """Two CTEs after the CTE ``row`` (one row, or none): ``e``, the content hash of the event :func:`_holed`
    templated, its holes filled (``fills``, then the subject index) and hashed as ``content_hash`` hashes
    (sha256 of CONTENT_TAG and the canonical JSON), for a row where ``when`` holds; and ``s``, the seal of
    that event (``columns``: its columns as ``jsonb_build_object`` pairs, the content hash added) and what
    it returns. The seal is in a target list: called once per row of ``e``, and not at all (no lock on the
    chain's head) when there is none."""
    filled = f"CASE WHEN {row}.subject_index IS NULL THEN %(e_plain)s::text ELSE %(e_subject)s::text END"
    for name, value in (*fills.items(), ("subject", f"coalesce(to_json({row}.subject_index)::text, '')")):
        filled = f"replace({filled}, %(h_{name})s::text, {value})"
    event = f"jsonb_build_array(jsonb_build_object({columns}, 'c', e.content))"
    return (  # our own names and expressions; every value travels as a parameter
        f"e AS (SELECT encode(sha256(%(e_tag)s::bytea || convert_to({filled}, 'UTF8')), 'hex') AS content "  # noqa: S608
        f"FROM {row} WHERE {when}), "
        "s AS MATERIALIZED (SELECT (sealed).first_seq, (sealed).last_seq, (sealed).last_hash FROM "
        f"(SELECT {seal_function}({event}) AS sealed FROM {row} CROSS JOIN e) AS x) "
    )


def _read_sql(job_sql: str, seal_function: str) -> str:
    """The job (``job_sql``: its viewed columns) and, when it holds an answer or an error and is what the
    reader's Admit lets through (``x_owner``, ``x_ended``: ``reads.Expect``, NULL for anything; the row's
    ``admitted``), the seal of its ``result.read`` event made from the row: one statement, so the read is on the
    record before its answer leaves the database."""
    columns = (
        "'i', 0, 'action', %(e_action)s::text, 'job_id', %(b_id)s::text, 'assistant_id', j.assistant_id, "
        "'actor', %(e_actor)s::text, 'outcome', j.status, 'subject_index', j.subject_index"
    )
    admitted = (  # what the reader's Admit lets through (reads.Expect): NULL, anything
        "(%(x_owner)s::text IS NULL OR j.actor = %(x_owner)s::text) "
        "AND (%(x_ended)s::text[] IS NULL OR j.status = ANY(%(x_ended)s::text[]))"
    )
    when = f"({admitted}) AND (j.answer IS NOT NULL OR j.error IS NOT NULL)"
    sealing = _sealing_ctes("j", _READ_FILLS, columns, seal_function, when)
    return (  # our own compiled statement and function name; every value travels as a parameter
        f"WITH j AS ({job_sql}), {sealing}"  # noqa: S608
        f"SELECT j.*, ({admitted}) AS admitted, e.content, s.first_seq, s.last_seq, s.last_hash "
        "FROM j LEFT JOIN e ON true LEFT JOIN s ON true"
    )


def _claim_requested_sql(claim_sql: str, seal_function: str) -> str:
    """The claim (``claim_sql``: of a job with a request digest), and the seal of its request event made from the
    row: one statement."""
    columns = (
        "'i', 0, 'action', %(e_action)s::text, 'job_id', %(b_id)s::text, 'assistant_id', c.assistant_id, "
        "'attempt', c.attempts, 'actor', %(b_worker)s::text, 'token_fp', %(e_token_fp)s::text, "
        "'request_digest', c.request_digest, 'request_bytes', c.request_bytes, 'subject_index', c.subject_index"
    )
    sealing = _sealing_ctes("c", _REQUEST_FILLS, columns, seal_function)
    return (  # our own compiled statement and function name; every value travels as a parameter
        f"WITH c AS ({claim_sql}), {sealing}"  # noqa: S608
        "SELECT c.*, e.content, s.first_seq, s.last_seq, s.last_hash FROM c CROSS JOIN e CROSS JOIN s"
    )


def _give_back(pooled: Any, connection: psycopg.Connection[Any]) -> None:
    """Roll back what is left open (no round trip when nothing is), leave autocommit, return to the pool."""
    try:
        connection.rollback()
        connection.autocommit = False
    except psycopg.Error as exc:
        pooled.invalidate(exc)
        return
    pooled.close()


def audit_sealed(settings: Settings, row: Any) -> None:
    """A commit sealed events (``row``: first_seq, last_seq, last_hash): anchor the head when it is due."""
    if row is not None and row.last_seq is not None and row.last_seq >= row.first_seq:
        after_seal(settings, Sealed(int(row.first_seq), int(row.last_seq), str(row.last_hash)))


def hot_path_for(engine: Engine, keyring: Keyring, settings: Settings) -> HotPath | None:
    """The hot path for ``engine`` if it is PostgreSQL on psycopg with the server-side seal (the runtime's
    engines are, once migrated); None elsewhere (SQLite): everything then goes through ``qbgw.store.jobs``."""
    if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
        return None
    if not getattr(engine.dialect, COMMIT_SEALS, False):
        return None
    return HotPath(engine, keyring, settings)
