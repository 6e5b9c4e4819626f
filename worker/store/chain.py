"""Chain: the audit log's SQL. Events staged by ``audit.events.record`` are chained and inserted when their
transaction commits (on PostgreSQL by ``qbgw_audit_seal`` in the COMMIT's own round trip), read back as
records, and walked for verification; the head is anchored as it grows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace
from typing import Any

from psycopg import sql
from sqlalchemy import Connection, Engine, event, func, insert, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.util import identity_key

from ..audit.anchors import Anchor, after_seal, write_anchor
from ..audit.events import CHAINED, CONTENT, OPTIONAL, PENDING, AuditRecord, Sealed, content_hash, link_hash, stamp
from ..audit.verify import Problem, VerifyReport, check
from ..lifecycle import utcnow
from ..settings import Settings
from .models import GENESIS, AuditChainHead, AuditEvent, Job

__all__ = [
    "seal",
    "seal_at_commit",
    "chain_staged",
    "may_stage",
    "SEAL_BLOCK",
    "STAGE_AND_COMMIT_SQL",
    "COMMIT_STAGES",
    "seal_argument",
    "fill_subjects",
    "install_commit_seal",
    "install_hooks",
    "discard",
    "Staged",
    "COMMIT_SEALS",
    "SEAL_AND_COMMIT_SQL",
    "events_for_job",
    "to_record",
    "head",
    "Anchorer",
    "verify",
]


def seal(session: Session) -> Sealed | None:
    """Chain and insert the session's pending events now; returns what was added, or None.

    Locks the chain head row until the transaction ends, so concurrent transactions chain in
    the order they commit, and stamps the events with the time under that lock, so their times
    follow the same order. The content hashes are computed before the lock is taken.
    """
    pending = session.info.pop(PENDING, None)
    if not pending:
        return None
    fill_subjects(session, pending)
    contents = [content_hash(event) for event in pending]
    head = session.execute(select(AuditChainHead).where(AuditChainHead.id == 1).with_for_update()).scalar_one()
    # The time under the lock, never behind the chain's last (a clock stepped back): occurred_at follows seq.
    at = utcnow() if head.last_at is None else max(utcnow(), head.last_at)
    seq, prev, spelled = head.seq, head.row_hash, stamp(at)
    for staged, content in zip(pending, contents, strict=True):
        seq += 1
        staged["seq"], staged["prev_hash"], staged["occurred_at"] = seq, prev, at
        staged["row_hash"] = prev = link_hash(prev, seq, spelled, content)
    session.execute(insert(AuditEvent), pending)
    first = head.seq + 1
    head.seq, head.row_hash, head.last_at = seq, prev, at
    session.flush()
    return Sealed(first, seq, prev)


@dataclass
class Staged:
    """Events handed to the transaction's COMMIT (PostgreSQL); ``sealed`` is set once it ran."""

    payload: str
    sealed: Sealed | None = None


#: Where a pooled PostgreSQL connection keeps the events its next COMMIT must seal first.
STAGED = "qbgw_audit_staged"


#: Set on a dialect whose commits seal staged events (see :func:`install_commit_seal`).
COMMIT_SEALS = "qbgw_commit_seals"


#: The seal (lock the head, link and insert the events, move the head: ``qbgw_audit_seal``, which a migration
#: made) and the COMMIT, as one simple-protocol query: one message, one round trip. The events are a literal
#: (quoted by psycopg), as the simple protocol takes no parameters.
SEAL_AND_COMMIT_SQL = sql.SQL("SELECT first_seq, last_seq, last_hash FROM qbgw_audit_seal({}::jsonb); COMMIT")

#: Block sealing (``QBGW_AUDIT_SEAL=block``): the events are staged in ``audit_pending`` by the COMMIT's query
#: instead (``qbgw_audit_stage``: the same argument and columns, all NULL), with no lock, for the sealer.
STAGE_AND_COMMIT_SQL = sql.SQL("SELECT first_seq, last_seq, last_hash FROM qbgw_audit_stage({}::jsonb); COMMIT")

#: Set on a dialect whose commits stage events for the block sealer instead of sealing them.
COMMIT_STAGES = "qbgw_commit_stages"

#: Staged rows a sealer chains per transaction (one head lock and one flush for all of them).
SEAL_BLOCK = 500

_ANY_PENDING = text("SELECT 1 FROM audit_pending ORDER BY id LIMIT 1")
_SEAL_PENDING = text(
    "SELECT first_seq, last_seq, last_hash, sealed_rows FROM qbgw_audit_seal_pending(CAST(:rows AS integer))"
)


def seal_at_commit(session: Session) -> Sealed | Staged | None:
    """Called just before the transaction commits: on PostgreSQL (with :func:`install_commit_seal`),
    hash the pending events and stage them for the COMMIT, which sends one ``qbgw_audit_seal``
    call in the same round trip, so the head's row lock is held for no client round trip at all;
    elsewhere, :func:`seal` them now."""
    if not getattr(session.get_bind().dialect, COMMIT_SEALS, False):
        return seal(session)
    pending = session.info.pop(PENDING, None)
    if not pending:
        return None
    fill_subjects(session, pending)
    staged = Staged(seal_argument(pending))
    session.connection().connection.info[STAGED] = staged
    return staged


def fill_subjects(session: Session, pending: list[dict[str, Any]]) -> None:
    """Give each event whose maker left its subject index out (``audit.events.UNKNOWN``) its job's: from a job
    this session holds, else read in one query per 500 jobs (events without a job have none)."""
    wanted: dict[str, str | None] = {}
    missing: set[str] = set()
    for staged in pending:
        job_id = staged.get("job_id")
        if "subject_index" in staged or job_id is None or job_id in wanted:
            continue
        held = session.identity_map.get(identity_key(Job, job_id))
        if held is not None and "subject_index" in held.__dict__:
            wanted[job_id] = held.subject_index
        else:
            missing.add(job_id)
    listed = sorted(missing)
    for start in range(0, len(listed), 500):
        chunk = listed[start : start + 500]
        wanted.update({job_id: None for job_id in chunk})
        for job_id, index in session.execute(select(Job.id, Job.subject_index).where(Job.id.in_(chunk))):
            wanted[job_id] = index
    for staged in pending:
        if "subject_index" not in staged:
            job_id = staged.get("job_id")
            staged["subject_index"] = None if job_id is None else wanted.get(job_id)


def seal_argument(pending: list[dict[str, Any]]) -> str:
    """The events as ``qbgw_audit_seal`` takes them (a JSON array, in chain order): each event's columns,
    its position ``i`` and its content hash ``c``, hashed here, before the chain head is locked (the function
    gives them their seq and time under the lock)."""
    rows = []
    for i, pending_event in enumerate(pending):
        row = {name: pending_event[name] for name in CONTENT}
        row["subject_index"] = pending_event.get("subject_index")
        row["i"], row["c"] = i, content_hash(pending_event)
        rows.append(row)
    return json.dumps(rows, separators=(",", ":"))


def install_commit_seal(engine: Engine, *, block: bool = False) -> None:
    """On PostgreSQL, make ``engine``'s COMMIT seal the events staged by :func:`seal_at_commit`:
    ``qbgw_audit_seal(...)`` and COMMIT go out together (one query), so the chain head is locked
    only while the server runs them, never while this process waits for the GIL. With ``block``, the COMMIT
    stages them in ``audit_pending`` instead (``qbgw_audit_stage``), for :func:`chain_staged` to chain."""
    dialect = engine.dialect
    if dialect.name != "postgresql" or getattr(dialect, COMMIT_SEALS, False):
        return
    plain_commit, plain_rollback = dialect.do_commit, dialect.do_rollback
    seal_and_commit = STAGE_AND_COMMIT_SQL if block else SEAL_AND_COMMIT_SQL

    def do_commit(connection: Any) -> None:
        staged: Staged | None = connection.info.pop(STAGED, None)
        if staged is None:
            plain_commit(connection)
            return
        # Not psycopg's pipeline mode (seal, then COMMIT, in one pipeline): it did the same in one round
        # trip too, but its client side cost 2.5x the CPU of one query (measured), 14% of a worker's.
        # An error in the seal aborts the rest of the query: the COMMIT does not run, the caller rolls back.
        cursor = connection.dbapi_connection.cursor()
        cursor.execute(seal_and_commit.format(sql.Literal(staged.payload)))
        first, last, row_hash = cursor.fetchone()
        staged.sealed = None if last is None else Sealed(int(first), int(last), str(row_hash))

    def do_rollback(connection: Any) -> None:
        connection.info.pop(STAGED, None)  # the events describe nothing that happened
        plain_rollback(connection)

    dialect.do_commit = do_commit  # type: ignore[method-assign, assignment]
    dialect.do_rollback = do_rollback  # type: ignore[method-assign, assignment]
    setattr(dialect, COMMIT_SEALS, True)
    setattr(dialect, COMMIT_STAGES, block)


def may_stage(bind: Engine | Connection) -> bool:
    """Whether events can be staged for the block sealer on this database: PostgreSQL only (SQLite always seals
    at commit). Staged rows may come from any process of the fleet in block mode, whatever this one's mode."""
    return bind.dialect.name == "postgresql"


def chain_staged(session: Session) -> Sealed | None:
    """Chain every event staged for the block sealer (``QBGW_AUDIT_SEAL=block``), in blocks of
    :data:`SEAL_BLOCK` transactions; None when nothing was staged, or when this database never stages (the
    events of a committed transaction are then chained already).

    The head stays locked until ``session``'s transaction ends, so give it a transaction of its own and commit
    at once (the sealer does; readers call ``Runtime.chain_staged`` before they open theirs): a read in a
    later transaction then sees the whole chain, every event committed before this call. Its commit anchors
    the head when due (see :func:`install_hooks`). Events staged by processes in block mode are chained by any
    process, whatever its own mode: a reader or a verification in commit mode chains them too.
    """
    if not may_stage(session.get_bind()) or session.execute(_ANY_PENDING).first() is None:
        return None  # (no lock taken: a commit-mode fleet's readers never wait for the head)
    first: int | None = None
    last: Sealed | None = None
    while True:
        row = session.execute(_SEAL_PENDING, {"rows": SEAL_BLOCK}).one()
        if row.last_seq is not None:
            first = int(row.first_seq) if first is None else first
            last = Sealed(first, int(row.last_seq), str(row.last_hash))
        if row.sealed_rows < SEAL_BLOCK:
            break
    if last is not None:
        session.info[_CHAINED_STAGED] = last
    return last


_CHAINED_STAGED = "qbgw_chained_staged"


def discard(session: Session) -> None:
    """The transaction rolled back: its events describe nothing that happened."""
    session.info.pop(PENDING, None)


def events_for_job(*, session: Session, job_id: str) -> list[AuditRecord]:
    """The job's events, oldest first (including those this transaction has not sealed yet). Events staged for
    the block sealer are not read: the caller chains them first, before this transaction (``Runtime.chain_staged``)."""
    seal(session)
    rows = session.scalars(select(AuditEvent).where(AuditEvent.job_id == job_id).order_by(AuditEvent.seq))
    return [to_record(row) for row in rows]


def to_record(row: AuditEvent) -> AuditRecord:
    return AuditRecord(
        seq=row.seq,
        occurred_at=row.occurred_at,
        action=row.action,
        job_id=row.job_id,
        batch_id=row.batch_id,
        assistant_id=row.assistant_id,
        attempt=row.attempt,
        actor=row.actor,
        token_fp=row.token_fp,
        outcome=row.outcome,
        http_status=row.http_status,
        error_class=row.error_class,
        latency_ms=row.latency_ms,
        request_digest=row.request_digest,
        request_bytes=row.request_bytes,
        response_digest=row.response_digest,
        response_bytes=row.response_bytes,
        detail=json.loads(row.detail) if row.detail else {},
        subject_index=row.subject_index,
    )


_SEALED = "qbgw_sealed"


def install_hooks(factory: sessionmaker[Session], settings: Settings) -> None:
    """Seal audit events just before every commit; anchor the head every N events after it."""

    bind = factory.kw.get("bind")
    if bind is not None:
        install_commit_seal(bind, block=settings.audit_seal == "block")

    def before_commit(session: Session) -> None:
        session.info[_SEALED] = seal_at_commit(session)

    def after_commit(session: Session) -> None:
        sealed = session.info.pop(_SEALED, None)
        after_seal(settings, sealed.sealed if isinstance(sealed, Staged) else sealed)
        after_seal(settings, session.info.pop(_CHAINED_STAGED, None))

    def after_rollback(session: Session) -> None:
        session.info.pop(_SEALED, None)
        session.info.pop(_CHAINED_STAGED, None)
        discard(session)

    event.listen(factory, "before_commit", before_commit)
    event.listen(factory, "after_commit", after_commit)
    event.listen(factory, "after_rollback", after_rollback)


def head(session: Session) -> tuple[int, str]:
    """The chain's last (seq, hash): the head row, which every seal updates under its lock, not the table's
    highest seq, which any row inserted past the head (never sealed) would be: an anchor must not sign one.
    Events staged for the block sealer count once chained: the caller chains them first, before this
    transaction (``Runtime.chain_staged``)."""
    row = session.execute(select(AuditChainHead.seq, AuditChainHead.row_hash).where(AuditChainHead.id == 1)).first()
    if row is not None:
        return int(row.seq), str(row.row_hash)
    last = session.execute(select(AuditEvent.seq, AuditEvent.row_hash).order_by(AuditEvent.seq.desc()).limit(1)).first()
    return (last.seq, last.row_hash) if last else (0, GENESIS)


def past_head(session: Session) -> tuple[int, int | None]:
    """The head's seq, and the first seq of a row stored past it (inserted, never sealed: a seal moves the head in
    the transaction that inserts), or None; in one statement, so a commit in between cannot look like one."""
    stray = select(func.min(AuditEvent.seq)).where(AuditEvent.seq > AuditChainHead.seq).scalar_subquery()
    row = session.execute(select(AuditChainHead.seq, stray).where(AuditChainHead.id == 1)).first()
    if row is None:  # no head row (never on a migrated database): the table's end is the chain's
        return head(session)[0], None
    return int(row[0]), None if row[1] is None else int(row[1])


class Anchorer:
    """Writes an anchor every ``audit_anchor_seconds`` even when nothing happens, so that a
    truncated tail cannot hide behind silence (CloudTrail's hourly digests do the same)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._last = 0.0

    def due(self) -> bool:
        """Whether the next :meth:`tick` writes an anchor."""
        return time.monotonic() - self._last >= self.settings.audit_anchor_seconds

    def tick(self, session: Session) -> Anchor | None:
        if not self.due():
            return None
        self._last = time.monotonic()
        return write_anchor(self.settings, *head(session))


def verify(
    session: Session, anchors: list[Anchor], key: bytes, progress: Callable[[int, int], None] | None = None
) -> VerifyReport:
    """Recompute the whole chain in order and check it against ``anchors`` (``audit.verify.check``).
    ``progress(checked, last_seq)`` is called every :data:`PROGRESS_EVERY` events read, and at the end."""
    starts = session.execute(select(AuditChainHead.v2_from, AuditChainHead.v3_from).where(AuditChainHead.id == 1))
    v2_from, v3_from = starts.first() or (1, 1)
    after = max((a.seq for a in anchors if a.kind == "base"), default=0)
    # The chain ends at the head row, which every seal moves (the anchors, read before, are at or before it); a
    # row past it was inserted, never sealed, linked or not. The walk stops at the head.
    last, stray = past_head(session)
    rows = _rows(session, after=after, through=last)
    counted = rows if progress is None else _counted(rows, progress, last - after)
    try:
        report = check(counted, anchors, key, v2_from=v2_from, v3_from=v3_from)
    finally:
        rows.close()  # closes the server-side cursor when the walk stops early
    walked = after + report.events
    if report.ok and walked < last:  # the head row was moved by the seals that made them: they were there
        found = Problem(walked + 1, f"events seq {walked + 1} to {last} are missing: the chain's head is seq {last}")
        return replace(report, problem=found)
    if report.ok and stray is not None:
        found = Problem(
            stray, f"event seq {stray} was inserted past the chain's head (seq {last}): no seal put it there"
        )
        return replace(report, problem=found)
    return report


#: How often a verification reports its progress, in events.
PROGRESS_EVERY = 2000


def _counted(rows: Iterator[Any], progress: Callable[[int, int], None], total: int) -> Generator[Any]:
    done = 0
    for row in rows:
        yield row
        done += 1
        if done % PROGRESS_EVERY == 0:
            progress(done, total)
    progress(done, total)


def _rows(session: Session, after: int = 0, through: int | None = None) -> Generator[Any]:
    columns = [getattr(AuditEvent, name) for name in (*CHAINED, *OPTIONAL, "prev_hash", "row_hash")]
    query = select(*columns).where(AuditEvent.seq > after).order_by(AuditEvent.seq)
    if through is not None:
        query = query.where(AuditEvent.seq <= through)
    result = session.execute(query.execution_options(yield_per=20_000))
    try:
        yield from result.mappings()
    finally:
        result.close()
