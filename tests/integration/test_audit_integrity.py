"""Tamper evidence: each way of falsifying the audit log is named by verify, on SQLite and
PostgreSQL; and the log refuses UPDATE, DELETE and TRUNCATE."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from qbgw import admin, producer
from qbgw.audit import anchors as integrity
from qbgw.audit import events as audit
from qbgw.cli.main import cli
from qbgw.execution.tasks import run_attempt
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from qbgw.store import chain
from qbgw.store.models import AuditChainHead, AuditEvent
from tests.conftest import ASSISTANT, as_owner

JOBS = 6


@pytest.fixture(params=["sqlite", "postgres", "postgres-block"])
def backend(request: pytest.FixtureRequest) -> str:
    """Every tamper case on both databases, and on PostgreSQL with block sealing (QBGW_AUDIT_SEAL=block) too."""
    return str(request.param)


@pytest.fixture
def logged(settings: Settings) -> Settings:
    """Some jobs run to the end, then an anchor of the head."""
    for n in range(JOBS):
        job_id = producer.submit(ASSISTANT, [{"role": "user", "content": f"job {n}"}], settings=settings)
        run_attempt(runtime(settings), job_id)
    chain_staged(settings)
    with runtime(settings).transaction() as session:
        integrity.write_anchor(settings, *chain.head(session))
    return settings


def chain_staged(settings: Settings) -> None:
    """Chain what block sealing staged (a worker's sealer would); nothing to do otherwise."""
    runtime(settings).chain_staged()


def check(settings: Settings) -> integrity.VerifyReport:
    chain_staged(settings)  # as admin.verify_log does
    with runtime(settings).transaction() as session:
        return chain.verify(session, integrity.read_anchors(settings.anchor_path), integrity.anchor_key(settings))


def last_seq(settings: Settings) -> int:
    chain_staged(settings)
    with runtime(settings).transaction() as session:
        return chain.head(session)[0]


def row(connection: Connection, seq: int) -> dict[str, Any]:
    """An event as the application reads it (typed: timestamps are datetimes)."""
    table = AuditEvent.__table__
    return dict(connection.execute(select(table).where(table.c.seq == seq)).mappings().one())


def test_an_untouched_log_verifies(logged: Settings) -> None:
    report = check(logged)
    assert report.ok
    assert report.events == last_seq(logged) >= JOBS * 4
    assert report.anchors == 1


def test_a_changed_byte_is_named(logged: Settings, owner_url: str) -> None:
    with as_owner(owner_url) as db:
        db.execute(text("UPDATE audit_events SET latency_ms = latency_ms + 1 WHERE seq = 7"))
    problem = check(logged).problem
    assert problem is not None
    assert problem.seq == 7
    assert "altered" in problem.message


def test_a_deleted_event_is_named(logged: Settings, owner_url: str) -> None:
    with as_owner(owner_url) as db:
        db.execute(text("DELETE FROM audit_events WHERE seq = 5"))
    problem = check(logged).problem
    assert problem is not None
    assert problem.seq == 5
    assert "missing" in problem.message


def _renumber(db: Connection, from_seq: int, by: int) -> None:
    # Two steps, so that the unique index on seq never sees two equal values.
    db.execute(text("UPDATE audit_events SET seq = -seq WHERE seq >= :s"), {"s": from_seq})
    db.execute(text("UPDATE audit_events SET seq = -seq + :by WHERE seq < 0"), {"by": by})


def test_an_inserted_event_is_named_even_with_a_valid_hash(logged: Settings, owner_url: str) -> None:
    with as_owner(owner_url) as db:
        forged = row(db, 4)
        _renumber(db, 5, 1)
        forged.update(id=None, seq=5, actor="intruder", prev_hash=forged["row_hash"])
        forged["row_hash"] = audit.chain_hash(forged["prev_hash"], forged)
        forged.pop("id")
        db.execute(insert(AuditEvent.__table__).values(**forged))
    problem = check(logged).problem
    assert problem is not None
    assert problem.seq == 5
    assert "inserted" in problem.message


def test_two_swapped_events_are_named(logged: Settings, owner_url: str) -> None:
    with as_owner(owner_url) as db:
        db.execute(text("UPDATE audit_events SET seq = -1 WHERE seq = 8"))
        db.execute(text("UPDATE audit_events SET seq = 8 WHERE seq = 9"))
        db.execute(text("UPDATE audit_events SET seq = 9 WHERE seq = -1"))
    problem = check(logged).problem
    assert problem is not None
    assert problem.seq == 8
    assert "does not follow" in problem.message


def _recompute_from(db: Connection, seq: int) -> None:
    prev = row(db, seq - 1)["row_hash"]
    for current in range(seq, db.execute(text("SELECT max(seq) FROM audit_events")).scalar_one() + 1):
        values = row(db, current)
        values["prev_hash"] = prev
        prev = audit.chain_hash(prev, values)
        db.execute(
            text("UPDATE audit_events SET prev_hash = :p, row_hash = :h WHERE seq = :s"),
            {"p": values["prev_hash"], "h": prev, "s": current},
        )
    db.execute(text("UPDATE audit_chain_head SET row_hash = :h"), {"h": prev})


def test_a_whole_chain_recomputed_by_someone_with_database_access_is_caught_by_the_anchor(
    logged: Settings, owner_url: str
) -> None:
    with as_owner(owner_url) as db:
        db.execute(text("UPDATE audit_events SET actor = 'someone-else' WHERE seq = 6"))
        _recompute_from(db, 6)
    report = check(logged)
    top = last_seq(logged)
    assert report.problem is not None
    assert report.problem.seq == top
    assert "does not match the signed anchor" in report.problem.message
    assert "rewritten" in report.problem.message


def test_a_truncated_tail_is_caught_by_the_anchor(logged: Settings, owner_url: str) -> None:
    top = last_seq(logged)
    with as_owner(owner_url) as db:
        db.execute(text("DELETE FROM audit_events WHERE seq > :s"), {"s": top - 3})
    problem = check(logged).problem
    assert problem is not None
    assert problem.seq == top - 2
    assert "truncated tail" in problem.message


def test_an_altered_anchor_file_is_named(logged: Settings) -> None:
    path = logged.anchor_path
    path.write_text(path.read_text().replace('"seq": ', '"seq": 1', 1))
    problem = check(logged).problem
    assert problem is not None
    assert problem.seq is None
    assert "anchor line 1 has a bad signature" in problem.message


def test_anchors_are_written_every_n_events(settings: Settings) -> None:
    every = settings.with_(audit_anchor_events=5)
    for n in range(4):
        job_id = producer.submit(ASSISTANT, [{"role": "user", "content": f"job {n}"}], settings=every)
        run_attempt(runtime(every), job_id)
    last = last_seq(every)  # (block sealing: chains what was staged, as the worker's sealer would)
    anchors = integrity.read_anchors(every.anchor_path)
    seqs = [a.seq for a in anchors]
    assert seqs == sorted(seqs)
    if every.audit_seal == "block":
        # One seal chained the whole block of 4 jobs: one anchor at its end, covering every event.
        assert seqs == [last]
        return
    assert len(anchors) >= last // 5 - 1
    assert all(later - earlier <= 5 + 4 for earlier, later in zip([0, *seqs], seqs, strict=False))


REFUSALS: list[tuple[str, Callable[[str], str]]] = [
    ("UPDATE", lambda t: f"UPDATE {t} SET actor = 'x'"),
    ("DELETE", lambda t: f"DELETE FROM {t}"),
    ("TRUNCATE", lambda t: f"TRUNCATE {t}"),
]


@pytest.mark.parametrize(("verb", "sql"), REFUSALS)
def test_the_log_refuses_changes_even_from_its_owner(
    logged: Settings, owner_url: str, verb: str, sql: Callable[[str], str]
) -> None:
    engine = create_engine(owner_url)
    if engine.dialect.name == "sqlite" and verb == "TRUNCATE":
        pytest.skip("SQLite has no TRUNCATE (DELETE covers it)")
    try:
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
            connection.execute(text(sql("audit_events")))
    finally:
        engine.dispose()
    assert check(logged).ok


# --- format v2 and the PostgreSQL commit that seals ------------------------------------------------


def _note(session: Any, actor: str) -> None:
    audit.record(session=session, action=audit.Action.AUDIT_QUERIED, job_id=None, actor=actor, detail={"n": 1})


@pytest.mark.parametrize("backend", ["postgres"])
def test_postgres_seals_in_the_commit_itself(logged: Settings) -> None:
    before = last_seq(logged)
    with runtime(logged).transaction() as session:
        _note(session, "first")
        _note(session, "second")
        staged = chain.seal_at_commit(session)
        assert isinstance(staged, chain.Staged)
        assert staged.sealed is None
    assert staged.sealed == audit.Sealed(before + 1, before + 2, admin.head_hash(logged))
    assert check(logged).ok


@pytest.mark.parametrize("backend", ["postgres"])
def test_staged_events_of_a_rolled_back_transaction_are_never_sealed(logged: Settings) -> None:
    before = last_seq(logged)

    def fails_after_staging() -> None:
        with runtime(logged).transaction() as session:
            _note(session, "rolled-back")
            chain.seal_at_commit(session)
            raise RuntimeError("the change fails")

    with pytest.raises(RuntimeError, match="the change fails"):
        fails_after_staging()
    with runtime(logged).transaction() as session:  # the same pooled connection, most likely
        _note(session, "kept")
    with runtime(logged).transaction() as session:
        actors = session.scalars(select(AuditEvent.actor).where(AuditEvent.seq > before)).all()
    assert actors == ["kept"]
    assert check(logged).ok


def test_events_in_older_formats_before_their_boundaries_still_verify(settings: Settings, owner_url: str) -> None:
    """A database chained before formats v2 and v3 keeps its v1 and v2 events; new ones follow them in v3."""
    with runtime(settings).transaction() as session:
        for _ in range(4):
            _note(session, "older-to-be")
    chain_staged(settings)
    with as_owner(owner_url) as db:  # rewrite 1-2 as format v1 made them and 3-4 as v2, with the boundaries
        prev = "0" * 64
        for seq, rehash in (
            (1, audit.chain_hash_v1),
            (2, audit.chain_hash_v1),
            (3, audit.chain_hash_v2),
            (4, audit.chain_hash_v2),
        ):
            db.execute(text("UPDATE audit_events SET prev_hash = :p WHERE seq = :s"), {"p": prev, "s": seq})
            prev = rehash(prev, row(db, seq))
            db.execute(text("UPDATE audit_events SET row_hash = :h WHERE seq = :s"), {"h": prev, "s": seq})
        db.execute(text("UPDATE audit_chain_head SET row_hash = :h, v2_from = 3, v3_from = 5"), {"h": prev})
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": "after the boundary"}], settings=settings)
    run_attempt(runtime(settings), job_id)
    report = check(settings)
    assert report.ok
    assert report.events == last_seq(settings) > 4
    for v2_from, v3_from, bad in ((1, 5, 1), (3, 3, 3), (3, 7, 5)):  # a boundary moved: those events fail
        with as_owner(owner_url) as db:
            db.execute(text("UPDATE audit_chain_head SET v2_from = :a, v3_from = :b"), {"a": v2_from, "b": v3_from})
        problem = check(settings).problem
        assert problem is not None, (v2_from, v3_from)
        assert problem.seq == bad, (v2_from, v3_from)
        assert "altered" in problem.message, (v2_from, v3_from)


def test_event_times_follow_the_chain_order_whatever_the_writers_noted(settings: Settings) -> None:
    """The seal gives every event its time under the chain head's lock: a transaction that began long ago
    (a bulk cancel) still sorts its events after those committed before it, by seq and by time alike."""
    with runtime(settings).transaction() as early:
        _note(early, "began first, commits last")
        time.sleep(0.01)
        with runtime(settings).transaction() as other:
            _note(other, "began second, commits first")
    chain_staged(settings)
    with runtime(settings).transaction() as session:
        times = session.execute(select(AuditEvent.seq, AuditEvent.occurred_at).order_by(AuditEvent.seq)).all()
    assert [t for _, t in times] == sorted(t for _, t in times)
    with runtime(settings).transaction() as session:
        head = session.execute(select(AuditChainHead.last_at)).scalar_one()
    assert head == times[-1][1]


def _stray(db: Connection, top: int) -> None:
    """A row linked to the head, inserted past it by hand (no seal: the head row does not move)."""
    forged = row(db, top)
    forged.update(seq=top + 1, actor="intruder", prev_hash=forged["row_hash"])
    forged["row_hash"] = audit.chain_hash(forged["prev_hash"], forged)
    forged.pop("id")
    db.execute(insert(AuditEvent.__table__).values(**forged))


def test_a_row_past_the_head_is_named_and_never_anchored(logged: Settings, owner_url: str) -> None:
    top = last_seq(logged)
    with as_owner(owner_url) as db:
        _stray(db, top)
    problem = check(logged).problem
    assert problem is not None
    assert problem.seq == top + 1
    assert f"inserted past the chain's head (seq {top})" in problem.message
    # the anchorer signs the head the seals moved, not the table's highest row
    assert admin.anchor_now(settings=logged).seq == top
    # the verification is reported even though its own event cannot take the seq the stray row holds
    report = admin.verify_log(settings=logged)
    assert report.problem is not None
    assert report.problem.seq == top + 1


def test_a_truncated_tail_past_the_last_anchor_is_named_by_the_head(settings: Settings, owner_url: str) -> None:
    for n in range(2):
        run_attempt(
            runtime(settings), producer.submit(ASSISTANT, [{"role": "user", "content": f"{n}"}], settings=settings)
        )
    top = last_seq(settings)
    with as_owner(owner_url) as db:
        db.execute(text("DELETE FROM audit_events WHERE seq > :s"), {"s": top - 2})
    problem = check(settings).problem
    assert problem is not None
    assert problem.seq == top - 1
    assert f"events seq {top - 1} to {top} are missing" in problem.message


def test_a_line_removed_from_the_anchor_file_is_named(logged: Settings) -> None:
    admin.anchor_now(settings=logged)
    admin.anchor_now(settings=logged)
    path = logged.anchor_path
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 3
    assert all('"prev": ' in line for line in lines)
    assert check(logged).ok
    path.write_text(lines[0] + lines[2])  # the middle one
    problem = check(logged).problem
    assert problem is not None
    assert problem.seq is None
    assert "anchor line 2 does not follow line 1" in problem.message
    path.write_text(lines[1] + lines[2])  # the first one
    problem = check(logged).problem
    assert problem is not None
    assert "anchor line 1 links to a line before it that is not in the file" in problem.message
    path.write_text(lines[0] + lines[1])  # the last one: nothing links to it (docs/audit.md says so)
    assert check(logged).ok


def test_verify_names_the_newest_anchor_and_warns_when_there_is_none(logged: Settings) -> None:
    env = logged.to_env()
    told = CliRunner().invoke(cli, ["audit", "verify"], env=env)
    assert told.exit_code == 0, told.output
    newest = integrity.last_anchor(logged.anchor_path)
    assert newest is not None
    assert f"the newest signs seq {newest.seq}, at {newest.at}" in told.stdout
    assert "warning" not in told.stderr
    logged.anchor_path.unlink()
    told = CliRunner().invoke(cli, ["audit", "verify"], env=env)
    assert told.exit_code == 0
    assert told.stdout.startswith("ok: ")
    assert "warning: no anchor: nothing outside the database vouches for these events" in told.stderr


def test_a_lost_anchor_key_is_named_not_replaced(logged: Settings) -> None:
    if logged.anchor_key:
        pytest.skip("the key is given in QBGW_ANCHOR_KEY here, not kept in a file")
    key = logged.anchor_path.with_suffix(".key")
    key.unlink()
    told = CliRunner().invoke(cli, ["audit", "verify"], env=logged.to_env())
    assert told.exit_code == 7, told.output
    assert f"the audit anchor key {key} is missing" in told.stderr
    assert not key.exists()  # not made anew: that would make every anchor look forged
